"""``LearnedOptimizer``: a frozen meta-learned update rule as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_l2l.nets import (
    DEFAULT_KIND,
    ZERO_GRADS,
    CoordinatewiseLSTM,
    KindLayout,
    MomentMLP,
    UpdateRule,
    apply_rule,
    params_by_kind,
    shape_kind,
)
from lightning_l2l.nets._fused import fused_lstm_status
from lightning_l2l.nets._fused_moments import fused_moments_status
from lightning_l2l.nets.kinds import portable_kind_map
from lightning_l2l.pretrained import Weights, resolve

__all__ = ["LearnedOptimizer", "shape_kind", "param_groups_by_kind"]

#: coordinates per network call on CPU: small enough for the activations to stay in cache
#: (benchmarks/step_time.py measures the choice), bounding temporaries to ~45 MiB
CPU_CHUNK_SIZE = 1 << 14
#: coordinates per network call on GPUs: large, so that kernel launches do not dominate
ACCELERATOR_CHUNK_SIZE = 1 << 19


def param_groups_by_kind(
    module: nn.Module, params: Iterable[Tensor] | None = None, kind_map: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Param groups of ``module``, one per parameter kind (:func:`lightning_l2l.nets.params_by_kind`).

    Args:
        module: the model.
        params: restrict to these parameters (e.g. those an existing optimizer holds); default:
            every parameter of ``module``. Parameters not in ``module`` go to a group with ``kind=None``.
        kind_map: routing of layer kinds to the rule's kinds (:func:`lightning_l2l.nets.param_kinds`,
            e.g. ``{"conv.bias": "fc", "norm": "fc"}``); ``None``: none.

    A group with ``kind=None`` holds the parameters whose layer the router does not know; the
    optimizer gives each of them :func:`~lightning_l2l.nets.shape_kind`.
    """
    return [{"params": ps, "kind": kind} for kind, ps in params_by_kind(module, params, kind_map).items()]


def _check_lr(lr: Any) -> float:
    """The value of ``lr`` (a number or a 1-element tensor); ``ValueError`` unless it is finite and >= 0."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        value = float(lr.detach().reshape(()))
    else:
        value = float(lr)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"Invalid learning rate: {lr} (a multiplier of the learned update, expected a finite value >= 0)")
    return value


class _Resolved(NamedTuple):
    """Weights already loaded by :func:`resolve` (``from_module`` reads their metadata first: load once)."""

    rule: UpdateRule
    metadata: dict[str, Any]


@dataclass
class _Buffer:
    """The flat states of one group's parameters that share a device and a dtype, laid out by kind."""

    params: list[Tensor]
    layout: KindLayout  # keys: positions in ``params``
    states: dict[str, Tensor]  # {kind: (coords, *state_shape)}, contiguous
    views: list[Tensor]  # self.state[p]["hidden"] of each param: a slice of ``states``


