"""Tiny image datasets in their real on-disk formats, for tests that must not need the real data.

- :func:`write_idx`: an idx file (the format of MNIST / Fashion-MNIST), gzip-compressed or not.
- :func:`write_fashion_mnist`: the four Fashion-MNIST idx files, ``n`` random images per split.
- :func:`write_fake_cifar10`: CIFAR-10 in torchvision's layout (``cifar-10-batches-py`` pickles).
  torchvision checks the MD5 of the real files; :func:`allow_fake_cifar10` turns that check off.
- :func:`config_data_args`: the extra ``l2l`` arguments that let a shipped config which reads a
  user's CIFAR-10 (``dataset: cifar10``) run on a fake copy (used by ``tests/test_cli.py``).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

__all__ = ["write_idx", "write_fashion_mnist", "write_fake_cifar10", "allow_fake_cifar10", "config_data_args"]

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
    """Extra ``l2l`` arguments for ``config``: families reading CIFAR-10 get a fake copy's ``data_dir``."""
    model = (yaml.safe_load(config.read_text()) or {}).get("model", {})
    args = []
    for key in ("task_family", "eval_family", "test_family"):
        family = model.get(key)
        if isinstance(family, dict) and (family.get("init_args") or {}).get("dataset") == "cifar10":
            args.append(f"--model.{key}.init_args.data_dir={tmp_path / 'fake_cifar10'}")
    if args:
        write_fake_cifar10(tmp_path / "fake_cifar10")
        allow_fake_cifar10(monkeypatch)
    return args
