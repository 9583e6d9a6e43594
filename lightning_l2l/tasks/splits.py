"""Splitting a labelled dataset into disjoint, class-stratified parts (train / validation / test pools)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["SPLITS", "stratified_split"]

#: the names of the pools every image task family cuts from its data
SPLITS = ("train", "val", "test")


def stratified_split(labels: Tensor, sizes: Sequence[int], seed: int = 0) -> list[Tensor]:
    """Disjoint index sets of the given ``sizes``, each stratified by class, a pure function of ``seed``.

    Each class is shuffled with ``seed``; every example gets the key ``rank within its class /
    class size``, and the examples sorted by that key are dealt out in order: every prefix, and so
    every part, holds the classes in the proportions of the whole (500 of each class in 5,000
    digits gives 300 / 100 / 100 per class for sizes 3,000 / 1,000 / 1,000).

    Args:
        labels: ``(N,)`` integer class labels.
        sizes: size of each part; their sum must not exceed ``N``.
        seed: seed of the shuffle.
    """
    labels = labels.reshape(-1).cpu()
    if any(s < 0 for s in sizes) or sum(sizes) > labels.numel():
        raise ValueError(f"Invalid sizes: {list(sizes)} (expected non-negative sizes summing to at most {labels.numel()})")
    g = torch.Generator().manual_seed(seed)
    key = torch.empty(labels.numel(), dtype=torch.float64)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        rank = torch.empty(idx.numel(), dtype=torch.float64)
        rank[torch.randperm(idx.numel(), generator=g)] = torch.arange(idx.numel(), dtype=torch.float64)
        key[idx] = (rank + 0.5) / idx.numel()
    # ties (same fraction in classes of equal size) are broken by a random permutation of classes
    tiebreak = torch.randperm(labels.numel(), generator=g).double() / (labels.numel() * 1e6)
    order = torch.argsort(key + tiebreak, stable=True)
    parts, start = [], 0
    for s in sizes:
        parts.append(order[start : start + s].sort().values)
        start += s
    return parts
