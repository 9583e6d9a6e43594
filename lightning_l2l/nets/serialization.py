"""Saving and loading update rules as ``.safetensors`` weights plus a JSON config.

A rule is stored as two files side by side: ``NAME.safetensors`` (tensors only, no code) and
``NAME.json`` (``{"rule": {"class_path": ..., "init_args": ...}, "metadata": {...}}``). Loading
rebuilds the rule only from classes in an allow-list, so a weights file can never run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lightning_l2l.nets.base import UpdateRule
from lightning_l2l.nets.gac import LSTMGAC, NTMBFGS
from lightning_l2l.nets.linear import CoordinatewiseLinear
from lightning_l2l.nets.lstm import CoordinatewiseLSTM
from lightning_l2l.nets.moments import MomentMLP
from lightning_l2l.nets.per_kind import PerKindRule
from lightning_l2l.nets.scaled import ScaledRule

__all__ = ["RULE_CLASSES", "build_rule", "save_rule", "load_rule", "WeightsError"]

_LOADABLE = (CoordinatewiseLSTM, CoordinatewiseLinear, MomentMLP, PerKindRule, ScaledRule, LSTMGAC, NTMBFGS)
RULE_CLASSES: dict[str, type[UpdateRule]] = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in _LOADABLE}
# short names are accepted too: "CoordinatewiseLSTM", "lightning_l2l.nets.CoordinatewiseLSTM"
for _cls in _LOADABLE:
    RULE_CLASSES[_cls.__name__] = _cls
    RULE_CLASSES[f"lightning_l2l.nets.{_cls.__name__}"] = _cls


class WeightsError(ValueError):
    """A weights file is missing, corrupt, or does not match its config."""


def build_rule(config: dict[str, Any]) -> UpdateRule:
    """Rebuild a rule from :meth:`UpdateRule.config` output, using only allow-listed classes."""
    if not isinstance(config, dict) or "class_path" not in config:
        raise WeightsError(f"a rule config is a dict with 'class_path' and 'init_args', got {config!r}")
    cls = RULE_CLASSES.get(config["class_path"])
    if cls is None:
        raise WeightsError(
            f"unknown update rule class {config['class_path']!r}; loadable classes are "
            f"{sorted(k for k in RULE_CLASSES if '.' not in k)}"
        )
    args = dict(config.get("init_args", {}))
    if cls is PerKindRule:
        networks = args.get("networks")
        if not isinstance(networks, dict):
            raise WeightsError(f"PerKindRule config needs init_args.networks, a dict of rule configs; got {networks!r}")
        args["networks"] = {k: build_rule(v) for k, v in networks.items()}
    if cls is ScaledRule:
        if not isinstance(args.get("rule"), dict):
            raise WeightsError(f"ScaledRule config needs init_args.rule, a rule config; got {args.get('rule')!r}")
        args["rule"] = build_rule(args["rule"])
    try:
        return cls(**args)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"bad init_args for {cls.__name__}: {err}") from err


def _paths(path: str | Path) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` for ``NAME``, ``NAME.safetensors`` or ``NAME.json``.

    Only those two suffixes are stripped: ``run.a`` and ``run.b`` are different rules.
    """
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.parent / f"{path.name}.safetensors", path.parent / f"{path.name}.json"


def save_rule(rule: UpdateRule, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``PATH.safetensors`` and ``PATH.json``; returns the ``.safetensors`` path."""
    weights, config_file = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in rule.state_dict().items()}
    save_file(tensors, str(weights))
    doc = {"format": "lightning_l2l.rule/1", "rule": rule.config(), "metadata": metadata or {}}
    config_file.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return weights


def load_rule(path: str | Path) -> tuple[UpdateRule, dict[str, Any]]:
    """Load a rule saved by :func:`save_rule`; returns ``(rule, metadata)``.

    Raises:
        WeightsError: a file is missing, unreadable, or its tensors do not fit its config.
    """
    weights, config_file = _paths(path)
    for f in (weights, config_file):
        if not f.is_file():
            raise WeightsError(f"missing {f}: a rule is stored as NAME.safetensors plus NAME.json side by side")
    try:
        doc = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{config_file} is not valid JSON ({err}); re-export it with `l2l export`") from err
    if not isinstance(doc, dict) or "rule" not in doc:
        raise WeightsError(f"{config_file} has no 'rule' entry; re-export it with `l2l export`")
    rule = build_rule(doc["rule"])
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{weights} is not a readable safetensors file ({err}); it may be corrupt") from err
    expected = rule.state_dict()
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    bad_shapes = [k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape]
    if missing or extra or bad_shapes:
        raise WeightsError(
            f"{weights} does not match its config {config_file.name}: missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}, wrong shape {sorted(bad_shapes)}"
        )
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:  # keep the dtype the rule was saved in (float64 rules stay exact)
        rule = rule.to(dtypes.pop())
    rule.load_state_dict(tensors)
    return rule, dict(doc.get("metadata", {}))
