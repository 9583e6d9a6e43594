"""Unrolling an update rule on a task: SGD parity, truncated BPTT, second derivatives."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from lightning_l2l.nets import CoordinatewiseLinear, CoordinatewiseLSTM, UpdateRule
from lightning_l2l.tasks import ModuleTask, QuadraticTask, Task
from lightning_l2l.trajectory import (
    STEP_WEIGHTS,
    Trajectory,
    frozen_run,
    rule_curve,
    rule_final_loss,
    step_weight,
    unroll,
)


def _sgd_rule(lr: float, construct: str = "exact") -> CoordinatewiseLinear:
    """A float64 ``-lr * g`` rule; ``"exact"`` sets the scale to -lr in float64 after ``.double()``."""
    rule = CoordinatewiseLinear(lr=lr).double()
    if construct == "exact":
        with torch.no_grad():
            rule.scale.fill_(-lr)
    return rule


def _rule_grads(rule: UpdateRule, loss: Tensor) -> list[Tensor]:
    return [g.clone() for g in torch.autograd.grad(loss, list(rule.parameters()))]


# ------------------------------------------------------------------------------------------- basics


def test_start(lstm_rule: CoordinatewiseLSTM, quadratic_task: QuadraticTask) -> None:
    """A trajectory starts at theta_0, step 0, with the rule's initial state per kind."""
    traj = Trajectory.start(lstm_rule, quadratic_task, device="cpu")
    assert traj.step == 0
    assert_close(traj.params["theta"], quadratic_task.theta0, rtol=0, atol=0)
    assert traj.layout.kinds == ["default"]
    assert traj.states["default"].shape == (12, 2, 2, 4)
    assert (traj.states["default"] == 0).all()


@pytest.mark.parametrize("differentiable", [True, False])
def test_unroll_result(
    lstm_rule: CoordinatewiseLSTM, quadratic_task: QuadraticTask, differentiable: bool
) -> None:
    """curve has num_steps + 1 losses per problem; meta_loss is the mean of the last num_steps."""
    traj = Trajectory.start(lstm_rule, quadratic_task)
    theta0 = traj.params["theta"].clone()
    res = unroll(lstm_rule, traj, 4, differentiable=differentiable)
    assert res.curve.shape == (5,) and res.finite
    assert not res.curve.requires_grad
    assert_close(res.curve[0], quadratic_task.loss({"theta": theta0}) / 4)
    assert_close(res.curve[-1], quadratic_task.loss({"theta": traj.params["theta"].detach()}) / 4)
    assert_close(res.meta_loss.detach(), res.curve[1:].mean())
    assert res.meta_loss.requires_grad is differentiable
    assert traj.step == 4
    assert not torch.equal(traj.params["theta"].detach(), theta0)


def test_unroll_zero_steps(lstm_rule: CoordinatewiseLSTM, quadratic_task: QuadraticTask) -> None:
    """Zero steps: the curve is the starting loss and the meta-loss is 0."""
    traj = Trajectory.start(lstm_rule, quadratic_task)
    res = unroll(lstm_rule, traj, 0)
    assert res.curve.shape == (1,) and traj.step == 0
    assert res.meta_loss.item() == 0.0


def test_unroll_step_continues(linear_rule: CoordinatewiseLinear, module_task64: ModuleTask) -> None:
    """Successive unrolls continue the step count (which picks a data task's minibatch)."""
    traj = Trajectory.start(linear_rule.double(), module_task64)
    unroll(linear_rule, traj, 2, differentiable=False)
    unroll(linear_rule, traj, 3, differentiable=False)
    assert traj.step == 5


def test_unroll_divergence_is_reported(quadratic_task: QuadraticTask) -> None:
    """A rule that blows the optimizee up gives ``finite=False`` instead of raising."""
    rule = CoordinatewiseLinear(lr=1e3)
    res = unroll(rule, Trajectory.start(rule, quadratic_task), 30, differentiable=False)
    assert not res.finite
    assert not torch.isfinite(res.curve[-1])


