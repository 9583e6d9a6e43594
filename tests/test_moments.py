"""``MomentMLP``: the scale-free moment rule behind the ``general`` weights."""

from __future__ import annotations

import inspect
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lightning_l2l import LearnedOptimizer
from lightning_l2l.meta import MetaLearner
from lightning_l2l.nets import KindLayout, MomentMLP, apply_rule
from lightning_l2l.nets.moments import FEATURE_CLAMP
from lightning_l2l.tasks import QuadraticFamily
from lightning_l2l.trajectory import Trajectory, unroll


def _random(rule: MomentMLP, std: float = 1.0, seed: int = 0) -> MomentMLP:
    """Every weight random (the head too, which starts at zero), so every path of the rule is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rule.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return rule


def _grads(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, n, dtype=torch.float64)


def test_docstring_defaults() -> None:
    """The defaults the docstring states."""
    params = inspect.signature(MomentMLP.__init__).parameters
    defaults = {k: v.default for k, v in params.items() if k != "self"}
    assert defaults == {
        "lr": 1e-3, "hidden": 16, "layers": 2, "momentum_betas": (0.5, 0.9, 0.99), "rms_betas": (0.9, 0.99),
        "log_range": math.log(10.0), "clip": 3.0, "eps": 1e-8, "zero_init": True, "direction_scale": 1.0,
        "decay_steps": 0.0, "decay_power": 0.5, "alignment_betas": (),
    }
    rule = MomentMLP()
    assert rule.num_features == 3 + 1 + 1  # three momenta, the gradient, one ratio of second moments
    assert rule.state_size == 3 + 2 + 1
    assert torch.count_nonzero(rule.head.weight) == 0 and torch.count_nonzero(rule.head.bias) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "Invalid lr"),
        ({"lr": float("nan")}, "Invalid lr"),
        ({"hidden": 0}, "Invalid MLP size"),
        ({"layers": -1}, "Invalid MLP size"),
        ({"momentum_betas": (0.5, 0.99)}, "must contain 0.9"),
        ({"momentum_betas": ()}, "Invalid momentum_betas"),
        ({"rms_betas": (1.0,)}, "Invalid rms_betas"),
        ({"log_range": 0.0}, "Invalid log_range"),
        ({"clip": -1.0}, "Invalid clip"),
        ({"eps": float("inf")}, "Invalid eps"),
        ({"direction_scale": -0.5}, "Invalid direction_scale"),
        ({"decay_steps": -1.0}, "Invalid decay_steps"),
        ({"decay_power": float("nan")}, "Invalid decay_power"),
        ({"alignment_betas": (0.9, 1.0)}, "Invalid alignment_betas"),
    ],
)
def test_invalid_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MomentMLP(**kwargs)


def test_zero_init_is_adam_step_for_step_float64() -> None:
    """With the head at zero (and a clip that is never reached) the rule is torch.optim.Adam."""
    rule = MomentMLP(lr=0.01, rms_betas=(0.9, 0.999), clip=1e6).double()
    target = torch.randn(6, 5, dtype=torch.float64)
    a = nn.Parameter(torch.zeros(6, 5, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(6, 5, dtype=torch.float64))
    ours = LearnedOptimizer([a], rule, zero_grads="update")
    adam = torch.optim.Adam([b], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(25):
        for p, opt in ((a, ours), (b, adam)):
            opt.zero_grad()
            ((p - target) ** 4).sum().backward()
            opt.step()
        assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
    assert (a.detach() - target).abs().mean() < target.abs().mean()


def test_decay_is_adam_under_an_inverse_square_root_schedule_float64() -> None:
    """decay_steps: the zero-head rule is Adam whose learning rate follows (1 + (t - 1) / decay_steps)^-power."""
    tau, power = 4.0, 0.5
    rule = MomentMLP(lr=0.01, rms_betas=(0.9, 0.999), clip=1e6, decay_steps=tau, decay_power=power).double()
    target = torch.randn(6, 5, dtype=torch.float64)
    a = nn.Parameter(torch.zeros(6, 5, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(6, 5, dtype=torch.float64))
    ours = LearnedOptimizer([a], rule, zero_grads="update")
    adam = torch.optim.Adam([b], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(adam, lambda k: (1 + k / tau) ** -power)  # k = t - 1
    for _ in range(25):
        for p, opt in ((a, ours), (b, adam)):
            opt.zero_grad()
            ((p - target) ** 4).sum().backward()
            opt.step()
        sched.step()
        assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
    assert sched.get_last_lr()[0] < 0.01 * 0.45  # the schedule did shrink the step


def test_first_step_and_clip() -> None:
    """Adam's first step is +-lr whatever the gradient's size; the direction is clipped to +-clip (in units of lr)."""
    rule = MomentMLP().double()
    state = rule.init_state(3, dtype=torch.float64)
    u, state = rule(torch.tensor([1e-2, -5.0, 300.0], dtype=torch.float64), state)
    assert_close(u, torch.tensor([-1e-3, 1e-3, -1e-3], dtype=torch.float64), rtol=1e-6, atol=0)
    clipped = MomentMLP(clip=0.25).double()
    u, _ = clipped(torch.tensor([2.0, -1e-3], dtype=torch.float64), clipped.init_state(2, dtype=torch.float64))
    assert_close(u, torch.tensor([-0.25e-3, 0.25e-3], dtype=torch.float64))


@pytest.mark.parametrize("alignment_betas", [(), (0.5, 0.9)])
def test_updates_are_invariant_to_the_gradient_scale(alignment_betas) -> None:
    """Multiplying every gradient by a constant changes nothing (down to eps): the inputs are normalised."""
    rule = _random(MomentMLP(eps=1e-30, alignment_betas=alignment_betas).double())
    s1 = rule.init_state(64, dtype=torch.float64)
    s2 = rule.init_state(64, dtype=torch.float64)
    for step in range(12):
        g = _grads(64, seed=step)
        u1, s1 = rule(g, s1)
        u2, s2 = rule(g * 1e4, s2)
        assert_close(u1, u2, rtol=1e-9, atol=1e-15)  # atol: 1e-12 of lr, where an update cancels to ~0


def test_update_is_bounded_whatever_the_input() -> None:
    """|update| <= lr * exp(log_range) * clip for any weights and gradients, including huge and non-finite ones."""
    rule = _random(MomentMLP(lr=0.01), std=30.0)
    bound = 0.01 * math.exp(rule.log_range) * rule.clip
    state = rule.init_state(8)
    for scale in (1e-20, 1.0, 1e20):
        g = torch.randn(8) * scale
        g[0], g[1] = float("nan"), float("inf")
        u, state = rule(g, state)
        assert torch.isfinite(u).all() and torch.isfinite(state).all()
        assert u.abs().max() <= bound * (1 + 1e-6)
    x, _, _ = rule.features(torch.randn(8) * 1e30, state)
    assert x.abs().max() <= FEATURE_CLAMP


def test_state_is_per_coordinate_and_chunking_changes_nothing() -> None:
    """apply_rule in chunks of 7 equals one call; each coordinate's state depends on its own gradients only."""
    rule = _random(MomentMLP().double(), std=0.5)
    layout = KindLayout({"w": (5, 6), "b": (6,)})
    states_a = layout.init_state(rule, dtype=torch.float64)
    states_b = layout.init_state(rule, dtype=torch.float64)
    for step in range(5):
        grads = {"w": _grads(30, seed=step).view(5, 6), "b": _grads(6, seed=100 + step)}
        one = apply_rule(rule, layout, grads, states_a)
        chunked = apply_rule(rule, layout, grads, states_b, chunk_size=7)
        states_a, states_b = one.states, chunked.states
        for key in grads:
            assert_close(one.updates[key], chunked.updates[key], rtol=1e-12, atol=1e-18)  # matmul blocking differs
    # coordinate 0 alone, fed the same gradients, ends with the same state as in the batch
    single = rule.init_state(1, dtype=torch.float64)
    for step in range(5):
        _, single = rule(_grads(30, seed=step)[:1], single)
    assert_close(single[0], states_a["default"][0], rtol=0, atol=0)  # the state is fixed formulas: exact


