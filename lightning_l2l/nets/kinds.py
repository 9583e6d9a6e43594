"""Parameter kinds: which network of a per-kind rule updates a parameter (section 3.3 of the paper).

The one router is :func:`param_kinds`: a parameter's kind is that of the layer owning it
(:func:`layer_kind`), optionally re-routed by a ``kind_map``. :func:`shape_kind` is the fallback for
tensors whose layer is unknown. Everything that needs a kind (tasks, ``LearnedOptimizer``, export)
asks these functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

__all__ = [
    "DEFAULT_KIND",
    "KIND_BY_LAYER",
    "LAYER_KINDS",
    "check_kind_map",
    "layer_kind",
    "param_kinds",
    "params_by_kind",
    "portable_kind_map",
    "shape_kind",
]

#: the kind of a parameter nothing says more about; a per-kind rule sends it to its default network
DEFAULT_KIND = "default"

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


def param_kinds(module: nn.Module, kind_map: Mapping[str, str] | None = None) -> dict[str, str]:
    """The kind of every parameter of ``module``, by qualified name: the one router.

    Without ``kind_map`` a parameter has the kind of the layer that owns it (:func:`layer_kind`; a
    conv bias is ``conv``). ``kind_map`` may send parameters elsewhere: a parameter's kind is then
    ``kind_map[name]``, else ``kind_map["<layer kind>.<leaf name>"]`` (e.g. ``"conv.bias"``), else
    ``kind_map["<layer kind>"]`` (e.g. ``"norm"``), else its layer kind. ``{}`` routes nothing.

    Raises:
        ValueError: ``kind_map`` has a key that is neither a layer kind, ``"<layer kind>.<leaf>"``
            nor a parameter name of ``module`` (:func:`check_kind_map`).
    """
    kind_map = {} if kind_map is None else kind_map
    check_kind_map(kind_map, module)
    out: dict[str, str] = {}
    for mod_name, mod in module.named_modules():
        kind = layer_kind(mod)
        for leaf, _ in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            out[name] = next((kind_map[k] for k in (name, f"{kind}.{leaf}", kind) if k in kind_map), kind)
    return out


def shape_kind(param: Tensor) -> str:
    """The kind of a tensor whose owning layer is unknown, guessed from its shape.

    ``conv`` for 3 or more dimensions (convolution kernels), ``fc`` for matrices, and
    :data:`DEFAULT_KIND` for vectors and scalars, whose layer a shape cannot tell (a bias or a norm
    scale). :func:`param_kinds` knows the owning layer and is better.
    """
    if param.dim() >= 3:
        return "conv"
    if param.dim() == 2:
        return "fc"
    return DEFAULT_KIND


def params_by_kind(
    module: nn.Module, params: Iterable[Tensor] | None = None, kind_map: Mapping[str, str] | None = None
) -> dict[str | None, list[Tensor]]:
    """``module``'s parameters (or those of ``params``) grouped by :func:`param_kinds`, in order.

    Parameters of layers :data:`KIND_BY_LAYER` does not know (kind ``other``, unless ``kind_map``
    routes them) and tensors that are not ``module``'s go under ``None``: their kind is unknown
    (:func:`shape_kind` is the fallback). A parameter shared by several layers has the kind of the first.
    """
    named = dict(module.named_parameters(remove_duplicate=False))
    kind_by_id: dict[int, str] = {}
    for name, kind in param_kinds(module, kind_map).items():
        kind_by_id.setdefault(id(named[name]), kind)
    groups: dict[str | None, list[Tensor]] = {}
    seen: set[int] = set()
    for p in module.parameters() if params is None else params:
        if id(p) not in seen:
            seen.add(id(p))
            kind = kind_by_id.get(id(p))
            groups.setdefault(None if kind in (None, "other") else kind, []).append(p)
    return groups
