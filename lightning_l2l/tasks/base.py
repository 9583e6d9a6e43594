"""Optimizee problems: a :class:`TaskFamily` samples :class:`Task` s from a ``torch.Generator``."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["Task", "TaskFamily"]


class Task(ABC):
    """One optimizee problem ``f(theta)``.

    A task gives initial parameters (a dict of named tensors), the loss at a step (a data task
    uses that step's minibatch), and each parameter's kind (``conv``, ``fc``, ...). A task may bundle
    ``num_problems`` independent problems whose losses are summed (e.g. a batch of quadratics):
    gradients of each problem are then unaffected by the batching, and reported losses are the sum
    divided by ``num_problems``, the mean loss per problem.
    """

    #: independent problems summed in :meth:`loss`; reported losses are divided by it
    num_problems: int = 1

    @abstractmethod
    def init_params(self) -> dict[str, Tensor]:
        """Fresh initial parameters ``theta_0`` (new tensors, ``requires_grad=False``)."""

    @abstractmethod
    def loss(self, params: dict[str, Tensor], step: int) -> Tensor:
        """The scalar loss at optimizee step ``step`` (differentiable in ``params``)."""

    def eval_loss(self, params: dict[str, Tensor]) -> Tensor | None:
        """The loss that learning curves report, or ``None`` to report :meth:`loss` at each step.

        A data task whose :meth:`loss` is a minibatch loss may return the loss on its whole
        dataset here (the "full-data loss"): evaluation curves (:func:`~lightning_l2l.trajectory.rule_curve`,
        the tuned baselines, ``MetaLearner`` validation and test) then record it instead of the
        step's minibatch loss, while the gradients and the meta-training loss keep using
        :meth:`loss`. Curves call it under ``torch.no_grad()``; the ``log_eval`` meta-objective
        (:func:`~lightning_l2l.trajectory.unroll`) calls it with a graph, and needs it to be
        differentiable in ``params`` there (so do not detach or disable grad inside).
        """
        return None

    def kinds(self) -> dict[str, str]:
        """Kind of each parameter; parameters not listed are of kind :data:`~lightning_l2l.nets.kinds.DEFAULT_KIND`."""
        return {}

    def to(self, device: torch.device | str) -> Task:
        """Move the task's tensors to ``device`` (in place); returns ``self``."""
        return self


class TaskFamily(ABC):
    """A distribution over tasks. ``sample`` must be a pure function of the generator's state."""

    @abstractmethod
    def sample(self, generator: torch.Generator) -> Task:
        """Draw one task using only ``generator`` for randomness."""
