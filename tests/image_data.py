"""Tiny image datasets in their real on-disk formats, for tests that must not need the real data.

- :func:`write_idx`: an idx file (the format of MNIST / Fashion-MNIST), gzip-compressed or not.
- :func:`write_fashion_mnist`: the four Fashion-MNIST idx files, ``n`` random images per split.
- :func:`write_fake_cifar10`: CIFAR-10 in torchvision's layout (``cifar-10-batches-py`` pickles).
  torchvision checks the MD5 of the real files; :func:`allow_fake_cifar10` turns that check off.
- :func:`config_data_args`: the extra ``l2l`` arguments that let a shipped config which reads a
  user's CIFAR-10 (``dataset: cifar10``) run on a fake copy, and one that reads Fashion-MNIST run on
  the committed sample of it (:data:`FASHION_SAMPLE_DIR`) where the full set is not installed.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_l2l.tasks.images import FASHION_MNIST_DIR, FASHION_MNIST_ENV

__all__ = [
    "FASHION_SAMPLE_DIR",
    "allow_fake_cifar10",
    "config_data_args",
    "full_fashion_mnist",
    "needs_full_fashion_mnist",
    "write_fake_cifar10",
    "write_fashion_mnist",
    "write_idx",
]

#: 100 real images per class of Fashion-MNIST's train and test sets (tests/data/make_fashion_mnist_sample.py)
FASHION_SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "fashion-mnist-sample"
_FASHION_FILES = [f"{p}-{kind}-ubyte.gz" for p in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]


def full_fashion_mnist() -> bool:
    """Whether the full Fashion-MNIST is installed where the configs read it (``FASHION_MNIST_DIR``)."""
    return all((FASHION_MNIST_DIR / name).is_file() for name in _FASHION_FILES)


#: for tests that need all 70,000 images; ``make test`` installs them where ``apt-get`` can
needs_full_fashion_mnist = pytest.mark.skipif(
    not full_fashion_mnist(),
    reason=f"needs the full Fashion-MNIST at {FASHION_MNIST_DIR}: `apt-get install dataset-fashion-mnist` "
    "(`make test` does this where it can)",
)

_CODES = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
          np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write ``array`` as an idx file (big-endian, type code from its dtype); gzip if ``compress``."""
    dtype = array.dtype if array.dtype.itemsize == 1 else array.dtype.newbyteorder(">")
    data = np.ascontiguousarray(array.astype(dtype))
    header = bytes([0, 0, _CODES[dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + data.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_fashion_mnist(root: Path, n_train: int = 60, n_test: int = 40, seed: int = 0) -> Path:
    """Random 28x28 images with labels cycling through 0..9, as the four Fashion-MNIST idx files."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return root


def write_fake_cifar10(root: Path, per_batch: int = 20, n_test: int = 40, seed: int = 0) -> Path:
    """CIFAR-10's python layout under ``root/cifar-10-batches-py`` with random images.

    Five training batches of ``per_batch`` images and a test batch of ``n_test``; labels cycle
    through 0..9. Read it with ``torchvision.datasets.CIFAR10(root)`` under :func:`allow_fake_cifar10`.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        entry = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8), "labels": list(np.arange(n) % 10)}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


def allow_fake_cifar10(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks each CIFAR-10 file against the MD5 of the real one; accept the fake ones."""
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": None})  # check_integrity(path, None): exists


def config_data_args(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Extra ``l2l`` arguments for ``config``: families reading CIFAR-10 get a fake copy's ``data_dir``;
    families reading Fashion-MNIST from its default place get the committed sample's where the full set
    is absent (the same loader and splits on 2,000 real images; the header of the run says so), and a
    mixture that holds examples of it out holds out 100, not more than the sample's pool."""
    model = (yaml.safe_load(config.read_text()) or {}).get("model", {})
    args = []
    cifar = False
    for key in ("task_family", "eval_family", "test_family"):
        family = model.get(key)
        init = (family.get("init_args") or {}) if isinstance(family, dict) else {}
        if init.get("dataset") == "cifar10":
            args.append(f"--model.{key}.init_args.data_dir={tmp_path / 'fake_cifar10'}")
            cifar = True
        elif init.get("dataset") == "fashion_mnist" and init.get("data_dir") is None and not full_fashion_mnist():
            args.append(f"--model.{key}.init_args.data_dir={FASHION_SAMPLE_DIR}")
        if "fashion_mnist" in (init.get("datasets") or ()) and isinstance(init.get("heldout"), int) \
                and not isinstance(init.get("heldout"), bool) and not full_fashion_mnist():
            # the sample's train pool holds 1,000 images: hold out 100 of each pool, not the config's 1,000
            args.append(f"--model.{key}.init_args.heldout=100")
    if not full_fashion_mnist():  # nested families (mixtures) read the default folder: point it at the sample
        monkeypatch.setenv(FASHION_MNIST_ENV, str(FASHION_SAMPLE_DIR))
    if cifar:
        write_fake_cifar10(tmp_path / "fake_cifar10")
        allow_fake_cifar10(monkeypatch)
    return args