def test_differentiable_and_frozen_paths_agree(
    lstm_rule: CoordinatewiseLSTM, quadratic_task: QuadraticTask
) -> None:
    """The differentiable unroll (meta-training) and the no-grad one (evaluation) give the same numbers."""
    a = Trajectory.start(lstm_rule, quadratic_task)
    b = Trajectory.start(lstm_rule, quadratic_task)
    res_a = unroll(lstm_rule, a, 5, differentiable=True)
    res_b = unroll(lstm_rule, b, 5, differentiable=False)
    assert_close(res_a.curve, res_b.curve)
    assert_close(a.params["theta"].detach(), b.params["theta"])
    assert_close(a.states["default"].detach(), b.states["default"])
    assert b.params["theta"].grad_fn is None and b.states["default"].grad_fn is None


def test_rule_curve_matches_unroll(lstm_rule: CoordinatewiseLSTM, quadratic_task: QuadraticTask) -> None:
    """rule_curve is the frozen unroll from theta_0, and works under inference_mode."""
    ref = unroll(lstm_rule, Trajectory.start(lstm_rule, quadratic_task), 4, differentiable=False).curve
    assert_close(rule_curve(lstm_rule, quadratic_task, 4), ref)
    with torch.inference_mode():
        assert_close(rule_curve(lstm_rule, quadratic_task, 4), ref)
    assert all(p.grad is None for p in lstm_rule.parameters())


def test_lr_multiplies_the_rules_updates(quadratic_task64: QuadraticTask) -> None:
    """``lr`` scales every update, as LearnedOptimizer(lr=...) does: a -0.1*g rule at lr 0.5 is SGD(0.05)."""
    curve = rule_curve(_sgd_rule(0.1), quadratic_task64, 6, lr=0.5)
    assert_close(curve, rule_curve(_sgd_rule(0.05), quadratic_task64, 6), rtol=1e-12, atol=1e-12)
    frozen = rule_curve(_sgd_rule(0.1), quadratic_task64, 3, lr=0.0)
    assert_close(frozen, frozen[:1].expand(4))  # no update at all: the loss of theta_0 throughout
    traj = Trajectory.start(_sgd_rule(0.1), quadratic_task64)
    differentiable = unroll(_sgd_rule(0.1), traj, 6, lr=0.5).curve
    assert_close(differentiable, curve, rtol=1e-12, atol=1e-12)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="Invalid lr"):
            rule_curve(_sgd_rule(0.1), quadratic_task64, 2, lr=bad)


# -------------------------------------------------------------------------------------- SGD parity


def _assert_sgd_parity(rule: UpdateRule, task: Task, steps: int = 10) -> None:
    """Step the rule one unroll at a time next to torch.optim.SGD(lr=0.1) and compare every step."""
    traj = Trajectory.start(rule, task)
    ref = {n: p.clone().requires_grad_() for n, p in task.init_params().items()}
    opt = torch.optim.SGD(list(ref.values()), lr=0.1)
    ref_curve = []
    for step in range(steps):
        unroll(rule, traj, 1, differentiable=False)
        opt.zero_grad()
        loss = task.loss(ref, step)
        ref_curve.append(loss.detach() / task.num_problems)
        loss.backward()
        opt.step()
        for n, p in ref.items():
            assert_close(traj.params[n], p.detach(), rtol=1e-12, atol=1e-12)
    # the loss curve of one 10-step unroll, against SGD's
    curve = unroll(rule, Trajectory.start(rule, task), steps, differentiable=False).curve
    ref_curve.append(task.loss(ref, steps).detach() / task.num_problems)
    assert_close(curve, torch.stack(ref_curve), rtol=1e-12, atol=1e-12)
    assert curve[-1] < curve[0]  # the run did optimise something


@pytest.mark.parametrize(
    "construct",
    [
        "exact",
        "double",
    ],
)
def test_sgd_parity_quadratic(quadratic_task64: QuadraticTask, construct: str) -> None:
    """A -0.1*g rule through unroll matches torch.optim.SGD(lr=0.1) in float64 on a quadratic."""
    _assert_sgd_parity(_sgd_rule(0.1, construct), quadratic_task64)


def test_sgd_parity_module_task(module_task64: ModuleTask) -> None:
    """A -0.1*g rule through unroll matches torch.optim.SGD(lr=0.1) on a float64 nn.Linear regression."""
    _assert_sgd_parity(_sgd_rule(0.1), module_task64)


