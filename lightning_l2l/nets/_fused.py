"""The fused steps of :class:`~lightning_l2l.nets.CoordinatewiseLSTM` on CPU: small C kernels.

The eager network spends most of a frozen step outside its FLOPs: skinny ``(n, 22) x (22, 80)``
products, a dozen elementwise passes over ``(n, 80)`` gates, and the state stacked and copied back
(``benchmarks/step_time.py``). ``_kernels/lstm_step.c`` does one coordinate at a time in
registers and writes the state in place, so a step costs its FLOPs, the gates' activations and one
pass over the state. It is built here with the system C compiler (``cc``, or ``$CC``) at its first
use, for this CPU (``-march=native``), into a cache directory (``$L2L_KERNEL_CACHE``, else
``~/.cache/lightning_l2l/kernels``), and loaded with :mod:`ctypes`. Without a compiler, or on other
devices and dtypes, the eager network runs: same updates to float32 rounding (``tests/test_fused.py``).

With gradients on (meta-training), :func:`fused_lstm_forward` is the network as one autograd node: the
same kernel saves the gates for ``l2l_lstm_backward``, which gives the gradients of the state and of
the weights (docs/implementation.md). ``L2L_FUSED=0`` in the environment turns every fused path off.

A run of coordinates is split over ``torch.get_num_threads()`` threads: where torch runs on libgomp (its
Linux wheels) the kernel is built with ``-fopenmp``, the loader gives it torch's own libgomp, and the runs
share one parallel region on torch's OpenMP threads; elsewhere Python threads run them (a ctypes call
releases the GIL), which compete for the cores with the OpenMP threads that spin after each torch op.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_l2l.nets.lstm import CoordinatewiseLSTM

__all__ = ["fused_lstm_status", "fused_lstm_step", "fused_lstm_supports", "fused_lstm_trains", "fused_lstm_forward"]

_SOURCE = Path(__file__).with_name("_kernels") / "lstm_step.c"
#: floats per vector lane group the packed weights are padded to (the widest vector the kernel uses)
_PAD = 16
#: fewest coordinates worth a thread of their own
_MIN_PER_THREAD = 4096
# the first that builds wins (clang on Apple CPUs wants -mcpu); not without either: built for a baseline CPU
# (x86-64's SSE2) the kernel is slower than the eager network (docs/implementation.md). -fopenmp first where
# torch's libgomp is loaded (_torch_libgomp).
_FLAGS = (["-O3", "-march=native"], ["-O3", "-mcpu=native"])
_OPENMP = "-fopenmp"
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


def _torch_libgomp() -> bool:
    """Whether torch runs its ops on libgomp, loaded in this process (Linux): a kernel built with -fopenmp then
    shares that runtime and its threads (the loader finds the soname ``libgomp.so.1`` already loaded). Elsewhere
    (Intel's or LLVM's OpenMP, macOS) an -fopenmp build would load a second runtime: not done."""
    if os.environ.get("L2L_FUSED_OPENMP") == "0" or "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    try:  # under the soname a GCC -fopenmp build asks for (wheels that rename it would bring a second copy)
        with open("/proc/self/maps") as maps:
            return any(line.rstrip().endswith("/libgomp.so.1") for line in maps)
    except OSError:
        return False


def _is_gcc(cc: str) -> bool:
    """Whether ``cc`` is GCC (clang's -fopenmp links LLVM's libomp, a second runtime beside torch's libgomp)."""
    try:
        out = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" not in out.stdout.lower() and "free software foundation" in out.stdout.lower()


def build(source: Path, defines: list[str]) -> tuple[ctypes.CDLL | None, str]:
    """``(the kernel library of source, "")`` built with ``defines`` for this CPU (cached), or ``(None, why not)``.

    With OpenMP first where torch runs on libgomp (:func:`_torch_libgomp`); the library's ``openmp`` attribute
    says whether it was. Used by the LSTM's kernels here and by :mod:`~lightning_l2l.nets._fused_moments`.
    """
    if os.environ.get("L2L_FUSED") == "0":
        return None, "turned off by L2L_FUSED=0"
    if sys.platform == "win32":
        return None, "the fused kernel is built with a Unix C compiler; not on Windows"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (install gcc or clang, or set CC)"
    text = source.read_bytes()
    errors = []
    openmp = [[*f, _OPENMP] for f in _FLAGS] if _torch_libgomp() and _is_gcc(cc) else []
    for flags in [*openmp, *_FLAGS]:
        key = hashlib.sha256(b"\0".join([text, cc.encode(), " ".join(flags + defines).encode(),
                                         _cpu_id().encode()])).hexdigest()[:20]
        target = _cache_dir() / f"{source.stem}_{key}.so"
        failed = target.with_suffix(".failed")  # an OpenMP build that failed here: not retried at every start
        if not target.exists() and failed.exists():
            errors.append(failed.read_text(errors="replace"))
            continue
        if not target.exists():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
                os.close(fd)
                cmd = [*cc.split(), *flags, *defines, "-shared", "-fPIC", "-o", tmp, str(source), "-lm"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
                if out.returncode != 0:
                    os.unlink(tmp)
                    errors.append(f"{' '.join(cmd)}: {out.stderr.strip()[-500:]}")
                    if _OPENMP in flags:  # the build without OpenMP follows; delete the cache to retry this one
                        failed.write_text(errors[-1])
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
        lib.l2l_openmp.restype = ctypes.c_int
        lib.openmp = bool(lib.l2l_openmp())
        return lib, ""
    return None, "building the fused kernel failed: " + " | ".join(errors)


@functools.cache
def _library(hidden: int, layers: int, nin: int) -> tuple[ctypes.CDLL | None, str]:
    """``(the kernels for this network shape, "")``, or ``(None, why not)``."""
    lib, why = build(_SOURCE, [f"-DH={hidden}", f"-DL={layers}", f"-DNIN={nin}"])
    if lib is None:
        return None, why
    f, i64 = ctypes.c_float, ctypes.c_int64
    lib.l2l_lstm_step.argtypes = [i64, _P, _P, _P, _P, _P, _P, _P, _P, f, f, f]
    lib.l2l_lstm_forward.argtypes = [i64, _P, _P, _P, _P, _P, _P, _P, _P, _P, f, f, f]
    lib.l2l_lstm_backward.argtypes = [i64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, f]
    lib.l2l_lstm_step_mt.argtypes = [ctypes.c_int, *lib.l2l_lstm_step.argtypes]
    lib.l2l_lstm_forward_mt.argtypes = [ctypes.c_int, *lib.l2l_lstm_forward.argtypes]
    lib.l2l_lstm_backward_mt.argtypes = [ctypes.c_int, *lib.l2l_lstm_backward.argtypes]
    for fn in (lib.l2l_lstm_step, lib.l2l_lstm_forward, lib.l2l_lstm_backward, lib.l2l_lstm_step_mt,
               lib.l2l_lstm_forward_mt, lib.l2l_lstm_backward_mt):
        fn.restype = None
    return lib, ""


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


# each rule's weights as its kernel reads them, rebuilt when a weight changes (by identity or by value)
_packed: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[int, ...], list[Tensor], Any]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


class _Packed(NamedTuple):
    """A rule's weights as the kernels read them (``_kernels/lstm_step.c``, the Args of each)."""

    w: Tensor  # per layer (inputs + hidden, width): [W_ifo; W_g]^T times -s, columns zero-padded
    b: Tensor  # per layer (width,), times -s
    act: Tensor  # (2, width): a, c
    wo: Tensor  # (hidden,)
    bo: float
    wt: Tensor  # the backward's: per layer (4 hidden, KPAD) [W_ifo; W_g], rows zero-padded


def packed_weights(rule: torch.nn.Module, pack: Callable[[], Any]) -> Any:
    """``pack()``'s result for ``rule``, cached until one of its weights changes (by identity or by value).

    The values are compared with a copy taken when the weights were packed, not by the parameters' version
    counters: ``p.data.copy_(...)`` (weights loaded by hand) changes a parameter without bumping its counter.
    A rule has a few thousand weights: the comparison costs microseconds a step."""
    params = list(rule.parameters())
    ids = tuple(map(id, params))
    with _lock:
        hit = _packed.get(rule)
    if hit is not None and hit[0] == ids and all(torch.equal(a, b) for a, b in zip(hit[1], params, strict=True)):
        return hit[2]
    snapshot = [p.detach().clone() for p in params]
    packed = pack()
    with _lock:
        _packed[rule] = (ids, snapshot, packed)
    return packed


def _weights(rule: CoordinatewiseLSTM) -> _Packed:
    return packed_weights(rule, lambda: _pack(rule))


def _pack(rule: CoordinatewiseLSTM) -> _Packed:
    hidden, nin = rule.hidden_size, _shape(rule)[2]
    width = -(-4 * hidden // _PAD) * _PAD
    kpad = -(-(hidden + max(nin, hidden)) // _PAD) * _PAD
    # a gate's activation is a * sigmoid(s z) + c: sigmoid for i, f, o (s = a = 1, c = 0), and for the cell
    # input g tanh(z) = 2 sigmoid(2 z) - 1; the kernel takes -s z, so the weights and biases are packed times
    # -s (exact: a power of two)
    s = torch.ones(width)
    s[3 * hidden : 4 * hidden] = 2.0
    a, c = s.clone(), torch.zeros(width)
    c[3 * hidden : 4 * hidden] = -1.0
    pad = torch.nn.functional.pad
    with torch.no_grad():
        ws, bs, wts = [], [], []
        for cell in rule.cells:
            w = torch.cat([cell.weight_ifo, cell.weight_g]).float()  # (4 hidden, inputs + hidden): i, f, o, g
            ws.append(pad(w.t(), (0, width - 4 * hidden)).mul(-s).reshape(-1))
            wts.append(pad(w, (0, kpad - w.shape[1])).reshape(-1))
            b = torch.cat([cell.bias_ifo, cell.bias_g])  # (4 hidden,)
            bs.append(pad(b.float(), (0, width - 4 * hidden)).mul(-s))
        return _Packed(torch.cat(ws).contiguous(), torch.cat(bs).contiguous(), torch.cat([a, c]).contiguous(),
                       rule.out.weight.detach().float().reshape(-1).contiguous(), float(rule.out.bias),
                       torch.cat(wts).contiguous())


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < threads:  # type: ignore[attr-defined]
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="l2l-fused")
        return _pool


def _parts(n: int) -> int:
    """Runs of coordinates for ``n``: one per thread of ``torch.get_num_threads()``, none below ``_MIN_PER_THREAD``."""
    return max(1, min(torch.get_num_threads(), n // _MIN_PER_THREAD))


def _parallel(n: int, run: Callable[[int, int], None], parts: int | None = None) -> None:
    """``run(start, stop)`` over ``[0, n)`` in ``parts`` runs (default :func:`_parts`) on Python threads (ctypes
    releases the GIL); the kernels built with OpenMP use their ``_mt`` entry points instead."""
    parts = _parts(n) if parts is None else parts
    if parts == 1:
        run(0, n)
        return
    bounds = [n * i // parts for i in range(parts + 1)]
    futures = [_executor(parts).submit(run, a, z) for a, z in zip(bounds[:-1], bounds[1:], strict=True)]
    for f in futures:
        f.result()


def run_step(lib: ctypes.CDLL, name: str, grad: Tensor, state: Tensor, keep: Tensor | None, *rest: Any) -> Tensor:
    """Call a frozen in-place step kernel ``name(n, grad, keep, state, update, *rest)`` (or its ``name_mt``, split
    in runs on OpenMP's threads) on float32 ``grad`` and ``state``; returns the update in ``grad``'s dtype."""
    g = grad.detach().to(torch.float32).contiguous()
    k = None if keep is None else keep.to(torch.bool).contiguous().view(torch.uint8)
    n = g.numel()
    update = torch.empty(n, dtype=torch.float32)
    row = state[0].numel() if n else 0
    parts = _parts(n)
    if parts > 1 and lib.openmp:
        getattr(lib, name + "_mt")(parts, n, g.data_ptr(), None if k is None else k.data_ptr(), state.data_ptr(),
                                   update.data_ptr(), *rest)
    else:
        step = getattr(lib, name)

        def run(start: int, stop: int) -> None:
            step(stop - start, g.data_ptr() + 4 * start, None if k is None else k.data_ptr() + start,
                 state.data_ptr() + 4 * row * start, update.data_ptr() + 4 * start, *rest)

        _parallel(n, run, parts)
    torch.autograd.graph.increment_version(state)  # written through a pointer: as state.copy_ would, for autograd's checks
    return update.to(grad.dtype)


def fused_lstm_step(rule: CoordinatewiseLSTM, grad: Tensor, state: Tensor, keep: Tensor | None = None) -> Tensor:
    """One frozen step of ``rule`` on ``(n,)`` ``grad``: writes the new state into ``state``, returns the update.

    ``keep``: ``(n,)`` bool, ``False`` where a coordinate gets no update and keeps its state.
    Call only where :func:`fused_lstm_supports` holds.
    """
    lib = _library(*_shape(rule))[0]
    assert lib is not None
    pk = _weights(rule)
    return run_step(lib, "l2l_lstm_step", grad, state, keep, pk.w.data_ptr(), pk.b.data_ptr(), pk.act.data_ptr(),
                    pk.wo.data_ptr(), pk.bo, float(rule.output_scale), float(rule.p))


# ------------------------------------------------------------------------------ differentiable


def fused_lstm_trains(rule: CoordinatewiseLSTM, grad: Tensor, state: Tensor) -> bool:
    """Whether :func:`fused_lstm_forward` computes this differentiable call: CPU, float32, no autocast,
    a gradient that is an input (no second derivatives), the kernels built."""
    weight = rule.out.weight
    return (
        torch.is_grad_enabled()
        and (state.requires_grad or weight.requires_grad)
        and not grad.requires_grad
        and not torch.is_autocast_enabled("cpu")
        and state.device.type == "cpu"
        and state.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and grad.device.type == "cpu"
        and grad.dtype == torch.float32
        and state.shape[1:] == (rule.num_layers, 2, rule.hidden_size)
        and _library(*_shape(rule))[0] is not None
    )


def fused_lstm_forward(rule: CoordinatewiseLSTM, grad: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """``rule(grad, state)`` through the kernels, differentiable in the state and the weights (the gradient
    is an input: Andrychowicz et al. drop its derivative). Call only where :func:`fused_lstm_trains` holds."""
    params = [p for cell in rule.cells for p in (cell.weight_ifo, cell.bias_ifo, cell.weight_g, cell.bias_g)]
    return _FusedLSTM.apply(rule, grad.contiguous(), state.contiguous(), rule.out.weight, rule.out.bias, *params)


class _FusedLSTM(torch.autograd.Function):
    """The network as one autograd node: the forward kernel saves the gates, the backward kernel turns
    their gradients into the state's, and two matmuls per layer give the weights' (``dz^T [x, h]``)."""

    @staticmethod
    def forward(ctx: Any, rule: CoordinatewiseLSTM, grad: Tensor, state: Tensor, *weights: Tensor) -> tuple[Tensor, Tensor]:
        lib = _library(*_shape(rule))[0]
        assert lib is not None
        pk = _weights(rule)
        hidden, layers, nin = _shape(rule)
        n = grad.numel()
        new_state = torch.empty_like(state)
        save = torch.empty(n, nin + layers * 5 * hidden)  # (coords, input + layers x (i, f, o, g, tanh c))
        update = torch.empty(n)
        row, srow = state[0].numel() if n else 0, save.shape[1]
        scale, p = float(rule.output_scale), float(rule.p)

        def run(start: int, stop: int) -> None:
            lib.l2l_lstm_forward(stop - start, grad.data_ptr() + 4 * start, state.data_ptr() + 4 * row * start,
                                 new_state.data_ptr() + 4 * row * start, save.data_ptr() + 4 * srow * start,
                                 update.data_ptr() + 4 * start, pk.w.data_ptr(), pk.b.data_ptr(), pk.act.data_ptr(),
                                 pk.wo.data_ptr(), pk.bo, scale, p)

        parts = _parts(n)
        if parts > 1 and lib.openmp:
            lib.l2l_lstm_forward_mt(parts, n, grad.data_ptr(), state.data_ptr(), new_state.data_ptr(), save.data_ptr(),
                                    update.data_ptr(), pk.w.data_ptr(), pk.b.data_ptr(), pk.act.data_ptr(),
                                    pk.wo.data_ptr(), pk.bo, scale, p)
        else:
            _parallel(n, run, parts)
        ctx.rule, ctx.packed = rule, pk
        ctx.save_for_backward(save, state, new_state)
        return update, new_state

    @staticmethod
    def backward(ctx: Any, g_update: Tensor | None, g_state: Tensor | None) -> tuple[Tensor | None, ...]:
        rule: CoordinatewiseLSTM = ctx.rule
        pk: _Packed = ctx.packed
        save, state, new_state = ctx.saved_tensors
        lib = _library(*_shape(rule))[0]
        hidden, layers, nin = _shape(rule)
        n = state.shape[0]
        scale = float(rule.output_scale)
        gu = torch.zeros(n) if g_update is None else g_update.float().contiguous()
        gs = None if g_state is None else g_state.float().contiguous()
        g_in = torch.empty_like(state)
        row, srow = state[0].numel() if n else 0, save.shape[1]
        krows = -(-(hidden + max(nin, hidden)) // 4) * 4  # KROWS of the kernel: the bias row's index
        width = pk.b.numel() // layers
        runs = _parts(n)
        # per run of coordinates, its sums: (layer, input k or bias, gate), and the output layer's (weights, bias)
        gw_runs, gwo_runs = torch.zeros(runs, layers, krows + 1, width), torch.zeros(runs, hidden + 1)
        first = {n * i // runs: i for i in range(runs)}  # where _parallel's runs start

        def run(start: int, stop: int) -> None:
            part = first[start]
            lib.l2l_lstm_backward(stop - start, save.data_ptr() + 4 * srow * start, state.data_ptr() + 4 * row * start,
                                  new_state.data_ptr() + 4 * row * start, gu.data_ptr() + 4 * start,
                                  None if gs is None else gs.data_ptr() + 4 * row * start,
                                  g_in.data_ptr() + 4 * row * start, gw_runs[part].data_ptr(),
                                  gwo_runs[part].data_ptr(), pk.wt.data_ptr(), pk.wo.data_ptr(), scale)

        if runs > 1 and lib.openmp:
            lib.l2l_lstm_backward_mt(runs, n, save.data_ptr(), state.data_ptr(), new_state.data_ptr(), gu.data_ptr(),
                                     None if gs is None else gs.data_ptr(), g_in.data_ptr(), gw_runs.data_ptr(),
                                     gwo_runs.data_ptr(), pk.wt.data_ptr(), pk.wo.data_ptr(), scale)
        else:
            _parallel(n, run, runs)
        gw, gwo = gw_runs.sum(0), gwo_runs.sum(0)
        grads: list[Tensor] = []
        for layer in range(layers):
            k = (nin if layer == 0 else hidden) + hidden
            w = gw[layer, :k, : 4 * hidden].t()  # (4 hidden, inputs + hidden)
            b = gw[layer, krows, : 4 * hidden]
            grads += [w[: 3 * hidden], b[: 3 * hidden], w[3 * hidden :], b[3 * hidden :]]
        return None, None, g_in, gwo[:hidden].reshape(1, hidden), gwo[hidden:], *grads