def test_skipped_coordinates_keep_their_own_step_count() -> None:
    """A coordinate whose gradient is skipped (zero with zero_grads='skip') keeps t, so its bias correction stays its own."""
    rule = MomentMLP().double()
    layout = KindLayout({"w": (2,)})
    states = layout.init_state(rule, dtype=torch.float64)
    for _ in range(3):
        states = apply_rule(rule, layout, {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}, states,
                            zero_grads="skip").states
    assert states["default"][:, -1].tolist() == [3.0, 0.0]


def test_meta_training_moves_the_head_and_stays_finite(tmp_path) -> None:
    """MetaLearner meta-trains the rule through the one apply path: the zero head gets a gradient and moves."""
    torch.manual_seed(0)
    rule = MomentMLP(lr=0.01, hidden=8)
    learner = MetaLearner(rule, QuadraticFamily(dim=4, num_functions=8), horizon=20, unroll=5, meta_lr=1e-2,
                          truncations_per_epoch=8, num_val_tasks=1, num_test_tasks=1, meta_objective="log_mean")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, max_steps=8, limit_val_batches=0)
    trainer.fit(learner)
    assert trainer.global_step == 8
    assert torch.count_nonzero(rule.head.weight) > 0
    assert all(torch.isfinite(p).all() for p in rule.parameters())
    task = QuadraticFamily(dim=4, num_functions=8).sample(torch.Generator().manual_seed(5))
    traj = Trajectory.start(rule, task)
    result = unroll(rule, traj, 20, differentiable=False)
    assert result.finite and result.curve[-1] < result.curve[0]