# ---------------------------------------------------------------------------------- truncated BPTT


def test_meta_loss_reaches_rule_weights(lstm_rule: CoordinatewiseLSTM, quadratic_task: QuadraticTask) -> None:
    """meta_loss.backward() gives nonzero gradients on the rule's weights (every layer)."""
    res = unroll(lstm_rule, Trajectory.start(lstm_rule, quadratic_task), 3)
    res.meta_loss.backward()
    for name, p in lstm_rule.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert lstm_rule.out.weight.grad.abs().sum() > 0
    assert lstm_rule.cells[0].weight_ifo.grad.abs().sum() > 0
    assert lstm_rule.cells[1].weight_g.grad.abs().sum() > 0


def test_truncation_cuts_the_graph(lstm_rule: CoordinatewiseLSTM, quadratic_task: QuadraticTask) -> None:
    """After ``detach`` nothing carries a graph, and the next truncation's meta-gradient stays inside it."""
    traj = Trajectory.start(lstm_rule, quadratic_task)
    first = unroll(lstm_rule, traj, 3)
    captured = traj.params["theta"]  # end of truncation 1, part of its graph
    assert captured.grad_fn is not None
    captured.retain_grad()
    first.meta_loss.backward()
    captured_grad = captured.grad.clone()
    assert captured_grad.abs().sum() > 0

    traj.detach()
    for t in [*traj.params.values(), *traj.states.values()]:
        assert t.grad_fn is None and t.is_leaf and not t.requires_grad
    start_params = {n: p.clone() for n, p in traj.params.items()}
    start_states = {k: s.clone() for k, s in traj.states.items()}

    lstm_rule.zero_grad()
    second = unroll(lstm_rule, traj, 3)
    second.meta_loss.backward()
    assert torch.equal(captured.grad, captured_grad)  # nothing flowed back into truncation 1
    grads = [p.grad.clone() for p in lstm_rule.parameters()]
    assert any(g.abs().sum() > 0 for g in grads)

    # the same meta-gradient as a fresh trajectory starting from the detached values
    fresh = Trajectory(quadratic_task, traj.layout, start_params, start_states, step=3)
    for g, g_ref in zip(grads, _rule_grads(lstm_rule, unroll(lstm_rule, fresh, 3).meta_loss), strict=True):
        assert_close(g, g_ref)


def test_without_detach_the_graph_does_cross(
    lstm_rule: CoordinatewiseLSTM, quadratic_task: QuadraticTask
) -> None:
    """Control for the test above: without ``detach`` the second meta-loss does reach truncation 1."""
    traj = Trajectory.start(lstm_rule, quadratic_task)
    first = unroll(lstm_rule, traj, 3)
    captured = traj.params["theta"]
    captured.retain_grad()
    first.meta_loss.backward(retain_graph=True)
    captured_grad = captured.grad.clone()
    second = unroll(lstm_rule, traj, 3)
    second.meta_loss.backward()
    assert not torch.equal(captured.grad, captured_grad)


def test_frozen_unroll_has_no_graph(lstm_rule: CoordinatewiseLSTM, quadratic_task: QuadraticTask) -> None:
    """``differentiable=False`` leaves no graph on params, states or the meta-loss."""
    traj = Trajectory.start(lstm_rule, quadratic_task)
    res = unroll(lstm_rule, traj, 3, differentiable=False)
    assert res.meta_loss.grad_fn is None
    assert all(t.grad_fn is None for t in [*traj.params.values(), *traj.states.values()])


# ------------------------------------------------------------------------------ second derivatives


