"""The update-rule interface shared by meta-training and :class:`~lightning_l2l.LearnedOptimizer`.

An update rule ``m`` maps a flat tensor of gradient coordinates and a per-coordinate state to a
flat tensor of updates and the next state (Andrychowicz et al., 2016, eq. 1 and section 2.1):

.. math::  \\theta_{t+1} = \\theta_t + g_t, \\qquad [g_t, h_{t+1}] = m(\\nabla_t, h_t; \\phi)

The state's first dimension indexes coordinates, so the state of any subset of coordinates is a
slice of it and never leaks from one tensor to another.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_l2l.nets.kinds import DEFAULT_KIND

__all__ = ["UpdateRule", "DEFAULT_KIND", "SHARE_OVER", "RuleSteps", "run_steps"]

#: what a rule that shares information between coordinates averages over: all coordinates of a kind
#: that :func:`~lightning_l2l.nets.apply_rule` updates in one call, each tensor's separately, or each
#: row's (a slice along the first dimension of a tensor of 2 or more dimensions: one quadratic of a
#: ``(functions, dim)`` batch, one output unit's weights of a linear layer; a vector is one row)
SHARE_OVER = ("kind", "tensor", "row")

#: :meth:`UpdateRule.steps`: yields per-coordinate values ``(n, d)``, is sent their group means
#: (``(n, d)`` or ``(1, d)``), returns ``(update (n,), new state)``
RuleSteps = Generator[Tensor, Tensor, tuple[Tensor, Tensor]]


class UpdateRule(nn.Module, ABC):
    """Base class of update rules: a coordinatewise map from gradients to updates.

    Subclasses implement :meth:`init_state` and :meth:`forward`. Every constructor argument must
    be a plain value (or a nested :class:`UpdateRule`) so that :meth:`config` can describe the rule
    and :func:`~lightning_l2l.nets.build_rule` can rebuild it without executing code from a file.
    """

    def __init__(self) -> None:
        super().__init__()
        self._init_args: dict[str, Any] = {}

    def _record_init_args(self, local_vars: dict[str, Any]) -> None:
        """Store the constructor arguments (call from ``__init__`` with ``locals()``)."""
        sig = inspect.signature(type(self).__init__)
        self._init_args = {name: local_vars[name] for name in sig.parameters if name != "self"}

    def config(self) -> dict[str, Any]:
        """A JSON-serialisable description: ``{"class_path": ..., "init_args": {...}}``."""
        args: dict[str, Any] = {}
        for key, value in self._init_args.items():
            if isinstance(value, UpdateRule):
                value = value.config()
            elif isinstance(value, dict):
                value = {k: v.config() if isinstance(v, UpdateRule) else v for k, v in value.items()}
            args[key] = value
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}

    def kinds(self) -> tuple[str, ...]:
        """Parameter kinds this rule has a dedicated network for (empty: one network for all)."""
        return ()

    @abstractmethod
    def init_state(
        self,
        num_coords: int,
        kind: str = DEFAULT_KIND,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """The initial state of ``num_coords`` coordinates; its first dimension is ``num_coords``."""

    @abstractmethod
    def forward(self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND) -> tuple[Tensor, Tensor]:
        """Map a flat ``(n,)`` gradient and its ``(n, ...)`` state to ``(update (n,), new state)``."""

    # ------------------------------------------------- information sharing between coordinates
    # A coordinatewise rule needs none of this. A rule that shares information between coordinates
    # (the arXiv version's section "Information sharing between coordinates": LSTM+GAC,
    # NTM-BFGS) needs means over coordinates it may not see in one call: apply_rule chunks a kind's
    # coordinates and skips tensors without a gradient. Such a rule writes its step as a generator,
    # :meth:`steps`, that yields each quantity it needs averaged and is sent the mean; apply_rule
    # computes the means over every chunk of the kind (or of each tensor), so chunking does not
    # change what a mean is.

    def shared_stages(self, kind: str = DEFAULT_KIND) -> int:
        """How many means over coordinates one step of ``kind`` needs (0: a coordinatewise rule)."""
        return 0

    def shared_over(self, kind: str = DEFAULT_KIND) -> str:
        """What the means of :meth:`steps` are over: ``"kind"``, ``"tensor"`` or ``"row"`` (:data:`SHARE_OVER`)."""
        return "kind"

    def steps(self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND) -> RuleSteps:
        """One step as a generator: ``shared_stages(kind)`` times it yields per-coordinate values
        ``(n, d)`` and is sent their means over the group (``(n, d)``, or ``(1, d)`` for one group);
        then it returns ``(update (n,), new state)``. The default yields nothing and returns
        ``forward(grad, state, kind)``.
        """
        return self(grad, state, kind)
        yield  # a generator that yields nothing  # pragma: no cover

    def step_(
        self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND, keep: Tensor | None = None, *, fused: bool = True
    ) -> Tensor:
        """One frozen step in place (under ``no_grad``): writes the new state into ``state``, returns the update.

        What :func:`~lightning_l2l.nets.apply_rule` calls with ``inplace=True``. ``keep``: ``(n,)`` bool,
        ``False`` where a coordinate gets a zero update and keeps its state. ``fused``: a rule with
        a faster implementation of this step may use it (:class:`~lightning_l2l.nets.CoordinatewiseLSTM`
        on CPU; same updates to float rounding); ``False``: :meth:`forward`. The default runs
        :meth:`forward` and copies its state back.
        """
        update, new_state = self(grad, state, kind)
        if keep is not None:
            update = torch.where(keep, update, torch.zeros_like(update))
            new_state = torch.where(keep.view(-1, *([1] * (new_state.dim() - 1))), new_state, state)
        state.copy_(new_state)
        return update

    def state_dtype(self) -> torch.dtype:
        """The dtype the rule keeps its state in: that of its weights."""
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()


def run_steps(steps: RuleSteps, mean: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Drive :meth:`UpdateRule.steps` in one call: every yielded ``(n, d)`` is sent ``mean(values)``."""
    try:
        values = next(steps)
        while True:
            values = steps.send(mean(values))
    except StopIteration as done:
        return done.value
