"""A coordinatewise MLP over scale-free moment features: the rule behind the ``general`` weights.

Not in the paper. The paper's LSTM sees the gradient itself (through log/sign preprocessing), so
what it learns is tied to the gradient scales of the tasks it was trained on, and its recurrent
state drifts once a run goes past the horizon it was unrolled for. The rules that have generalised
since (google/learned_optimization's ``small_fc_lopt`` and ``adafac_mlp_lopt``, VeLO, Celo) share a
few choices, which this rule takes:

- its per-coordinate state is running moments of the gradient at several timescales, updated by
  fixed formulas (no learned recurrence that can drift);
- its inputs are those moments divided by the running RMS of the gradient, so multiplying a
  task's loss (or a layer's gradients) by any constant changes nothing it sees;
- its output is split into a direction and a log step size, and both are bounded, so no input can
  produce an arbitrarily large step.

It does *not* see training progress (the step count or a fraction of a known total) or the
parameter's value: a user's run has no horizon to give a progress feature, and a rule that never
sees ``t`` cannot learn a schedule that breaks once ``t`` passes the meta-training horizon; its
features are stationary statistics once the slowest moment has warmed up (a few hundred steps).

With its last layer at zero (:meth:`MomentMLP.__init__`'s default) the rule is exactly Adam with
``betas=(0.9, rms_betas[-1])`` and ``eps`` at learning rate ``lr`` (default 1e-3, the untuned
Adam most users run), with each coordinate's step clipped to ``clip * lr``: meta-training starts
from a sound optimizer and learns a correction to it, and the comparison with Adam(1e-3) says
what the correction is worth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_l2l.nets._fused_moments import fused_moments_step, fused_moments_supports
from lightning_l2l.nets.base import DEFAULT_KIND, UpdateRule

__all__ = ["MomentMLP"]

#: features are clamped to +-FEATURE_CLAMP (a normalised moment rarely exceeds 1/sqrt(1 - beta))
FEATURE_CLAMP = 10.0


def _betas(values: Sequence[float], name: str) -> tuple[float, ...]:
    out = tuple(float(b) for b in values)
    if not out or not all(0.0 <= b < 1.0 for b in out):
        raise ValueError(f"Invalid {name}: {list(values)} (expected one or more decay rates in [0, 1))")
    return out


class MomentMLP(UpdateRule):
    """``update = -lr * decay(t) * exp(log_range * tanh(s)) * clamp(adam + direction_scale * tanh(d), -clip, clip)``.

    Per coordinate the state holds momenta ``m_k`` at ``momentum_betas``, second moments ``v_j``
    at ``rms_betas`` and the coordinate's step count ``t`` (for bias correction; every moment is
    bias-corrected as Adam's are). The features, for ``r = 1 / (sqrt(v_slow) + eps)``
    (``v_slow``: the last of ``rms_betas``), are ``m_k * r`` for every
    ``k``, ``g * r``, and ``log(v_j / v_slow) / 2`` for every other ``j``; clamped to
    +-:data:`FEATURE_CLAMP`. An MLP maps them to ``(d, s)``; ``adam`` is the bias-corrected
    ``m_{0.9} * r`` (Adam's direction). Everything the MLP sees is invariant to the gradient's scale
    (down to ``eps``), and ``|update| <= lr * exp(log_range) * clip`` whatever the input.

    Args:
        lr: the base step size (Adam's learning rate at initialisation; default 1e-3).
        hidden: width of each hidden layer of the MLP.
        layers: number of hidden layers.
        momentum_betas: decay rates of the momenta; must contain 0.9 (the Adam direction).
        rms_betas: decay rates of the second moments; the last is the normaliser.
        log_range: the learned step size lies in ``[lr * exp(-log_range), lr * exp(log_range)]``.
        clip: bound on the direction, in units of ``lr``.
        eps: Adam's epsilon (absolute: below gradients of about ``eps`` the rule is not scale-free).
        zero_init: start the last layer at zero, so the rule starts as clipped Adam.
        direction_scale: how far the learned direction may move from Adam's (``0``: the rule only learns
            a step size per coordinate, along Adam's direction).
        decay_steps: a fixed schedule on the step size, ``(1 + (t - 1) / decay_steps) ** -decay_power`` at
            each coordinate's ``t``-th step (``0``: none). It needs no horizon: inverse-square-root decay
            (``decay_power=0.5``) goes on shrinking the step however long a run is.
        decay_power: the schedule's exponent.
        alignment_betas: decay rates of running *alignments* (default none: off), one extra feature and
            one state column each. The alignment is the running mean of ``(g * r) * (m_prev * r)``, the
            normalised gradient times the normalised Adam direction of the step before (``m_prev``: the
            bias-corrected 0.9 momentum before this gradient): positive where the last step did not go far
            enough along the gradient, negative where it overshot (the gradient flipped). Scale-free like
            every other feature; what a rule needs to tell a too-small step from a too-large one, which
            moments alone say little about.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        hidden: int = 16,
        layers: int = 2,
        momentum_betas: Sequence[float] = (0.5, 0.9, 0.99),
        rms_betas: Sequence[float] = (0.9, 0.99),
        log_range: float = math.log(10.0),
        clip: float = 3.0,
        eps: float = 1e-8,
        zero_init: bool = True,
        direction_scale: float = 1.0,
        decay_steps: float = 0.0,
        decay_power: float = 0.5,
        alignment_betas: Sequence[float] = (),
    ) -> None:
        super().__init__()
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"Invalid lr: {lr} (expected a finite step size > 0, e.g. 3e-3)")
        if hidden < 1 or layers < 0:
            raise ValueError(f"Invalid MLP size: hidden={hidden}, layers={layers} (expected hidden >= 1, layers >= 0)")
        mom, rms = _betas(momentum_betas, "momentum_betas"), _betas(rms_betas, "rms_betas")
        if 0.9 not in mom:
            raise ValueError(f"momentum_betas must contain 0.9 (the Adam direction the rule starts from), got {list(mom)}")
        for name, value in (("log_range", log_range), ("clip", clip), ("eps", eps)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Invalid {name}: {value} (expected a finite value > 0)")
        if not (math.isfinite(direction_scale) and direction_scale >= 0):
            raise ValueError(f"Invalid direction_scale: {direction_scale} (expected a finite value >= 0)")
        for name, value in (("decay_steps", decay_steps), ("decay_power", decay_power)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Invalid {name}: {value} (expected a finite value >= 0; decay_steps=0: no decay)")
        align = _betas(alignment_betas, "alignment_betas") if len(alignment_betas) else ()
        self._record_init_args(locals())
        self._init_args.update(momentum_betas=list(mom), rms_betas=list(rms))
        if align:
            self._init_args["alignment_betas"] = list(align)
        else:  # the config of a rule without alignments is what it was before they existed
            self._init_args.pop("alignment_betas", None)
        self.lr, self.log_range, self.clip, self.eps = float(lr), float(log_range), float(clip), float(eps)
        self.direction_scale = float(direction_scale)
        self.decay_steps, self.decay_power = float(decay_steps), float(decay_power)
        self.momentum_betas, self.rms_betas, self.alignment_betas = mom, rms, align
        self._adam = mom.index(0.9)
        self.num_features = len(mom) + 1 + (len(rms) - 1) + len(align)
        sizes = [self.num_features] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            blocks += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*blocks)
        self.head = nn.Linear(sizes[-1], 2)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def widen_from(self, source: MomentMLP) -> None:
        """Copy ``source``'s weights into this rule, where this rule is ``source`` with ``alignment_betas`` added.

        The new features' input weights start at zero, so the widened rule's updates are exactly
        ``source``'s (meta-training then learns what the alignments are worth): how a run continues from
        weights meta-trained without them (``MetaLearner(init_weights=...)``).
        """
        mine = {k: v for k, v in self.config()["init_args"].items() if k != "alignment_betas"}
        theirs = {k: v for k, v in source.config()["init_args"].items() if k != "alignment_betas"}
        if mine != theirs or source.alignment_betas or not self.alignment_betas:
            raise ValueError(
                f"cannot widen {source.config()} into {self.config()}: the rules must differ only in "
                "alignment_betas, which the source must not have"
            )
        state = {k: v.clone() for k, v in source.state_dict().items()}
        first = "mlp.0.weight" if len(self.mlp) else "head.weight"
        w = state[first]
        state[first] = torch.cat([w, w.new_zeros(w.shape[0], len(self.alignment_betas))], dim=1)
        self.load_state_dict(state)

    @property
    def state_size(self) -> int:
        """Columns of the per-coordinate state: the moments, the alignments, then the step count."""
        return len(self.momentum_betas) + len(self.rms_betas) + len(self.alignment_betas) + 1

    def init_state(
        self,
        num_coords: int,
        kind: str = DEFAULT_KIND,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        return torch.zeros(num_coords, self.state_size, device=device, dtype=dtype or self.state_dtype())

    def features(self, grad: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(features (n, F), Adam direction (n,), new state)`` for one step."""
        g = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad)).to(state.dtype).unsqueeze(1)  # (n, 1)
        # so that g * g, and so the second moments, stay finite: a gradient past ~1e18 (float32) is treated as 1e18
        limit = math.sqrt(torch.finfo(state.dtype).max) / 4
        g = g.clamp(-limit, limit)
        nm = len(self.momentum_betas)
        # from the Python floats in the state's dtype (a float32 buffer cast to float64 would keep float32's rounding)
        mom_b = torch.tensor(self.momentum_betas, dtype=state.dtype, device=state.device)  # (len(momentum_betas),)
        rms_b = torch.tensor(self.rms_betas, dtype=state.dtype, device=state.device)  # (len(rms_betas),)
        nr, na = len(self.rms_betas), len(self.alignment_betas)
        t = state[:, -1:] + 1
        m = mom_b * state[:, :nm] + (1 - mom_b) * g
        v = rms_b * state[:, nm : nm + nr] + (1 - rms_b) * g * g
        # bias correction per coordinate (a coordinate skipped for a zero gradient keeps its own t)
        m_hat = m / (1 - mom_b**t)
        v_hat = v / (1 - rms_b**t)
        eps2 = self.eps**2
        r = 1.0 / (v_hat[:, -1:].sqrt() + self.eps)  # (n, 1): Adam's normaliser
        gr = g * r  # (n, 1): the normalised gradient
        feats = [m_hat * r, gr]  # (n, len(momentum_betas)), (n, 1)
        if v_hat.shape[1] > 1:  # (n, len(rms_betas) - 1): is the gradient's scale rising or falling?
            feats.append(0.5 * torch.log((v_hat[:, :-1] + eps2) / (v_hat[:, -1:] + eps2)))
        parts = [m, v]
        if na:  # running means of (g r) (m_prev r): did the last step fall short (> 0) or overshoot (< 0)?
            al_b = torch.tensor(self.alignment_betas, dtype=state.dtype, device=state.device)  # (na,)
            m_prev = state[:, self._adam : self._adam + 1] / (1 - mom_b[self._adam] ** (t - 1)).clamp_min(1e-12)
            prod = gr.clamp(-FEATURE_CLAMP, FEATURE_CLAMP) * (m_prev * r).clamp(-FEATURE_CLAMP, FEATURE_CLAMP)
            a = al_b * state[:, nm + nr : nm + nr + na] + (1 - al_b) * prod
            feats.append(a / (1 - al_b**t))
            parts.append(a)
        x = torch.cat(feats, dim=1).clamp(-FEATURE_CLAMP, FEATURE_CLAMP)
        new_state = torch.cat([*parts, t], dim=1)
        return x, (m_hat[:, self._adam] * r[:, 0]), new_state

    def step_(
        self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND, keep: Tensor | None = None, *, fused: bool = True
    ) -> Tensor:
        """The frozen step in place; on CPU in float32 one fused kernel (:mod:`lightning_l2l.nets._fused_moments`)
        where it builds, else :meth:`forward` (the same updates to float32 rounding)."""
        if fused and fused_moments_supports(self, grad, state):
            return fused_moments_step(self, grad, state, keep)
        return super().step_(grad, state, kind, keep, fused=fused)

    def forward(self, grad: Tensor, state: Tensor, kind: str = DEFAULT_KIND) -> tuple[Tensor, Tensor]:
        x, adam, new_state = self.features(grad, state)
        w = self.head.weight
        out = self.head(self.mlp(x.to(w.dtype)))
        direction = (adam.to(w.dtype) + self.direction_scale * torch.tanh(out[:, 0])).clamp(-self.clip, self.clip)
        step = self.lr * torch.exp(self.log_range * torch.tanh(out[:, 1]))
        if self.decay_steps > 0 and self.decay_power > 0:  # (1 + (t - 1) / decay_steps)^-power, per coordinate
            t = new_state[:, -1].to(w.dtype)
            step = step * (1 + (t - 1) / self.decay_steps).pow(-self.decay_power)
        return (-step * direction).to(grad.dtype), new_state
