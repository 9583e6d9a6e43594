"""``LearnedOptimizer``: a frozen meta-learned update rule as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_l2l.nets import DEFAULT_KIND, UpdateRule, module_param_kinds, route_param_kinds
from lightning_l2l.nets.kinds import portable_kind_map
from lightning_l2l.pretrained import Weights, resolve

__all__ = ["LearnedOptimizer", "shape_kind", "param_groups_by_kind"]

#: coordinates per network call on CPU: small enough for the activations to stay in cache (the
#: fastest of 4k ... 256k measured by benchmarks/step_time.py), bounding temporaries to ~45 MiB
CPU_CHUNK_SIZE = 1 << 14
#: coordinates per network call on GPUs: large, so that kernel launches do not dominate
#: (about 1.4 GiB of temporaries for the paper's LSTM)
ACCELERATOR_CHUNK_SIZE = 1 << 19


def shape_kind(param: Tensor) -> str:
    """The kind of a parameter guessed from its shape, used when its group has no ``kind``.

    ``conv`` for tensors of 3 or more dimensions (convolution kernels), ``fc`` for matrices, and
    ``default`` (the rule's default network) for vectors and scalars, whose layer a shape cannot
    tell (a bias or a norm scale). :func:`param_groups_by_kind` knows the owning layer and is better.
    """
    if param.dim() >= 3:
        return "conv"
    if param.dim() == 2:
        return "fc"
    return DEFAULT_KIND


def param_groups_by_kind(
    module: nn.Module, params: Iterable[Tensor] | None = None, kind_map: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Param groups of ``module``, one per kind of owning layer (``conv``, ``fc``, ``norm``, ...).

    Kinds come from :func:`lightning_l2l.nets.module_param_kinds` (a bias has the kind of its
    layer), routed by ``kind_map`` where given (:func:`lightning_l2l.nets.route_param_kinds`: e.g.
    ``{"conv.bias": "fc", "norm": "fc"}``, the routing the shipped ``conv`` weights were meta-trained
    with). Parameters of layers the table does not know (kind ``other``, unless ``kind_map`` routes
    them) go to a group with ``kind=None``, which falls back to :func:`shape_kind` parameter by parameter.

    Args:
        module: the model.
        params: restrict to these parameters (e.g. those an existing optimizer holds); default:
            every parameter of ``module``. Parameters not in ``module`` go to the ``kind=None`` group.
        kind_map: routing of layer kinds to the rule's kinds; ``None``: none.
    """
    kind_by_id: dict[int, str] = {}
    named = dict(module.named_parameters(remove_duplicate=False))
    kinds = module_param_kinds(module) if kind_map is None else route_param_kinds(module, kind_map)
    for name, kind in kinds.items():
        kind_by_id.setdefault(id(named[name]), kind)
    chosen = list(module.parameters()) if params is None else list(params)
    groups: dict[str | None, list[Tensor]] = {}
    seen: set[int] = set()
    for p in chosen:
        if id(p) in seen:
            continue
        seen.add(id(p))
        kind = kind_by_id.get(id(p))
        groups.setdefault(None if kind in (None, "other") else kind, []).append(p)
    return [{"params": ps, "kind": kind} for kind, ps in groups.items()]


class _Resolved(NamedTuple):
    """Weights already loaded by :func:`resolve` (``from_module`` reads their metadata first: load once)."""

    rule: UpdateRule
    metadata: dict[str, Any]


@dataclass
class _Run:
    """Consecutive parameters of a buffer that all have a gradient this step."""

    params: list[Tensor]
    start: int  # first coordinate in the buffer
    numels: list[int]

    @property
    def size(self) -> int:
        return sum(self.numels)


@dataclass
class _Buffer:
    """One flat state buffer: the parameters of one group sharing kind, device and dtype."""

    kind: str
    params: list[Tensor]
    numels: list[int]
    offsets: list[int]
    state: Tensor  # (coords, *state_shape), contiguous
    views: list[Tensor] = field(default_factory=list)  # self.state[p]["hidden"] of each param


class LearnedOptimizer(Optimizer):
    """A frozen learned update rule applied to any parameters (Andrychowicz et al., 2016).

    Every coordinate ``i`` of every parameter gets the update of the meta-trained network ``m``
    with its own hidden state ``h_i`` (section 2.1, eq. 1 of the paper):

    .. math::  [g_i, h_i'] = m(\\nabla_i, h_i; \\phi), \\qquad \\theta_i \\leftarrow \\theta_i + \\mathrm{lr} \\cdot g_i

    ``m`` is the same :class:`~lightning_l2l.nets.UpdateRule` ``forward`` that meta-training
    unrolls (:func:`lightning_l2l.trajectory.unroll`), called under ``no_grad`` on flat vectors of
    coordinates: one call per kind and param group per step (per chunk of ``chunk_size``
    coordinates; :meth:`from_module` makes one group per kind), never a Python loop over
    coordinates or a network call per parameter. With ``lr=1`` it reproduces meta-training's updates exactly.

    Kinds (section 3.3, per-layer-type LSTMs): a param group may carry ``kind`` (``conv``,
    ``fc``, ...), routed by a :class:`~lightning_l2l.nets.PerKindRule` to its network; a rule with a
    single network serves every kind. :meth:`from_module` builds one group per layer type; a group
    without ``kind`` falls back to :func:`shape_kind` (``conv`` for 3+ dimensions, ``fc`` for
    matrices, ``default`` otherwise).

    State: ``self.state[p]["hidden"]`` is the ``(p.numel(), *state_shape)`` hidden state of ``p``'s
    coordinates (``(numel, layers, 2, hidden)`` for the LSTM), created lazily at ``p``'s first
    gradient. Internally the states of a group's parameters of one kind live in one contiguous
    buffer and ``self.state[p]["hidden"]`` is a view of it, so a step reads and writes each state
    once. ``state_dict``/``load_state_dict`` round-trip the hidden states across devices and dtypes.

    Robustness:

    - a parameter whose ``grad`` is ``None`` is skipped: no update, its state does not change;
    - a non-finite gradient entry (NaN, +-inf) gives that coordinate a zero update and leaves its
      hidden state unchanged, as if the step had not happened for it (other coordinates proceed);
      :attr:`last_stats` counts such entries;
    - sparse gradients raise ``RuntimeError``; complex parameters raise ``ValueError``;
    - the state dtype is float32 for float32, float16 and bfloat16 parameters (a 16-bit LSTM
      state would round away the small cell updates that carry memory over many steps, and the
      rule was meta-trained in float32) and float64 for float64 parameters; the update is cast to
      the parameter's dtype.

    Args:
        params: parameters or param groups; a group may set ``kind`` and ``lr``.
        weights: a shipped name (:func:`lightning_l2l.pretrained.available`), a path to a
            ``.safetensors`` file exported by ``l2l export`` (with its ``.json`` beside it), a
            ``MetaLearner`` ``.ckpt``, or an ``UpdateRule`` (copied). Default: ``"quadratic"``.
        lr: multiplies the learned update (default ``1.0``, the update the rule was meta-trained
            with); learning-rate schedulers act on it.
        kind: the kind of every group that does not set its own (default ``None``: by shape).
        chunk_size: coordinates per network call; bounds the memory of the network's temporaries
            (about 2.7 KiB per coordinate for the paper's LSTM). Default ``None``: 16384 on CPU
            (cache-sized), 524288 on GPUs (fewer kernel launches).
        compile: run the network through ``torch.compile`` (default ``False``). The first steps
            pay the compilation (tens of seconds; on CPU it needs a C++ compiler), later steps fuse
            the LSTM's elementwise work (``benchmarks/step_time.py --compile`` measures it). The
            updates equal the eager ones to float rounding, not to the bit. If compilation fails
            the optimizer warns once and continues eagerly (an error the eager network raises too
            is the rule's and propagates).

    Example::

        opt = LearnedOptimizer.from_module(model, weights="quadratic")
        for x, y in data:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        weights: Weights = "quadratic",
        *,
        lr: float = 1.0,
        kind: str | None = None,
        chunk_size: int | None = None,
        compile: bool = False,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr} (a multiplier of the learned update, expected >= 0)")
        if kind is not None and not isinstance(kind, str):
            raise ValueError(f"Invalid kind: {kind!r} (expected a string such as 'conv' or 'fc', or None)")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"Invalid chunk_size: {chunk_size} (expected >= 1 coordinates per network call, or None)")
        if not isinstance(compile, bool):
            raise ValueError(f"Invalid compile: {compile!r} (expected True or False)")
        rule, metadata = weights if isinstance(weights, _Resolved) else resolve(weights)
        rule.requires_grad_(False).eval()
        self.rule: UpdateRule = rule
        self.weights_metadata: dict[str, Any] = metadata
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.compile = compile
        self._fingerprint = {**_fingerprint(rule), "source": str(metadata.get("source", ""))}
        self._rules: dict[tuple[torch.device, torch.dtype], UpdateRule] = {}
        self._compiled: dict[tuple[torch.device, torch.dtype], Callable[..., tuple[Tensor, Tensor]]] = {}
        self._buffers: dict[int, list[_Buffer]] = {}  # by id of the param group dict
        #: statistics of the last :meth:`step` (tensors, no host sync): ``update_norm`` (L2 norm of
        #: all updates), ``nonfinite`` (count of non-finite gradient entries), ``num_coords``
        #: (coordinates with a gradient) and ``nonfinite_fraction``.
        self.last_stats: dict[str, Tensor] = {}
        super().__init__(params, {"lr": lr, "kind": kind})

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        weights: Weights = "quadratic",
        *,
        params: Iterable[Tensor] | None = None,
        kind_map: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> LearnedOptimizer:
        """One param group per layer type of ``module`` (see :func:`param_groups_by_kind`).

        Args:
            module: the model.
            weights: as for the constructor.
            params: restrict to these parameters (default: all of ``module``'s).
            kind_map: routing of layer kinds to the rule's kinds (e.g. ``{"conv.bias": "fc"}``).
                ``None``: the routing the weights were meta-trained with, where their metadata
                records it (``kind_map``; the shipped ``conv`` sends conv biases and batch-norm
                parameters to its ``fc`` network; entries that name parameters of the meta-training
                network are left out), else none. ``{}``: none.
            **kwargs: the constructor's keyword arguments (``lr``, ``chunk_size``, ``compile``).
        """
        resolved = _Resolved(*resolve(weights))
        if kind_map is None:
            recorded = resolved.metadata.get("kind_map")
            # entries naming parameters of the meta-training network do not apply to this one
            kind_map = None if recorded is None else portable_kind_map(recorded)
        return cls(param_groups_by_kind(module, params, kind_map), resolved, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        kind = param_group.get("kind")
        if kind is not None and not isinstance(kind, str):
            raise ValueError(f"Invalid kind: {kind!r} (expected a string such as 'conv' or 'fc', or None)")
        if "lr" in param_group and not 0.0 <= float(param_group["lr"]):
            raise ValueError(f"Invalid learning rate: {param_group['lr']}")
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if torch.is_complex(p):
                raise ValueError(
                    f"LearnedOptimizer does not support complex parameters (got one of dtype {p.dtype}); "
                    "optimize torch.view_as_real(p) as a real parameter instead"
                )
            if not p.is_floating_point():
                raise ValueError(f"LearnedOptimizer needs floating-point parameters, got dtype {p.dtype}")

    # ------------------------------------------------------------------------------------ step
    def state_dtype(self, param: Tensor) -> torch.dtype:
        """The dtype of ``param``'s hidden state: float64 for float64 parameters, else the rule's (float32)."""
        return torch.float64 if param.dtype == torch.float64 else self.rule.state_dtype()

    def _chunk(self, device: torch.device) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return CPU_CHUNK_SIZE if device.type == "cpu" else ACCELERATOR_CHUNK_SIZE

    def _kind(self, group: dict[str, Any], param: Tensor) -> str:
        return group["kind"] if group.get("kind") is not None else shape_kind(param)

    def _rule_for(self, device: torch.device, dtype: torch.dtype) -> UpdateRule:
        key = (device, dtype)
        if key not in self._rules:
            same = self.rule.state_dtype() == dtype and all(p.device == device for p in self.rule.parameters())
            self._rules[key] = self.rule if same else copy.deepcopy(self.rule).to(device=device, dtype=dtype)
        return self._rules[key]

    def _network_for(self, device: torch.device, dtype: torch.dtype) -> Callable[..., tuple[Tensor, Tensor]]:
        """What computes the updates: the rule on that device and dtype, compiled if ``compile``."""
        rule = self._rule_for(device, dtype)
        if not self.compile:
            return rule
        key = (device, dtype)
        if key not in self._compiled:
            self._compiled[key] = _compiled(rule, key, self._compiled)
        return self._compiled[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One learned update of every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (called with grad enabled).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sq_norms: list[Tensor] = []
        nonfinite: list[Tensor] = []
        num_coords = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        "LearnedOptimizer does not support sparse gradients; use dense gradients "
                        "(e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam for those parameters"
                    )
            for buf in self._group_buffers(group):
                for run in _runs(buf):
                    sq, bad = self._update_run(group, buf, run)
                    sq_norms.append(sq)
                    nonfinite.append(bad)
                    num_coords += run.size
        if sq_norms:
            device = sq_norms[0].device  # stays there: no host sync for statistics nobody reads
            update_norm = torch.stack([s.to(device, torch.float64) for s in sq_norms]).sum().sqrt()
            bad_total = torch.stack([b.to(device) for b in nonfinite]).sum()
            self.last_stats = {
                "update_norm": update_norm.float(),
                "nonfinite": bad_total,
                "num_coords": torch.tensor(num_coords, device=device),
                "nonfinite_fraction": (bad_total.double() / num_coords).float(),
            }
        else:
            self.last_stats = {}
        return loss

    def _update_run(self, group: dict[str, Any], buf: _Buffer, run: _Run) -> tuple[Tensor, Tensor]:
        """Apply the rule to one run of coordinates; returns (squared update norm, non-finite count)."""
        grads = [p.grad.reshape(-1) for p in run.params]  # type: ignore[union-attr]
        g = grads[0] if len(grads) == 1 else torch.cat(grads)  # (n,)
        rule = self._network_for(buf.state.device, buf.state.dtype)
        finite = torch.isfinite(g)
        bad = (~finite).sum()
        masked = bool(bad)  # the one host sync of a run; False in the common case
        state = buf.state[run.start : run.start + g.numel()]  # (n, *state_shape), a view
        update = torch.empty_like(g)
        chunk = self._chunk(g.device)
        for s in range(0, g.numel(), chunk):
            gc, hc = g[s : s + chunk], state[s : s + chunk]
            u, h = rule(gc, hc, buf.kind)  # (chunk,), (chunk, *state_shape)
            if masked:
                ok = finite[s : s + chunk]
                u = torch.where(ok, u, torch.zeros_like(u))
                h = torch.where(ok.view(-1, *([1] * (h.dim() - 1))), h, hc)
            hc.copy_(h)
            update[s : s + u.numel()] = u
        lr = group["lr"]
        if lr != 1.0:
            update.mul_(lr)
        sq = update.float().pow(2).sum() if update.dtype != torch.float64 else update.pow(2).sum()
        pieces = torch.split(update, run.numels)
        torch._foreach_add_(run.params, [u.view_as(p) for u, p in zip(pieces, run.params, strict=True)])
        return sq, bad

    # ------------------------------------------------------------------------- state buffers
    def _group_buffers(self, group: dict[str, Any]) -> list[_Buffer]:
        """The group's state buffers, (re)built when a parameter gets its first state or state was replaced."""
        buffers = self._buffers.get(id(group))
        fresh = [p for p in group["params"] if p.grad is not None and "hidden" not in self.state.get(p, {})]
        if buffers is not None and not fresh and _valid(self.state, buffers, group):
            return buffers
        buffers = self._build_buffers(group, fresh)
        self._buffers[id(group)] = buffers
        return buffers

    def _build_buffers(self, group: dict[str, Any], fresh: list[Tensor]) -> list[_Buffer]:
        """One contiguous state buffer per (kind, device, dtype); ``fresh`` parameters get initial states.

        States are written straight into the buffer, so building it for the first time needs the
        buffer plus one parameter's initial state, not twice the state.
        """
        is_fresh = {id(p) for p in fresh}
        members: dict[tuple[str, torch.device, torch.dtype], list[Tensor]] = {}
        for p in group["params"]:
            if id(p) in is_fresh or "hidden" in self.state.get(p, {}):
                members.setdefault((self._kind(group, p), p.device, p.dtype), []).append(p)
        buffers = []
        for (kind, device, _), params in members.items():
            dtype = self.state_dtype(params[0])
            rule = self._rule_for(device, dtype)
            tail = rule.init_state(0, kind, device=device, dtype=dtype).shape[1:]
            numels = [p.numel() for p in params]
            offsets = [0]
            for n in numels[:-1]:
                offsets.append(offsets[-1] + n)
            state = torch.empty((sum(numels), *tail), device=device, dtype=dtype)  # (coords, *state_shape)
            buf = _Buffer(kind, params, numels, offsets, state)
            for p, o, n in zip(params, offsets, numels, strict=True):
                view = state[o : o + n]
                if id(p) in is_fresh:
                    for c in range(0, n, self._chunk(device)):  # a chunk at a time: no full-size temporary
                        part = view[c : c + self._chunk(device)]
                        part.copy_(rule.init_state(part.shape[0], kind, device=device, dtype=dtype))
                else:
                    h = self.state[p]["hidden"]
                    if h.shape != (n, *tail):
                        raise ValueError(
                            f"the hidden state of a parameter of shape {tuple(p.shape)} has shape "
                            f"{tuple(h.shape)}, but these weights keep {(n, *tail)}: the state was made with "
                            "other weights or for another parameter; load a state dict saved by an optimizer "
                            "with the same weights and parameters"
                        )
                    view.copy_(h)
                self.state[p]["hidden"] = view
                buf.views.append(view)
            buffers.append(buf)
        return buffers

    # ---------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict (hidden states under ``state[i]["hidden"]``) plus a weights fingerprint."""
        sd = super().state_dict()
        sd["l2l_weights"] = dict(self._fingerprint)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict`, casting hidden states to each parameter's state dtype.

        ``torch.optim`` casts floating state to the parameter's dtype; a float16 parameter would get
        a float16 hidden state. The saved states are re-read here in the dtype of
        :meth:`state_dtype` instead, on the parameter's device.
        """
        saved_fp = state_dict.get("l2l_weights")
        if saved_fp is not None and saved_fp.get("sha256") != self._fingerprint["sha256"]:
            warnings.warn(
                "loading an optimizer state saved with other update-rule weights "
                f"({saved_fp.get('source')!r}) into one using {self._fingerprint['source']!r}: the hidden "
                "states belong to the other network",
                stacklevel=2,
            )
        saved_state = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "l2l_weights"})
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for saved_id, p in zip(saved_ids, params, strict=True):
            entry = saved_state.get(saved_id)
            if isinstance(entry, dict) and isinstance(entry.get("hidden"), Tensor):
                self.state[p]["hidden"] = entry["hidden"].to(device=p.device, dtype=self.state_dtype(p), copy=True)
        self._buffers = {}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in ("rule", "weights_metadata", "chunk_size", "compile", "_fingerprint"):
            state[key] = self.__dict__[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("compile", False)  # pickled before the option existed
        super().__setstate__(state)
        self._rules, self._compiled, self._buffers, self.last_stats = {}, {}, {}, {}


def _compiled(
    rule: UpdateRule, key: tuple[torch.device, torch.dtype], cache: dict[Any, Any]
) -> Callable[..., tuple[Tensor, Tensor]]:
    """``torch.compile(rule)`` (dynamic shapes: the last chunk of a run is shorter), built at the first call.

    Where compiling or running the compiled network raises but the eager ``rule`` computes the same call,
    the compiler is at fault: one warning, and ``cache[key]`` becomes the eager ``rule`` for good. Where
    the eager call raises too, that error propagates (the rule's, not the compiler's) and nothing changes.
    """
    compiled: Callable[..., tuple[Tensor, Tensor]] | None = None

    def call(grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND) -> tuple[Tensor, Tensor]:
        nonlocal compiled
        if cache.get(key) is not call:  # fell back already
            return rule(grad, state, kind)
        try:
            if compiled is None:
                compiled = torch.compile(rule, dynamic=True)  # raises at once on Pythons dynamo does not support
            return compiled(grad, state, kind)
        except Exception as err:  # the eager rule decides whose failure it is
            out = rule(grad, state, kind)
            first_line = (str(err).strip().splitlines() or [""])[0]
            warnings.warn(
                f"LearnedOptimizer(compile=True): torch.compile failed on {key[0]} ({type(err).__name__}: "
                f"{first_line}); continuing without compilation. On CPU it needs a C++ compiler (g++ or "
                "clang++) and Python's headers; pass compile=False to silence this.",
                RuntimeWarning, stacklevel=3,  # LearnedOptimizer.step
            )
            cache[key] = rule
            return out

    return call


def _runs(buf: _Buffer) -> list[_Run]:
    """Maximal runs of consecutive parameters of ``buf`` that have a gradient."""
    runs: list[_Run] = []
    current: _Run | None = None
    for p, o, n in zip(buf.params, buf.offsets, buf.numels, strict=True):
        if p.grad is None:
            current = None
            continue
        if current is None:
            current = _Run([], o, [])
            runs.append(current)
        current.params.append(p)
        current.numels.append(n)
    return runs


def _valid(state: dict[Tensor, dict[str, Any]], buffers: Sequence[_Buffer], group: dict[str, Any]) -> bool:
    """Whether every state is still the view of its buffer (nobody replaced or moved it)."""
    count = 0
    for buf in buffers:
        for p, view in zip(buf.params, buf.views, strict=True):
            if state.get(p, {}).get("hidden") is not view:
                return False
        count += len(buf.params)
    return count == sum(1 for p in group["params"] if "hidden" in state.get(p, {}))


def _fingerprint(rule: UpdateRule) -> dict[str, str]:
    """A hash of the rule's config and weights, stored in state dicts to catch mixed-up weights."""
    h = hashlib.sha256(json.dumps(rule.config(), sort_keys=True).encode())
    for name, t in sorted(rule.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"sha256": h.hexdigest(), "source": type(rule).__name__}
