"""Peak-memory measurement shared by the benchmark scripts (``step_time.py``, ``precision_throughput.py``).

CUDA: bytes allocated by PyTorch's caching allocator. CPU: the process's resident set from
``/proc/self/status`` (Linux), whose peak ``VmHWM`` :func:`reset_peak` restarts from the current RSS
(Linux >= 4.0); elsewhere the CPU peak is ``ru_maxrss``, the whole process's peak so far.
"""

from __future__ import annotations

import resource

import torch


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak(device: torch.device) -> None:
    """Restart the peak from the current usage (on CPU only where Linux allows it)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def current_bytes(device: torch.device) -> int:
    """CUDA: allocated now. CPU: resident now (0 where ``/proc`` is missing)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status_bytes("VmRSS") or 0


def peak_bytes(device: torch.device) -> int:
    """CUDA: peak allocated since :func:`reset_peak`. CPU: peak resident since then (Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
