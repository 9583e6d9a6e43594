"""Gradient preprocessing of Andrychowicz et al. (2016), Appendix A.

Gradients span many orders of magnitude, which an LSTM with saturating gates handles badly. The
paper feeds the network two numbers per coordinate instead of the raw gradient ``g``:

.. math::

    g \\mapsto \\begin{cases}
        (\\log|g| / p,\\ \\operatorname{sign}(g)) & \\text{if } |g| \\ge e^{-p} \\\\
        (-1,\\ e^{p} g) & \\text{otherwise}
    \\end{cases}

with ``p = 10`` in the paper. Both branches agree in the limit ``|g| -> e^{-p}`` on the first
feature (``-1``) and give a magnitude of one on the second, so the map is continuous in its first
feature and bounded in its second.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["PREPROCESSINGS", "log_sign", "identity", "preprocess", "num_features"]

PREPROCESSINGS = ("none", "log_sign")


def log_sign(grad: Tensor, p: float = 10.0) -> Tensor:
    """Appendix A preprocessing. Returns ``(n, 2)`` features for a flat ``(n,)`` gradient.

    Computed in float32 (or float64 for float64 input) whatever the input dtype or autocast
    state: ``log`` of a bfloat16 gradient loses the small magnitudes this map exists to keep.
    Non-finite entries (NaN, +-inf) map to the features of a zero gradient, ``(-1, 0)``: the
    network sees "no signal" rather than propagating NaN into its state.
    """
    if not p > 0:  # also refuses NaN
        raise ValueError(f"Invalid preprocessing p: {p} (expected p > 0; the paper uses 10)")
    work_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=grad.device.type, enabled=False):
        g = grad.to(work_dtype)
        g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        absg = g.abs()
        big = absg >= math.exp(-p)
        # clamp_min keeps log finite on the branch torch.where discards (and its gradient too)
        log_part = torch.where(big, torch.log(absg.clamp_min(math.exp(-p))) / p, torch.full_like(g, -1.0))
        sign_part = torch.where(big, torch.sign(g), g * math.exp(p))
        return torch.stack((log_part, sign_part), dim=-1)  # (n, 2)


def identity(grad: Tensor) -> Tensor:
    """No preprocessing: ``(n, 1)`` features, the raw gradient (non-finite entries set to zero)."""
    g = grad.float() if grad.dtype not in (torch.float32, torch.float64) else grad
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    return g.unsqueeze(-1)  # (n, 1)


def num_features(kind: str) -> int:
    """Number of input features per coordinate that ``preprocess(kind=...)`` produces."""
    if kind == "log_sign":
        return 2
    if kind == "none":
        return 1
    raise ValueError(f"unknown preprocessing {kind!r}; expected one of {PREPROCESSINGS}")


def preprocess(grad: Tensor, kind: str = "log_sign", p: float = 10.0) -> Tensor:
    """Dispatch on the preprocessing name (``"none"`` or ``"log_sign"``)."""
    if kind == "log_sign":
        return log_sign(grad, p)
    if kind == "none":
        return identity(grad)
    raise ValueError(f"unknown preprocessing {kind!r}; expected one of {PREPROCESSINGS}")
