"""Running an update rule on a task: the unroll shared by meta-training, evaluation and tests.

``unroll`` applies ``theta_{t+1} = theta_t + g_t``, ``[g_t, h_{t+1}] = m(grad_t, h_t; phi)``
(Andrychowicz et al., 2016, eq. 1) for a number of steps and returns the losses along the way.
With ``differentiable=True`` the parameters keep their graph to ``phi`` so that
``L(phi) = sum_t w_t f(theta_t)`` (eq. 2, ``w_t = 1``) can be backpropagated; optimizee gradients
are treated as inputs (``d grad_t / d phi = 0``, section 2) unless ``second_derivatives=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_l2l.nets import KindLayout, UpdateRule, apply_rule
from lightning_l2l.tasks import BatchedTask, Task

__all__ = [
    "OBJECTIVES", "STEP_WEIGHTS", "Trajectory", "UnrollResult", "step_weight", "unroll", "rule_curve", "frozen_run",
    "rule_final_loss", "rule_losses_at",
]

#: meta-objectives :func:`unroll` can return: the paper's mean loss, or the mean log loss
OBJECTIVES = ("mean", "log_mean", "log_eval")
#: schedules of the weights ``w_t`` on the optimizee loss at step ``t`` of a trajectory (eq. 2)
STEP_WEIGHTS = ("uniform", "linear")
#: floor under the loss in the ``log_mean`` objective (keeps ``log`` finite at a zero loss)
LOG_LOSS_FLOOR = 1e-12


def step_weight(schedule: str, step: int, horizon: int) -> float:
    """``w_t`` of eq. 2 for the loss at step ``t = step`` (1 ... ``horizon``) of a trajectory.

    ``"uniform"``: ``w_t = 1`` (the paper). ``"linear"``: ``w_t = 2 t / (horizon + 1)``, which rises from
    about 0 to about 2 and averages 1 over the horizon: the late losses, where a rule is judged, weigh
    more, while the early steps still get a meta-gradient (not in the paper).
    """
    if schedule == "uniform":
        return 1.0
    if schedule == "linear":
        if not 1 <= step <= horizon:
            raise ValueError(f"step {step} is outside the horizon 1 ... {horizon}")
        return 2.0 * step / (horizon + 1)
    raise ValueError(f"Invalid step weights: {schedule!r} (expected one of {STEP_WEIGHTS})")


@dataclass
class Trajectory:
    """Where an optimizee is on its trajectory: parameters, rule state and step count."""

    task: Task
    layout: KindLayout
    params: dict[str, Tensor]
    states: dict[str, Tensor]
    step: int = 0

    @classmethod
    def start(cls, rule: UpdateRule, task: Task, device: torch.device | str | None = None) -> Trajectory:
        """Begin at ``theta_0`` with the rule's initial state."""
        params = task.init_params()
        if device is not None:
            params = {n: p.to(device) for n, p in params.items()}
        layout = KindLayout({n: p.shape for n, p in params.items()}, task.kinds())
        any_param = next(iter(params.values()))
        states = layout.init_state(rule, device=any_param.device)
        return cls(task, layout, params, states)

    def detach(self) -> None:
        """Cut the graph: the truncation boundary of truncated BPTT."""
        self.params = {n: p.detach() for n, p in self.params.items()}
        self.states = {k: s.detach() for k, s in self.states.items()}


@dataclass
class UnrollResult:
    """Outcome of :func:`unroll`.

    Attributes:
        meta_loss: mean over the unrolled steps of ``f(theta_t) / num_problems`` for the
            ``num_steps`` parameters the rule produced (differentiable when requested); with
            ``objective="log_mean"`` the mean of ``log(f(theta_t) / num_problems)`` (for a
            :class:`~lightning_l2l.tasks.BatchedTask`, the mean over its members of each one's log loss
            per problem, so that every member counts the same whatever its loss scale); each term times
            ``w_t`` where ``step_weights`` is not uniform.
        curve: ``(num_steps + 1,)`` detached losses per problem, ``f(theta_start) ... f(theta_end)``:
            the step's :meth:`~lightning_l2l.tasks.Task.loss`, or with ``eval_curve=True`` the
            task's :meth:`~lightning_l2l.tasks.Task.eval_loss` where it defines one.
        finite: whether every loss was finite.
    """

    meta_loss: Tensor
    curve: Tensor
    finite: bool = field(default=True)


