"""A JSON file cache for evaluation results keyed by their inputs (benchmarks re-run only what changed)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["digest", "json_cached", "rule_fingerprint"]

T = TypeVar("T")


def digest(obj: Any) -> str:
    """A short, stable hash of a JSON-serialisable description of some inputs (12 hex digits)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def rule_fingerprint(rule: Any, steps: int = 3) -> str:
    """A short hash (12 hex digits) of what ``rule`` computes: its updates on a fixed probe.

    The probe is a gradient vector of magnitudes from 1e-8 to 10, both signs and zero, run for
    ``steps`` steps from the initial state, for every kind the rule has networks for, and the rule's
    configuration (which network serves the other kinds). A cache keyed
    by it (beside the weights' digest) is invalidated by a change of the code that computes a step,
    not only of the weights. Bit-exact: another machine may give another fingerprint.
    """
    import torch

    from lightning_l2l.nets.base import DEFAULT_KIND

    magnitudes = torch.logspace(-8, 1, 19)
    probe = torch.cat((magnitudes, -magnitudes, torch.zeros(1)))
    kinds = rule.kinds() or (DEFAULT_KIND,)
    h = hashlib.sha256(json.dumps(rule.config(), sort_keys=True, default=str).encode())  # e.g. a default kind
    with torch.no_grad():
        for kind in kinds:
            state = rule.init_state(probe.numel(), kind)
            for _ in range(steps):
                update, state = rule(probe, state, kind)
                h.update(update.detach().cpu().double().numpy().tobytes())
    return h.hexdigest()[:12]


def json_cached(cache_dir: Path | str | None, key: str, compute: Callable[[], T]) -> T:
    """``compute()``, stored in ``cache_dir/KEY.json`` and read back from there on later calls.

    ``key`` must name everything the value depends on (e.g. ``f"curves_{digest(inputs)}"``); the
    value must be JSON-serialisable. ``cache_dir=None`` computes every time and stores nothing.
    """
    path = Path(cache_dir) / f"{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    value = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    return value
