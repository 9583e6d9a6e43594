"""Batching parameters by kind: one rule call per kind, whatever the number of tensors.

Both meta-training and :class:`~lightning_l2l.LearnedOptimizer` hold a set of named tensors of
several kinds. :class:`KindLayout` fixes an order, concatenates every kind's tensors into one flat
vector, and splits updates back, so the rule is called once per kind per step (no Python loop over
parameters or coordinates in the network call) and each coordinate keeps its own state slice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_l2l.nets.base import UpdateRule

__all__ = ["KindLayout", "apply_rule"]


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: torch.Size
    kind: str


class KindLayout:
    """A fixed order of named tensors, grouped by kind.

    Args:
        shapes: tensor shape per name, in a fixed order.
        kinds: kind per name; names missing here get ``default_kind``.
        default_kind: kind of names not listed in ``kinds``.
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        kinds: Mapping[str, str] | None = None,
        default_kind: str = "default",
    ) -> None:
        kinds = kinds or {}
        unknown = set(kinds) - set(shapes)
        if unknown:
            raise ValueError(f"kinds given for unknown tensors {sorted(unknown)}")
        self.entries = [_Entry(n, torch.Size(s), kinds.get(n, default_kind)) for n, s in shapes.items()]
        self.by_kind: dict[str, list[_Entry]] = {}
        for e in self.entries:
            self.by_kind.setdefault(e.kind, []).append(e)

    @property
    def kinds(self) -> list[str]:
        return list(self.by_kind)

    def numel(self, kind: str) -> int:
        return sum(e.shape.numel() for e in self.by_kind[kind])

    def flatten(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Concatenate each kind's tensors into one ``(n_kind,)`` vector."""
        return {
            kind: torch.cat([tensors[e.name].reshape(-1) for e in entries]) if len(entries) > 1
            else tensors[entries[0].name].reshape(-1)
            for kind, entries in self.by_kind.items()
        }

    def unflatten(self, flat: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Inverse of :meth:`flatten`: split each kind's vector back into named tensors."""
        out: dict[str, Tensor] = {}
        for kind, entries in self.by_kind.items():
            pieces = torch.split(flat[kind], [e.shape.numel() for e in entries])
            for e, piece in zip(entries, pieces, strict=True):
                out[e.name] = piece.view(e.shape)
        return {e.name: out[e.name] for e in self.entries}

    def init_state(
        self, rule: UpdateRule, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> dict[str, Tensor]:
        """The rule's initial state for every kind, ``{kind: (n_kind, ...)}``."""
        return {k: rule.init_state(self.numel(k), k, device=device, dtype=dtype) for k in self.by_kind}


def apply_rule(
    rule: UpdateRule,
    layout: KindLayout,
    grads: Mapping[str, Tensor],
    states: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One step of ``rule`` on every tensor: ``(updates by name, new states by kind)``.

    The single code path behind both meta-training (differentiable) and
    :class:`~lightning_l2l.LearnedOptimizer` (under ``no_grad``).
    """
    flat_grads = layout.flatten(grads)
    flat_updates: dict[str, Tensor] = {}
    new_states: dict[str, Tensor] = {}
    for kind, g in flat_grads.items():
        flat_updates[kind], new_states[kind] = rule(g, states[kind], kind)
    return layout.unflatten(flat_updates), new_states
