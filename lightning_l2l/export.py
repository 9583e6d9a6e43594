"""``l2l export``: write a meta-trained rule as ``.safetensors`` weights plus a JSON config.

    l2l export --ckpt runs/quadratic/checkpoints/best.ckpt --out lightning_l2l/pretrained/quadratic

    l2l export --ckpt runs/conv_stage2/checkpoints/best.ckpt --out lightning_l2l/pretrained/conv --lr conv=3.16,fc=1.33

The checkpoint is read with ``torch.load(weights_only=True)``: no code from it runs. ``--lr M``
exports the rule at a calibrated update multiplier (a :class:`~lightning_l2l.nets.ScaledRule`: the
updates of ``LearnedOptimizer(lr=M)`` with the checkpoint's rule, at ``lr=1``); choose ``M`` on
validation tasks, never on the tasks a claim is measured on (``benchmarks/conv_select.py --lrs``).
``--lr conv=5.62,fc=1.33`` gives each network of a ``PerKindRule`` its own multiplier, and a rule with
one network a copy of it per named kind (:func:`~lightning_l2l.nets.scale_rule`).

    l2l export --weights mnist --out my_mnist --lr 0.4       # exported weights again, at a multiplier

``--weights`` (a shipped name or a ``.safetensors`` file) instead of ``--ckpt`` re-exports weights already
exported, at ``--lr``, keeping their metadata.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

from lightning_l2l.nets import WeightsError, parse_multiplier, save_rule, scale_rule
from lightning_l2l.nets.kinds import check_kind_map
from lightning_l2l.pretrained import rule_from_checkpoint

__all__ = ["rule_from_checkpoint", "export_checkpoint", "export_weights", "main"]


def export_checkpoint(
    ckpt_path: str | Path,
    out: str | Path,
    command: str | None = None,
    lr: float | Mapping[str, float] | None = None,
    kind_map: Mapping[str, str] | None = None,
) -> Path:
    """Export the rule of a ``MetaLearner`` checkpoint to ``OUT.safetensors`` + ``OUT.json``.

    With ``lr``, the rule exported is ``scale_rule(rule, lr)`` (metadata ``update_multiplier``): a
    ``ScaledRule`` for a number, a ``PerKindRule`` of ``ScaledRule`` networks for a mapping
    ``{kind: multiplier}`` (for a one-network rule: a copy of the network per named kind, and kind
    ``default`` for the rest; see :func:`~lightning_l2l.nets.scale_rule`). The metadata's
    ``kind_map`` (the routing of parameters to the rule's kinds in meta-training, which
    ``LearnedOptimizer.from_module`` then applies) is ``kind_map`` if given, else what the checkpoint
    recorded (``MetaLearner`` records its task family's ``kind_map``).
    """
    rule, ckpt = rule_from_checkpoint(ckpt_path)
    if lr is not None:
        try:
            rule = scale_rule(rule, lr)
        except (TypeError, ValueError) as err:
            raise WeightsError(f"--lr {lr}: {err}") from err
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if isinstance(v, (int, float, str, bool))}
    metadata = {
        "source_checkpoint": str(ckpt_path),
        "global_step": int(ckpt.get("global_step", 0)),
        "meta_hparams": hparams,
    }
    if lr is not None:
        metadata["update_multiplier"] = dict(lr) if isinstance(lr, Mapping) else float(lr)
    if kind_map is None and "l2l_kind_map" in ckpt:
        kind_map = json.loads(ckpt["l2l_kind_map"])
    if kind_map is not None:
        try:
            check_kind_map(kind_map)
        except ValueError as err:
            raise WeightsError(str(err)) from None
        metadata["kind_map"] = dict(kind_map)
    if command:
        metadata["command"] = command
    return save_rule(rule, out, metadata)


def export_weights(
    weights: str | Path,
    out: str | Path,
    command: str | None = None,
    lr: float | Mapping[str, float] | None = None,
) -> Path:
    """Re-export weights already exported (a shipped name or a ``.safetensors`` file) at update multiplier
    ``lr`` (as :func:`export_checkpoint`'s ``lr``): its metadata is kept, ``update_multiplier`` multiplied
    into any it had, ``source_weights`` names what it came from and ``command`` is the one given."""
    from lightning_l2l.pretrained import resolve

    rule, metadata = resolve(str(weights))
    metadata = {k: v for k, v in metadata.items() if k != "source"}
    if lr is not None:
        try:
            rule = scale_rule(rule, lr)
        except (TypeError, ValueError) as err:
            raise WeightsError(f"--lr {lr}: {err}") from err
        previous = metadata.get("update_multiplier")
        if isinstance(lr, Mapping) or isinstance(previous, Mapping):
            metadata["update_multiplier"] = {"previous": previous, "applied": dict(lr) if isinstance(lr, Mapping) else float(lr)}
        else:
            metadata["update_multiplier"] = float(lr) * (1.0 if previous is None else float(previous))
    metadata["source_weights"] = str(weights)
    if command:
        metadata["command"] = command
    return save_rule(rule, out, metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="l2l export", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a MetaLearner checkpoint (.ckpt)")
    source.add_argument("--weights", help="or weights already exported (a shipped name or a .safetensors file), "
                        "to re-export at an update multiplier (--lr)")
    parser.add_argument("--out", required=True, help="output path without extension (writes OUT.safetensors, OUT.json)")
    parser.add_argument("--command", default=None, help="the command that reproduces the checkpoint, stored as metadata")
    parser.add_argument("--lr", default=None,
                        help="export the rule at this update multiplier (a ScaledRule), calibrated on validation tasks; "
                             "or one per parameter kind: --lr conv=5.62,fc=1.33")
    parser.add_argument("--kind-map", default=None,
                        help="the routing of parameters to the rule's kinds in meta-training, as JSON "
                             "(e.g. '{\"conv.bias\": \"fc\", \"norm\": \"fc\"}'), for checkpoints that did not "
                             "record it; LearnedOptimizer.from_module applies it")
    args = parser.parse_args(argv)
    try:
        lr = None if args.lr is None else parse_multiplier(args.lr)
    except ValueError as err:
        raise SystemExit(f"l2l export: --lr: {err}") from None
    try:
        kind_map = None if args.kind_map is None else json.loads(args.kind_map)
    except json.JSONDecodeError as err:
        raise SystemExit(f"l2l export: --kind-map is not JSON ({err}); e.g. '{{\"conv.bias\": \"fc\"}}'") from None
    try:
        if args.weights is not None:
            if kind_map is not None:
                raise SystemExit("l2l export: --kind-map applies to --ckpt only (exported weights keep their routing)")
            path = export_weights(args.weights, args.out, args.command, lr)
        else:
            path = export_checkpoint(args.ckpt, args.out, args.command, lr, kind_map)
    except WeightsError as err:
        raise SystemExit(f"l2l export: {err}") from None
    print(f"wrote {path} and {path.with_suffix('.json')}")
