"""Write ``tests/data/fashion-mnist-sample``: the first 100 images of each class of Fashion-MNIST's
training set and of its test set, in the original idx format (gzip), in their original order.

The shipped conv-net configs read the full set (``apt-get install dataset-fashion-mnist``); the tests
run them, shrunk, on this sample where the full set is not installed. Regenerate with::

    python tests/data/make_fashion_mnist_sample.py [/usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path

import numpy as np

PER_CLASS = 100
OUT = Path(__file__).resolve().parent / "fashion-mnist-sample"


def _read(path: Path) -> tuple[bytes, np.ndarray]:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return raw[:4], np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _write(path: Path, magic: bytes, array: np.ndarray) -> None:
    header = magic + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    # mtime=0: the same bytes on every run
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array).tobytes(), mtime=0))


def main(root: str = "/usr/share/datasets/fashion-mnist") -> None:
    OUT.mkdir(exist_ok=True)
    for prefix in ("train", "t10k"):
        magic_x, images = _read(Path(root) / f"{prefix}-images-idx3-ubyte.gz")
        magic_y, labels = _read(Path(root) / f"{prefix}-labels-idx1-ubyte.gz")
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in range(10)]))
        _write(OUT / f"{prefix}-images-idx3-ubyte.gz", magic_x, images[keep])
        _write(OUT / f"{prefix}-labels-idx1-ubyte.gz", magic_y, labels[keep])
    for path in sorted(OUT.glob("*.gz")):
        print(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
