"""A rule whose updates are a fixed multiple of another rule's: a calibrated step size, shipped with the weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_l2l.nets.base import DEFAULT_KIND, UpdateRule

__all__ = ["ScaledRule"]


class ScaledRule(UpdateRule):
    """``update = multiplier * rule(grad)``: ``rule`` run at a fixed update multiplier.

    The same updates as ``LearnedOptimizer(params, rule, lr=multiplier)`` and as
    ``rule_curve(rule, task, steps, lr=multiplier)``, but as a rule of its own, so that a multiplier
    calibrated on validation tasks after meta-training (``benchmarks/conv_select.py --lrs``) travels
    with the weights (``l2l export --lr``) and is what every user of them gets, at ``lr=1``.
    Meta-training optimises the loss along truncated unrolls; the step size that is best at the
    horizon, where a rule is judged, can differ, and one number corrects it.

    Args:
        rule: the meta-trained rule (its weights are this rule's, under ``rule.``).
        multiplier: the factor on every update; finite and > 0.
    """

    def __init__(self, rule: UpdateRule, multiplier: float) -> None:
        super().__init__()
        if not isinstance(rule, UpdateRule):
            raise TypeError(f"rule is a {type(rule).__name__}, expected an UpdateRule")
        if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
            raise TypeError(f"multiplier must be a number, got {multiplier!r}")
        if not (math.isfinite(multiplier) and multiplier > 0):
            raise ValueError(f"Invalid multiplier: {multiplier} (expected a finite value > 0; 1 is the rule itself)")
        self._record_init_args(locals())
        self._init_args["multiplier"] = float(multiplier)
        self.rule = rule
        self.multiplier = float(multiplier)

    def kinds(self) -> tuple[str, ...]:
        return self.rule.kinds()

    def init_state(
        self,
        num_coords: int,
        kind: str = DEFAULT_KIND,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        return self.rule.init_state(num_coords, kind, device=device, dtype=dtype)

    def forward(self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND) -> tuple[Tensor, Tensor]:
        update, state = self.rule(grad, state, kind)
        # the same operation as unroll's `u * lr`: bit-identical to running `rule` at lr=multiplier
        return update * self.multiplier, state
