"""Several independent tasks optimised as one: a meta-batch of optimizees per meta-step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_l2l.tasks.base import Task

__all__ = ["BatchedTask"]

#: separates a member's index from its own parameter name, ``"2/0.weight"``
SEPARATOR = "/"


class BatchedTask(Task):
    """``tasks`` side by side: their parameters in one dict, their losses summed.

    A member's parameter ``name`` is ``f"{i}/{name}"`` (``i``: its index in ``tasks``), with the kind
    it has in its member. Since the losses are summed, each member's gradients are exactly those it
    has alone, and a coordinatewise rule treats every coordinate as it would in the member alone:
    running the rule on a ``BatchedTask`` is running it on each member, in one call per kind per
    step (what ``MetaLearner(tasks_per_step=...)`` meta-trains on). ``num_problems`` is the members'
    total, so reported losses are the mean loss per problem.

    Args:
        tasks: the members (at least one); each keeps its own minibatch sequence.
    """

    def __init__(self, tasks: Sequence[Task]) -> None:
        if len(tasks) == 0:
            raise ValueError("BatchedTask needs at least one task")
        self.tasks = list(tasks)
        self.num_problems = sum(t.num_problems for t in self.tasks)
        # (own name, batched name) of every member's parameters, fixed once: no string matching per step
        self._names = [[(n, self._name(i, n)) for n in t.init_params()] for i, t in enumerate(self.tasks)]

    @staticmethod
    def _name(i: int, name: str) -> str:
        return f"{i}{SEPARATOR}{name}"

    def _member_params(self, params: dict[str, Tensor], i: int) -> dict[str, Tensor]:
        return {own: params[batched] for own, batched in self._names[i]}

    def init_params(self) -> dict[str, Tensor]:
        return {self._name(i, n): p for i, t in enumerate(self.tasks) for n, p in t.init_params().items()}

    def kinds(self) -> dict[str, str]:
        return {self._name(i, n): k for i, t in enumerate(self.tasks) for n, k in t.kinds().items()}

    def loss(self, params: dict[str, Tensor], step: int) -> Tensor:
        return self.member_losses(params, step).sum()

    def member_losses(self, params: dict[str, Tensor], step: int) -> Tensor:
        """``(len(tasks),)``: each member's :meth:`~Task.loss`; :meth:`loss` is their sum. The ``log_mean``
        meta-objective averages the log of each member's loss, so that a member with a large loss scale
        does not drown the others (:func:`~lightning_l2l.trajectory.unroll`)."""
        return torch.stack([t.loss(self._member_params(params, i), step) for i, t in enumerate(self.tasks)])

    def eval_loss(self, params: dict[str, Tensor]) -> Tensor | None:
        """The members' summed ``eval_loss``; ``None`` unless every member defines one."""
        members = self.member_eval_losses(params)
        return None if members is None else members.sum()

    def member_eval_losses(self, params: dict[str, Tensor]) -> Tensor | None:
        """``(len(tasks),)``: each member's ``eval_loss`` (the ``log_eval`` objective averages their logs);
        ``None`` unless every member defines one."""
        losses = []
        for i, t in enumerate(self.tasks):
            value = t.eval_loss(self._member_params(params, i))
            if value is None:
                return None
            losses.append(value)
        return torch.stack(losses)

    def to(self, device: torch.device | str) -> BatchedTask:
        self.tasks = [t.to(device) for t in self.tasks]
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.tasks)} tasks: {type(self.tasks[0]).__name__}, ...)"