def unroll(
    rule: UpdateRule,
    traj: Trajectory,
    num_steps: int,
    *,
    differentiable: bool = True,
    second_derivatives: bool = False,
    eval_curve: bool = False,
    objective: str = "mean",
    step_weights: str = "uniform",
    horizon: int | None = None,
    lr: float = 1.0,
    zero_grads: str = "update",
    eval_every: int = 0,
) -> UnrollResult:
    """Advance ``traj`` by ``num_steps`` rule steps (in place) and return the losses.

    Args:
        rule: the update rule ``m``.
        traj: the trajectory to advance; its ``params``, ``states`` and ``step`` are updated.
        num_steps: steps to take.
        differentiable: keep the graph from the losses to the rule's weights.
        second_derivatives: backpropagate through the optimizee gradients too (off in the paper).
        eval_curve: record the task's ``eval_loss`` (e.g. the full-data loss) in ``curve`` where it
            defines one; ``meta_loss`` and the gradients always use ``loss`` (the step's minibatch).
        objective: ``"mean"``: ``meta_loss`` is the mean loss, the paper's ``L(phi)`` with
            ``w_t = 1`` (eq. 2); ``"log_mean"``: the mean of the log loss, which counts halving the
            loss the same wherever it happens, so that the small losses late in a trajectory still
            drive the meta-gradient (not in the paper); ``"log_eval"``: the mean of the log of the
            task's held-out ``eval_loss`` every ``eval_every`` steps of the trajectory and after the
            last step, so that what the rule is trained for is the loss on examples it never took a
            step on, late in a run included (overfitting counts against it; not in the paper). Over a
            meta-batch (:class:`~lightning_l2l.tasks.BatchedTask`) both log objectives average each
            member's log, so that every task counts alike whatever its loss scale.
        step_weights: the ``w_t`` of eq. 2 on each step's term (:func:`step_weight`); ``"linear"``
            needs ``horizon``, the trajectory's length, since ``t`` counts from its start.
        lr: multiplier of the rule's updates, ``theta_{t+1} = theta_t + lr * g_t`` (what
            :class:`~lightning_l2l.LearnedOptimizer`'s ``lr`` does; 1: the rule as meta-trained).
        zero_grads: what the rule does with a gradient entry that is exactly zero: ``"update"`` (it
            sees the zero like any gradient; the paper) or ``"skip"`` (no update, state unchanged;
            ``LearnedOptimizer``'s default). See :func:`~lightning_l2l.nets.apply_rule`.
        eval_every: with ``objective="log_eval"``, the held-out loss enters the objective at every step
            ``t`` (counted from the trajectory's start) that is a multiple of it, and after the last step
            (``0``: after the last step only).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"Invalid objective: {objective!r} (expected one of {OBJECTIVES})")
    if eval_every < 0:
        raise ValueError(f"Invalid eval_every: {eval_every} (expected >= 0 steps; 0: the last step only)")
    if step_weights not in STEP_WEIGHTS:
        raise ValueError(f"Invalid step_weights: {step_weights!r} (expected one of {STEP_WEIGHTS})")
    if step_weights != "uniform" and horizon is None:
        raise ValueError(f"step_weights={step_weights!r} needs the trajectory's horizon (horizon=...)")
    if second_derivatives and not differentiable:
        raise ValueError("second_derivatives=True needs differentiable=True")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"Invalid lr: {lr} (a multiplier of the rule's updates, expected a finite value >= 0)")
    task, scale = traj.task, 1.0 / traj.task.num_problems
    terms: list[Tensor] = []
    curve: list[Tensor] = []
    with torch.enable_grad():
        for i in range(num_steps + 1):
            params = {
                n: p if p.requires_grad else p.detach().requires_grad_() for n, p in traj.params.items()
            }
            members = None
            if objective == "log_mean" and isinstance(task, BatchedTask):
                members = task.member_losses(params, traj.step)  # (k,): log-averaged one by one below
                loss = members.sum()
            else:
                loss = task.loss(params, traj.step)
            recorded = None
            if eval_curve:
                with torch.no_grad():
                    recorded = task.eval_loss(params)
            curve.append((loss if recorded is None else recorded).detach() * scale)
            if objective == "log_eval":
                if i > 0 and (i == num_steps or (eval_every > 0 and traj.step % eval_every == 0)):
                    terms.append(_log_eval_term(task, params, differentiable))
            elif i > 0:
                term = loss * scale if differentiable else loss.detach() * scale
                if members is not None:  # a meta-batch: the mean of each member's log loss per problem
                    term = _mean_log_per_problem(members if differentiable else members.detach(), task)
                elif objective == "log_mean":
                    term = torch.log(term.clamp_min(LOG_LOSS_FLOOR))
                if horizon is not None and step_weights != "uniform":  # horizon: checked above
                    term = term * step_weight(step_weights, traj.step, horizon)
                terms.append(term)
            if i == num_steps:
                break
            grads = torch.autograd.grad(
                loss,
                list(params.values()),
                create_graph=second_derivatives,
                retain_graph=differentiable,
                allow_unused=True,  # a parameter the loss does not use: no gradient, skipped
            )
            grads_by_name = {
                n: None if g is None else g if second_derivatives else g.detach()
                for n, g in zip(params.keys(), grads, strict=True)
            }
            with torch.set_grad_enabled(differentiable):  # frozen: new params and states carry no graph
                # frozen, the states are written in place (the fused LSTM step on CPU), unless one still
                # carries a graph (a trajectory unrolled differentiably and not detached)
                inplace = not differentiable and not any(s.requires_grad for s in traj.states.values())
                result = apply_rule(rule, traj.layout, grads_by_name, traj.states, zero_grads=zero_grads,
                                    inplace=inplace)
                updates, traj.states = result.updates, result.states
                if lr != 1.0:
                    updates = {n: u * lr for n, u in updates.items()}
                traj.params = {n: params[n] + updates[n] if n in updates else params[n] for n in params}
            traj.step += 1
    curve_t = torch.stack(curve)
    meta_loss = torch.stack(terms).mean() if terms else curve_t.new_zeros(())
    return UnrollResult(meta_loss, curve_t, bool(torch.isfinite(curve_t).all()))


def _mean_log_per_problem(losses: Tensor, task: Task) -> Tensor:
    """The mean over a meta-batch's members (``losses``: one each) of ``log(loss / num_problems)``; a single
    task is a meta-batch of one. What makes both log objectives weigh every member alike."""
    members = task.tasks if isinstance(task, BatchedTask) else [task]
    sizes = losses.new_tensor([t.num_problems for t in members])
    return torch.log((losses.reshape(len(members)) / sizes).clamp_min(LOG_LOSS_FLOOR)).mean()


def _log_eval_term(task: Task, params: dict[str, Tensor], differentiable: bool) -> Tensor:
    """The ``log_eval`` objective's term: the log held-out loss per problem (each member's, averaged)."""
    with torch.set_grad_enabled(differentiable):
        losses = task.member_eval_losses(params) if isinstance(task, BatchedTask) else task.eval_loss(params)
    if losses is None:
        raise ValueError(
            f"objective='log_eval' needs a task with a held-out eval_loss, and {type(task).__name__} defines "
            "none; use objective='log_mean', or a task family whose tasks hold out examples (e.g. GeneralFamily)"
        )
    term = _mean_log_per_problem(losses, task)
    if differentiable and not term.requires_grad and any(p.requires_grad for p in params.values()):
        raise ValueError(
            f"objective='log_eval': {type(task).__name__}.eval_loss returned a loss without a graph; it must be "
            "differentiable in params (no torch.no_grad() or .detach() inside)"
        )
    return term if differentiable else term.detach()


def rule_curve(
    rule: UpdateRule,
    task: Task,
    num_steps: int,
    device: torch.device | str | None = None,
    lr: float = 1.0,
    zero_grads: str = "update",
) -> Tensor:
    """Loss per problem along ``num_steps`` steps of the frozen ``rule`` from ``theta_0``: ``(num_steps + 1,)``.

    Records the task's ``eval_loss`` (e.g. the full-data loss) where it defines one, else the
    step's loss. ``lr`` multiplies the rule's updates (``LearnedOptimizer(lr=...)``), ``zero_grads``
    is :func:`unroll`'s.
    """
    with torch.inference_mode(False):
        traj = Trajectory.start(rule, task, device)
        return unroll(rule, traj, num_steps, differentiable=False, eval_curve=True, lr=lr, zero_grads=zero_grads).curve


def frozen_run(
    rule: UpdateRule,
    task: Task,
    num_steps: int,
    device: torch.device | str | None = None,
    lr: float = 1.0,
    zero_grads: str = "update",
) -> tuple[Tensor, Tensor]:
    """``num_steps`` steps of the frozen ``rule`` from ``theta_0``: the steps' losses and the final loss.

    Returns ``(curve, final)``: ``curve`` is ``(num_steps + 1,)`` losses per problem of the steps'
    minibatches (what the rule saw, and what the paper's meta-objective averages), ``final`` the task's
    ``eval_loss`` after the last step where it defines one (e.g. the loss on the task's fixed evaluation
    images), else the last step's loss: the same number as ``rule_curve(...)[-1]`` (the trajectory never
    depends on what is recorded along it), without an ``eval_loss`` pass at every step, which on image
    tasks is more than half of :func:`rule_curve`'s compute.
    """
    with torch.inference_mode(False):
        traj = Trajectory.start(rule, task, device)
        curve = unroll(rule, traj, num_steps, differentiable=False, lr=lr, zero_grads=zero_grads).curve
        with torch.no_grad():
            recorded = task.eval_loss(traj.params)
    # scaled as unroll scales its curve, so that the number is rule_curve's to the bit
    return curve, curve[-1] if recorded is None else recorded.detach() * (1.0 / task.num_problems)


def rule_final_loss(
    rule: UpdateRule,
    task: Task,
    num_steps: int,
    device: torch.device | str | None = None,
    lr: float = 1.0,
    zero_grads: str = "update",
) -> Tensor:
    """``rule_curve(rule, task, num_steps, device, lr)[-1]`` at about half the cost (:func:`frozen_run`):
    what checkpoint selection and the tuning of an update multiplier look at."""
    return frozen_run(rule, task, num_steps, device, lr, zero_grads)[1]


def rule_losses_at(
    rule: UpdateRule,
    task: Task,
    steps: Sequence[int],
    device: torch.device | str | None = None,
    lr: float = 1.0,
    zero_grads: str = "update",
) -> Tensor:
    """``rule_curve(rule, task, max(steps), ...)[steps]`` with the ``eval_loss`` computed at those steps only
    (one frozen run, continued from each step to the next): ``(len(steps),)`` for increasing ``steps``."""
    if list(steps) != sorted(set(steps)) or not steps or steps[0] < 0:
        raise ValueError(f"Invalid steps: {list(steps)} (expected increasing step counts >= 0)")
    out, done = [], 0
    with torch.inference_mode(False):
        traj = Trajectory.start(rule, task, device)
        for n in steps:
            curve = unroll(rule, traj, n - done, differentiable=False, lr=lr, zero_grads=zero_grads).curve
            done = n
            with torch.no_grad():
                recorded = task.eval_loss(traj.params)
            out.append(curve[-1] if recorded is None else recorded.detach() * (1.0 / task.num_problems))
    return torch.stack(out)
