"""A mixture of task families: each task comes from one family drawn at random."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_l2l.tasks.base import Task, TaskFamily

__all__ = ["MixtureFamily"]


class MixtureFamily(TaskFamily):
    """Draws a family (with probability proportional to ``weights``), then a task from it.

    For meta-training one rule over several architectures or datasets, e.g. conv nets of two and
    three layers on Fashion-MNIST and on MNIST digits (``configs/conv_oos.yaml``). Sampling is a pure
    function of the generator, as every family's.

    Args:
        families: the families to draw from.
        weights: relative probability of each family (default: all alike).
    """

    def __init__(self, families: Sequence[TaskFamily], weights: Sequence[float] | None = None) -> None:
        families = list(families)
        if not families:
            raise ValueError("Invalid families: empty (expected at least one TaskFamily)")
        for f in families:
            if not isinstance(f, TaskFamily):
                raise TypeError(f"families must be TaskFamily instances (e.g. lightning_l2l.tasks.ConvFamily), "
                                f"got {type(f).__name__}")
        if weights is None:
            weights = [1.0] * len(families)
        weights = [float(w) for w in weights]
        if len(weights) != len(families) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"Invalid weights: {weights} (expected {len(families)} non-negative weights, not all 0)")
        self.families, self.weights = families, weights

    def sample(self, generator: torch.Generator) -> Task:
        i = int(torch.multinomial(torch.tensor(self.weights, dtype=torch.float64), 1, generator=generator))
        return self.families[i].sample(generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.families}, weights={self.weights})"