@pytest.mark.parametrize(
    "make_rule",
    [lambda: CoordinatewiseLSTM(hidden_size=4), lambda: CoordinatewiseLinear(0.01)],
    ids=["lstm", "linear"],
)
def test_second_derivatives_change_meta_gradient(make_rule, quadratic_task64: QuadraticTask) -> None:
    """Backpropagating through the optimizee gradients changes the meta-gradient, not the losses.

    In float64, so that the (small, for the log-sign LSTM) second-order term is far above rounding.
    """
    rule = make_rule().double()

    def meta_grad(second_derivatives: bool) -> tuple[Tensor, Tensor]:
        res = unroll(rule, Trajectory.start(rule, quadratic_task64), 4, second_derivatives=second_derivatives)
        grads = torch.cat([g.flatten() for g in _rule_grads(rule, res.meta_loss)])
        return res.curve, grads

    curve1, g1 = meta_grad(False)
    curve2, g2 = meta_grad(True)
    assert_close(curve1, curve2, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(g2).all()
    assert_close(meta_grad(False)[1], g1, rtol=1e-13, atol=0.0)  # control: reruns agree to rounding
    assert (g1 - g2).abs().max() > 1e-6 * g1.abs().max()


def test_second_derivatives_need_differentiable(
    lstm_rule: CoordinatewiseLSTM, quadratic_task: QuadraticTask
) -> None:
    """second_derivatives=True with differentiable=False is a contradiction: ValueError."""
    with pytest.raises(ValueError, match="second_derivatives=True needs differentiable=True"):
        unroll(
            lstm_rule,
            Trajectory.start(lstm_rule, quadratic_task),
            2,
            differentiable=False,
            second_derivatives=True,
        )


# ------------------------------------------------------------------------------ step weights w_t


def test_step_weight_schedules() -> None:
    assert STEP_WEIGHTS == ("uniform", "linear")
    assert all(step_weight("uniform", t, 100) == 1.0 for t in range(1, 101))
    linear = torch.tensor([step_weight("linear", t, 100) for t in range(1, 101)], dtype=torch.float64)
    assert linear.mean().item() == pytest.approx(1.0)  # same scale as the paper's w_t = 1
    assert (linear.diff() > 0).all() and linear[0] < 0.02 and linear[-1] > 1.98
    with pytest.raises(ValueError, match="outside the horizon"):
        step_weight("linear", 101, 100)
    with pytest.raises(ValueError, match="Invalid step weights"):
        step_weight("exp", 1, 100)


def test_unroll_linear_step_weights_use_the_step_within_the_trajectory(quadratic_task) -> None:
    """Two truncations of 3 steps of a 6-step trajectory weigh the losses at t = 1..3, then t = 4..6."""
    rule = CoordinatewiseLSTM(hidden_size=4)
    plain_traj = Trajectory.start(rule, quadratic_task)
    weighted_traj = Trajectory.start(rule, quadratic_task)
    for first in (1, 4):
        plain = unroll(rule, plain_traj, 3)
        weighted = unroll(rule, weighted_traj, 3, step_weights="linear", horizon=6)
        assert_close(weighted.curve, plain.curve)
        w = torch.tensor([2.0 * t / 7 for t in range(first, first + 3)])
        assert_close(weighted.meta_loss, (plain.curve[1:] * w).mean())
        logged = unroll(rule, Trajectory.start(rule, quadratic_task), 3, objective="log_mean",
                        step_weights="linear", horizon=6)
        assert torch.isfinite(logged.meta_loss)
    grads = torch.autograd.grad(weighted.meta_loss, list(rule.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_unroll_step_weights_bad_arguments(quadratic_task) -> None:
    rule = CoordinatewiseLSTM(hidden_size=4)
    with pytest.raises(ValueError, match="needs the trajectory's horizon"):
        unroll(rule, Trajectory.start(rule, quadratic_task), 2, step_weights="linear")
    with pytest.raises(ValueError, match="Invalid step_weights"):
        unroll(rule, Trajectory.start(rule, quadratic_task), 2, step_weights="late")


def test_final_loss_without_an_eval_loss_is_the_last_step_loss(
    lstm_rule: CoordinatewiseLSTM, quadratic_task: QuadraticTask
) -> None:
    """A task with no eval_loss (a quadratic): the curve is rule_curve's and the final loss its end."""
    full = rule_curve(lstm_rule, quadratic_task, 5)
    steps, final = frozen_run(lstm_rule, quadratic_task, 5)
    assert torch.equal(steps, full) and torch.equal(final, full[-1])
    assert torch.equal(rule_final_loss(lstm_rule, quadratic_task, 5), full[-1])
