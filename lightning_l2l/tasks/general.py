"""``GeneralFamily``: a wide mixture of small training problems, for rules meant to work on any model.

Not in the paper. A rule meta-trained on one architecture learns that architecture's gradient
statistics (the paper's MNIST optimizer fails on ReLU networks, Figure 5). The learned optimizers
that transfer (VeLO, Celo, Celo2: ``../shared/ANCHORS.md``) were meta-trained on many small tasks
that differ in architecture, data, batch size and initialisation. This family samples, per task:

- an **architecture** (:data:`ARCHITECTURES`): MLPs (sigmoid / ReLU / tanh / GELU, 1-3 hidden layers of
  16-64 units, LayerNorm or not), conv nets (1-2 conv layers of 4-16 channels, batch norm or not,
  ReLU or tanh), residual MLPs (pre-norm blocks), MLP autoencoders (MSE), and Elman RNNs on sequences;
- a **dataset**: Fashion-MNIST images average-pooled to 7x7 or 14x14 (a random subset of 2-10
  classes), Gaussian clusters, a random teacher network's regression targets (MSE), or a sequence
  task (the sign of a noisy running sum) generated from the task's seed; on request
  (:data:`EXTRA_ARCHITECTURES`) also linear models (convex) and residual conv nets with batch norm;
- a **batch size** (16 / 32 / 64 / 128) and an **initialisation scale** (the layers' defaults
  times 0.5 / 1 / 2).

Each task trains on ``num_train`` examples and its :meth:`GeneralTask.eval_loss` is the loss on
``num_eval`` *other* examples of the same distribution, so a reported loss never rewards memorising
the examples a run has seen. ``split`` keeps Fashion-MNIST's images apart (``train``: the official
training set; ``val`` / ``test``: halves of the official test set) and offsets the seed of the
generated data, so validation tasks are never meta-training tasks.

The MNIST digits, attention models and gated recurrent networks never appear here: the held-out
benchmark (``benchmarks/general.py``) tests on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_l2l.tasks.base import TaskFamily
from lightning_l2l.tasks.images import image_pools
from lightning_l2l.tasks.module import LossFn, ModuleTask

__all__ = ["ARCHITECTURES", "EXTRA_ARCHITECTURES", "SPLITS", "GeneralFamily", "GeneralTask", "TaskSpec"]

#: what a :class:`GeneralFamily` samples by default
ARCHITECTURES = ("mlp", "conv", "resmlp", "autoencoder", "rnn")
#: sampled only where ``architectures=`` names them: linear models (softmax or linear regression: convex,
#: the regime where a fast rule overfits) and residual conv nets with batch norm
EXTRA_ARCHITECTURES = ("linear", "resconv")
SPLITS = ("train", "val", "test")
ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
_SPLIT_SEED = {"train": 0, "val": 1_000_003, "test": 2_000_003}


@dataclass(frozen=True)
class TaskSpec:
    """What one :class:`GeneralTask` is, in words (``repr`` it to see a sampled task)."""

    architecture: str
    data: str
    detail: str
    batch_size: int
    init_scale: float


class GeneralTask(ModuleTask):
    """A :class:`ModuleTask` evaluated on held-out examples, with a :class:`TaskSpec` saying what it is."""

    def __init__(self, module: nn.Module, inputs: Tensor, targets: Tensor, eval_inputs: Tensor,
                 eval_targets: Tensor, loss_fn: LossFn, batch_size: int, seed: int, spec: TaskSpec) -> None:
        super().__init__(module, inputs, targets, loss_fn, batch_size, seed=seed, eval_data=(eval_inputs, eval_targets))
        self.spec = spec

    def __repr__(self) -> str:
        s = self.spec
        return f"GeneralTask({s.architecture} on {s.data}: {s.detail}, batch {s.batch_size}, init x{s.init_scale})"


class _ResBlock(nn.Module):
    def __init__(self, width: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(width), nn.Linear(width, width), act(), nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class _ElmanClassifier(nn.Module):
    def __init__(self, in_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.rnn = nn.RNN(in_features, hidden, batch_first=True)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (n, T, in) -> (n, classes)
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


def _mlp(sizes: Sequence[int], act: type[nn.Module], layer_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if layer_norm:
                layers.append(nn.LayerNorm(b))
            layers.append(act())
    return layers


class GeneralFamily(TaskFamily):
    """Small training problems of many architectures, datasets, batch sizes and initialisations.

    Args:
        split: ``"train"`` (meta-training), ``"val"`` (checkpoint selection) or ``"test"``.
        architectures: which of :data:`ARCHITECTURES` and :data:`EXTRA_ARCHITECTURES` to sample, uniformly
            (default: :data:`ARCHITECTURES`; the extras are opt-in, so that the default validation tasks
            stay the ones earlier rules were chosen on).
        dataset: the image dataset of the image tasks (``"fashion_mnist"``).
        data_dir: folder of its idx files (default: where ``dataset-fashion-mnist`` installs them).
        num_train: training examples per task.
        num_eval: held-out examples per task (what :meth:`GeneralTask.eval_loss` averages over).
        batch_sizes: minibatch sizes to sample from.
        init_scales: multipliers of the layers' default initialisation to sample from.
    """

    def __init__(
        self,
        split: str = "train",
        architectures: Sequence[str] | None = None,
        dataset: str = "fashion_mnist",
        data_dir: str | None = None,
        num_train: int = 2048,
        num_eval: int = 512,
        batch_sizes: Sequence[int] = (16, 32, 64, 128),
        init_scales: Sequence[float] = (0.5, 1.0, 2.0),
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"Invalid split: {split!r} (expected one of {SPLITS})")
        archs = tuple(architectures) if architectures is not None else ARCHITECTURES
        known = ARCHITECTURES + EXTRA_ARCHITECTURES
        unknown = [a for a in archs if a not in known]
        if unknown or not archs:
            raise ValueError(f"Invalid architectures: {list(archs)} (expected a non-empty subset of {list(known)})")
        if dataset != "fashion_mnist":
            raise ValueError(f"Invalid dataset: {dataset!r} (GeneralFamily's image tasks use 'fashion_mnist')")
        if num_train < 1 or num_eval < 1:
            raise ValueError(f"Invalid sizes: num_train={num_train}, num_eval={num_eval} (expected >= 1)")
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"Invalid batch_sizes: {list(batch_sizes)} (expected sizes >= 1)")
        if not init_scales or not all(math.isfinite(s) and s > 0 for s in init_scales):
            raise ValueError(f"Invalid init_scales: {list(init_scales)} (expected finite values > 0)")
        self.split, self.architectures, self.dataset, self.data_dir = split, archs, dataset, data_dir
        self.num_train, self.num_eval = int(num_train), int(num_eval)
        self.batch_sizes, self.init_scales = tuple(int(b) for b in batch_sizes), tuple(float(s) for s in init_scales)

    def __repr__(self) -> str:
        return f"GeneralFamily(split={self.split!r}, architectures={list(self.architectures)})"

    # ------------------------------------------------------------------------------------ data
    def _images(self, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
        """Pooled Fashion-MNIST images of 2-10 classes: train and disjoint held-out examples."""
        images, labels = image_pools(self.dataset, self.data_dir)[self.split]
        side = (7, 14)[_pick(2, g)]
        num_classes = 2 + _pick(9, g)
        classes = torch.randperm(10, generator=g)[:num_classes]
        keep = torch.isin(labels, classes).nonzero().squeeze(1)
        keep = keep[torch.randperm(keep.numel(), generator=g)]
        n_eval = min(self.num_eval, keep.numel() // 4)
        chosen = keep[: self.num_train + n_eval]
        x = F.adaptive_avg_pool2d(images[chosen].float() / 255.0, side)  # (n, 1, side, side)
        x = (x - x.mean()) / x.std().clamp_min(1e-6)
        y = torch.searchsorted(classes.sort().values, labels[chosen])  # labels 0 .. num_classes - 1
        n_train = chosen.numel() - n_eval
        return x[:n_train], y[:n_train], x[n_train:], y[n_train:], f"Fashion-MNIST {side}x{side}, {num_classes} classes"

    def _vectors(self, g: torch.Generator, kind: str) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
        """Gaussian clusters (classification) or a random teacher's targets (regression)."""
        n = self.num_train + self.num_eval
        dim = (8, 16, 32)[_pick(3, g)]
        if kind == "clusters":
            k = 2 + _pick(7, g)
            centres = torch.randn(k, dim, generator=g) * (0.5 + torch.rand(1, generator=g))
            y = torch.randint(k, (n,), generator=g)
            x = centres[y] + torch.randn(n, dim, generator=g)
            detail = f"{k} Gaussian clusters in {dim}-d"
        else:
            out = (1, 4)[_pick(2, g)]
            x = torch.randn(n, dim, generator=g)
            w1 = torch.randn(dim, 32, generator=g) / math.sqrt(dim)
            w2 = torch.randn(32, out, generator=g) / math.sqrt(32)
            y = torch.tanh(x @ w1) @ w2 * 3.0 ** (_pick(3, g) - 1)  # targets at scale 1/3, 1 or 3
            y = y + 0.1 * y.std() * torch.randn(y.shape, generator=g)
            detail = f"teacher regression {dim}-d -> {out}"
        return x[: self.num_train], y[: self.num_train], x[self.num_train :], y[self.num_train :], detail

    def _sequences(self, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
        """Is the noisy running sum of a random sequence positive at its end?"""
        n, length = self.num_train + self.num_eval, (8, 16)[_pick(2, g)]
        steps = torch.randn(n, length, 1, generator=g)
        y = (steps.sum(dim=(1, 2)) > 0).long()
        x = torch.cat([steps, torch.randn(n, length, 1, generator=g)], dim=2)  # a distractor channel
        return x[: self.num_train], y[: self.num_train], x[self.num_train :], y[self.num_train :], f"running-sum sign, length {length}"

    # ---------------------------------------------------------------------------------- sample
    def sample(self, generator: torch.Generator) -> GeneralTask:
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        g = torch.Generator().manual_seed(seed + _SPLIT_SEED[self.split])
        arch = self.architectures[_pick(len(self.architectures), g)]
        batch = self.batch_sizes[_pick(len(self.batch_sizes), g)]
        scale = self.init_scales[_pick(len(self.init_scales), g)]
        act_name = list(ACTIVATIONS)[_pick(len(ACTIVATIONS), g)]
        act = ACTIVATIONS[act_name]
        width = (16, 32, 64)[_pick(3, g)]
        loss_fn: LossFn = F.cross_entropy
        if arch == "rnn":
            x, y, ex, ey, data = self._sequences(g)
            build = lambda: _ElmanClassifier(2, width, 2)  # noqa: E731
            detail = f"Elman RNN, {width} tanh units"
        elif arch == "conv":
            x, y, ex, ey, data = self._images(g)
            bn, conv_act = bool(_pick(2, g)), ("relu", "tanh")[_pick(2, g)]
            depth, channels = 1 + _pick(2, g), (4, 8, 16)[_pick(3, g)]
            classes, side = int(y.max()) + 1, x.shape[-1]
            build = lambda: _conv(side, classes, depth, channels, bn, ACTIVATIONS[conv_act])  # noqa: E731
            detail = f"{depth} conv layers of {channels}, {conv_act}, {'batch norm' if bn else 'no norm'}"
        elif arch == "resconv":
            x, y, ex, ey, data = self._images(g)
            blocks, channels = 1 + _pick(2, g), (4, 8, 16)[_pick(3, g)]
            classes, side = int(y.max()) + 1, x.shape[-1]
            build = lambda: _resconv(classes, blocks, channels)  # noqa: E731
            detail = f"conv stem and {blocks} residual blocks of {channels} (conv, batch norm, relu)"
        elif arch == "autoencoder":
            x, _, ex, _, data = self._images(g)
            x, ex = x.flatten(1), ex.flatten(1)
            y, ey, loss_fn = x, ex, F.mse_loss
            d, code = x.shape[1], (4, 8, 16)[_pick(3, g)]
            build = lambda: nn.Sequential(*_mlp([d, width, code, width, d], act, False))  # noqa: E731
            detail = f"autoencoder {d}-{width}-{code}-{width}-{d}, {act_name}"
            data += ", reconstruction (MSE)"
        else:  # mlp, resmlp, linear: on images, clusters or a teacher
            source = ("images", "clusters", "teacher")[_pick(3, g)]
            x, y, ex, ey, data = self._images(g) if source == "images" else self._vectors(g, source)
            x, ex = x.flatten(1), ex.flatten(1)
            regression = source == "teacher"
            loss_fn = F.mse_loss if regression else F.cross_entropy
            d_in, d_out = x.shape[1], (y.shape[1] if regression else int(max(y.max(), ey.max())) + 1)
            if arch == "linear":  # convex: softmax regression, or least squares on a teacher
                build = lambda: nn.Linear(d_in, d_out)  # noqa: E731
                detail = f"linear model {d_in} -> {d_out} ({'least squares' if regression else 'softmax regression'})"
            else:
                depth, ln = 1 + _pick(3, g), bool(_pick(2, g))
                if arch == "mlp":
                    build = lambda: nn.Sequential(*_mlp([d_in] + [width] * depth + [d_out], act, ln))  # noqa: E731
                    detail = f"MLP {depth}x{width} {act_name}{', LayerNorm' if ln else ''}"
                else:
                    build = lambda: nn.Sequential(  # noqa: E731
                        nn.Linear(d_in, width), *[_ResBlock(width, act) for _ in range(depth)],
                        nn.LayerNorm(width), nn.Linear(width, d_out))
                    detail = f"{depth} residual blocks of {width}, {act_name}"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = build()
            with torch.no_grad():
                for p in module.parameters():
                    if p.dim() > 1:  # weights only: biases and norm gains keep their defaults
                        p.mul_(scale)
        spec = TaskSpec(arch, data, detail, batch, scale)
        return GeneralTask(module, x, y, ex, ey, loss_fn, batch, seed, spec)


def _conv(side: int, classes: int, depth: int, channels: int, bn: bool, act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 1
    for _ in range(depth):
        layers += [nn.Conv2d(cin, channels, 3, padding=1, bias=not bn)]
        layers += [nn.BatchNorm2d(channels, track_running_stats=False)] if bn else []
        layers += [act()]
        cin = channels
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(channels * 4, classes)]  # (n, c, 2, 2) -> logits
    return nn.Sequential(*layers)


class _ResConvBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels, track_running_stats=False), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels, track_running_stats=False))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


def _resconv(classes: int, blocks: int, channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels, track_running_stats=False), nn.ReLU(),
                         *[_ResConvBlock(channels) for _ in range(blocks)],
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(channels * 4, classes))


def _pick(n: int, g: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=g))
