"""``GeneralFamily``: the wide task mixture the ``general`` weights are meta-trained on."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_l2l.nets import MomentMLP
from lightning_l2l.tasks import GeneralFamily, GeneralTask
from lightning_l2l.tasks.general import ARCHITECTURES, EXTRA_ARCHITECTURES
from lightning_l2l.trajectory import frozen_run
from tests.image_data import FASHION_SAMPLE_DIR

SAMPLE = str(FASHION_SAMPLE_DIR)  # 2,000 real Fashion-MNIST images: the same loader on any machine


def _family(**kwargs) -> GeneralFamily:
    return GeneralFamily(data_dir=SAMPLE, num_train=256, num_eval=64, **kwargs)


def _tasks(n: int, seed: int = 0, **kwargs) -> list[GeneralTask]:
    family, g = _family(**kwargs), torch.Generator().manual_seed(seed)
    return [family.sample(g) for _ in range(n)]


def test_docstring_defaults() -> None:
    family = GeneralFamily()
    assert family.split == "train" and family.architectures == ARCHITECTURES
    assert (family.num_train, family.num_eval) == (2048, 512)
    assert family.batch_sizes == (16, 32, 64, 128) and family.init_scales == (0.5, 1.0, 2.0)


def test_sampling_is_a_pure_function_of_the_generator() -> None:
    a, b = _tasks(6, seed=3), _tasks(6, seed=3)
    for ta, tb in zip(a, b, strict=True):
        assert repr(ta) == repr(tb)
        for (na, pa), (nb, pb) in zip(ta.init_params().items(), tb.init_params().items(), strict=True):
            assert na == nb and torch.equal(pa, pb)
        assert torch.equal(ta.inputs, tb.inputs) and torch.equal(ta.eval_targets, tb.eval_targets)
        assert torch.equal(ta.loss(ta.init_params(), 5), tb.loss(tb.init_params(), 5))


def test_the_mixture_covers_every_architecture_and_setting() -> None:
    tasks = _tasks(60)
    specs = [t.spec for t in tasks]
    assert {s.architecture for s in specs} == set(ARCHITECTURES)
    assert {s.batch_size for s in specs} == {16, 32, 64, 128}
    assert {s.init_scale for s in specs} == {0.5, 1.0, 2.0}
    details = " ".join(f"{s.data} {s.detail}" for s in specs)
    for word in ("batch norm", "no norm", "LayerNorm", "sigmoid", "relu", "tanh", "gelu", "Fashion-MNIST",
                 "Gaussian clusters", "teacher regression", "running-sum", "MSE"):
        assert word in details, word


@pytest.mark.parametrize("arch", ARCHITECTURES + EXTRA_ARCHITECTURES)
def test_every_architecture_trains_and_reports_held_out_loss(arch: str) -> None:
    """Finite losses and gradients; 100 steps of Adam-like updates lower the held-out loss."""
    task = _tasks(1, seed=1, architectures=[arch])[0]
    assert task.spec.architecture == arch
    params = {n: p.requires_grad_() for n, p in task.init_params().items()}
    loss = task.loss(params, 0)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    assert math.isfinite(loss.detach().item()) and all(g is None or torch.isfinite(g).all() for g in grads)
    before = float(task.eval_loss(task.init_params()))
    _, after = frozen_run(MomentMLP(lr=3e-3), task, 100, zero_grads="skip")
    assert math.isfinite(before) and float(after) < before, (repr(task), before, float(after))


def test_extra_architectures_are_opt_in() -> None:
    """The default mixture never draws the extras (its validation tasks stay what earlier rules were chosen on);
    named, they are drawn, and the linear model is one layer (convex)."""
    assert not {t.spec.architecture for t in _tasks(40)} & set(EXTRA_ARCHITECTURES)
    tasks = _tasks(30, architectures=ARCHITECTURES + EXTRA_ARCHITECTURES)
    assert set(EXTRA_ARCHITECTURES) <= {t.spec.architecture for t in tasks}
    linear = [t for t in tasks if t.spec.architecture == "linear"]
    assert all(len(t.init_params()) == 2 for t in linear)  # weight and bias
    resconv = next(t for t in tasks if t.spec.architecture == "resconv")
    assert "batch norm" in resconv.spec.detail and any("body" in n for n in resconv.init_params())
    with pytest.raises(ValueError, match="linear"):
        _family(architectures=["lnear"])


def test_held_out_examples_are_not_training_examples() -> None:
    for task in _tasks(12, seed=2):
        train = {tuple(row.flatten().tolist()) for row in task.inputs}
        assert not any(tuple(row.flatten().tolist()) in train for row in task.eval_inputs), repr(task)


def test_splits_draw_other_tasks_from_the_same_seed() -> None:
    train, val = _tasks(4, seed=5, split="train"), _tasks(4, seed=5, split="val")
    assert [repr(t) for t in train] != [repr(t) for t in val]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "holdout"}, "Invalid split"),
        ({"architectures": ["transformer"]}, "Invalid architectures"),
        ({"architectures": []}, "Invalid architectures"),
        ({"dataset": "cifar10"}, "Invalid dataset"),
        ({"num_eval": 0}, "Invalid sizes"),
        ({"batch_sizes": [0]}, "Invalid batch_sizes"),
        ({"init_scales": [0.0]}, "Invalid init_scales"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GeneralFamily(**kwargs)


# ------------------------------------------------------------------------------- log_eval objective

def test_log_eval_objective_is_the_mean_log_held_out_loss_at_the_recorded_steps() -> None:
    """``objective="log_eval"``: the mean of log eval_loss at every ``eval_every``-th step and the last one,
    the same numbers ``rule_curve`` records there (the trajectory never depends on what is recorded)."""
    from lightning_l2l.trajectory import Trajectory, rule_curve, unroll

    task = _tasks(1, seed=5)[0]
    rule = MomentMLP(lr=3e-3, zero_init=False)
    traj = Trajectory.start(rule, task)
    result = unroll(rule, traj, 7, differentiable=False, objective="log_eval", eval_every=3)
    curve = rule_curve(rule, task, 7)
    expected = torch.log(curve[[3, 6, 7]]).mean()
    torch.testing.assert_close(result.meta_loss, expected, rtol=1e-5, atol=1e-6)
    traj = Trajectory.start(rule, task)  # eval_every=0: the last step only
    last = unroll(rule, traj, 7, differentiable=False, objective="log_eval").meta_loss
    torch.testing.assert_close(last, torch.log(curve[7]), rtol=1e-5, atol=1e-6)


def test_log_eval_objective_reaches_the_rule_and_weighs_members_alike() -> None:
    from lightning_l2l.tasks import BatchedTask
    from lightning_l2l.trajectory import Trajectory, unroll

    tasks = _tasks(2, seed=6)
    rule = MomentMLP(lr=3e-3, zero_init=False)
    alone = [unroll(rule, Trajectory.start(rule, t), 4, differentiable=False, objective="log_eval",
                    eval_every=2).meta_loss for t in tasks]
    traj = Trajectory.start(rule, BatchedTask(tasks))
    batched = unroll(rule, traj, 4, objective="log_eval", eval_every=2)
    torch.testing.assert_close(batched.meta_loss.detach(), torch.stack(alone).mean(), rtol=1e-5, atol=1e-6)
    batched.meta_loss.backward()
    grads = [p.grad for p in rule.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_log_eval_objective_needs_a_held_out_loss() -> None:
    from lightning_l2l.nets import CoordinatewiseLSTM
    from lightning_l2l.tasks import QuadraticFamily
    from lightning_l2l.trajectory import Trajectory, unroll

    task = QuadraticFamily(dim=3).sample(torch.Generator().manual_seed(0))
    rule = CoordinatewiseLSTM(hidden_size=4)
    with pytest.raises(ValueError, match="log_eval.*held-out eval_loss.*log_mean"):
        unroll(rule, Trajectory.start(rule, task), 2, objective="log_eval")
    with pytest.raises(ValueError, match="eval_every"):
        unroll(rule, Trajectory.start(rule, task), 2, objective="log_eval", eval_every=-1)


def test_meta_learner_trains_on_the_held_out_loss(tmp_path) -> None:
    """MetaLearner(meta_objective="log_eval") meta-trains on GeneralFamily's held-out losses through a real
    Trainer; a family whose tasks hold nothing out is refused before the first unroll."""
    import lightning as L

    from lightning_l2l.meta import MetaLearner
    from lightning_l2l.tasks import QuadraticFamily

    def trainer() -> L.Trainer:
        return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         num_sanity_val_steps=0, max_steps=3, limit_val_batches=0)

    torch.manual_seed(0)
    rule = MomentMLP(lr=3e-3, hidden=8)
    learner = MetaLearner(rule, _family(), horizon=6, unroll=6, meta_lr=1e-2, truncations_per_epoch=3,
                          num_val_tasks=1, num_test_tasks=1, meta_objective="log_eval", eval_every=3,
                          tasks_per_step=2, zero_grads="skip")
    fit = trainer()
    fit.fit(learner)
    assert fit.global_step == 3 and learner.nonfinite_count == 0
    assert torch.count_nonzero(rule.head.weight) > 0  # the zero head got a gradient through the held-out loss
    with pytest.raises(ValueError, match="log_eval.*QuadraticFamily.*log_mean"):
        trainer().fit(MetaLearner(MomentMLP(), QuadraticFamily(dim=3), horizon=4, unroll=4, meta_objective="log_eval"))
    with pytest.raises(ValueError, match="Invalid eval_every"):
        MetaLearner(MomentMLP(), QuadraticFamily(dim=3), horizon=4, unroll=4, eval_every=-2)


def test_losses_at_some_steps_are_the_curves_there() -> None:
    """rule_losses_at / baseline_losses_at: the held-out losses of rule_curve / baseline_curve at the given
    steps, with eval_loss computed there only; steps must increase."""
    from lightning_l2l.evaluation import baseline_curve, baseline_losses_at
    from lightning_l2l.trajectory import rule_curve, rule_losses_at

    task = _tasks(1, seed=8)[0]
    rule = MomentMLP(lr=3e-3, zero_init=False)
    steps = [0, 3, 7]
    torch.testing.assert_close(rule_losses_at(rule, task, steps), rule_curve(rule, task, 7)[steps])
    torch.testing.assert_close(baseline_losses_at("adam", 1e-2, task, steps), baseline_curve("adam", 1e-2, task, 7)[steps])
    for bad in ([3, 3], [5, 2], []):
        with pytest.raises(ValueError, match="Invalid steps"):
            rule_losses_at(rule, task, bad)
        with pytest.raises(ValueError, match="Invalid steps"):
            baseline_losses_at("adam", 1e-2, task, bad)
