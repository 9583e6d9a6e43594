"""The ``l2l`` command line: every shipped config parses and runs shrunk, W&B offline, export."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from lightning_l2l.cli import L2LCLI, main, run
from lightning_l2l.export import rule_from_checkpoint
from lightning_l2l.meta import MetaLearner
from lightning_l2l.nets import PerKindRule, ScaledRule, WeightsError, load_rule
from tests.image_data import config_data_args
from tests.wandb_records import history

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("**/*.yaml"))
# attempts that did not ship, kept beside their write-ups to reproduce them: they must still parse
ATTEMPT_CONFIGS = sorted((ROOT / "docs" / "results").glob("**/*.yaml"))
# Shrink any config to a few seconds: a few short truncations of a short trajectory, one validation
# and test task, 3 lrs.
SHRINK = [
    "--trainer.max_steps=3",
    "--model.horizon=4",
    "--model.unroll=2",
    "--model.truncations_per_epoch=3",
    "--model.num_val_tasks=1",
    "--model.num_test_tasks=1",
    "--model.lr_grid=[0.001,0.01,0.1]",
    "--trainer.enable_progress_bar=false",
    "--model.init_weights=null",  # a later stage's config starts from the previous stage's run, absent here
]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Configs write to relative paths (runs/...): keep them in the test's directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_configs_exist():
    assert CONFIGS, "configs/ holds no YAML file"
    assert ROOT / "configs" / "meta.yaml" in CONFIGS


@pytest.mark.parametrize("config", CONFIGS + ATTEMPT_CONFIGS, ids=lambda p: p.name)
def test_config_parses(config):
    cli = L2LCLI(MetaLearner, args=["--config", str(config), "--model.init_weights=null"], run=False)
    assert isinstance(cli.model, MetaLearner)
    assert cli.trainer.max_steps > 0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_runs_shrunk(config, tmp_path, monkeypatch):
    data = config_data_args(config, tmp_path, monkeypatch)  # a config that reads CIFAR-10 gets a fake copy
    main(["fit", "--config", str(config), *SHRINK, *data, "--trainer.logger=false"])
    ckpts = list(tmp_path.glob("runs/**/best.ckpt"))
    assert ckpts, "the config's ModelCheckpoint wrote no best.ckpt"
    main(["test", "--config", str(config), *SHRINK, *data, "--trainer.logger=false", "--ckpt_path", "best"])
    reports = list(tmp_path.glob("runs/**/comparison.md"))
    assert reports and "learned" in reports[0].read_text()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_last_ckpt_is_the_final_state(config):
    """``last.ckpt`` is where a resume starts: it must hold the last meta-step whether or not the last
    validation improved ``val/final_loss`` (Lightning's ``save_last`` alone re-saves only on improvement)."""
    cli = L2LCLI(MetaLearner, args=["--config", str(config), "--model.init_weights=null"], run=False)
    checkpoints = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    assert checkpoints[0].monitor == "val/final_loss" and checkpoints[0].filename == "best"  # `--ckpt_path best`
    latest = [cb for cb in checkpoints if cb.filename == "last"]
    assert len(latest) == 1 and latest[0].monitor is None and latest[0].dirpath == checkpoints[0].dirpath


def test_last_ckpt_after_a_validation_that_did_not_improve(tmp_path):
    config = ROOT / "configs" / "meta.yaml"
    # a meta-lr this large makes val/final_loss worse after meta-step 2: best.ckpt stays there
    cli = run(["fit", "--config", str(config), *SHRINK, "--trainer.logger=false", "--trainer.max_steps=8",
               "--model.truncations_per_epoch=1", "--model.meta_lr=0.1"])
    best = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert best["global_step"] < 8, "the run must end on a validation that did not improve"
    last = torch.load(tmp_path / "runs/quadratic/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == cli.trainer.global_step == 8


@pytest.mark.parametrize("previous, stage", [
    ("mnist.yaml", "mnist_stage2.yaml"), ("mnist_stage2.yaml", "mnist_stage3.yaml"), ("conv.yaml", "conv_stage2.yaml"),
    ("conv_one_lstm.yaml", "conv_one_lstm_stage2.yaml"),
])
def test_stages_chain_best_checkpoints(previous, stage):
    """A later stage starts from the best checkpoint that the previous stage's config writes, on the same tasks."""
    import yaml

    doc = yaml.safe_load((ROOT / "configs" / stage).read_text())
    prev_doc = yaml.safe_load((ROOT / "configs" / previous).read_text())
    best = next(cb["init_args"] for cb in prev_doc["trainer"]["callbacks"] if cb["init_args"].get("filename") == "best")
    assert doc["model"]["init_weights"] == f"{best['dirpath']}/best.ckpt"
    for family in ("task_family", "eval_family", "test_family"):  # same tasks, later stage
        assert doc["model"][family] == prev_doc["model"][family]
    assert doc["model"]["rule"] == prev_doc["model"]["rule"]
    assert doc["trainer"]["default_root_dir"] != prev_doc["trainer"]["default_root_dir"]  # writes elsewhere


def test_one_lstm_stage2_differs_from_the_two_lstm_stage2_only_in_rule_and_paths():
    """The one-LSTM ablation goes through the same stage-2 recipe as the shipped two-LSTM rule."""
    import yaml

    text = (ROOT / "configs/conv_one_lstm_stage2.yaml").read_text()
    one = yaml.safe_load(text)
    two = yaml.safe_load((ROOT / "configs/conv_stage2.yaml").read_text())
    assert one["model"]["rule"]["class_path"].endswith("CoordinatewiseLSTM")
    assert one["model"]["rule"] == two["model"]["rule"]["init_args"]["networks"]["conv"]
    assert one["model"]["init_weights"] == "runs/conv_one_lstm/checkpoints/best.ckpt"
    # everything else, loggers and checkpoint callbacks included, is the same up to the run folder
    same = yaml.safe_load(text.replace("runs/conv_one_lstm_stage2", "runs/conv_stage2"))
    for section in ("model", "trainer"):
        a, b = dict(same[section]), dict(two[section])
        for key in ("rule", "init_weights"):
            a.pop(key, None), b.pop(key, None)
        assert a == b, section
    assert one["seed_everything"] == two["seed_everything"]


def test_conv_untie_starts_both_lstms_from_the_one_lstm_run():
    """configs/conv_untie.yaml: the two-LSTM rule of conv.yaml, both networks from conv_one_lstm.yaml's best."""
    import yaml

    docs = {name: yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
            for name in ("conv", "conv_one_lstm", "conv_untie")}
    best = next(cb["init_args"] for cb in docs["conv_one_lstm"]["trainer"]["callbacks"]
                if cb["init_args"].get("filename") == "best")
    assert docs["conv_untie"]["model"]["init_weights"] == f"{best['dirpath']}/best.ckpt"
    assert docs["conv_untie"]["model"]["rule"] == docs["conv"]["model"]["rule"]
    for net in docs["conv_untie"]["model"]["rule"]["init_args"]["networks"].values():
        assert net == docs["conv_one_lstm"]["model"]["rule"]
    for family in ("task_family", "eval_family", "test_family"):
        assert docs["conv_untie"]["model"][family] == docs["conv_one_lstm"]["model"][family]


def test_mnist_stages_run_as_a_chain(tmp_path):
    """Shrunk, the three stage configs run one after another, each from the previous stage's best.ckpt."""
    from lightning_l2l.pretrained import resolve

    shrink = [a for a in SHRINK if not a.startswith("--model.init_weights")] + ["--trainer.logger=false"]
    main(["fit", "--config", str(ROOT / "configs/mnist.yaml"), *shrink])
    for stage, previous in ((2, "runs/mnist"), (3, "runs/mnist_stage2")):
        start, _ = resolve(str(tmp_path / previous / "checkpoints/best.ckpt"))
        cli = L2LCLI(MetaLearner, args=["--config", str(ROOT / f"configs/mnist_stage{stage}.yaml"), *shrink], run=False)
        cli.model.load_init_weights()
        torch.testing.assert_close(cli.model.rule.state_dict(), start.state_dict())  # starts where the last ended
        main(["fit", "--config", str(ROOT / f"configs/mnist_stage{stage}.yaml"), *shrink])
        assert (tmp_path / f"runs/mnist_stage{stage}/checkpoints/best.ckpt").is_file()
    # testing the last stage, and resuming it, need only its own checkpoints: earlier stages may be gone
    shutil.rmtree(tmp_path / "runs/mnist_stage2")
    stage3 = str(ROOT / "configs/mnist_stage3.yaml")
    main(["test", "--config", stage3, *shrink, "--ckpt_path", "best"])
    last = str(tmp_path / "runs/mnist_stage3/checkpoints/last.ckpt")
    main(["fit", "--config", stage3, *shrink, "--trainer.max_steps=6", "--ckpt_path", last])
    assert torch.load(last, weights_only=True)["global_step"] == 6


def test_init_weights_from_the_command_line():
    """A second stage of meta-training starts from earlier weights: `--model.init_weights NAME_OR_PATH`."""
    from lightning_l2l.pretrained import resolve

    config = ROOT / "configs" / "meta.yaml"
    cli = L2LCLI(MetaLearner, args=["--config", str(config), "--model.init_weights=quadratic"], run=False)
    cli.model.load_init_weights()
    shipped, _ = resolve("quadratic")
    torch.testing.assert_close(cli.model.rule.state_dict(), shipped.state_dict())


def test_init_weights_of_a_run_not_yet_made_says_what_to_do(tmp_path):
    """configs/general_wide.yaml continues another run's checkpoint: absent, the fit stops at its start, naming
    the file and what to do."""
    from lightning_l2l.nets.serialization import WeightsError

    cli = L2LCLI(MetaLearner, args=["--config", str(ROOT / "configs" / "general_wide.yaml")], run=False)
    with pytest.raises(WeightsError, match=r"step=150\.ckpt.*no such file.*run the config that writes it first.*general"):
        cli.model.load_init_weights()


def test_wandb_offline_run_holds_logged_metrics(tmp_path):
    config = ROOT / "configs" / "meta.yaml"
    cli = run(["fit", "--config", str(config), *SHRINK, "--trainer.log_every_n_steps=1"])
    wandb_loggers = [lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger)]
    assert len(wandb_loggers) == 1 and wandb_loggers[0].experiment.settings.mode in ("offline", "dryrun")
    wandb_loggers[0].experiment.finish()  # what the end of the `l2l` process does; flushes the run file
    runs = list(tmp_path.glob("runs/quadratic/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    rows = history(runs[0])
    keys = set().union(*rows)
    assert {"train/meta_loss", "val/final_loss", "val/mean_loss", "train/nonfinite_trajectories"} <= keys
    losses = [r["train/meta_loss"] for r in rows if "train/meta_loss" in r]
    assert len(losses) == 3 and all(v > 0 for v in losses)
    # the CSV logger sees the same metrics
    csv = next(tmp_path.glob("runs/quadratic/csv/version_0/metrics.csv")).read_text()
    assert "train/meta_loss" in csv and "val/final_loss" in csv


def test_ckpt_path_best_without_a_run_says_what_to_do():
    config = ROOT / "configs" / "meta.yaml"
    with pytest.raises(SystemExit) as err:
        main(["test", "--config", str(config), *SHRINK, "--trainer.logger=false", "--ckpt_path", "best"])
    assert "Meta-train first" in str(err.value)


def test_unknown_task_class_fails_clearly(capsys):
    config = ROOT / "configs" / "meta.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--model.task_family=lightning_l2l.tasks.NoSuchFamily"])
    err = capsys.readouterr().err
    assert "NoSuchFamily" in err and "task_family" in err


@pytest.mark.parametrize(
    ("override", "message"),
    [("--model.horizon=-5", "Invalid horizon: -5"), ("--model.unroll=200", "unroll (200) is longer than the horizon")],
)
def test_bad_numbers_fail_with_a_fix(override, message, capsys):
    config = ROOT / "configs" / "meta.yaml"
    with pytest.raises((SystemExit, ValueError)) as err:
        main(["fit", "--config", str(config), override, "--trainer.logger=false"])
    assert message in str(err.value) + capsys.readouterr().err


def test_export_round_trip(tmp_path):
    config = ROOT / "configs" / "meta.yaml"
    main(["fit", "--config", str(config), *SHRINK, "--trainer.logger=false"])
    best = next(tmp_path.glob("runs/**/best.ckpt"))
    main(["export", "--ckpt", str(best), "--out", str(tmp_path / "exported" / "rule"), "--command", "l2l fit ..."])
    rule, meta = load_rule(tmp_path / "exported" / "rule.safetensors")
    reference, _ = rule_from_checkpoint(best)
    grad = torch.randn(50)
    state = rule.init_state(50)
    torch.testing.assert_close(rule(grad, state), reference(grad, state))
    assert meta["command"] == "l2l fit ..." and meta["global_step"] == 3


def test_export_at_a_calibrated_update_multiplier(tmp_path):
    """``l2l export --lr M`` ships ScaledRule(rule, M): M times the checkpoint rule's updates, recorded in
    the metadata; a multiplier that is not > 0 is refused with what is wrong and nothing is written."""
    config = ROOT / "configs" / "meta.yaml"
    main(["fit", "--config", str(config), *SHRINK, "--trainer.logger=false"])
    best = next(tmp_path.glob("runs/**/best.ckpt"))
    main(["export", "--ckpt", str(best), "--out", str(tmp_path / "scaled"), "--lr", "1.78"])
    rule, meta = load_rule(tmp_path / "scaled")
    reference, _ = rule_from_checkpoint(best)
    assert isinstance(rule, ScaledRule) and rule.multiplier == 1.78 and meta["update_multiplier"] == 1.78
    grad = torch.randn(50)
    state = rule.init_state(50)
    torch.testing.assert_close(rule(grad, state)[0], reference(grad, state)[0] * 1.78, rtol=0, atol=0)
    with pytest.raises(SystemExit, match="'0' is not a finite value > 0"):
        main(["export", "--ckpt", str(best), "--out", str(tmp_path / "zero"), "--lr", "0"])
    assert not list(tmp_path.glob("zero*"))


def test_export_at_per_kind_update_multipliers(tmp_path):
    """``l2l export --lr conv=A,fc=B`` on a PerKindRule checkpoint ships each network at its own multiplier
    (metadata: the mapping), and a rule with one network as a copy per named kind; with an unknown kind or
    a malformed value it says what to give instead and writes nothing."""
    config = ROOT / "configs" / "meta.yaml"
    rule_yaml = tmp_path / "per_kind.yaml"
    rule_yaml.write_text(
        "model:\n  rule:\n    class_path: lightning_l2l.nets.PerKindRule\n    init_args:\n      default: fc\n"
        "      networks:\n"
        + "".join(f"        {k}:\n          class_path: lightning_l2l.nets.CoordinatewiseLSTM\n"
                  "          init_args: {hidden_size: 4}\n" for k in ("conv", "fc"))
    )
    main(["fit", "--config", str(config), "--config", str(rule_yaml), *SHRINK, "--trainer.logger=false"])
    best = next(tmp_path.glob("runs/**/best.ckpt"))
    main(["export", "--ckpt", str(best), "--out", str(tmp_path / "pk"), "--lr", "conv=5.62,fc=1.33"])
    rule, meta = load_rule(tmp_path / "pk")
    reference, _ = rule_from_checkpoint(best)
    assert isinstance(reference, PerKindRule) and meta["update_multiplier"] == {"conv": 5.62, "fc": 1.33}
    grad = torch.randn(50)
    for kind, m in (("conv", 5.62), ("fc", 1.33), ("norm", 1.33)):
        state = rule.init_state(50, kind)
        torch.testing.assert_close(rule(grad, state, kind)[0], reference(grad, state, kind)[0] * m, rtol=0, atol=0)
    with pytest.raises(SystemExit, match="no network for kinds"):
        main(["export", "--ckpt", str(best), "--out", str(tmp_path / "unknown"), "--lr", "conv=2,norm=3"])
    with pytest.raises(SystemExit, match="Invalid update multiplier 'conv:2'"):
        main(["export", "--ckpt", str(best), "--out", str(tmp_path / "typo"), "--lr", "conv:2"])
    main(["fit", "--config", str(config), *SHRINK, "--trainer.logger=false"])  # the same path, one network
    one = next(tmp_path.glob("runs/**/best.ckpt"))
    assert not isinstance(rule_from_checkpoint(one)[0], PerKindRule)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("unknown", "typo"))]
    # one network for every kind: a copy per named kind at its multiplier, the rest at the rule's own step
    main(["export", "--ckpt", str(one), "--out", str(tmp_path / "one_pk"), "--lr", "conv=2,fc=0.5"])
    rule, meta = load_rule(tmp_path / "one_pk")
    reference, _ = rule_from_checkpoint(one)
    assert isinstance(rule, PerKindRule) and meta["update_multiplier"] == {"conv": 2.0, "fc": 0.5}
    for kind, m in (("conv", 2.0), ("fc", 0.5), ("norm", 1.0)):
        state = rule.init_state(50, kind)
        torch.testing.assert_close(rule(grad, state, kind)[0], reference(grad, state, kind)[0] * m, rtol=0, atol=0)


