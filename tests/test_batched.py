"""BatchedTask and MetaLearner(tasks_per_step=...): several optimizees per meta-step."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_l2l.meta import MetaLearner
from lightning_l2l.nets import CoordinatewiseLSTM
from lightning_l2l.tasks import BatchedTask, MNISTFamily, ModuleTask, QuadraticFamily
from lightning_l2l.trajectory import Trajectory, rule_curve, rule_final_loss, unroll


def _module_tasks(n: int) -> list[ModuleTask]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randint(3, (64,), generator=g)
    tasks = []
    for seed in range(n):
        torch.manual_seed(seed)
        tasks.append(ModuleTask(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), x, y, batch_size=16, seed=seed))
    return tasks


def test_batched_task_names_kinds_and_problems() -> None:
    members = [QuadraticFamily(dim=3, num_functions=4).sample(torch.Generator().manual_seed(s)) for s in range(2)]
    modules = _module_tasks(1)
    task = BatchedTask([*members, *modules])
    params = task.init_params()
    assert set(params) == {"0/theta", "1/theta", "2/0.weight", "2/0.bias", "2/2.weight", "2/2.bias"}
    assert_close(params["1/theta"], members[1].init_params()["theta"])
    assert task.kinds() == {f"2/{n}": k for n, k in modules[0].kinds().items()}
    assert task.num_problems == 4 + 4 + 1


def test_batched_loss_is_the_sum_and_gradients_are_the_members() -> None:
    members = _module_tasks(3)
    task = BatchedTask(members)
    params = {n: p.requires_grad_() for n, p in task.init_params().items()}
    loss = task.loss(params, step=5)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    total = 0.0
    for i, member in enumerate(members):
        own = {n: p.requires_grad_() for n, p in member.init_params().items()}
        own_loss = member.loss(own, step=5)  # each member keeps its own minibatch sequence
        total = total + own_loss
        for n, g in zip(own, torch.autograd.grad(own_loss, list(own.values())), strict=True):
            assert_close(grads[f"{i}/{n}"], g)
    assert_close(loss, total)


def test_batched_eval_loss_sums_members_or_is_none() -> None:
    family = MNISTFamily(width=4, split="val", batch_size=32)
    gen = torch.Generator().manual_seed(0)
    members = [family.sample(gen) for _ in range(2)]
    task = BatchedTask(members)
    params = task.init_params()
    expected = sum(float(m.eval_loss(m.init_params())) for m in members)
    assert float(task.eval_loss(params)) == pytest.approx(expected, rel=1e-6)
    mixed = BatchedTask([members[0], *_module_tasks(1)])  # a ModuleTask has no full-data loss
    assert mixed.eval_loss(mixed.init_params()) is None


def test_final_loss_of_a_batch_is_the_curve_end() -> None:
    """rule_final_loss on a batch of 3 tasks with a full-data loss: rule_curve's last entry to the bit
    (the same per-problem scaling)."""
    torch.manual_seed(0)
    rule = CoordinatewiseLSTM(hidden_size=6).requires_grad_(False)
    family = MNISTFamily(width=4, split="val", batch_size=32)
    gen = torch.Generator().manual_seed(1)
    task = BatchedTask([family.sample(gen) for _ in range(3)])
    assert torch.equal(rule_final_loss(rule, task, 5), rule_curve(rule, task, 5)[-1])


def test_rule_on_a_batch_is_the_rule_on_each_member() -> None:
    """Coordinatewise: batching members changes nothing but the number of rule calls."""
    torch.manual_seed(0)
    rule = CoordinatewiseLSTM(hidden_size=6)
    members = _module_tasks(3)
    batched = rule_curve(rule, BatchedTask(members), 12)
    alone = torch.stack([rule_curve(rule, m, 12) for m in members]).mean(0)  # num_problems 3
    assert_close(batched, alone, rtol=1e-5, atol=1e-6)

    traj = Trajectory.start(rule, BatchedTask(members))
    unroll(rule, traj, 4, differentiable=False)
    for i, member in enumerate(members):
        own = Trajectory.start(rule, member)
        unroll(rule, own, 4, differentiable=False)
        for n, p in own.params.items():
            assert_close(traj.params[f"{i}/{n}"], p, rtol=1e-5, atol=1e-6)


def test_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one task"):
        BatchedTask([])


def _learner(**kwargs) -> MetaLearner:
    args = dict(
        rule=CoordinatewiseLSTM(hidden_size=8), task_family=QuadraticFamily(dim=4, num_functions=8),
        horizon=10, unroll=5, truncations_per_epoch=4, num_val_tasks=1, num_test_tasks=1, lr_grid=[1e-2],
    )
    args.update(kwargs)
    return MetaLearner(**args)


def _fit(model: MetaLearner, tmp_path, steps: int) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, max_steps=steps)
    trainer.fit(model)
    return trainer


def test_tasks_per_step_meta_trains_on_a_batch_of_fresh_tasks(tmp_path) -> None:
    torch.manual_seed(0)
    model = _learner(tasks_per_step=3)
    before = {n: p.detach().clone() for n, p in model.rule.named_parameters()}
    _fit(model, tmp_path, steps=3)  # horizon 10 / unroll 5: a new batch of tasks at step 3
    task = model._traj.task
    assert isinstance(task, BatchedTask) and len(task.tasks) == 3
    thetas = [m.init_params()["theta"] for m in task.tasks]
    assert not torch.equal(thetas[0], thetas[1]) and not torch.equal(thetas[1], thetas[2])
    assert model._traj.step == 5
    assert any(not torch.equal(before[n], p) for n, p in model.rule.named_parameters())


def test_tasks_per_step_one_is_the_plain_task_stream(tmp_path) -> None:
    """The default keeps earlier runs reproducible: the task itself, not a batch of one."""
    torch.manual_seed(0)
    model = _learner()
    _fit(model, tmp_path, steps=1)
    assert not isinstance(model._traj.task, BatchedTask)
    first = QuadraticFamily(dim=4, num_functions=8).sample(torch.Generator().manual_seed(0))  # seed 0, rank 0
    assert torch.equal(model._traj.task.init_params()["theta"], first.init_params()["theta"])


def test_tasks_per_step_must_be_positive() -> None:
    with pytest.raises(ValueError, match="Invalid tasks_per_step: 0"):
        _learner(tasks_per_step=0)


def test_log_mean_weighs_each_member_alike():
    """With the log_mean objective a meta-batch's loss is the mean of its members' own log-mean losses,
    whatever their loss scales (a member with a 1,000 times larger loss does not drown the other)."""
    family = QuadraticFamily(dim=3, num_functions=2, init_std=1.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    small, large = family.sample(g), family.sample(g)
    large.W, large.y = large.W * 30.0, large.y * 30.0  # a loss about 1,000 times larger
    rule = CoordinatewiseLSTM(hidden_size=4).double()
    alone = []
    for task in (small, large):
        traj = Trajectory.start(rule, task)
        alone.append(unroll(rule, traj, 6, differentiable=False, objective="log_mean").meta_loss)
    traj = Trajectory.start(rule, BatchedTask([small, large]))
    batched = unroll(rule, traj, 6, differentiable=False, objective="log_mean").meta_loss
    torch.testing.assert_close(batched, torch.stack(alone).mean(), rtol=1e-12, atol=1e-12)
