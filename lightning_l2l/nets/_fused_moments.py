"""The fused frozen step of :class:`~lightning_l2l.nets.MomentMLP` on CPU: ``_kernels/moments_step.c``.

The eager step (``MomentMLP.forward`` then the state copied back) spends its time in a few dozen small
elementwise passes over ``(n, 6)`` moments and ``(n, 16)`` activations (``pow`` of the bias corrections,
``cat``, ``copy``, ``mul``) and in Python, about 17x its FLOP floor (docs/usage.md). The kernel does a
coordinate's moments, features, MLP and update in registers, one coordinate per vector lane, and writes the
state in place. Built like the LSTM's kernels (:func:`lightning_l2l.nets._fused.build`: the system C
compiler, ``-march=native``, cached, OpenMP where torch runs on libgomp); without a compiler, on other
devices and dtypes, and where gradients are needed, ``MomentMLP.forward`` runs: the same updates to float32
rounding (``tests/test_fused_moments.py``). ``L2L_FUSED=0`` turns it off with the others.
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from lightning_l2l.nets._fused import _P, build, packed_weights, run_step

if TYPE_CHECKING:
    from lightning_l2l.nets.moments import MomentMLP

__all__ = ["fused_moments_status", "fused_moments_step", "fused_moments_supports"]

_SOURCE = Path(__file__).with_name("_kernels") / "moments_step.c"


def _shape(rule: MomentMLP) -> tuple[int, int, int, int, int]:
    layers = sum(isinstance(m, nn.Linear) for m in rule.mlp)
    return len(rule.momentum_betas), len(rule.rms_betas), rule.head.in_features, layers, len(rule.alignment_betas)


@functools.cache
def _library(nm: int, nr: int, hidden: int, layers: int, na: int = 0) -> tuple[ctypes.CDLL | None, str]:
    flags = [f"-DNM={nm}", f"-DNR={nr}", f"-DHID={hidden}", f"-DNL={layers}"]
    lib, why = build(_SOURCE, flags + ([f"-DNA={na}"] if na else []))
    if lib is None:
        return None, why
    f, i64, i32 = ctypes.c_float, ctypes.c_int64, ctypes.c_int
    lib.l2l_moments_step.argtypes = [i64, _P, _P, _P, _P, _P, _P, _P, i32, f, f, f, f, f, f, f, f]
    lib.l2l_moments_step_mt.argtypes = [i32, *lib.l2l_moments_step.argtypes]
    lib.l2l_moments_step.restype = lib.l2l_moments_step_mt.restype = None
    return lib, ""


def fused_moments_status(rule: MomentMLP | None = None) -> str | None:
    """``None`` if the fused step runs here for ``rule``'s shape (default ``MomentMLP()``'s), else why not."""
    shape = _shape(rule) if rule is not None else (3, 2, 16, 2, 0)
    return _library(*shape)[1] or None


def fused_moments_supports(rule: MomentMLP, grad: Tensor, state: Tensor) -> bool:
    """Whether :func:`fused_moments_step` computes this call (else ``MomentMLP.forward`` must)."""
    weight = rule.head.weight
    return (
        grad.dim() == 1
        and state.device.type == "cpu"
        and state.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and grad.device.type == "cpu"
        and grad.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and state.is_contiguous()
        and state.shape == (grad.shape[0], rule.state_size)
        and all(isinstance(m, (nn.Linear, nn.ReLU)) for m in rule.mlp)
        and not (
            torch.is_grad_enabled()
            and (grad.requires_grad or state.requires_grad or any(p.requires_grad for p in rule.parameters()))
        )
        and _library(*_shape(rule))[0] is not None
    )


class _Packed(NamedTuple):
    beta: Tensor  # (NM + NR + NA,) the decay rates in float32, as the eager rule rounds them
    logb: Tensor  # their logs (float64, then rounded)
    w: Tensor  # per hidden layer its weight (HID, inputs) and bias, then the head's weight (2, inputs) and bias


def _weights(rule: MomentMLP) -> _Packed:
    return packed_weights(rule, lambda: _pack(rule))


def _pack(rule: MomentMLP) -> _Packed:
    beta = torch.tensor([*rule.momentum_betas, *rule.rms_betas, *rule.alignment_betas], dtype=torch.float32)
    linears = [m for m in rule.mlp if isinstance(m, nn.Linear)] + [rule.head]
    with torch.no_grad():
        w = torch.cat([t.detach().float().reshape(-1) for m in linears for t in (m.weight, m.bias)]).contiguous()
    return _Packed(beta, beta.double().log().float(), w)


def fused_moments_step(rule: MomentMLP, grad: Tensor, state: Tensor, keep: Tensor | None = None) -> Tensor:
    """One frozen step of ``rule`` on ``(n,)`` ``grad``: writes the new state into ``state``, returns the update.

    ``keep``: ``(n,)`` bool, ``False`` where a coordinate gets no update and keeps its state.
    Call only where :func:`fused_moments_supports` holds.
    """
    lib = _library(*_shape(rule))[0]
    assert lib is not None
    pk = _weights(rule)
    limit = math.sqrt(torch.finfo(torch.float32).max) / 4  # MomentMLP.features' clamp of the gradient
    decay = rule.decay_steps if rule.decay_steps > 0 and rule.decay_power > 0 else 0.0
    return run_step(lib, "l2l_moments_step", grad, state, keep, pk.beta.data_ptr(), pk.logb.data_ptr(),
                    pk.w.data_ptr(), rule._adam, limit, rule.lr, rule.log_range, rule.clip, rule.eps,
                    rule.direction_scale, decay, rule.decay_power)
