"""The fused frozen step of :class:`~lightning_l2l.nets.CoordinatewiseLSTM` on CPU: a small C kernel.

The eager network spends most of a frozen step outside its FLOPs: skinny ``(n, 22) x (22, 80)``
products, a dozen elementwise passes over ``(n, 80)`` gates, and the state stacked and copied back
(``benchmarks/step_time.py``). ``_kernels/lstm_step.c`` does one coordinate at a time in
registers and writes the state in place, so a step costs its FLOPs, the gates' activations and one
pass over the state. It is built here with the system C compiler (``cc``, or ``$CC``) at its first
use, for this CPU (``-march=native``), into a cache directory (``$L2L_KERNEL_CACHE``, else
``~/.cache/lightning_l2l/kernels``), and loaded with :mod:`ctypes`. Without a compiler, on other
devices and dtypes, or with gradients on, the eager network runs: same updates to float32
rounding (``tests/test_fused.py``).

A call releases the GIL (ctypes does), so a run of coordinates is split over
``torch.get_num_threads()`` Python threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_l2l.nets.lstm import CoordinatewiseLSTM

__all__ = ["fused_lstm_status", "fused_lstm_step", "fused_lstm_supports"]

_SOURCE = Path(__file__).with_name("_kernels") / "lstm_step.c"
#: floats per vector lane group the packed weights are padded to (the widest vector the kernel uses)
_PAD = 16
#: fewest coordinates worth a thread of their own
_MIN_PER_THREAD = 4096
_FLAGS = (["-O3", "-march=native"], ["-O3"])  # the first that builds wins (some compilers refuse -march=native)
_P = ctypes.c_void_p


def _cache_dir() -> Path:
    root = os.environ.get("L2L_KERNEL_CACHE")
    if root:
        return Path(root)
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(home) / "lightning_l2l" / "kernels"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags (a shared cache may serve several machines)."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features", "CPU part")):
                    text += line
                if line.strip() == "":
                    break  # the first processor is enough
    except OSError:
        pass
    return text


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name.split()[0]):
            return name
    return None


@functools.cache
def _library(hidden: int, layers: int, nin: int) -> tuple[ctypes._CFuncPtr | None, str]:  # type: ignore[name-defined]
    """``(the kernel's entry point, "")`` for this network shape, or ``(None, why not)``."""
    if sys.platform == "win32":
        return None, "the fused kernel is built with a Unix C compiler; not on Windows"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (install gcc or clang, or set CC)"
    source = _SOURCE.read_bytes()
    defines = [f"-DH={hidden}", f"-DL={layers}", f"-DNIN={nin}"]
    errors = []
    for flags in _FLAGS:
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags + defines).encode(),
                                         _cpu_id().encode()])).hexdigest()[:20]
        target = _cache_dir() / f"lstm_step_{key}.so"
        if not target.exists():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
                os.close(fd)
                cmd = [*cc.split(), *flags, *defines, "-shared", "-fPIC", "-o", tmp, str(_SOURCE), "-lm"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
                if out.returncode != 0:
                    os.unlink(tmp)
                    errors.append(f"{' '.join(cmd)}: {out.stderr.strip()[-500:]}")
                    continue
                os.replace(tmp, target)  # atomic: processes building at once do not see half a file
            except (OSError, subprocess.SubprocessError) as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as err:
            errors.append(f"loading {target}: {err}")
            continue
        fn = lib.l2l_lstm_step
        fn.argtypes = [ctypes.c_int64, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_float, ctypes.c_float, ctypes.c_float]
        fn.restype = None
        return fn, ""
    return None, "building the fused kernel failed: " + " | ".join(errors)


def _shape(rule: CoordinatewiseLSTM) -> tuple[int, int, int]:
    return rule.hidden_size, rule.num_layers, 2 if rule.preprocessing == "log_sign" else 1


def fused_lstm_status(rule: CoordinatewiseLSTM | None = None) -> str | None:
    """``None`` if the fused kernel runs here (for ``rule``'s shape, default the paper's), else why not.

    Builds the kernel if it is not built yet.
    """
    shape = _shape(rule) if rule is not None else (20, 2, 2)
    return _library(*shape)[1] or None


def fused_lstm_supports(rule: CoordinatewiseLSTM, grad: Tensor, state: Tensor) -> bool:
    """Whether :func:`fused_lstm_step` computes this call (else the eager network must)."""
    weight = rule.out.weight
    return (
        state.device.type == "cpu"
        and state.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and grad.device.type == "cpu"
        and grad.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and state.is_contiguous()
        and state.shape[1:] == (rule.num_layers, 2, rule.hidden_size)
        and not (torch.is_grad_enabled() and (grad.requires_grad or state.requires_grad or weight.requires_grad))
        and _library(*_shape(rule))[0] is not None
    )


# the packed weights of each rule, rebuilt when a weight changes (by identity or in place)
_packed: weakref.WeakKeyDictionary[CoordinatewiseLSTM, tuple[tuple[int, ...], tuple[Tensor, ...]]] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _weights(rule: CoordinatewiseLSTM) -> tuple[Tensor, ...]:
    """``(w, b, act, wo)`` as the kernel reads them (``_kernels/lstm_step.c``, its Args)."""
    params = list(rule.parameters())
    key = tuple(x for p in params for x in (id(p), p.data_ptr(), p._version))
    with _lock:
        hit = _packed.get(rule)
        if hit is not None and hit[0] == key:
            return hit[1]
    hidden = rule.hidden_size
    width = -(-4 * hidden // _PAD) * _PAD
    # a gate's activation is a * sigmoid(s z) + c: sigmoid for i, f, o (s = a = 1, c = 0), and for the cell
    # input g tanh(z) = 2 sigmoid(2 z) - 1; the kernel takes -s z, so the weights and biases are packed times
    # -s (exact: a power of two)
    s = torch.ones(width)
    s[3 * hidden : 4 * hidden] = 2.0
    a, c = s.clone(), torch.zeros(width)
    c[3 * hidden : 4 * hidden] = -1.0
    with torch.no_grad():
        ws, bs = [], []
        for cell in rule.cells:
            w = torch.cat([cell.weight_ifo, cell.weight_g]).t()  # (inputs + hidden, 4 hidden): i, f, o, g
            ws.append(torch.nn.functional.pad(w.float(), (0, width - 4 * hidden)).mul(-s).reshape(-1))
            b = torch.cat([cell.bias_ifo, cell.bias_g])  # (4 hidden,)
            bs.append(torch.nn.functional.pad(b.float(), (0, width - 4 * hidden)).mul(-s))
        packed = (torch.cat(ws).contiguous(), torch.cat(bs).contiguous(), torch.cat([a, c]).contiguous(),
                  rule.out.weight.detach().float().reshape(-1).contiguous(),
                  rule.out.bias.detach().float().reshape(()).clone())
    with _lock:
        _packed[rule] = (key, packed)
    return packed


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < threads:  # type: ignore[attr-defined]
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="l2l-fused")
        return _pool


def fused_lstm_step(rule: CoordinatewiseLSTM, grad: Tensor, state: Tensor, keep: Tensor | None = None) -> Tensor:
    """One frozen step of ``rule`` on ``(n,)`` ``grad``: writes the new state into ``state``, returns the update.

    ``keep``: ``(n,)`` bool, ``False`` where a coordinate gets no update and keeps its state.
    Call only where :func:`fused_lstm_supports` holds.
    """
    fn = _library(*_shape(rule))[0]
    assert fn is not None
    w, b, act, wo, bo = _weights(rule)
    g = grad.detach().to(torch.float32).contiguous()
    k = None if keep is None else keep.to(torch.bool).contiguous().view(torch.uint8)
    n = g.numel()
    update = torch.empty(n, dtype=torch.float32)
    row = state[0].numel() if n else 0
    bo_f, scale, p = float(bo), float(rule.output_scale), float(rule.p)

    def run(start: int, stop: int) -> None:
        fn(stop - start, g.data_ptr() + 4 * start, None if k is None else k.data_ptr() + start,
           state.data_ptr() + 4 * row * start, update.data_ptr() + 4 * start,
           w.data_ptr(), b.data_ptr(), act.data_ptr(), wo.data_ptr(), bo_f, scale, p)

    parts = max(1, min(torch.get_num_threads(), n // _MIN_PER_THREAD))
    if parts == 1:
        run(0, n)
    else:  # ctypes releases the GIL: the parts run at once
        bounds = [n * i // parts for i in range(parts + 1)]
        futures = [_executor(parts).submit(run, a, z) for a, z in zip(bounds[:-1], bounds[1:], strict=True)]
        for f in futures:
            f.result()
    return update.to(grad.dtype)
