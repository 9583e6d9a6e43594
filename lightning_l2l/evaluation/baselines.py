"""Hand-designed baselines at their tuned learning rate, as the paper compares against (section 3).

Each baseline's learning rate is picked from a log grid by the best mean loss at the horizon on
validation tasks, then the baseline is run on test tasks it was not tuned on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_l2l.tasks import Task

__all__ = ["BASELINES", "PAPER_BASELINES", "DEFAULT_LR_GRID", "baseline_curve", "tune_baseline", "TunedBaseline"]

OptimizerFactory = Callable[[Iterable[Tensor], float], torch.optim.Optimizer]

BASELINES: dict[str, OptimizerFactory] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "nag": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    # one gradient per step like the others (no line search: it would spend several), curvature pairs kept
    # across steps; what style-transfer users reach for (issue: neural art)
    "lbfgs": lambda params, lr: torch.optim.LBFGS(params, lr=lr, max_iter=1, history_size=10),
}

#: the paper's four (section 3), what every comparison but neural art's runs by default
PAPER_BASELINES: tuple[str, ...] = ("sgd", "nag", "rmsprop", "adam")

#: 10^-5 ... 10^1 in steps of 10^0.25 (25 values)
DEFAULT_LR_GRID: tuple[float, ...] = tuple(10 ** (-5 + 0.25 * i) for i in range(25))


def baseline_curve(
    name: str, lr: float, task: Task, num_steps: int, device: torch.device | str | None = None
) -> Tensor:
    """Loss per problem of baseline ``name`` at ``lr`` over ``num_steps`` steps: ``(num_steps + 1,)``.

    Records the task's ``eval_loss`` (e.g. the full-data loss) where it defines one, else the
    step's loss. A run that turns non-finite stays non-finite (``inf``) from that step on.
    """
    return _run_baseline(name, lr, task, num_steps, device, eval_at=None)


def baseline_final_loss(
    name: str, lr: float, task: Task, num_steps: int, device: torch.device | str | None = None
) -> Tensor:
    """``baseline_curve(name, lr, task, num_steps)[-1]`` without the ``eval_loss`` of every step before
    it (what tuning and checkpoint-selection scripts look at; the twin of
    :func:`~lightning_l2l.trajectory.rule_final_loss`)."""
    return _run_baseline(name, lr, task, num_steps, device, eval_at={num_steps})[-1]


def baseline_losses_at(
    name: str, lr: float, task: Task, steps: Sequence[int], device: torch.device | str | None = None
) -> Tensor:
    """``baseline_curve(name, lr, task, max(steps))[steps]`` with the ``eval_loss`` computed at those steps
    only (the twin of :func:`~lightning_l2l.trajectory.rule_losses_at`): ``(len(steps),)``."""
    if list(steps) != sorted(set(steps)) or not steps or steps[0] < 0:
        raise ValueError(f"Invalid steps: {list(steps)} (expected increasing step counts >= 0)")
    return _run_baseline(name, lr, task, steps[-1], device, eval_at=set(steps))[list(steps)]


def _run_baseline(
    name: str, lr: float, task: Task, num_steps: int, device: torch.device | str | None,
    eval_at: Collection[int] | None,
) -> Tensor:
    """:func:`baseline_curve`; with ``eval_at`` only the entries at those steps are the ``eval_loss``
    (the others are the steps' losses), which is all tuning needs and spares a full-data pass per step."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; available: {sorted(BASELINES)}")
    with torch.inference_mode(False), torch.enable_grad():
        params = {n: p.to(device).requires_grad_() for n, p in task.init_params().items()}
        opt = BASELINES[name](list(params.values()), lr)
        curve = []
        for step in range(num_steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = task.loss(params, step)
            recorded = None
            if eval_at is None or step in eval_at:
                with torch.no_grad():
                    recorded = task.eval_loss(params)  # e.g. the full-data loss; None: the step's loss
            value = (loss if recorded is None else recorded).detach() / task.num_problems
            curve.append(value)
            if not (torch.isfinite(value) and torch.isfinite(loss)):
                curve.extend([torch.full_like(value, math.inf)] * (num_steps - step))
                break
            if step < num_steps:
                loss.backward()
                # the gradient is in .grad already; the closure only hands over the loss (LBFGS reads it;
                # with max_iter=1 it never evaluates again, and the others just return it)
                opt.step(lambda loss=loss: loss)
    return torch.stack(curve).cpu()


@dataclass
class TunedBaseline:
    """A baseline with the learning rate picked on validation tasks."""

    name: str
    lr: float
    #: mean loss per problem at the horizon on the validation tasks, per grid learning rate
    scores: dict[float, float]

    @property
    def at_grid_edge(self) -> bool:
        """True when the best rate is the smallest or largest of the grid: widen the grid."""
        lrs = sorted(self.scores)
        return self.lr in (lrs[0], lrs[-1])


def tune_baseline(
    name: str,
    tasks: Sequence[Task],
    num_steps: int,
    lr_grid: Sequence[float] = DEFAULT_LR_GRID,
    device: torch.device | str | None = None,
) -> TunedBaseline:
    """Pick ``name``'s learning rate from ``lr_grid`` by the mean loss at ``num_steps`` on ``tasks``."""
    if not tasks:
        raise ValueError("tune_baseline needs at least one validation task")
    scores: dict[float, float] = {}
    for lr in lr_grid:
        finals = [float(baseline_final_loss(name, lr, t, num_steps, device)) for t in tasks]
        score = sum(finals) / len(finals)
        scores[lr] = score if math.isfinite(score) else math.inf
    best = min(scores, key=lambda lr: scores[lr])
    return TunedBaseline(name, best, scores)
