"""A coordinatewise linear rule: learned SGD, the simplest member of the family."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_l2l.nets.base import DEFAULT_KIND, UpdateRule

__all__ = ["CoordinatewiseLinear"]


class CoordinatewiseLinear(UpdateRule):
    """``update = scale * g``, with ``scale`` learned (starts at ``-lr``); a stateless rule.

    Useful as a sanity baseline for meta-training (it can only learn a step size) and as the rule
    that must reproduce :class:`torch.optim.SGD` exactly, which pins the plumbing shared by
    meta-training and :class:`~lightning_l2l.LearnedOptimizer`.

    Args:
        lr: initial step size; the update is ``-lr * g``.
    """

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self._record_init_args(locals())
        # float64 so that `-lr` is exact; forward casts to the gradient dtype
        self.scale = nn.Parameter(torch.tensor(-float(lr), dtype=torch.float64))

    def init_state(
        self,
        num_coords: int,
        kind: str = DEFAULT_KIND,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        return torch.zeros(num_coords, 0, device=device, dtype=dtype or self.state_dtype())

    def forward(self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND) -> tuple[Tensor, Tensor]:
        g = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
        return (self.scale.to(grad.dtype) * g), state
