"""A rule whose updates are a fixed multiple of another rule's: a calibrated step size, shipped with the weights."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_l2l.nets.base import DEFAULT_KIND, RuleSteps, UpdateRule

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

    def step_(
        self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND, keep: Tensor | None = None, *, fused: bool = True
    ) -> Tensor:
        return self.rule.step_(grad, state, kind, keep, fused=fused) * self.multiplier  # a kept-out zero stays zero

    def shared_stages(self, kind: str = DEFAULT_KIND) -> int:
        return self.rule.shared_stages(kind)

    def shared_over(self, kind: str = DEFAULT_KIND) -> str:
        return self.rule.shared_over(kind)

    def steps(self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND) -> RuleSteps:
        update, state = yield from self.rule.steps(grad, state, kind)
        return update * self.multiplier, state


def _check_multiplier(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Invalid {what}: {value} (expected a finite value > 0; 1 is the rule itself)")
    return float(value)


def _scaled_copy(rule: UpdateRule, factor: float) -> UpdateRule:
    """A copy of ``rule`` at ``factor`` (a plain copy at 1)."""
    return copy.deepcopy(rule) if factor == 1.0 else ScaledRule(copy.deepcopy(rule), factor)


def _unwrap(rule: UpdateRule) -> tuple[float, UpdateRule]:
    """``(product of the multipliers, innermost rule)`` of nested ``ScaledRule``s (``(1.0, rule)`` for none)."""
    factor = 1.0
    while isinstance(rule, ScaledRule):
        factor, rule = factor * rule.multiplier, rule.rule
    return factor, rule


def scale_rule(rule: UpdateRule, multiplier: float | Mapping[str, float]) -> UpdateRule:
    """``rule`` at a calibrated update multiplier: one for every parameter, or one per parameter kind.

    A number gives ``ScaledRule(rule, multiplier)``. A mapping such as ``{"conv": 5.62, "fc": 1.33}``
    gives a :class:`~lightning_l2l.nets.PerKindRule`:

    - for a ``PerKindRule``: its network for each kind as ``ScaledRule(network, multiplier[kind])``
      (a kind not in the mapping keeps its network's step size; kinds without a network of their own
      go to its default network, as before);
    - for a rule with one network for every kind (one LSTM): a copy of that network per named kind at
      its multiplier, and, for every other kind, the network under kind ``DEFAULT_KIND``
      (``"default"``), the result's default, at its own step size unless the mapping names
      ``"default"`` too. Vectors in a param group without a kind (``shape_kind``) and layer kinds the
      mapping does not name (``norm``, ``embedding``, ...) go there, so give it the step size they
      should have: ``{"conv": 3.16, "fc": 1.78, "default": 1.78}``
      (``--lr conv=3.16,fc=1.78,default=1.78``).

    Multipliers are relative to ``rule``: a ``ScaledRule`` around it, or around one of its networks
    (the shipped ``conv``), is folded in, so the result never nests them.
    Section 3.3's two LSTMs are meta-trained jointly, and the step size that is best at the horizon can
    differ between them; ``benchmarks/conv_select.py --lrs conv=M,fc=M`` measures it. The networks are
    copied: ``rule`` is left as it was.
    """
    from lightning_l2l.nets.per_kind import PerKindRule

    if not isinstance(rule, UpdateRule):
        raise TypeError(f"rule is a {type(rule).__name__}, expected an UpdateRule")
    outer, inner = _unwrap(rule)
    if not isinstance(multiplier, Mapping):
        return ScaledRule(copy.deepcopy(inner), outer * _check_multiplier(multiplier, "multiplier"))
    factors = {kind: _check_multiplier(m, f"multiplier for kind {kind!r}") for kind, m in multiplier.items()}
    if not isinstance(inner, PerKindRule):
        # one network for every kind: a copy per named kind, and the default for the others
        kinds = {DEFAULT_KIND: 1.0, **factors}
        return PerKindRule({kind: _scaled_copy(inner, outer * m) for kind, m in kinds.items()}, default=DEFAULT_KIND)
    unknown = sorted(set(factors) - set(inner.networks))
    if unknown:
        raise ValueError(f"no network for kinds {unknown}: this PerKindRule's kinds are {sorted(inner.networks)}")
    networks = {}
    for kind, net in inner.networks.items():
        own, base = _unwrap(net)
        networks[kind] = _scaled_copy(base, outer * own * factors.get(kind, 1.0))
    return PerKindRule(networks, default=inner.default)


def parse_multiplier(text: str) -> float | dict[str, float]:
    """``"1.78"`` -> ``1.78``; ``"conv=5.62,fc=1.33"`` -> ``{"conv": 5.62, "fc": 1.33}`` (see :func:`scale_rule`)."""
    hint = "give a number such as 1.78, or one per parameter kind such as conv=5.62,fc=1.33"

    def number(value: str, item: str) -> float:
        try:
            out = float(value)
        except ValueError:
            raise ValueError(f"{item!r} is not a number") from None
        if not (math.isfinite(out) and out > 0):
            raise ValueError(f"{item!r} is not a finite value > 0")
        return out

    text = text.strip()
    try:
        if "=" not in text:
            return number(text, text)
        out: dict[str, float] = {}
        for item in text.split(","):
            kind, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not kind:
                raise ValueError(f"{item.strip()!r} is not kind=value")
            if kind in out:
                raise ValueError(f"kind {kind!r} is given twice")
            out[kind] = number(value, item.strip())
        return out
    except ValueError as err:
        raise ValueError(f"Invalid update multiplier {text!r}: {err}; {hint}") from None