def test_direction_scale_zero_keeps_adams_direction() -> None:
    """With direction_scale=0 the rule only scales Adam's direction: any head gives updates of Adam's sign."""
    rule = _random(MomentMLP(direction_scale=0.0).double())
    state = rule.init_state(16, dtype=torch.float64)
    for step in range(6):
        g = _grads(16, seed=step)
        _, adam, _ = rule.features(g, state)  # Adam's direction at this step
        u, state = rule(g, state)
        nonzero = adam != 0
        assert torch.equal(torch.sign(u[nonzero]), -torch.sign(adam[nonzero]))


def test_step_time_benchmark_times_it() -> None:
    """benchmarks/step_time.py --rules moments, shrunk: a row, and the floor model's state size and FLOPs."""
    from tests.benchmark_scripts import load_benchmark

    bench = load_benchmark("step_time")
    row = bench.worker(dict(size=500, device="cpu", threads=1, steps=2, warmup=1, weights=None, chunk_size=64,
                            optimizer="moments"))
    assert row["step_s"] > 0
    state, flops = bench.rule_costs(None, "moments")
    assert state == 6  # three momenta, two second moments, the step count
    assert flops == 2 * (5 * 16 + 16 * 16) + 2 * 16 * 2  # two hidden layers and the two-output head
    assert flops < bench.rule_costs(None, "learned")[1] / 10  # an order of magnitude below the paper's LSTM


def _alignment_rule(**kwargs) -> MomentMLP:
    return MomentMLP(alignment_betas=(0.5, 0.9), **kwargs).double()


def test_alignment_features_say_whether_the_last_step_fell_short_or_overshot() -> None:
    """A gradient that keeps its sign (the step fell short) gives alignments > 0; one that flips sign
    every step (the step overshot) gives alignments < 0; both in state columns after the moments."""
    rule = _alignment_rule()
    assert rule.num_features == 5 + 2 and rule.state_size == 3 + 2 + 2 + 1
    steady, flipping = rule.init_state(1, dtype=torch.float64), rule.init_state(1, dtype=torch.float64)
    for step in range(30):
        x_s, _, steady = rule.features(torch.tensor([2.0], dtype=torch.float64), steady)
        x_f, _, flipping = rule.features(torch.tensor([(-1.0) ** step * 3.0], dtype=torch.float64), flipping)
        if step == 0:  # no step before the first: nothing to align with
            assert x_s[0, 5:].tolist() == [0.0, 0.0]
    assert (x_s[0, 5:] > 0.5).all() and (x_f[0, 5:] < -0.05).all(), (x_s, x_f)
    # the first five features are exactly those of the rule without alignments
    plain, state = MomentMLP().double(), MomentMLP().double().init_state(1, dtype=torch.float64)
    for step in range(30):
        x_p, _, state = plain.features(torch.tensor([(-1.0) ** step * 3.0], dtype=torch.float64), state)
    assert_close(x_p, x_f[:, :5], rtol=0, atol=0)
    assert_close(state[:, :5], flipping[:, :5], rtol=0, atol=0)


