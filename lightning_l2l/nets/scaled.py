"""A rule whose updates are a fixed multiple of another rule's: a calibrated step size, shipped with the weights."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_l2l.nets.base import DEFAULT_KIND, UpdateRule

__all__ = ["ScaledRule", "parse_multiplier", "scale_rule"]


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
        _check_multiplier(multiplier, "multiplier")
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


def _check_multiplier(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Invalid {what}: {value} (expected a finite value > 0; 1 is the rule itself)")
    return float(value)


def scale_rule(rule: UpdateRule, multiplier: float | Mapping[str, float]) -> UpdateRule:
    """``rule`` at a calibrated update multiplier: one for every parameter, or one per parameter kind.

    A number gives ``ScaledRule(rule, multiplier)``. A mapping such as ``{"conv": 5.62, "fc": 1.33}``
    needs a :class:`~lightning_l2l.nets.PerKindRule` (or a ``ScaledRule`` around one, whose multiplier
    is folded in) and gives a ``PerKindRule`` whose network for each kind is
    ``ScaledRule(network, multiplier[kind])`` (a kind not in the mapping keeps its network's step
    size). Section 3.3's two LSTMs are meta-trained jointly, and the step size that is best at the
    horizon can differ between them; ``benchmarks/conv_select.py --lrs conv=M,fc=M`` measures it.
    The networks are copied: ``rule`` is left as it was.
    """
    from lightning_l2l.nets.per_kind import PerKindRule

    if not isinstance(rule, UpdateRule):
        raise TypeError(f"rule is a {type(rule).__name__}, expected an UpdateRule")
    if not isinstance(multiplier, Mapping):
        return ScaledRule(copy.deepcopy(rule), _check_multiplier(multiplier, "multiplier"))
    outer = 1.0
    if isinstance(rule, ScaledRule):
        outer, rule = rule.multiplier, rule.rule
    if not isinstance(rule, PerKindRule):
        raise ValueError(
            f"per-kind multipliers {dict(multiplier)} need a PerKindRule (one network per parameter kind); "
            f"this rule is a {type(rule).__name__}: give one number instead"
        )
    factors = {kind: _check_multiplier(m, f"multiplier for kind {kind!r}") for kind, m in multiplier.items()}
    unknown = sorted(set(factors) - set(rule.networks))
    if unknown:
        raise ValueError(f"no network for kinds {unknown}: this PerKindRule's kinds are {sorted(rule.networks)}")
    networks = {}
    for kind, net in rule.networks.items():
        factor = outer * factors.get(kind, 1.0)
        networks[kind] = copy.deepcopy(net) if factor == 1.0 else ScaledRule(copy.deepcopy(net), factor)
    return PerKindRule(networks, default=rule.default)


def parse_multiplier(text: str) -> float | dict[str, float]:
    """``"1.78"`` -> ``1.78``; ``"conv=5.62,fc=1.33"`` -> ``{"conv": 5.62, "fc": 1.33}`` (see :func:`scale_rule`)."""
    hint = "expected a number such as 1.78, or one per parameter kind such as conv=5.62,fc=1.33"
    text = text.strip()
    try:
        if "=" not in text:
            return _check_multiplier(float(text), "multiplier")
        out: dict[str, float] = {}
        for item in text.split(","):
            kind, _, value = item.partition("=")
            kind = kind.strip()
            if not kind or kind in out:
                raise ValueError(f"empty or repeated kind in {item!r}")
            out[kind] = _check_multiplier(float(value), f"multiplier for kind {kind!r}")
        return out
    except ValueError as err:
        raise ValueError(f"Invalid update multiplier {text!r}: {err} ({hint})") from None
