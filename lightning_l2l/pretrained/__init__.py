"""Pretrained update rules shipped with the package, and the one place that turns "weights" into a rule.

Each shipped rule is a pair of files in this folder, ``NAME.safetensors`` (tensors only) and
``NAME.json`` (the rule's config and metadata), written by ``l2l export``; the command that
reproduces it (config and seed) is written next to it (``README.md`` and the JSON's metadata).
:func:`available` lists whatever pairs are here; nothing is registered in code.

:func:`resolve` accepts

- a shipped name (``"quadratic"``),
- a path to a ``.safetensors`` file exported by ``l2l export`` (its ``.json`` beside it),
- a path to a ``MetaLearner`` Lightning checkpoint (``.ckpt``), read with
  ``torch.load(weights_only=True)``,
- an :class:`~lightning_l2l.nets.UpdateRule` instance (copied).

Loading never executes code from a file: safetensors holds tensors only, and the rule is rebuilt
from an allow-list of classes (:func:`lightning_l2l.nets.build_rule`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from lightning_l2l.nets import UpdateRule, WeightsError, load_rule

__all__ = ["PRETRAINED_DIR", "available", "path", "resolve", "WeightsError"]

#: the folder the shipped ``NAME.safetensors`` + ``NAME.json`` pairs live in
PRETRAINED_DIR = Path(__file__).resolve().parent

Weights = str | os.PathLike | UpdateRule


def available() -> list[str]:
    """Names of the shipped rules: every ``NAME.safetensors`` with a ``NAME.json`` beside it."""
    return sorted(f.stem for f in PRETRAINED_DIR.glob("*.safetensors") if f.with_suffix(".json").is_file())


def path(name: str) -> Path:
    """The ``.safetensors`` file of the shipped rule ``name``."""
    if name not in available():
        raise WeightsError(_unknown_message(name))
    return PRETRAINED_DIR / f"{name}.safetensors"


def _unknown_message(name: str) -> str:
    names = ", ".join(available()) or "(none shipped in this install)"
    return (
        f"unknown weights {name!r}; available: {names} "
        "(or pass a path to a .safetensors file or a MetaLearner .ckpt)"
    )


def resolve(weights: Weights) -> tuple[UpdateRule, dict[str, Any]]:
    """Load ``weights`` as an update rule; returns ``(rule, metadata)``.

    Args:
        weights: a shipped name, a ``.safetensors`` path (with its ``.json`` beside it), a
            ``MetaLearner`` ``.ckpt`` path, or an ``UpdateRule`` (deep-copied, so that freezing it
            leaves the caller's rule untouched).

    Returns:
        The rule (on CPU, in its stored dtype, ``requires_grad`` as stored) and a metadata dict with
        at least ``"source"`` (what was loaded).

    Raises:
        WeightsError: (a ``ValueError``) unknown name, missing file, corrupt file, or a weights
            file that does not match its config.
    """
    if isinstance(weights, UpdateRule):
        return copy.deepcopy(weights), {"source": f"<{type(weights).__name__} instance>"}
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(
            f"weights must be a shipped name, a path or an UpdateRule, got {type(weights).__name__}"
        )
    text = os.fspath(weights)
    if isinstance(weights, str) and text in available():
        rule, metadata = load_rule(PRETRAINED_DIR / f"{text}.safetensors")
        return rule, {**metadata, "source": text}
    file = Path(text).expanduser()
    if file.suffix == ".ckpt":
        from lightning_l2l.export import rule_from_checkpoint

        rule, ckpt = rule_from_checkpoint(file)
        return rule, {"source": str(file), "global_step": int(ckpt.get("global_step", 0))}
    if file.suffix in (".safetensors", ".json"):
        rule, metadata = load_rule(file)
        return rule, {**metadata, "source": str(file)}
    if file.exists():
        raise WeightsError(
            f"{file} is neither a .safetensors file exported by `l2l export` nor a MetaLearner .ckpt"
        )
    raise WeightsError(_unknown_message(text))
