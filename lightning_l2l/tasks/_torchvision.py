"""Reading a torchvision dataset that the user already has on disk (never downloading it)."""

from __future__ import annotations

from typing import Any


def read_torchvision(name: str, data_dir: str, train: bool, *, option: str, fallback: str, lands_in: str) -> Any:
    """``torchvision.datasets.<name>(data_dir, train=train, download=False)`` with errors that say what to do.

    Args:
        name: the dataset class in ``torchvision.datasets`` (``"MNIST"``, ``"CIFAR10"``).
        data_dir: torchvision's root folder.
        train: the training set, else the test set.
        option: the setting that asked for torchvision, for the messages (``"data_dir="``).
        fallback: what to do instead, for the messages (``"leave data_dir unset to ..."``).
        lands_in: where ``download=True`` puts the files under ``data_dir`` (``"MNIST/raw"``).

    Raises:
        ModuleNotFoundError: torchvision is not installed.
        FileNotFoundError: the dataset is not under ``data_dir``; the message says how to get it.
    """
    try:
        import torchvision.datasets
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"{option} reads {name} with torchvision, which is not installed: `pip install torchvision` "
            f"(or {fallback})",
            name="torchvision",
        ) from err
    try:
        return getattr(torchvision.datasets, name)(root=data_dir, train=train, download=False)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"no {name} under data_dir={data_dir!r} ({err}). Download it once with "
            f"`torchvision.datasets.{name}({data_dir!r}, download=True)` (it lands in {data_dir}/{lands_in}), "
            f"or {fallback}"
        ) from err
