"""Parameter kinds by owning layer type: how a parameter is routed to a per-kind network."""

from __future__ import annotations

from torch import nn

__all__ = ["KIND_BY_LAYER", "layer_kind", "module_param_kinds"]

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
