"""Parameter kinds by owning layer type: how a parameter is routed to a per-kind network."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

__all__ = ["KIND_BY_LAYER", "check_kind_map", "layer_kind", "module_param_kinds", "portable_kind_map", "route_param_kinds"]

KIND_BY_LAYER: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "conv"),
    ((nn.Linear, nn.Bilinear), "fc"),
    ((nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm), "norm"),
    ((nn.Embedding, nn.EmbeddingBag), "embedding"),
)


def layer_kind(module: nn.Module) -> str:
    """``conv``, ``fc``, ``norm``, ``embedding`` or ``other`` for a layer."""
    for types, kind in KIND_BY_LAYER:
        if isinstance(module, types):
            return kind
    return "other"


def module_param_kinds(module: nn.Module) -> dict[str, str]:
    """Kind of every parameter of ``module`` (by qualified name), from the layer that owns it.

    A bias has the kind of its layer (a conv bias is ``conv``).
    """
    kinds: dict[str, str] = {}
    for mod_name, mod in module.named_modules():
        kind = layer_kind(mod)
        for p_name, _ in mod.named_parameters(recurse=False):
            kinds[f"{mod_name}.{p_name}" if mod_name else p_name] = kind
    return kinds


LAYER_KINDS: frozenset[str] = frozenset({kind for _, kind in KIND_BY_LAYER} | {"other"})


def _is_layer_key(key: str) -> bool:
    head, _, leaf = key.partition(".")
    return key in LAYER_KINDS or (head in LAYER_KINDS and bool(leaf) and "." not in leaf)


def portable_kind_map(kind_map: Mapping[str, str]) -> dict[str, str]:
    """The entries of ``kind_map`` that apply to any network: layer kinds (``"norm"``) and
    ``"<layer kind>.<leaf>"`` (``"conv.bias"``), without those naming a parameter of one network."""
    return {key: value for key, value in kind_map.items() if isinstance(key, str) and _is_layer_key(key)}


def check_kind_map(kind_map: Mapping[str, str], module: nn.Module | None = None) -> None:
    """Raise ``ValueError`` (saying what keys are valid) unless ``kind_map`` can route ``module``'s parameters.

    Without ``module``, only its form is checked (string keys, non-empty string kinds): a map recorded
    with weights may name parameters of the network it was meta-trained on.
    """
    if not isinstance(kind_map, Mapping):
        raise ValueError(f"Invalid kind_map {kind_map!r}: expected a mapping such as {{'conv.bias': 'fc', 'norm': 'fc'}}")
    names = set() if module is None else {n for n, _ in module.named_parameters()}
    for key, value in kind_map.items():
        if not isinstance(key, str) or not isinstance(value, str) or not value:
            raise ValueError(f"Invalid kind_map entry {key!r}: {value!r} (expected string keys and non-empty kinds)")
        if module is None or key in names or _is_layer_key(key):
            continue
        raise ValueError(
            f"Invalid kind_map key {key!r}: expected a layer kind {sorted(LAYER_KINDS)}, "
            f"'<layer kind>.<weight|bias>' (e.g. 'conv.bias') or a parameter name of the network ({sorted(names)})"
        )


def route_param_kinds(module: nn.Module, kind_map: Mapping[str, str]) -> dict[str, str]:
    """Kind of every parameter of ``module`` after ``kind_map``, which may send a parameter to another kind.

    A parameter's kind is ``kind_map[name]``, else ``kind_map["<layer kind>.<leaf name>"]`` (e.g.
    ``"conv.bias"``), else ``kind_map["<layer kind>"]`` (e.g. ``"norm"``), else its layer kind
    (:func:`module_param_kinds`). ``{}`` routes nothing.
    """
    check_kind_map(kind_map, module)
    out: dict[str, str] = {}
    for name, kind in module_param_kinds(module).items():
        leaf = name.rsplit(".", 1)[-1]
        for key in (name, f"{kind}.{leaf}", kind):
            if key in kind_map:
                out[name] = kind_map[key]
                break
        else:
            out[name] = kind
    return out
