"""The one path that applies an update rule to a set of tensors: meta-training and ``LearnedOptimizer`` both call it.

:class:`KindLayout` fixes an order of keyed tensors and lays each kind's coordinates out in one
flat vector; its states are flat ``(n_kind, *state_shape)`` tensors. :func:`apply_rule` runs the
rule on them: one network call per kind (per bounded chunk) per step, never one per tensor or
coordinate, with the same masking of gradients it must not see, differentiably for meta-training
(:func:`lightning_l2l.trajectory.unroll`) or in place under ``no_grad`` for
:class:`~lightning_l2l.LearnedOptimizer`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_l2l.nets.base import UpdateRule
from lightning_l2l.nets.kinds import DEFAULT_KIND

__all__ = ["KindLayout", "RuleStep", "ZERO_GRADS", "apply_rule"]

#: what :func:`apply_rule` does with a gradient entry that is exactly zero
ZERO_GRADS = ("update", "skip")


@dataclass(frozen=True)
class _Entry:
    key: Hashable
    shape: torch.Size
    kind: str
    offset: int  # first coordinate in its kind's flat vector

    @property
    def numel(self) -> int:
        return self.shape.numel()


class KindLayout:
    """A fixed order of keyed tensors, grouped by kind; each kind's coordinates form one flat vector.

    Args:
        shapes: shape per key (a parameter name, or any hashable key), in a fixed order.
        kinds: kind per key; keys missing here get ``default_kind``.
        default_kind: kind of keys not listed in ``kinds`` (default :data:`~lightning_l2l.nets.DEFAULT_KIND`).
    """

    def __init__(
        self,
        shapes: Mapping[Hashable, Sequence[int]],
        kinds: Mapping[Hashable, str] | None = None,
        default_kind: str = DEFAULT_KIND,
    ) -> None:
        kinds = kinds or {}
        unknown = [k for k in kinds if k not in shapes]
        if unknown:
            raise ValueError(f"kinds given for unknown tensors {unknown}")
        sizes: dict[str, int] = {}
        self.entries: list[_Entry] = []
        self.by_kind: dict[str, list[_Entry]] = {}
        for key, shape in shapes.items():
            kind = kinds.get(key, default_kind)
            entry = _Entry(key, torch.Size(shape), kind, sizes.get(kind, 0))
            sizes[kind] = entry.offset + entry.numel
            self.entries.append(entry)
            self.by_kind.setdefault(kind, []).append(entry)
        self._sizes = sizes
        self._index = {e.key: e for e in self.entries}

    @property
    def kinds(self) -> list[str]:
        return list(self.by_kind)

    def numel(self, kind: str) -> int:
        return self._sizes[kind]

    def flatten(self, tensors: Mapping[Hashable, Tensor]) -> dict[str, Tensor]:
        """Concatenate each kind's tensors into one ``(n_kind,)`` vector."""
        return {kind: _cat([tensors[e.key].reshape(-1) for e in entries]) for kind, entries in self.by_kind.items()}

    def unflatten(self, flat: Mapping[str, Tensor]) -> dict[Hashable, Tensor]:
        """Inverse of :meth:`flatten`: each kind's vector split back into keyed tensors (views)."""
        out = {e.key: flat[e.kind][e.offset : e.offset + e.numel].view(e.shape) for e in self.entries}
        return out

    def state_of(self, states: Mapping[str, Tensor], key: Hashable) -> Tensor:
        """The ``(numel, *state_shape)`` slice (a view) of ``states`` that belongs to tensor ``key``."""
        e = self._index[key]
        return states[e.kind][e.offset : e.offset + e.numel]

    def init_state(
        self,
        rule: UpdateRule,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        chunk_size: int | None = None,
    ) -> dict[str, Tensor]:
        """The rule's initial state for every kind, ``{kind: (n_kind, *state_shape)}``.

        With ``chunk_size`` the state is written into its buffer a chunk at a time, so building it
        needs no full-size temporary besides the buffer.
        """
        states = {}
        for kind in self.by_kind:
            n = self.numel(kind)
            if chunk_size is None or n <= chunk_size:
                states[kind] = rule.init_state(n, kind, device=device, dtype=dtype)
                continue
            tail = rule.init_state(0, kind, device=device, dtype=dtype).shape[1:]
            states[kind] = torch.empty((n, *tail), device=device, dtype=dtype or rule.state_dtype())
            for s in range(0, n, chunk_size):
                part = states[kind][s : s + chunk_size]
                part.copy_(rule.init_state(part.shape[0], kind, device=device, dtype=dtype))
        return states


