"""The fused frozen step of CoordinatewiseLSTM (nets/_fused.py, nets/_kernels/lstm_step.c) against the eager network."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_l2l import LearnedOptimizer
from lightning_l2l.nets import (
    CoordinatewiseLinear,
    CoordinatewiseLSTM,
    MomentMLP,
    PerKindRule,
    ScaledRule,
    _fused,
)
from lightning_l2l.nets._fused import fused_lstm_status, fused_lstm_supports

needs_kernel = pytest.mark.skipif(
    fused_lstm_status() is not None, reason=f"the fused kernel cannot be built here: {fused_lstm_status()}"
)


def _grads(n: int, p: float = 10.0) -> torch.Tensor:
    """Gradients over many scales, with both preprocessing branches, exact zeros and non-finite entries."""
    g = torch.randn(n) * torch.logspace(-9, 2, n)[torch.randperm(n)]
    g[::13] = math.exp(-p) * (1 - 1e-6)  # just below the branch point
    g[1::13] = -math.exp(-p)  # on it
    g[2::17] = 0.0
    g[3] = float("nan")
    g[4] = float("inf")
    g[5] = -float("inf")
    return g


def _rule(hidden: int, layers: int, preprocessing: str) -> CoordinatewiseLSTM:
    rule = CoordinatewiseLSTM(hidden_size=hidden, num_layers=layers, preprocessing=preprocessing).eval()
    with torch.no_grad():  # an output layer as large as a trained one's, so the updates are not all tiny
        rule.out.weight.normal_()
        rule.out.bias.fill_(0.01)
    return rule.requires_grad_(False)


SHAPES = [(20, 2, "log_sign"), (4, 2, "log_sign"), (7, 3, "none"), (33, 1, "log_sign")]


@needs_kernel
@pytest.mark.parametrize(("hidden", "layers", "preprocessing"), SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_fused_step_matches_eager_float32(hidden, layers, preprocessing, masked):
    """Same updates and states as the eager network to float32 rounding, written in place; a coordinate
    with keep=False gets update 0 and keeps its state."""
    rule = _rule(hidden, layers, preprocessing)
    n = 3000
    g = _grads(n)
    state = rule.init_state(n) + 0.5 * torch.randn(n, layers, 2, hidden)
    keep = torch.rand(n) > 0.3 if masked else None
    with torch.no_grad():
        assert fused_lstm_supports(rule, g, state)
        eager_state, fused_state = state.clone(), state.clone()
        eager = rule.step_(g, eager_state, keep=keep, fused=False)
        fused = rule.step_(g, fused_state, keep=keep, fused=True)
    assert fused.dtype == torch.float32 and fused.shape == (n,)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_state, eager_state, rtol=1e-5, atol=1e-6)
    if masked:
        assert torch.equal(fused[~keep], torch.zeros_like(fused[~keep]))
        assert torch.equal(fused_state[~keep], state[~keep])


@needs_kernel
def test_fused_step_is_as_close_to_float64_as_eager():
    """Against the network in float64, the kernel's float32 error is of the eager float32 network's size."""
    rule = _rule(20, 2, "log_sign")
    rule64 = _rule(20, 2, "log_sign").double()
    rule64.load_state_dict(rule.state_dict())
    n = 5000
    g = _grads(n)
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    state = 0.5 * torch.randn(n, 2, 2, 20)
    with torch.no_grad():
        u64, s64 = rule64(g.double(), state.double())
        eager_state, fused_state = state.clone(), state.clone()
        eager = rule.step_(g, eager_state, fused=False)
        fused = rule.step_(g, fused_state, fused=True)
    for got, ref, want in ((fused, eager, u64), (fused_state, eager_state, s64)):
        err_fused = (got.double() - want).abs().max().item()
        err_eager = (ref.double() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err_fused <= max(4 * err_eager, 1e-6 * scale), (err_fused, err_eager, scale)


@needs_kernel
def test_fused_step_follows_weight_changes():
    """The packed weights are rebuilt when a weight changes in place or is replaced."""
    rule = _rule(20, 2, "log_sign")
    g = _grads(500)
    state = torch.zeros(500, 2, 2, 20)
    with torch.no_grad():
        rule.step_(g, state.clone())
        rule.cells[1].weight_g.mul_(-2)
        rule.out.bias = nn.Parameter(torch.tensor([0.3]), requires_grad=False)
        fused = rule.step_(g, state.clone())
        eager = rule.step_(g, state.clone(), fused=False)
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
        # through .data, which does not bump the parameter's version counter (e.g. weights loaded by hand)
        rule.cells[0].weight_ifo.data.copy_(torch.randn_like(rule.cells[0].weight_ifo) * 0.3)
        rule.out.weight.data.mul_(3)
        fused = rule.step_(g, state.clone())
        eager = rule.step_(g, state.clone(), fused=False)
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)


def test_fused_is_not_used_where_it_does_not_apply():
    """float64 states, gradients on, and a state of another shape go to the eager network."""
    rule = _rule(4, 2, "log_sign")
    g = torch.randn(10)
    assert not fused_lstm_supports(rule, g.double(), torch.zeros(10, 2, 2, 4, dtype=torch.float64))
    assert not fused_lstm_supports(rule, g, torch.zeros(10, 2, 2, 4)[:, :1])
    trainable = CoordinatewiseLSTM(hidden_size=4)
    with torch.enable_grad():
        assert not fused_lstm_supports(trainable, g, torch.zeros(10, 2, 2, 4))
    # and the differentiable path is the network's forward: gradients reach its weights
    update, _ = trainable(g, torch.zeros(10, 2, 2, 4))
    update.sum().backward()
    assert trainable.out.weight.grad is not None


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 50), nn.ReLU(), nn.Linear(50, 10))


def _run(fused: bool | None, weights="conv", steps: int = 4) -> list[torch.Tensor]:
    model = _mlp()
    opt = LearnedOptimizer.from_module(model, weights, fused=fused, chunk_size=700, lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):  # given gradients: a rounding difference is not fed back through the loss
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 10 ** torch.randint(-8, 1, p.shape, generator=gen)
        model[2].weight.grad[:3] = 0.0  # rows skipped: zero_grads="skip" keeps their state
        model[4].bias.grad = None  # no gradient: no update, no state
        opt.step()
    return [p.detach().clone() for p in model.parameters()] + [
        opt.state[p]["hidden"].clone() for p in model.parameters() if "hidden" in opt.state[p]
    ]


def _python_threads(monkeypatch, shapes) -> None:
    """Runs of coordinates on Python threads, as where the kernel is built without OpenMP."""
    for shape in shapes:
        lib = _fused._library(*shape)[0]
        if lib is not None:
            monkeypatch.setattr(lib, "openmp", False)


# (threads, the runs on OpenMP's threads where the kernel has them, else on Python threads)
PARALLEL = [(1, "openmp"), (2, "openmp"), (2, "python")]


@needs_kernel
@pytest.mark.parametrize(("threads", "runs_on"), PARALLEL)
def test_learned_optimizer_fused_matches_eager(monkeypatch, threads, runs_on):
    """LearnedOptimizer: fused (default) and fused=False take the same steps with the shipped conv weights
    (PerKindRule of ScaledRule LSTMs), chunks, skipped zeros and a parameter without a gradient; with two
    threads each chunk is split between them (on OpenMP's threads, or on Python threads)."""
    monkeypatch.setattr(_fused, "_MIN_PER_THREAD", 100)
    if runs_on == "python":
        _python_threads(monkeypatch, [(20, 2, 2)])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        eager, fused = _run(False), _run(None)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(fused, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_learned_optimizer_runs_eagerly_without_the_kernel(monkeypatch):
    """No compiler: fused=None steps eagerly (the same numbers as fused=False), fused=True refuses with the reason."""
    monkeypatch.setattr(_fused, "_library", lambda *shape: (None, "no C compiler found (install gcc)"))
    assert fused_lstm_status() == "no C compiler found (install gcc)"
    for a, b in zip(_run(None, steps=2), _run(False, steps=2), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="no C compiler found"):
        LearnedOptimizer([nn.Parameter(torch.zeros(3))], "conv", fused=True)


def test_fused_argument_checks():
    p = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="Invalid fused"):
        LearnedOptimizer(p, "conv", fused="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exclude each other"):
        LearnedOptimizer(p, "conv", fused=True, compile=True)
    with pytest.raises(ValueError, match="no CoordinatewiseLSTM or MomentMLP"):
        LearnedOptimizer(p, CoordinatewiseLinear(), fused=True)


def test_step_in_place_of_wrappers_matches_their_forward():
    """UpdateRule.step_ of the wrappers (PerKindRule, ScaledRule) and of a rule without a fused step
    (MomentMLP): the update of forward, masked, and its state written in place."""
    lstm = _rule(4, 2, "log_sign")
    rules = [PerKindRule({"conv": ScaledRule(lstm, 3.0), "fc": MomentMLP()}, default="fc")]
    g = _grads(300)
    keep = torch.isfinite(g) & (g != 0)
    for rule, kind in ((rules[0], "conv"), (rules[0], "fc")):
        state = rule.init_state(300, kind)
        with torch.no_grad():
            u_ref, s_ref = rule(g, state, kind)
            s = state.clone()
            u = rule.step_(g, s, kind, keep, fused=False)
        torch.testing.assert_close(u, torch.where(keep, u_ref, torch.zeros_like(u_ref)))
        mask = keep.view(-1, *([1] * (state.dim() - 1)))
        torch.testing.assert_close(s, torch.where(mask, s_ref, state))


# ----------------------------------------------------------------------------------- differentiable


def _two_steps(rule: CoordinatewiseLSTM, g: torch.Tensor, state0: torch.Tensor) -> list[torch.Tensor]:
    """Outputs and gradients (state, every weight) of two differentiable steps under a random loss."""
    gen = torch.Generator().manual_seed(1)
    gu = torch.randn(g.shape, generator=gen)
    gs = torch.randn(state0.shape, generator=gen)
    state = state0.clone().requires_grad_()
    u, s1 = rule(g, state)
    u2, s2 = rule(g * 0.5, s1)
    ((u * gu).sum() + (u2 * gu).sum() + (s2 * gs).sum()).backward()
    out = [u.detach(), s2.detach(), state.grad] + [p.grad for p in rule.parameters()]
    rule.zero_grad(set_to_none=True)
    return out


@needs_kernel
@pytest.mark.parametrize(("hidden", "layers", "preprocessing"), SHAPES)
@pytest.mark.parametrize(("threads", "runs_on"), PARALLEL)
def test_differentiable_fused_matches_eager_gradients(monkeypatch, hidden, layers, preprocessing, threads, runs_on):
    """With gradients on (meta-training), CPU float32: the fused autograd node gives the eager network's
    outputs and the same gradients of the state and of every weight (the output layer's included, summed in
    the kernel), to float32 rounding, on one thread or split over two."""
    monkeypatch.setattr(_fused, "_MIN_PER_THREAD", 100)
    rule = CoordinatewiseLSTM(hidden_size=hidden, num_layers=layers, preprocessing=preprocessing)
    if runs_on == "python":
        _python_threads(monkeypatch, [_fused._shape(rule)])
    with torch.no_grad():
        rule.out.weight.normal_()
    n = 1500
    g = _grads(n)
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    state0 = 0.5 * torch.randn(n, layers, 2, hidden)
    assert _fused.fused_lstm_trains(rule, g, state0.requires_grad_())
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = _two_steps(rule, g, state0.detach())
    finally:
        torch.set_num_threads(old)
    monkeypatch.setattr(_fused, "_library", lambda *shape: (None, "off"))
    eager = _two_steps(rule, g, state0.detach())
    for got, want in zip(fused, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-5 * want.abs().max().item())


@needs_kernel
def test_runs_do_not_depend_on_the_threads():
    """The kernels' ``_mt`` entry points over 3 runs (more than the 2 threads they may get): the sequential
    kernel's forward exactly, and its gradients once the runs' sums are added (on OpenMP's threads where the
    kernel has them, else a plain loop)."""
    rule = _rule(20, 2, "log_sign")
    lib, pk = _fused._library(20, 2, 2)[0], _fused._weights(rule)
    n, srow = 1001, 202
    g = _grads(n)
    g = torch.where(torch.isfinite(g), g, torch.zeros(n))
    state = 0.5 * torch.randn(n, 2, 2, 20)
    gu, gs = torch.randn(n), torch.randn(n, 2, 2, 20)
    out = {}
    for parts in (1, 3):
        new, save, upd = torch.empty_like(state), torch.empty(n, srow), torch.empty(n)
        gin, gw, gwo = torch.empty_like(state), torch.zeros(parts, 2, 41, 80), torch.zeros(parts, 21)
        args = (pk.w.data_ptr(), pk.b.data_ptr(), pk.act.data_ptr(), pk.wo.data_ptr(), pk.bo, 0.1, 10.0)
        lib.l2l_lstm_forward_mt(parts, n, g.data_ptr(), state.data_ptr(), new.data_ptr(), save.data_ptr(),
                                upd.data_ptr(), *args)
        lib.l2l_lstm_backward_mt(parts, n, save.data_ptr(), state.data_ptr(), new.data_ptr(), gu.data_ptr(),
                                 gs.data_ptr(), gin.data_ptr(), gw.data_ptr(), gwo.data_ptr(), pk.wt.data_ptr(),
                                 pk.wo.data_ptr(), 0.1)
        stepped = state.clone()
        upd_step = torch.empty(n)
        lib.l2l_lstm_step_mt(parts, n, g.data_ptr(), None, stepped.data_ptr(), upd_step.data_ptr(), *args)
        out[parts] = (upd, new, save, gin, upd_step, stepped, gw.sum(0), gwo.sum(0))
    for a, b in zip(out[3][:6], out[1][:6], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(out[3][6:], out[1][6:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    assert out[1][6].abs().sum() > 0 and out[1][7].abs().sum() > 0


@needs_kernel
def test_openmp_kernel_shares_torchs_runtime():
    """Where the kernel is built with OpenMP, the process has one OpenMP runtime: torch's libgomp (a second
    would bring its own threads, spinning against torch's)."""
    lib = _fused._library(20, 2, 2)[0]
    if not lib.openmp:
        pytest.skip("the kernel is built without OpenMP here (torch does not run on libgomp)")
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


def test_differentiable_fused_is_not_used_where_it_does_not_apply():
    """Second derivatives (a gradient that carries a graph), autocast, float64 and frozen weights with a
    frozen state go to the eager network."""
    rule = CoordinatewiseLSTM(hidden_size=4)
    g, state = torch.randn(10), torch.zeros(10, 2, 2, 4)
    assert not _fused.fused_lstm_trains(rule, g.requires_grad_(), state)
    g = g.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _fused.fused_lstm_trains(rule, g, state)
    assert not _fused.fused_lstm_trains(rule.double(), g.double(), state.double())
    frozen = CoordinatewiseLSTM(hidden_size=4).requires_grad_(False)
    assert not _fused.fused_lstm_trains(frozen, g, state)


@needs_kernel
def test_meta_gradient_of_an_unroll_matches_eager(monkeypatch):
    """trajectory.unroll, 5 differentiable steps on quadratics: the same meta-loss and meta-gradient as the
    eager network, to float32 rounding (what MetaLearner.training_step backpropagates)."""
    from lightning_l2l.tasks import QuadraticFamily
    from lightning_l2l.trajectory import Trajectory, unroll

    family = QuadraticFamily(dim=10, num_functions=64)

    def meta_grad() -> list[torch.Tensor]:
        torch.manual_seed(0)
        rule = CoordinatewiseLSTM()
        traj = Trajectory.start(rule, family.sample(torch.Generator().manual_seed(0)))
        result = unroll(rule, traj, 5)
        result.meta_loss.backward()
        return [result.meta_loss.detach()] + [p.grad for p in rule.parameters()]

    fused = meta_grad()
    monkeypatch.setattr(_fused, "_library", lambda *shape: (None, "off"))
    eager = meta_grad()
    for got, want in zip(fused, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@needs_kernel
def test_a_failed_openmp_build_falls_back_and_is_not_retried(monkeypatch, tmp_path):
    """An -fopenmp build that fails (here a flag the compiler refuses) leaves a kernel without OpenMP, which runs
    its runs on Python threads, and a marker, so that the next start does not compile it again."""
    monkeypatch.setenv("L2L_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(_fused, "_OPENMP", "-fno-such-flag-l2l")
    monkeypatch.setattr(_fused, "_torch_libgomp", lambda: True)
    monkeypatch.setattr(_fused, "_is_gcc", lambda cc: True)
    calls = []
    real_run = _fused.subprocess.run

    def counted(cmd, *args, **kwargs):
        calls.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(_fused.subprocess, "run", counted)
    lib, why = _fused.build(_fused._SOURCE, ["-DH=4", "-DL=1", "-DNIN=2"])
    assert lib is not None and why == "" and not lib.openmp
    built = len(calls)  # the OpenMP flag sets (each fails), then the first set without OpenMP
    assert built >= 2 and all("-fno-such-flag-l2l" in c for c in calls[:-1]) and "-fno-such-flag-l2l" not in calls[-1]
    assert len(list(tmp_path.glob("*.failed"))) == built - 1
    lib, why = _fused.build(_fused._SOURCE, ["-DH=4", "-DL=1", "-DNIN=2"])
    assert lib is not None and len(calls) == built  # neither the failed builds nor the good one compiled again
