"""The weights registry: shipped names, user files, checkpoints, and files that must be refused."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from lightning_l2l import LearnedOptimizer, pretrained
from lightning_l2l.evaluation import baseline_curve, tune_baseline
from lightning_l2l.nets import CoordinatewiseLSTM, PerKindRule, WeightsError, save_rule
from lightning_l2l.tasks import QuadraticFamily

SHIPPED = pretrained.available()


@pytest.fixture
def shelf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty pretrained folder in place of the package's."""
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path)
    return tmp_path


def test_available_lists_pairs_in_the_folder(shelf):
    assert pretrained.available() == []
    save_rule(CoordinatewiseLSTM(hidden_size=3), shelf / "zeta")
    save_rule(CoordinatewiseLSTM(hidden_size=3), shelf / "alpha")
    (shelf / "orphan.safetensors").write_bytes(b"")  # no .json: not a shipped rule
    assert pretrained.available() == ["alpha", "zeta"]
    assert pretrained.path("alpha") == shelf / "alpha.safetensors"
    rule, meta = pretrained.resolve("alpha")
    assert isinstance(rule, CoordinatewiseLSTM) and rule.hidden_size == 3 and meta["source"] == "alpha"


def test_unknown_name_lists_available(shelf):
    save_rule(CoordinatewiseLSTM(hidden_size=3), shelf / "quadratic")
    with pytest.raises(ValueError, match=r"unknown weights 'mnst'; available: quadratic \(or pass a path to a "
                                         r"\.safetensors file or a MetaLearner \.ckpt\)"):
        pretrained.resolve("mnst")
    with pytest.raises(WeightsError, match="unknown weights 'mnst'"):
        LearnedOptimizer([torch.zeros(1, requires_grad=True)], "mnst")
    with pytest.raises(WeightsError, match="unknown weights"):
        pretrained.path("mnst")


def test_unknown_name_with_nothing_shipped(shelf):
    with pytest.raises(WeightsError, match=r"available: \(none shipped"):
        pretrained.resolve("quadratic")


def test_safetensors_path_and_json_path(tmp_path):
    rule = PerKindRule({"conv": CoordinatewiseLSTM(hidden_size=3), "fc": CoordinatewiseLSTM(hidden_size=2)},
                       default="fc")
    path = save_rule(rule, tmp_path / "mine", metadata={"command": "l2l fit ..."})
    for p in (path, str(path), path.with_suffix(".json")):
        loaded, meta = pretrained.resolve(p)
        assert isinstance(loaded, PerKindRule) and loaded.kinds() == ("conv", "fc")
        assert meta["command"] == "l2l fit ..."
        for k, v in rule.state_dict().items():
            assert torch.equal(v, loaded.state_dict()[k])


def test_rule_instance_is_copied():
    rule = CoordinatewiseLSTM(hidden_size=3)
    loaded, meta = pretrained.resolve(rule)
    assert loaded is not rule and meta["source"] == "<CoordinatewiseLSTM instance>"


def test_other_types_are_refused():
    with pytest.raises(TypeError, match="shipped name, a path or an UpdateRule"):
        pretrained.resolve(3)  # type: ignore[arg-type]


def _checkpoint(rule, path: Path, **extra) -> Path:
    ckpt = {"state_dict": {f"rule.{k}": v for k, v in rule.state_dict().items()},
            "l2l_rule_config": json.dumps(rule.config()), "global_step": 42, **extra}
    torch.save(ckpt, path)
    return path


def test_meta_learner_checkpoint(tmp_path):
    rule = CoordinatewiseLSTM(hidden_size=3)
    loaded, meta = pretrained.resolve(_checkpoint(rule, tmp_path / "run.ckpt"))
    assert meta["global_step"] == 42 and meta["source"].endswith("run.ckpt")
    assert torch.equal(loaded.out.weight, rule.out.weight)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_checkpoint_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.target = str(marker)
    _checkpoint(CoordinatewiseLSTM(hidden_size=3), tmp_path / "evil.ckpt", extra=payload)
    with pytest.raises(WeightsError, match="could not be read"):
        pretrained.resolve(tmp_path / "evil.ckpt")
    assert not marker.exists()
    with pytest.raises(WeightsError):  # a raw pickle under a .ckpt name
        (tmp_path / "raw.ckpt").write_bytes(pickle.dumps(payload))
        pretrained.resolve(tmp_path / "raw.ckpt")
    assert not marker.exists()