def test_widen_from_starts_as_the_source_rule_exactly() -> None:
    """widen_from adds zero input weights for the alignments: the widened rule's updates equal the source's."""
    source = _random(MomentMLP(lr=3e-3, decay_steps=100).double(), std=0.5)
    wide = MomentMLP(lr=3e-3, decay_steps=100, alignment_betas=(0.5, 0.9)).double()
    wide.widen_from(source)
    s1, s2 = source.init_state(64, dtype=torch.float64), wide.init_state(64, dtype=torch.float64)
    for step in range(10):
        g = _grads(64, seed=step)
        u1, s1 = source(g, s1)
        u2, s2 = wide(g, s2)
        assert_close(u1, u2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="differ only in alignment_betas"):
        MomentMLP(lr=1e-3, alignment_betas=(0.9,)).widen_from(source)  # lr differs too


def test_alignment_rule_round_trips_and_its_frozen_step_matches_forward(tmp_path) -> None:
    """The config names alignment_betas only where set (a rule without them saves as before); save/load keeps
    the updates; the frozen step (step_: the fused kernel where it builds) equals forward."""
    from lightning_l2l.nets.serialization import load_rule, save_rule

    assert "alignment_betas" not in MomentMLP().config()["init_args"]
    rule = _random(MomentMLP(alignment_betas=(0.9,)), std=0.3)
    assert rule.config()["init_args"]["alignment_betas"] == [0.9]
    save_rule(rule, tmp_path / "r")
    loaded, _ = load_rule(tmp_path / "r")
    g = torch.randn(50)
    state = rule.init_state(50)
    with torch.no_grad():
        u, new = loaded(g, state.clone())
        u_ref, new_ref = rule(g, state.clone())
        stepped = state.clone()
        u_step = rule.step_(g, stepped)
    assert_close(u, u_ref, rtol=0, atol=0)
    assert_close(u_step, u_ref, rtol=1e-6, atol=1e-9)
    assert_close(stepped, new_ref, rtol=1e-6, atol=1e-9)


def test_meta_learner_widens_init_weights_without_alignments(tmp_path) -> None:
    """init_weights from a rule without alignments (saved weights) widens into a rule with them; the rule's own
    config (the shipped `general` has alignments) loads as it is."""
    from lightning_l2l.nets.serialization import save_rule
    from lightning_l2l.pretrained import resolve

    source = _random(MomentMLP(lr=3e-3, decay_steps=100.0), std=0.3)
    path = save_rule(source, tmp_path / "narrow")
    rule = MomentMLP(lr=3e-3, decay_steps=100.0, alignment_betas=(0.5, 0.9))
    learner = MetaLearner(rule, QuadraticFamily(dim=4, num_functions=8), horizon=4, unroll=2, init_weights=str(path))
    learner.load_init_weights()
    assert_close(rule.head.weight, source.head.weight, rtol=0, atol=0)
    assert_close(rule.mlp[0].weight[:, :5], source.mlp[0].weight, rtol=0, atol=0)
    assert torch.count_nonzero(rule.mlp[0].weight[:, 5:]) == 0
    general = resolve("general")[0]
    same = MomentMLP(**general.config()["init_args"])
    MetaLearner(same, QuadraticFamily(dim=4, num_functions=8), horizon=4, unroll=2, init_weights="general").load_init_weights()
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), general.state_dict().values(), strict=True))
