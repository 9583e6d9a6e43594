"""MetaLearner: truncated BPTT under a real Lightning Trainer."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_l2l.meta import MetaLearner
from lightning_l2l.nets import CoordinatewiseLSTM
from lightning_l2l.tasks import QuadraticFamily, QuadraticTask, TaskFamily
from lightning_l2l.trajectory import rule_curve


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def _small(**kwargs) -> MetaLearner:
    args = dict(
        rule=CoordinatewiseLSTM(hidden_size=8),
        task_family=QuadraticFamily(dim=4, num_functions=16),
        horizon=20, unroll=5, meta_lr=1e-2, truncations_per_epoch=10, num_val_tasks=1, num_test_tasks=1,
        lr_grid=[1e-3, 1e-2, 1e-1],
    )
    args.update(kwargs)
    return MetaLearner(**args)


def test_meta_loss_falls_on_tiny_family(tmp_path):
    """A few dozen meta-steps make the rule clearly better on a held-out task."""
    torch.manual_seed(0)
    model = _small()
    held_out = QuadraticFamily(dim=4, num_functions=64).sample(torch.Generator().manual_seed(99))
    before = float(rule_curve(model.rule, held_out, 20)[-1])
    trainer = _trainer(tmp_path, max_steps=60, limit_val_batches=0)
    trainer.fit(model)
    after = float(rule_curve(model.rule, held_out, 20)[-1])
    assert trainer.global_step == 60
    assert after < 0.7 * before, (before, after)


def test_one_backward_and_one_step_per_training_step(tmp_path, monkeypatch):
    model = _small()
    calls = {"backward": 0}
    original = MetaLearner.manual_backward

    def counting(self, loss, *args, **kwargs):
        calls["backward"] += 1
        return original(self, loss, *args, **kwargs)

    monkeypatch.setattr(MetaLearner, "manual_backward", counting)
    trainer = _trainer(tmp_path, max_steps=7, limit_val_batches=0)
    trainer.fit(model)
    assert calls["backward"] == 7
    assert trainer.global_step == 7


def test_trajectory_runs_to_horizon_then_restarts(tmp_path):
    """horizon 20 / unroll 5: four truncations per task, then a new task."""
    model = _small()
    trainer = _trainer(tmp_path, max_steps=4, limit_val_batches=0)
    trainer.fit(model)
    first_task = model._traj.task
    assert model._traj.step == 20
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model)
    assert model._traj.task is not first_task
    assert model._traj.step == 5


def test_unroll_not_dividing_horizon_stops_at_horizon(tmp_path):
    model = _small(horizon=12, unroll=5)
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model)
    assert model._traj.step == 12  # 5 + 5 + 2


class _NaNAfter(TaskFamily):
    """Quadratics whose loss turns NaN from optimizee step ``bad_step`` on."""

    def __init__(self, bad_step: int) -> None:
        self.inner = QuadraticFamily(dim=4, num_functions=8)
        self.bad_step = bad_step

    def sample(self, generator):
        task = self.inner.sample(generator)
        bad_step = self.bad_step

        class Task(QuadraticTask):
            def loss(self, params, step=0):
                value = super().loss(params, step)
                return value * math.nan if step >= bad_step else value

        return Task(task.W, task.y, task.theta0)


def test_nan_trajectory_is_dropped_and_counted(tmp_path):
    """Every truncation hits a NaN: nothing reaches the weights, each drop is counted."""
    model = _small(task_family=_NaNAfter(bad_step=2))
    before = {k: v.clone() for k, v in model.rule.state_dict().items()}
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(model)
    assert model.nonfinite_count == 10  # truncations_per_epoch
    assert trainer.global_step == 0  # no meta-step was taken
    for k, v in model.rule.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert trainer.callback_metrics["train/nonfinite_trajectories"] == 10


def test_nan_late_in_trajectory_keeps_earlier_truncations(tmp_path):
    """NaN from step 12 on: truncations 1-2 of each task (steps 0-10) train, the third is dropped."""
    model = _small(task_family=_NaNAfter(bad_step=12), horizon=15, unroll=5)
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0, limit_train_batches=6)
    trainer.fit(model)
    # 6 truncations: [ok, ok, nan] x 2 (a dropped trajectory restarts with a new task)
    assert model.nonfinite_count == 2
    assert trainer.global_step == 4


def test_validation_logs_final_and_mean_loss(tmp_path):
    model = _small()
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1.0)
    trainer.validate(model)
    metrics = trainer.callback_metrics
    assert {"val/final_loss", "val/mean_loss"} <= set(metrics)
    assert float(metrics["val/final_loss"]) > 0 and math.isfinite(float(metrics["val/mean_loss"]))


def test_validation_and_test_tasks_are_disjoint_from_training():
    model = _small()
    model.setup("fit")
    train_task = model.task_family.sample(torch.Generator().manual_seed(model.hparams.seed))
    val, test = model.val_tasks[0], model.test_tasks[0]
    assert not torch.equal(val.W, test.W)
    assert not torch.equal(val.W, train_task.W) and not torch.equal(test.W, train_task.W)


def test_test_writes_comparison_report(tmp_path):
    model = _small(report_dir=str(tmp_path / "report"))
    trainer = _trainer(tmp_path)
    trainer.test(model)
    c = model.comparison
    assert c is not None and set(c.curves) == {"learned", "sgd", "nag", "rmsprop", "adam"}
    for name in ("comparison.md", "comparison.csv", "comparison.png", "comparison.json"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "test/ratio_to_best_baseline" in trainer.callback_metrics


def test_second_derivatives_option_reaches_unroll(tmp_path):
    """With second derivatives the first meta-step moves the weights differently."""
    results = []
    for second in (False, True):
        torch.manual_seed(0)
        model = _small(second_derivatives=second)
        trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
        trainer.fit(model)
        results.append(torch.cat([p.detach().flatten() for p in model.rule.parameters()]))
    assert not torch.allclose(results[0], results[1])


class _WithUnusedParam(TaskFamily):
    """Quadratics plus a parameter whose gradient is exactly zero at every step, and one the loss never uses."""

    def sample(self, generator):
        quadratic = QuadraticFamily(dim=4, num_functions=16).sample(generator)

        class Task(type(quadratic)):
            def init_params(self):
                return {**super().init_params(), "zero": torch.ones(3), "unused": torch.ones(2)}

            def loss(self, params, step):
                rest = {k: v for k, v in params.items() if k not in ("zero", "unused")}
                return super().loss(rest, step) + 0.0 * params["zero"].sum()

        quadratic.__class__ = Task
        return quadratic


@pytest.mark.parametrize("zero_grads", ["update", "skip"])
def test_zero_grads_reaches_meta_training_and_validation(tmp_path, zero_grads):
    """``zero_grads`` is what the unrolled rule does with exactly-zero gradients, in training and validation."""
    torch.manual_seed(0)
    model = _small(task_family=_WithUnusedParam(), zero_grads=zero_grads)
    _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model)
    moved = not torch.equal(model._traj.params["zero"].detach(), torch.ones(3))
    assert moved is (zero_grads == "update")
    assert torch.equal(model._traj.params["unused"].detach(), torch.ones(2))  # no gradient: never moves


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(horizon=-5), "Invalid horizon: -5"),
        (dict(unroll=0), "Invalid unroll: 0"),
        (dict(horizon=10, unroll=20), "unroll (20) is longer than the horizon (10)"),
        (dict(meta_lr=0.0), "Invalid meta_lr"),
        (dict(baselines=["adamw"]), "unknown baselines ['adamw']"),
        (dict(num_val_tasks=0), "Invalid num_val_tasks"),
        (dict(zero_grads="ignore"), "Invalid zero_grads: 'ignore'"),
    ],
)
def test_bad_arguments_say_what_to_fix(kwargs, message):
    with pytest.raises(ValueError) as err:
        _small(**kwargs)
    assert message in str(err.value)


def test_bad_types_are_refused():
    with pytest.raises(TypeError, match="task_family must be a TaskFamily"):
        _small(task_family="quadratic")
    with pytest.raises(TypeError, match="rule must be an UpdateRule"):
        _small(rule=torch.nn.Linear(2, 2))


def test_resume_continues_the_task_stream(tmp_path):
    """A run resumed from a checkpoint samples the same tasks and ends with the same weights."""
    torch.manual_seed(0)
    full = _small(horizon=5, unroll=5, meta_lr_schedule="constant")
    _trainer(tmp_path, max_steps=4, limit_val_batches=0, enable_checkpointing=False).fit(full)

    torch.manual_seed(0)
    first = _small(horizon=5, unroll=5, meta_lr_schedule="constant")
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(first)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    assert "l2l_task_generator_state" in torch.load(ckpt, weights_only=True)

    resumed = _small(horizon=5, unroll=5, meta_lr_schedule="constant")
    _trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(resumed, ckpt_path=ckpt)
    torch.testing.assert_close(resumed._traj.task.W, full._traj.task.W)
    for key, value in full.rule.state_dict().items():
        torch.testing.assert_close(resumed.rule.state_dict()[key], value)
    assert resumed.nonfinite_count == 0


def test_resume_with_more_steps_stretches_the_cosine_schedule(tmp_path):
    """Extending a run (resume with a larger max_steps) follows the cosine of the new length from the resumed
    step: the rate jumps up once, to where a 12-step schedule is at step 4, then decays (it would otherwise
    restart from the old schedule's floor and rise again past its end)."""
    lrs: list[float] = []

    class Rates(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    first = _small(meta_lr=1e-2)
    trainer = _trainer(tmp_path, max_steps=4, limit_val_batches=0)
    trainer.fit(first)
    ckpt = tmp_path / "four.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.warns(UserWarning, match="spans 4 meta-steps but this fit runs to max_steps=12"):
        _trainer(tmp_path, max_steps=12, limit_val_batches=0, callbacks=[Rates()]).fit(_small(meta_lr=1e-2), ckpt_path=ckpt)
    expected = [5e-4 + (1e-2 - 5e-4) * (1 + math.cos(math.pi * t / 12)) / 2 for t in range(4, 12)]
    assert lrs == pytest.approx(expected, rel=1e-9)  # the schedule of a 12-step run from step 4 on


# ------------------------------------------------------------------------------- init_weights


def _saved_lstm(path) -> tuple[CoordinatewiseLSTM, str]:
    """A small LSTM of its own seed, saved as ``path``.safetensors; the global RNG is reseeded afterwards
    so that the rule under test starts from other weights."""
    from lightning_l2l.nets import save_rule

    torch.manual_seed(1)
    rule = CoordinatewiseLSTM(hidden_size=4)
    saved = save_rule(rule, path)
    torch.manual_seed(2)
    return rule, str(saved)


def test_init_weights_start_from_saved_rule(tmp_path) -> None:
    fam = QuadraticFamily(dim=3, num_functions=2)
    trained, path = _saved_lstm(tmp_path / "stage1")
    model = MetaLearner(CoordinatewiseLSTM(hidden_size=4), fam, init_weights=str(path))
    model.load_init_weights()  # what a fit from scratch does at its start
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(model.rule.state_dict()[name], value, rtol=0, atol=0)
    assert model.hparams.init_weights == str(path)


def test_init_weights_shipped_name_and_errors(tmp_path) -> None:
    from lightning_l2l.nets import WeightsError
    from lightning_l2l.pretrained import resolve

    fam = QuadraticFamily(dim=3, num_functions=2)
    model = MetaLearner(CoordinatewiseLSTM(), fam, init_weights="quadratic")
    model.load_init_weights()
    shipped, _ = resolve("quadratic")
    torch.testing.assert_close(model.rule.out.weight, shipped.out.weight)
    with pytest.raises(ValueError, match="configure `rule` as the network"):
        MetaLearner(CoordinatewiseLSTM(hidden_size=4), fam, init_weights="quadratic").load_init_weights()
    with pytest.raises(WeightsError, match="quadratic"):  # the message lists what is available
        MetaLearner(CoordinatewiseLSTM(), fam, init_weights="quadratc").load_init_weights()


def test_init_weights_untie_one_network_into_a_per_kind_rule(tmp_path) -> None:
    """A one-LSTM rule starts every network of a two-LSTM rule: same updates for every kind at the start."""
    from lightning_l2l.nets import PerKindRule

    fam = QuadraticFamily(dim=3, num_functions=2)
    shared, path = _saved_lstm(tmp_path / "one")
    two = PerKindRule({"conv": CoordinatewiseLSTM(hidden_size=4), "fc": CoordinatewiseLSTM(hidden_size=4)}, default="fc")
    model = MetaLearner(two, fam, init_weights=str(path))
    model.load_init_weights()
    grad = torch.randn(7)
    want, _ = shared(grad, shared.init_state(7))
    for kind in ("conv", "fc", "norm"):
        got, _ = model.rule(grad, model.rule.init_state(7, kind), kind)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    model.rule.networks["conv"].out.weight.data.add_(1.0)  # copies, not one shared tensor
    assert not torch.equal(model.rule.networks["fc"].out.weight, model.rule.networks["conv"].out.weight)
    # a per-kind rule whose networks differ from the source is still refused
    other = PerKindRule({"conv": CoordinatewiseLSTM(hidden_size=4), "fc": CoordinatewiseLSTM(hidden_size=8)}, default="fc")
    with pytest.raises(ValueError, match="each starts as a copy"):
        MetaLearner(other, fam, init_weights=str(path)).load_init_weights()


def test_scaled_rule_fine_tunes_from_calibrated_weights(tmp_path) -> None:
    """Calibrated weights (a ScaledRule, as `conv` shipped until its per-LSTM calibration) start a MetaLearner
    whose rule is that ScaledRule; meta-training then changes the inner network and keeps the multiplier."""
    from lightning_l2l.nets import ScaledRule, save_rule

    torch.manual_seed(1)
    calibrated = ScaledRule(CoordinatewiseLSTM(hidden_size=8), 1.78)
    path = save_rule(calibrated, tmp_path / "calibrated")
    torch.manual_seed(2)
    model = _small(rule=ScaledRule(CoordinatewiseLSTM(hidden_size=8), 1.78), init_weights=str(path))
    model.load_init_weights()  # what the fit does at its start
    for name, value in calibrated.state_dict().items():
        torch.testing.assert_close(model.rule.state_dict()[name], value, rtol=0, atol=0)
    _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(model)
    assert model.rule.multiplier == 1.78
    moved = [not torch.equal(a, b) for a, b in zip(model.rule.state_dict().values(),
                                                    calibrated.state_dict().values(), strict=True)]
    assert any(moved)
    with pytest.raises(ValueError, match="configure `rule` as the network"):  # the bare network: refused
        _small(init_weights=str(path)).load_init_weights()


def test_init_weights_are_not_read_outside_a_fit_from_scratch(tmp_path) -> None:
    """Testing, validating or loading a checkpoint needs only the checkpoint: init_weights may be gone."""
    fam = QuadraticFamily(dim=3, num_functions=2)
    model = MetaLearner(CoordinatewiseLSTM(hidden_size=4), fam, init_weights=str(tmp_path / "deleted.ckpt"))
    before = {k: v.clone() for k, v in model.rule.state_dict().items()}
    for stage in ("fit", "test", "validate"):
        model.setup(stage)
    torch.testing.assert_close(model.rule.state_dict(), before)
    with pytest.raises(ValueError, match="nothing to load"):
        MetaLearner(CoordinatewiseLSTM(hidden_size=4), fam).load_init_weights()


def test_fit_from_scratch_starts_from_init_weights(tmp_path) -> None:
    """A real Trainer: the first validation (sanity check) already runs the init weights."""
    from lightning_l2l.nets import save_rule

    fam = QuadraticFamily(dim=3, num_functions=2)
    torch.manual_seed(3)
    start = CoordinatewiseLSTM(hidden_size=4)
    path = save_rule(start, tmp_path / "start")
    model = MetaLearner(CoordinatewiseLSTM(hidden_size=4), fam, init_weights=str(path), horizon=4, unroll=2,
                        meta_lr=1e-30, truncations_per_epoch=1)
    seen = {}

    class Probe(L.Callback):
        def on_sanity_check_start(self, trainer, pl_module):
            seen.update({k: v.clone() for k, v in pl_module.rule.state_dict().items()})

    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Probe()], num_sanity_val_steps=1)
    trainer.fit(model)
    torch.testing.assert_close(seen, start.state_dict(), rtol=0, atol=0)