def test_json_cannot_name_a_class_outside_the_allow_list(tmp_path):
    path = save_rule(CoordinatewiseLSTM(hidden_size=3), tmp_path / "w")
    doc = json.loads(path.with_suffix(".json").read_text())
    doc["rule"]["class_path"] = "os.system"
    path.with_suffix(".json").write_text(json.dumps(doc))
    with pytest.raises(WeightsError, match="unknown update rule class 'os.system'"):
        pretrained.resolve(path)


def test_corrupt_weights_are_refused(tmp_path):
    path = save_rule(CoordinatewiseLSTM(hidden_size=3), tmp_path / "w")
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        pretrained.resolve(path)


def test_mismatched_weights_are_refused(tmp_path):
    path = save_rule(CoordinatewiseLSTM(hidden_size=3), tmp_path / "w")
    doc = json.loads(path.with_suffix(".json").read_text())
    doc["rule"]["init_args"]["hidden_size"] = 4
    path.with_suffix(".json").write_text(json.dumps(doc))
    with pytest.raises(WeightsError, match="does not match its config"):
        LearnedOptimizer([torch.zeros(1, requires_grad=True)], str(path))


def test_missing_files_are_refused(tmp_path):
    path = save_rule(CoordinatewiseLSTM(hidden_size=3), tmp_path / "w")
    path.with_suffix(".json").unlink()
    with pytest.raises(WeightsError, match="missing .*w.json"):
        pretrained.resolve(path)
    with pytest.raises(WeightsError, match="no checkpoint at"):
        pretrained.resolve(tmp_path / "nope.ckpt")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(WeightsError, match="neither a .safetensors file"):
        pretrained.resolve(tmp_path / "notes.txt")


# ----------------------------------------------------------------------------- shipped files
@pytest.mark.skipif(not SHIPPED, reason="no pretrained weights in this checkout")
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_rule_loads_and_says_how_it_was_made(name):
    rule, meta = pretrained.resolve(name)
    assert not any(p.requires_grad for p in LearnedOptimizer([torch.zeros(1, requires_grad=True)], name).rule.parameters())
    folder = pretrained.PRETRAINED_DIR
    readme = folder / "README.md"
    documented = (readme.is_file() and name in readme.read_text()) or "command" in meta
    assert documented, f"{name}: write the command that reproduces it (config and seed) in README.md or its metadata"
    assert all(torch.isfinite(p).all() for p in rule.parameters())


def quadratic_bar(weights: str = "quadratic", steps: int = 100, val_tasks: int = 2) -> tuple[float, float, float]:
    """Mean loss per quadratic at ``steps`` on 256 fresh 10-d quadratics: (learned, tuned Adam, Adam's lr).

    Adam's learning rate is tuned with ``tune_baseline`` on ``val_tasks`` separate validation tasks
    of the same family, over ``10^-3 ... 10^1`` in steps of ``10^0.25``.
    """
    family = QuadraticFamily(num_functions=256)
    val = [family.sample(torch.Generator().manual_seed(1000 + i)) for i in range(val_tasks)]
    test = family.sample(torch.Generator().manual_seed(7))
    grid = [10 ** (-3 + 0.25 * i) for i in range(17)]
    tuned = tune_baseline("adam", val, steps, grid)
    adam = float(baseline_curve("adam", tuned.lr, test, steps)[-1])
    theta = test.init_params()["theta"].requires_grad_()
    opt = LearnedOptimizer([theta], weights)
    for t in range(steps):
        opt.zero_grad()
        test.loss({"theta": theta}, t).backward()
        opt.step()
    learned = float(test.loss({"theta": theta.detach()}, steps)) / test.num_problems
    return learned, adam, tuned.lr


@pytest.mark.skipif("quadratic" not in SHIPPED, reason="needs the shipped quadratic weights")
def test_shipped_quadratic_beats_tuned_adam():
    """The bar: at most 0.7x tuned Adam's mean loss at step 100 on 256 fresh quadratics."""
    learned, adam, lr = quadratic_bar()
    assert learned <= 0.7 * adam, f"learned {learned:.4g} vs tuned Adam (lr {lr:.3g}) {adam:.4g}"