@dataclass
class RuleStep:
    """What :func:`apply_rule` returns.

    Attributes:
        updates: the update of every tensor that had a gradient, by key (absent: no gradient given).
        states: the new state of every kind (the same tensors as given, with ``inplace=True``).
        nonfinite: non-finite gradient entries (they got no update and kept their state): a 0-d
            tensor, no host sync to read it.
        num_coords: coordinates that had a gradient.
    """

    updates: dict[Hashable, Tensor]
    states: dict[str, Tensor]
    nonfinite: Tensor
    num_coords: int


def apply_rule(
    rule: UpdateRule,
    layout: KindLayout,
    grads: Mapping[Hashable, Tensor | None],
    states: Mapping[str, Tensor],
    *,
    chunk_size: int | None = None,
    zero_grads: str = "update",
    inplace: bool = False,
    fused: bool = True,
) -> RuleStep:
    """One step of ``rule`` on every tensor of ``layout``: ``[g, h'] = m(grad, h; phi)`` coordinatewise.

    Each kind's gradients go through the rule in one call (or one per ``chunk_size`` coordinates; the
    result is the same, since the rule is coordinatewise). A rule that shares information between
    coordinates (``rule.shared_stages(kind) > 0``: :class:`~lightning_l2l.nets.LSTMGAC`,
    :class:`~lightning_l2l.nets.NTMBFGS`) is run through its :meth:`~UpdateRule.steps`: each mean it
    needs is taken over every coordinate of the kind that gets an update in this call (or over each
    tensor's, ``rule.shared_over(kind) == "tensor"``, or each row's, ``"row"``), whatever the chunks;
    coordinates that are skipped (no gradient, non-finite, exact zeros with ``"skip"``) do not count
    in it. Unchunked, all
    runs of a kind advance together; chunked, every mean costs one more pass over the chunks (the
    rule's network is recomputed up to it), so the temporaries stay bounded by ``chunk_size``.

    A tensor whose gradient is missing or
    ``None`` is skipped: no update, its state unchanged, and its coordinates are never computed.
    A gradient entry that is not finite (NaN, +-inf) gives its coordinate a zero update and leaves
    its state unchanged, as if the step had not happened for it; so does an exact zero with
    ``zero_grads="skip"`` (with ``"update"`` the rule sees a zero like any other gradient).

    Args:
        rule: the update rule ``m``.
        layout: the tensors' order and kinds.
        grads: gradient per key (any subset of the layout's keys).
        states: ``{kind: (n_kind, *state_shape)}`` state of every kind in ``layout``.
        chunk_size: most coordinates per network call (bounds the temporaries); ``None``: one call per run
            of consecutive tensors with a gradient.
        zero_grads: ``"update"`` or ``"skip"`` (see above).
        inplace: write the new states into ``states`` (call under ``torch.no_grad``); otherwise they are
            new tensors, differentiable in the rule's weights.
        fused: with ``inplace``, a coordinatewise rule runs its :meth:`~UpdateRule.step_`, which may
            be a fused kernel (:class:`~lightning_l2l.nets.CoordinatewiseLSTM` on CPU: the same updates
            to float rounding); ``False``: its ``forward`` everywhere.
    """
    if zero_grads not in ZERO_GRADS:
        raise ValueError(f"Invalid zero_grads: {zero_grads!r} (expected one of {ZERO_GRADS})")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"Invalid chunk_size: {chunk_size} (expected >= 1 coordinates per network call, or None)")
    updates: dict[Hashable, Tensor] = {}
    new_states: dict[str, Tensor] = {}
    nonfinite: list[Tensor] = []
    num_coords = 0
    for kind, entries in layout.by_kind.items():
        state = states[kind]
        pieces: list[Tensor] = []  # the kind's new state, run by run and gap by gap (not inplace)
        done = 0
        runs = _runs(entries, grads)
        shared = _shared_stages(rule, kind)
        if shared and runs:  # a rule that averages over coordinates: every run of the kind at once
            results = _shared_step(rule, entries, runs, grads, state, kind, shared, chunk_size, zero_grads, inplace)
        for i, run in enumerate(runs):
            g = _cat([grads[e.key].reshape(-1) for e in run])  # type: ignore[union-attr]  # (n,)
            start = run[0].offset
            # (n, *state_shape): a view, or the state itself where the run is all of it (a slice's backward
            # would zero a tensor of the state's size and copy the gradient into it at every step)
            h = state if start == 0 and g.numel() == state.shape[0] else state[start : start + g.numel()]
            if shared:
                update, h_new, bad = results[i]
            else:
                update, h_new, bad = _step(rule, g, h, kind, chunk_size, zero_grads, inplace, fused)
            nonfinite.append(bad)
            num_coords += g.numel()
            for e, u in zip(run, torch.split(update, [e.numel for e in run]), strict=True):
                updates[e.key] = u.view(e.shape)
            if not inplace:
                pieces += [state[done:start], h_new]
                done = start + g.numel()
        if inplace or done == 0:
            new_states[kind] = state
        elif done == state.shape[0] and len(pieces) == 2:
            new_states[kind] = pieces[1]  # every coordinate had a gradient: the rule's output as it is
        else:
            new_states[kind] = torch.cat([*pieces, state[done:]])
    zero = next(iter(states.values())).new_zeros((), dtype=torch.int64) if states else torch.zeros((), dtype=torch.int64)
    return RuleStep(
        updates,
        new_states,
        torch.stack(nonfinite).sum() if nonfinite else zero,
        num_coords,
    )