def test_export_re_exports_shipped_weights_at_a_multiplier(tmp_path):
    """``l2l export --weights NAME --lr M``: the shipped rule at M times its updates, its metadata kept and
    the multiplier recorded; an unknown name is refused with the names there are, and nothing is written."""
    main(["export", "--weights", "quadratic", "--out", str(tmp_path / "q"), "--lr", "0.4", "--command", "c"])
    rule, meta = load_rule(tmp_path / "q")
    reference, ref_meta = load_rule(ROOT / "lightning_l2l" / "pretrained" / "quadratic.safetensors")
    assert isinstance(rule, ScaledRule) and meta["update_multiplier"] == 0.4 and meta["source_weights"] == "quadratic"
    assert meta["command"] == "c" and meta.get("global_step") == ref_meta.get("global_step")
    grad = torch.randn(50)
    state = rule.init_state(50)
    torch.testing.assert_close(rule(grad, state)[0], reference(grad, state)[0] * 0.4, rtol=0, atol=0)
    main(["export", "--weights", str(tmp_path / "q.safetensors"), "--out", str(tmp_path / "q2"), "--lr", "0.5"])
    assert load_rule(tmp_path / "q2")[1]["update_multiplier"] == pytest.approx(0.2)
    with pytest.raises(SystemExit, match="unknown weights 'nope'"):
        main(["export", "--weights", "nope", "--out", str(tmp_path / "nope"), "--lr", "2"])
    assert not list(tmp_path.glob("nope*"))


def test_export_refuses_a_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit, match="could not be read"):
        main(["export", "--ckpt", str(bad), "--out", str(tmp_path / "x")])
    with pytest.raises(WeightsError, match="no checkpoint"):
        rule_from_checkpoint(tmp_path / "missing.ckpt")


def test_console_script_is_installed():
    exe = shutil.which("l2l") or str(Path(sys.executable).parent / "l2l")
    out = subprocess.run([exe, "export", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--ckpt" in out.stdout
