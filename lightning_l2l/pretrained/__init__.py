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
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from lightning_l2l.nets import UpdateRule, WeightsError, build_rule, load_rule

__all__ = ["PRETRAINED_DIR", "available", "path", "resolve", "rule_from_checkpoint", "weights_digest", "WeightsError"]

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


def rule_from_checkpoint(path: str | Path) -> tuple[UpdateRule, dict[str, Any]]:
    """Rebuild the rule of a ``MetaLearner`` checkpoint; returns ``(rule, checkpoint)``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise WeightsError(f"{path} could not be read as a Lightning checkpoint ({err})") from err
    if "l2l_rule_config" not in ckpt or "state_dict" not in ckpt:
        raise WeightsError(f"{path} is not a lightning_l2l MetaLearner checkpoint (no rule config in it)")
    rule = build_rule(json.loads(ckpt["l2l_rule_config"]))
    prefix = "rule."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        rule.load_state_dict(state)
    except RuntimeError as err:
        raise WeightsError(f"{path}: the rule's weights do not match its config ({err})") from err
    return rule, ckpt


def weights_digest(weights: str | Path) -> str:
    """A short hash (12 hex digits) of the bytes of a rule's weights file: a shipped name or a path.

    Results computed with a rule are cached under it, so re-exported or re-trained weights never
    reuse stale numbers.
    """
    file = path(weights) if isinstance(weights, str) and weights in available() else Path(weights).expanduser()
    return hashlib.sha256(file.read_bytes()).hexdigest()[:12]