def _step(
    rule: UpdateRule,
    g: Tensor,
    h: Tensor,
    kind: str,
    chunk_size: int | None,
    zero_grads: str,
    inplace: bool,
    fused: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The rule on one flat run: ``(update (n,), new state (n, ...), non-finite count)``."""
    finite = torch.isfinite(g)
    keep = finite & (g != 0) if zero_grads == "skip" else finite
    bad = (~finite).sum()
    skipped = bad if keep is finite else (~keep).sum()
    mask = bool(skipped)  # the one host sync of a run; False in the common case
    n = g.numel()
    size = n if chunk_size is None else max(1, min(chunk_size, n))
    update = torch.empty_like(g) if inplace and size < n else None  # chunks written into it
    updates: list[Tensor] = []
    states: list[Tensor] = []
    # in place, an UpdateRule writes its state itself (a compiled network is a plain callable)
    step_ = getattr(rule, "step_", None) if inplace and isinstance(rule, UpdateRule) else None
    for s in range(0, n, size):
        gc, hc = (g, h) if size >= n else (g[s : s + size], h[s : s + size])  # no slice (and its backward) if one chunk
        if step_ is not None:
            u = step_(gc, hc, kind, keep[s : s + size] if mask else None, fused=fused)  # (chunk,)
            if update is not None:
                update[s : s + u.numel()] = u
            else:
                updates.append(u)
            continue
        u, hn = rule(gc, hc, kind)  # (chunk,), (chunk, *state_shape)
        if mask:
            ok = keep[s : s + size]
            u = torch.where(ok, u, torch.zeros_like(u))
            hn = torch.where(ok.view(-1, *([1] * (hn.dim() - 1))), hn, hc)
        if inplace:
            hc.copy_(hn)
        else:
            states.append(hn)
        if update is not None:
            update[s : s + u.numel()] = u
        else:
            updates.append(u)
    if update is None:
        update = _cat(updates) if updates else torch.empty_like(g)
    return update, h if inplace else (_cat(states) if states else h), bad


def _shared_stages(rule: UpdateRule, kind: str) -> int:
    """``rule.shared_stages(kind)``; 0 for a plain callable (a compiled coordinatewise network)."""
    stages = getattr(rule, "shared_stages", None)
    return stages(kind) if callable(stages) else 0


def _shared_step(
    rule: UpdateRule,
    entries: Sequence[_Entry],
    runs: Sequence[Sequence[_Entry]],
    grads: Mapping[Hashable, Tensor | None],
    state: Tensor,
    kind: str,
    stages: int,
    chunk_size: int | None,
    zero_grads: str,
    inplace: bool,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """A coordinate-sharing rule on every run of one kind: ``[(update, new state, non-finite count)]`` per run.

    Each of the ``stages`` means is a weighted sum over every chunk of every run (weight 0 for a
    skipped coordinate) per tensor, then grouped over the kind or per tensor.
    """
    over = rule.shared_over(kind)
    # groups: one per tensor ("kind" sums them all), or one per row of each tensor ("row": a slice along
    # the first dimension of a tensor of 2 or more dimensions; a vector or scalar is one row)
    first: dict[Hashable, int] = {}  # the first group of each tensor
    num_groups = 0
    for e in entries:
        first[e.key] = num_groups
        num_groups += _rows(e) if over == "row" else 1
    chunks: list[tuple[int, Tensor, Tensor, Tensor | None, Tensor]] = []  # (run, grad, state, keep, group ids)
    bads: list[Tensor] = []
    sizes: list[int] = []
    for r, run in enumerate(runs):
        g = _cat([grads[e.key].reshape(-1) for e in run])  # type: ignore[union-attr]  # (n,)
        start = run[0].offset
        h = state[start : start + g.numel()]  # (n, *state_shape), a view
        finite = torch.isfinite(g)
        keep = finite & (g != 0) if zero_grads == "skip" else finite
        bads.append((~finite).sum())
        mask = bool((~keep).any())  # the one host sync of a run, as in _step
        ids = _cat([_group_ids(e, first[e.key], over, g.device) for e in run])  # (n,) group of each coordinate
        n = g.numel()
        size = n if chunk_size is None else max(1, min(chunk_size, n))
        sizes.append(n)
        for s in range(0, n, size):
            part = slice(s, s + size)
            chunks.append((r, g[part], h[part], keep[part] if mask else None, ids[part]))
    dtype = torch.promote_types(state.dtype, torch.float32) if state.is_floating_point() else torch.float32
    counts = state.new_zeros(num_groups, dtype=dtype)  # (groups,) coordinates that count in a mean
    for _, g, _, keep, ids in chunks:
        counts = counts.index_add(0, ids, keep.to(dtype) if keep is not None else g.new_ones(g.shape, dtype=dtype))

    def means(sums: Tensor) -> Tensor:  # (groups, d) sums -> (1, d) or (groups, d) means
        if over == "kind":
            return sums.sum(0, keepdim=True) / counts.sum().clamp_min(1)
        return sums / counts.clamp_min(1)[:, None]

    def add(sums: Tensor | None, values: Tensor, keep: Tensor | None, ids: Tensor) -> Tensor:
        if values.dim() != 2 or values.shape[0] != ids.shape[0]:
            raise ValueError(f"{type(rule).__name__}.steps yielded shape {tuple(values.shape)}; expected (n, d)")
        if keep is not None:  # where, not a product: a skipped coordinate may be NaN
            values = torch.where(keep[:, None], values, torch.zeros_like(values))
        if sums is None:  # at least float32: a bfloat16 sum over many coordinates would lose the mean
            sums = values.new_zeros(num_groups, values.shape[1], dtype=torch.promote_types(values.dtype, dtype))
        return sums.index_add(0, ids, values.to(sums.dtype))

    def share(mean: Tensor, ids: Tensor) -> Tensor:  # the group mean of each coordinate of a chunk
        return mean if over == "kind" else mean[ids]

    def check_done(k: int) -> None:
        raise ValueError(f"{type(rule).__name__}.steps returned after {k} means; shared_stages says {stages}")

    outs: list[tuple[Tensor, Tensor]] = []
    total = sum(sizes)
    if chunk_size is None or total <= chunk_size:
        # every chunk's step alive at once: no recomputation
        gens = [rule.steps(g, h, kind) for _, g, h, _, _ in chunks]
        values: list[Tensor] = []
        for gen in gens:
            try:
                values.append(next(gen))
            except StopIteration:
                check_done(0)
        for k in range(stages):
            sums = None
            for v, (_, _, _, keep, ids) in zip(values, chunks, strict=True):
                sums = add(sums, v, keep, ids)
            mean = means(sums)  # type: ignore[arg-type]
            values = []
            for gen, (_, _, _, _, ids) in zip(gens, chunks, strict=True):
                try:
                    values.append(gen.send(share(mean, ids)))
                except StopIteration as done:
                    if k + 1 < stages:
                        check_done(k + 1)
                    outs.append(done.value)
            if k + 1 < stages and len(values) != len(gens) or k + 1 == stages and values:
                raise ValueError(f"{type(rule).__name__}.steps did not yield exactly {stages} times")
    else:
        # bounded memory: the k-th mean costs one pass over the chunks, each replaying the step up to it
        known: list[Tensor] = []
        for k in range(stages + 1):
            sums = None
            for _, g, h, keep, ids in chunks:
                gen = rule.steps(g, h, kind)
                try:
                    v = next(gen)
                    for j in range(k):
                        v = gen.send(share(known[j], ids))
                except StopIteration as done:
                    if k < stages:
                        check_done(k)
                    outs.append(done.value)
                    continue
                if k == stages:
                    raise ValueError(f"{type(rule).__name__}.steps yielded more than {stages} times")
                gen.close()
                sums = add(sums, v, keep, ids)
            if k < stages:
                known.append(means(sums))  # type: ignore[arg-type]
    # masking and write-back, chunk by chunk, as _step does
    per_run: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in runs]
    for (r, _, hc, keep, _), (u, hn) in zip(chunks, outs, strict=True):
        if keep is not None:
            u = torch.where(keep, u, torch.zeros_like(u))
            hn = torch.where(keep.view(-1, *([1] * (hn.dim() - 1))), hn, hc)
        if inplace:
            hc.copy_(hn)
        per_run[r][0].append(u)
        per_run[r][1].append(hn)
    results = []
    for r, run in enumerate(runs):
        start = run[0].offset
        h = state[start : start + sizes[r]]
        updates, hs = per_run[r]
        results.append((_cat(updates), h if inplace else _cat(hs), bads[r]))
    return results


def _rows(e: _Entry) -> int:
    """Groups of tensor ``e`` under ``over="row"``: its first dimension (1 for a vector or scalar)."""
    return e.shape[0] if len(e.shape) >= 2 and e.numel else 1


def _group_ids(e: _Entry, first: int, over: str, device: torch.device) -> Tensor:
    """``(numel,)`` group of each coordinate of tensor ``e``, whose groups start at ``first``."""
    if over != "row" or _rows(e) == 1:
        return torch.full((e.numel,), first, dtype=torch.int64, device=device)
    return torch.arange(e.numel, device=device) // (e.numel // _rows(e)) + first


def _runs(entries: Sequence[_Entry], grads: Mapping[Hashable, Tensor | None]) -> list[list[_Entry]]:
    """Maximal runs of consecutive ``entries`` that have a gradient."""
    runs: list[list[_Entry]] = []
    current: list[_Entry] | None = None
    for e in entries:
        if grads.get(e.key) is None:
            current = None
            continue
        if current is None:
            current = []
            runs.append(current)
        current.append(e)
    return runs


def _cat(tensors: Sequence[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