class LearnedOptimizer(Optimizer):
    """A frozen learned update rule applied to any parameters (Andrychowicz et al., 2016, section 2.1).

    Every coordinate ``i`` gets the update of the meta-trained network ``m`` with its own state ``h_i``:

    .. math::  [g_i, h_i'] = m(\\nabla_i, h_i; \\phi), \\qquad \\theta_i \\leftarrow \\theta_i + \\mathrm{lr} \\cdot g_i

    The step is :func:`lightning_l2l.nets.apply_rule`, the function meta-training unrolls
    (:func:`lightning_l2l.trajectory.unroll`), under ``no_grad``: with ``lr=1`` and the same
    ``zero_grads`` it reproduces meta-training's updates. A param group may carry ``kind``
    (``conv``, ``fc``, ...; section 3.3), which a :class:`~lightning_l2l.nets.PerKindRule` routes to
    its network; without one, each parameter gets :func:`~lightning_l2l.nets.shape_kind`.
    :meth:`from_module` makes one group per kind of owning layer.

    State: ``self.state[p]["hidden"]`` is the ``(p.numel(), *state_shape)`` state of ``p``'s
    coordinates, created at ``p``'s first gradient (a view of one flat buffer per group, device,
    dtype and kind). It is float32 for float32, float16 and bfloat16 parameters (the rule's dtype)
    and float64 for float64 ones; updates are cast to the parameter's dtype.

    Gradients: a parameter whose ``grad`` is ``None`` is skipped. A non-finite gradient entry gives
    its coordinate no update and leaves its state unchanged (counted in :attr:`last_stats`). An
    entry that is exactly zero does the same with ``zero_grads="skip"`` (the default: zeroed
    gradients, pruned weights, padding rows and unused parameters stay where they are) or goes
    through the rule like any gradient with ``zero_grads="update"`` (meta-training's default).
    Sparse gradients raise ``RuntimeError``; complex parameters ``ValueError``.

    Args:
        params: parameters or param groups; a group may set ``kind`` and ``lr``.
        weights: a shipped name (:func:`lightning_l2l.pretrained.available`), a ``.safetensors``
            file exported by ``l2l export`` (its ``.json`` beside it), a ``MetaLearner`` ``.ckpt``,
            or an ``UpdateRule`` (copied). Default: ``"general"``.
        lr: multiplier of the learned update, a number or a 1-element tensor (default ``1.0``: the
            update the rule was meta-trained with); learning-rate schedulers act on it.
        kind: the kind of every group that does not set its own (default ``None``: by shape).
        chunk_size: most coordinates per network call, bounding the temporaries.
            Default ``None``: 16384 on CPU, 524288 on GPUs.
        zero_grads: ``"skip"`` (default) or ``"update"``, see above.
        compile: run the network through ``torch.compile`` (default ``False``). Updates equal the
            eager ones to float rounding. If compiling fails, the optimizer warns once and runs
            eagerly (an error the eager network raises too propagates).
        fused: the fused step of :class:`~lightning_l2l.nets.CoordinatewiseLSTM` and of
            :class:`~lightning_l2l.nets.MomentMLP` (``general``) on CPU (C kernels built at first use with the
            system compiler; updates equal the eager ones to float32 rounding, several times faster:
            docs/usage.md). ``None`` (default): where it runs (CPU,
            float32 state, a C compiler found, ``compile=False``), eager elsewhere. ``True``: the same,
            but raise here if it cannot run on this machine. ``False``: always the eager network.

    Example::

        opt = LearnedOptimizer.from_module(model, weights="conv")
        for x, y in data:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        weights: Weights = "general",
        *,
        lr: float | Tensor = 1.0,
        kind: str | None = None,
        chunk_size: int | None = None,
        zero_grads: str = "skip",
        compile: bool = False,
        fused: bool | None = None,
    ) -> None:
        _check_lr(lr)
        if kind is not None and not isinstance(kind, str):
            raise ValueError(f"Invalid kind: {kind!r} (expected a string such as 'conv' or 'fc', or None)")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"Invalid chunk_size: {chunk_size} (expected >= 1 coordinates per network call, or None)")
        if zero_grads not in ZERO_GRADS:
            raise ValueError(f"Invalid zero_grads: {zero_grads!r} (expected one of {ZERO_GRADS})")
        if not isinstance(compile, bool):
            raise ValueError(f"Invalid compile: {compile!r} (expected True or False)")
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused: {fused!r} (expected None, True or False)")
        if fused and compile:
            raise ValueError("fused=True and compile=True exclude each other: choose one (fused is faster on CPU)")
        rule, metadata = weights if isinstance(weights, _Resolved) else resolve(weights)
        if fused:
            _check_fused(rule)
        rule.requires_grad_(False).eval()
        self.rule: UpdateRule = rule
        self.weights_metadata: dict[str, Any] = metadata
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.zero_grads = zero_grads
        self.compile = compile
        self.fused = fused
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
        weights: Weights = "general",
        *,
        params: Iterable[Tensor] | None = None,
        kind_map: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> LearnedOptimizer:
        """One param group per kind of owning layer of ``module`` (:func:`param_groups_by_kind`).

        Args:
            module: the model.
            weights: as for the constructor.
            params: restrict to these parameters (default: all of ``module``'s).
            kind_map: routing of layer kinds to the rule's kinds (e.g. ``{"conv.bias": "fc"}``).
                ``None``: the routing recorded with the weights (their ``kind_map`` metadata, less the
                entries that name parameters of the meta-training network), else none. ``{}``: none.
            **kwargs: the constructor's keyword arguments (``lr``, ``chunk_size``, ``zero_grads``, ``compile``, ``fused``).
        """
        resolved = _Resolved(*resolve(weights))
        if kind_map is None:
            recorded = resolved.metadata.get("kind_map")
            kind_map = None if recorded is None else portable_kind_map(recorded)
        return cls(param_groups_by_kind(module, params, kind_map), resolved, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        kind = param_group.get("kind")
        if kind is not None and not isinstance(kind, str):
            raise ValueError(f"Invalid kind: {kind!r} (expected a string such as 'conv' or 'fc', or None)")
        if "lr" in param_group:
            _check_lr(param_group["lr"])
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

    def _rule_for(self, device: torch.device, dtype: torch.dtype) -> UpdateRule:
        key = (device, dtype)
        if key not in self._rules:
            same = self.rule.state_dtype() == dtype and all(p.device == device for p in self.rule.parameters())
            self._rules[key] = self.rule if same else copy.deepcopy(self.rule).to(device=device, dtype=dtype)
        return self._rules[key]

    def _network_for(self, device: torch.device, dtype: torch.dtype) -> Callable[..., tuple[Tensor, Tensor]]:
        """What computes the updates: the rule on that device and dtype, compiled if ``compile``."""
        rule = self._rule_for(device, dtype)
        if not self.compile or _shares_coordinates(rule):
            return rule  # a rule that averages over coordinates runs its steps() generator: eager
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
            lr = _check_lr(group["lr"])  # a scheduler may have set it
            for buf in self._group_buffers(group):
                device = buf.views[0].device
                out = apply_rule(
                    self._network_for(device, next(iter(buf.states.values())).dtype),  # type: ignore[arg-type]
                    buf.layout,
                    {i: p.grad for i, p in enumerate(buf.params)},
                    buf.states,
                    chunk_size=self._chunk(device),
                    zero_grads=self.zero_grads,
                    inplace=True,
                    fused=self.fused is not False and not self.compile,  # compile=True falls back to forward
                )
                if not out.updates:
                    continue
                params = [buf.params[i] for i in out.updates]
                updates = list(out.updates.values())
                if lr != 1.0:
                    torch._foreach_mul_(updates, lr)
                sq_norms.append(torch.stack(torch._foreach_norm(updates)).double().pow(2).sum())
                nonfinite.append(out.nonfinite)
                num_coords += out.num_coords
                torch._foreach_add_(params, updates)
        if sq_norms:
            device = sq_norms[0].device  # stays there: no host sync for statistics nobody reads
            bad_total = torch.stack([b.to(device) for b in nonfinite]).sum()
            self.last_stats = {
                "update_norm": torch.stack([s.to(device) for s in sq_norms]).sum().sqrt().float(),
                "nonfinite": bad_total,
                "num_coords": torch.tensor(num_coords, device=device),
                "nonfinite_fraction": (bad_total.double() / num_coords).float(),
            }
        else:
            self.last_stats = {}
        return loss

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
        """One buffer per (device, dtype) of the group's parameters that have a state or get one now.

        ``fresh`` parameters start from the rule's initial state; the others keep theirs (copied in).
        """
        is_fresh = {id(p) for p in fresh}
        members: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in group["params"]:
            if id(p) in is_fresh or "hidden" in self.state.get(p, {}):
                members.setdefault((p.device, p.dtype), []).append(p)
        buffers = []
        for (device, _), params in members.items():
            dtype = self.state_dtype(params[0])
            rule = self._rule_for(device, dtype)
            layout = KindLayout(
                {i: p.shape for i, p in enumerate(params)},
                {i: shape_kind(p) if group["kind"] is None else group["kind"] for i, p in enumerate(params)},
            )
            states = layout.init_state(rule, device=device, dtype=dtype, chunk_size=self._chunk(device))
            views = []
            for i, p in enumerate(params):
                view = layout.state_of(states, i)
                if id(p) not in is_fresh:
                    h = self.state[p]["hidden"]
                    if h.shape != view.shape:
                        raise ValueError(
                            f"the hidden state of a parameter of shape {tuple(p.shape)} has shape "
                            f"{tuple(h.shape)}, but these weights keep {tuple(view.shape)}: the state was made "
                            "with other weights or for another parameter; load a state dict saved by an "
                            "optimizer with the same weights and parameters"
                        )
                    view.copy_(h)
                self.state[p]["hidden"] = view
                views.append(view)
            buffers.append(_Buffer(params, layout, states, views))
        return buffers

    # ---------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict (hidden states under ``state[i]["hidden"]``) plus ``l2l_weights``,
        a fingerprint of the weights (added before any registered state-dict post-hook runs)."""

        def add_fingerprint(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
            state_dict["l2l_weights"] = dict(self._fingerprint)

        handle = self.register_state_dict_post_hook(add_fingerprint, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict`, casting hidden states to each parameter's state dtype.

        ``torch.optim`` casts floating state to the parameter's dtype, which would give a float16
        parameter a float16 hidden state; hidden states are read in :meth:`state_dtype` instead, from
        the state dict as the registered load-state-dict pre-hooks left it. Warns if it was saved
        with other weights.
        """
        final: dict[str, Any] = {}

        def capture(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
            final["state_dict"] = state_dict

        handle = self.register_load_state_dict_pre_hook(capture)  # the last pre-hook: sees their result
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        loaded = final["state_dict"]
        saved_fp = loaded.get("l2l_weights")
        if saved_fp is not None and saved_fp.get("sha256") != self._fingerprint["sha256"]:
            warnings.warn(
                "loading an optimizer state saved with other update-rule weights "
                f"({saved_fp.get('source')!r}) into one using {self._fingerprint['source']!r}: the hidden "
                "states belong to the other network",
                stacklevel=2,
            )
        saved_ids = chain.from_iterable(g["params"] for g in loaded["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params, strict=True):
            entry = loaded["state"].get(saved_id)
            if isinstance(entry, dict) and isinstance(entry.get("hidden"), Tensor):
                self.state[p]["hidden"] = entry["hidden"].to(device=p.device, dtype=self.state_dtype(p), copy=True)
        self._buffers = {}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in ("rule", "weights_metadata", "chunk_size", "zero_grads", "compile", "fused", "_fingerprint"):
            state[key] = self.__dict__[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("compile", False)  # pickled before the options existed
        state.setdefault("fused", None)
        state.setdefault("zero_grads", "update")
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
                RuntimeWarning, stacklevel=4,  # LearnedOptimizer.step (through apply_rule and its _step)
            )
            cache[key] = rule
            return out

    return call


def _check_fused(rule: UpdateRule) -> None:
    """``fused=True``: the rule must hold a network with a fused step (:class:`CoordinatewiseLSTM`,
    :class:`MomentMLP`) and its kernel must build here."""
    nets = [m for m in rule.modules() if isinstance(m, (CoordinatewiseLSTM, MomentMLP))]
    if not nets:
        raise ValueError(
            f"fused=True, but the rule ({type(rule).__name__}) has no CoordinatewiseLSTM or MomentMLP, the networks "
            "with a fused step; leave fused=None"
        )
    for net in nets:
        why = fused_lstm_status(net) if isinstance(net, CoordinatewiseLSTM) else fused_moments_status(net)
        if why is not None:
            raise RuntimeError(f"fused=True, but the fused step cannot run here: {why}; or pass fused=None (eager)")


def _shares_coordinates(rule: UpdateRule) -> bool:
    """Whether ``rule`` or a rule inside it averages over coordinates (LSTM+GAC, NTM-BFGS)."""
    return any(m.shared_stages() for m in rule.modules() if isinstance(m, UpdateRule))


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
