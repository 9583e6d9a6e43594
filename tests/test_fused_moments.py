"""The fused frozen step of MomentMLP (nets/_fused_moments.py, nets/_kernels/moments_step.c) against its forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_l2l import LearnedOptimizer
from lightning_l2l.nets import MomentMLP, _fused, _fused_moments
from lightning_l2l.nets import moments as moments_module
from lightning_l2l.nets._fused_moments import fused_moments_status, fused_moments_supports
from lightning_l2l.pretrained import resolve

needs_kernel = pytest.mark.skipif(
    fused_moments_status() is not None, reason=f"the fused kernel cannot be built here: {fused_moments_status()}"
)


def _grads(n: int, gen: torch.Generator) -> torch.Tensor:
    """Gradients over 11 decades, exact zeros and non-finite entries."""
    g = torch.randn(n, generator=gen) * torch.logspace(-9, 2, n)[torch.randperm(n, generator=gen)]
    g[2::17] = 0.0
    g[3], g[4], g[5] = float("nan"), float("inf"), -float("inf")
    return g


def _trained_like(rule: MomentMLP) -> MomentMLP:
    """Weights of a trained rule's size (the default head starts at zero: the rule is then clipped Adam)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rule.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return rule.requires_grad_(False)


RULES = {
    "general": lambda: resolve("general")[0],
    "default": lambda: _trained_like(MomentMLP()),
    "one layer, one second moment": lambda: _trained_like(
        MomentMLP(hidden=8, layers=1, momentum_betas=(0.9,), rms_betas=(0.999,), decay_steps=10.0, decay_power=1.0)
    ),
    "no hidden layer": lambda: _trained_like(MomentMLP(layers=0, rms_betas=(0.5, 0.9, 0.999))),
    "alignments": lambda: _trained_like(MomentMLP(lr=3e-3, decay_steps=100.0, alignment_betas=(0.5, 0.9))),
    "one alignment, no hidden layer": lambda: _trained_like(MomentMLP(layers=0, alignment_betas=(0.99,))),
}


def _steps(rule: MomentMLP, n: int, steps: int, fused: bool, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Updates and states of ``steps`` in-place steps on the same gradients, zeros skipped."""
    gen = torch.Generator().manual_seed(0)
    rule = rule.to(dtype)
    state = rule.init_state(n)
    out = []
    for _ in range(steps):
        g = _grads(n, gen).to(dtype)
        keep = torch.isfinite(g) & (g != 0)
        with torch.no_grad():
            out.append(rule.step_(g, state, keep=keep, fused=fused).clone())
    return out + [state.clone()]


@needs_kernel
@pytest.mark.parametrize("name", list(RULES))
def test_fused_step_matches_forward(name):
    """30 steps (11 decades of gradient scale, zeros skipped, NaN and inf): the fused updates and states are as
    close to the float64 rule as the eager float32 ones, to float32 rounding: within 1e-5 of it relative to each
    column's largest entry (where the float32 decay rates' rounding alone makes 1 - 0.999^t differ by 1e-5 at
    t = 1, no further than eager; the kernel's 1 - beta^t as -expm1(t log beta) is often closer)."""
    rule = RULES[name]()
    n = 1003  # not a multiple of the vector width: the last coordinates run in a partial block
    with torch.no_grad():
        assert fused_moments_supports(rule, torch.zeros(n), rule.init_state(n))  # so "fused" below is the kernel
    fused, eager = _steps(rule, n, 30, True), _steps(rule, n, 30, False)
    exact = _steps(rule.double(), n, 30, False, torch.float64)
    rule.float()
    for f, e, x in zip(fused, eager, exact, strict=True):
        scale = x.abs().amax(0, keepdim=True) if x.dim() > 1 else x.abs().max()  # per state column
        err_fused = ((f.double() - x) / scale.clamp_min(1e-30)).abs().max().item()
        err_eager = ((e.double() - x) / scale.clamp_min(1e-30)).abs().max().item()
        # per column, relative to its largest entry: within 1e-5 of float64, or no further than eager float32
        assert err_fused <= max(1e-5, 1.5 * err_eager), (name, err_fused, err_eager)
        assert err_fused <= 4 * err_eager + 1e-6, (name, err_fused, err_eager)
    assert all(torch.isfinite(u).all() for u in fused)
    assert fused[0].abs().max() > 0


@needs_kernel
@pytest.mark.parametrize(("threads", "runs_on"), [(2, "openmp"), (2, "python")])
def test_fused_step_split_over_threads(monkeypatch, threads, runs_on):
    """Split over two threads (on OpenMP's, or on Python threads), the runs give the one-thread result exactly."""
    rule = RULES["general"]()
    one = _steps(rule, 3001, 5, True)
    monkeypatch.setattr(_fused, "_MIN_PER_THREAD", 100)
    if runs_on == "python":
        monkeypatch.setattr(_fused_moments._library(*_fused_moments._shape(rule))[0], "openmp", False)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        split = _steps(rule, 3001, 5, True)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(split, one, strict=True):
        assert torch.equal(a, b)


@needs_kernel
def test_learned_optimizer_general_fused_matches_eager():
    """LearnedOptimizer with the default `general` weights: fused (default) and fused=False take the same steps
    (chunks, a parameter without a gradient, zero gradients skipped)."""

    def run(fused: bool | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 3), nn.Linear(3, 3))
        opt = LearnedOptimizer.from_module(model, weights="general", chunk_size=500, fused=fused)
        x, y = torch.randn(64, 20), torch.randn(64, 3)
        for _ in range(8):
            opt.zero_grad()
            nn.functional.mse_loss(model[:3](x), y).backward()  # model[3] gets no gradient
            model[0].weight.grad[:2] = 0.0
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    calls = []
    real = _fused_moments.fused_moments_step

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moments_module, "fused_moments_step", spy)
        fused = run(None)
    assert calls  # the kernel took the steps
    for a, b in zip(fused, run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_step_is_not_used_where_it_does_not_apply():
    """float64, a state or gradient that needs a gradient, a 2-D gradient: MomentMLP.forward runs."""
    rule = MomentMLP()
    g, state = torch.randn(10), rule.init_state(10)
    assert not fused_moments_supports(rule.double(), g.double(), state.double())
    rule.float()
    with torch.enable_grad():
        assert not fused_moments_supports(rule, g.requires_grad_(), state)
        frozen_head = MomentMLP()
        frozen_head.head.requires_grad_(False)  # the MLP still trains: its graph is needed
        assert not fused_moments_supports(frozen_head, g.detach(), state)
    assert fused_moments_supports(rule.requires_grad_(False), g.detach(), state) or fused_moments_status() is not None
    assert not fused_moments_supports(rule, torch.randn(10, 1), state)
    assert not fused_moments_supports(rule, torch.randn(9), state)


def test_runs_eagerly_without_the_kernel(monkeypatch):
    """No compiler: the step is MomentMLP.forward's (the same numbers as fused=False); fused=True refuses."""
    monkeypatch.setattr(_fused_moments, "_library", lambda *shape: (None, "no C compiler found (install gcc)"))
    rule = RULES["default"]()
    for a, b in zip(_steps(rule, 50, 3, True), _steps(rule, 50, 3, False), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="no C compiler found"):
        LearnedOptimizer([nn.Parameter(torch.zeros(3))], MomentMLP(), fused=True)
