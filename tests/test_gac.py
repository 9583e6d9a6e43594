"""LSTM+GAC and NTM-BFGS (arXiv 1606.04474, section "Information sharing between coordinates")."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from lightning_l2l.meta import MetaLearner
from lightning_l2l.nets import (
    LSTMGAC,
    NTMBFGS,
    CoordinatewiseLSTM,
    KindLayout,
    PerKindRule,
    ScaledRule,
    UpdateRule,
    apply_rule,
    build_rule,
    load_rule,
    save_rule,
)
from lightning_l2l.optim import LearnedOptimizer
from lightning_l2l.tasks import QuadraticFamily
from lightning_l2l.trajectory import Trajectory, unroll

SHAPES = {"a": (3, 4), "gap": (2,), "b": (5,), "c": (7,), "d": (2, 3)}
KINDS = {"c": "fc", "d": "fc"}


def _random(rule: UpdateRule) -> UpdateRule:
    """Larger random output weights than the quiet init, so that every path shows in the updates."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in rule.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return rule


def _gac(**kwargs) -> LSTMGAC:
    args = dict(hidden_size=6, global_cells=[2, 3])
    args.update(kwargs)
    return _random(LSTMGAC(**args)).double()


def _ntm(**kwargs) -> NTMBFGS:
    args = dict(hidden_size=6, global_cells=2, memory_size=4, write_rank=2)
    args.update(kwargs)
    return _random(NTMBFGS(**args)).double()


RULES = {
    "gac": _gac,
    "gac_tensor": lambda: _gac(over="tensor"),
    "ntm": _ntm,
    "ntm_tensor": lambda: _ntm(over="tensor"),
    "ntm_no_gac": lambda: _ntm(global_cells=0),
    "gac_row": lambda: _gac(over="row"),
    "ntm_row": lambda: _ntm(over="row"),
}


def _grads(seed: int = 0, skip: tuple[str, ...] = ("gap",)) -> dict[str, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    return {k: None if k in skip else torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}


def _run(rule: UpdateRule, chunk_size: int | None, steps: int = 3, **kwargs) -> tuple[list[dict], dict[str, Tensor]]:
    layout = KindLayout(SHAPES, KINDS)
    states = layout.init_state(rule, dtype=torch.float64)
    updates = []
    for t in range(steps):
        out = apply_rule(rule, layout, _grads(t), states, chunk_size=chunk_size, **kwargs)
        updates.append(out.updates)
        states = out.states
    return updates, states


# ------------------------------------------------------------------------------------ the networks


def test_docstring_defaults() -> None:
    """The defaults the docstrings state."""
    gac = inspect.signature(LSTMGAC).parameters
    assert {k: gac[k].default for k in gac} == {
        "hidden_size": 20, "num_layers": 2, "global_cells": 4, "over": "kind", "preprocessing": "log_sign",
        "p": 10.0, "output_scale": 0.1,
    }
    ntm = inspect.signature(NTMBFGS).parameters
    assert {k: ntm[k].default for k in ntm} == {
        "hidden_size": 20, "num_layers": 2, "global_cells": 4, "memory_size": 8, "write_rank": 2, "over": "kind",
        "preprocessing": "log_sign", "p": 10.0, "output_scale": 0.1,
    }
    assert LSTMGAC().global_cells == [4, 4] and LSTMGAC().shared_stages() == 2
    assert NTMBFGS().shared_stages() == 3 and NTMBFGS(global_cells=0).shared_stages() == 1
    assert CoordinatewiseLSTM().shared_stages() == 0 and CoordinatewiseLSTM().shared_over() == "kind"


@pytest.mark.parametrize("name", ["gac", "ntm"])
def test_shapes_and_input_errors(name: str) -> None:
    rule = RULES[name]()
    state = rule.init_state(5)
    expected = (5, 2, 2, 6) if name == "gac" else (5, 2 * 2 * 6 + 2 * 4 + 1)
    assert state.shape == expected and state.dtype == torch.float64
    update, new_state = rule(torch.randn(5, dtype=torch.float64), state)
    assert update.shape == (5,) and new_state.shape == expected
    assert torch.isfinite(update).all() and torch.isfinite(new_state).all()
    with pytest.raises(ValueError, match="flat"):
        rule(torch.zeros(5, 1, dtype=torch.float64), state)
    with pytest.raises(ValueError, match="state holds 5 coordinates"):
        rule(torch.zeros(4, dtype=torch.float64), state)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (LSTMGAC, {"global_cells": 0}, "use CoordinatewiseLSTM"),
        (LSTMGAC, {"global_cells": 21}, "between 0 and hidden_size=20"),
        (LSTMGAC, {"global_cells": -1}, "between 0 and hidden_size"),
        (LSTMGAC, {"global_cells": [1, 2, 3]}, "one int per layer: 2"),
        (LSTMGAC, {"global_cells": [1.5, 2]}, "Invalid global_cells"),
        (LSTMGAC, {"over": "layer"}, r"Invalid over: 'layer' \(expected one of \('kind', 'tensor', 'row'\)"),
        (LSTMGAC, {"hidden_size": 0}, "Invalid hidden_size"),
        (LSTMGAC, {"num_layers": 0}, "Invalid num_layers"),
        (LSTMGAC, {"preprocessing": "x"}, "Invalid preprocessing"),
        (LSTMGAC, {"p": float("nan")}, "Invalid p"),
        (NTMBFGS, {"write_rank": 0}, "Invalid write_rank"),
        (NTMBFGS, {"memory_size": 1}, r"Invalid memory_size: 1 \(expected an int >= write_rank=2"),
        (NTMBFGS, {"memory_size": 7, "write_rank": 2}, "multiple of write_rank=2"),
        (NTMBFGS, {"over": "all"}, "Invalid over"),
        (NTMBFGS, {"global_cells": [4]}, "one int per layer"),
    ],
)
def test_invalid_configs(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_gac_cells_are_averaged_and_the_others_are_not() -> None:
    """After a step the global cells' activations are one value over the coordinates; the rest differ."""
    rule = _gac()
    _, state = rule(torch.linspace(-2, 2, 9, dtype=torch.float64), rule.init_state(9))
    h = state[:, :, 0]  # (n, layers, hidden)
    for layer, k in enumerate(rule.global_cells):
        assert_close(h[:, layer, :k], h[:1, layer, :k].expand(9, k), rtol=0, atol=0)
        assert (h[:, layer, k:].std(0) > 1e-6).all()
    assert (state[:, :, 1].std(0) > 1e-6).all()  # cell states stay per coordinate


def test_ntm_read_is_the_memory_matrix_times_the_key() -> None:
    """The read equals ``M q`` with ``M = U V^T / n`` formed densely (n x n) from the written rows."""
    rule = _ntm()
    n, k, size = 6, rule.memory_size, 2 * 2 * 6
    state = rule.init_state(n)
    for _ in range(3):  # fill the memory past its length: old writes must drop out
        _, state = rule(torch.randn(n, dtype=torch.float64), state)
    grad = torch.randn(n, dtype=torch.float64)
    captured = {}
    steps = rule.steps(grad, state)
    values = next(steps)
    for _ in range(rule.shared_stages() - 1):
        values = steps.send(values.mean(0, keepdim=True))
    captured["vq"] = values  # (n, k) = V * q of this step
    try:
        steps.send(values.mean(0, keepdim=True))
    except StopIteration as done:
        _, new_state = done.value
    u, v, read = new_state[:, size : size + k], new_state[:, size + k : size + 2 * k], new_state[:, -1]
    assert_close(u[:, : k - 2], state[:, size + 2 : size + k])  # the oldest rank-2 write dropped out
    q = captured["vq"][:, -1] / v[:, -1]  # the key, recovered from its product with the newest column
    assert_close(read, (u @ v.T / n) @ q)


@pytest.mark.parametrize("name", ["gac", "ntm"])
def test_state_does_not_leak_between_groups(name: str) -> None:
    """Over "tensor", a tensor's updates do not depend on another tensor's gradients; over "kind" they do."""
    for over, same in (("tensor", True), ("kind", False)):
        rule = RULES[name]() if over == "kind" else RULES[f"{name}_tensor"]()
        layout = KindLayout({"x": (4,), "y": (3,)})
        states = layout.init_state(rule, dtype=torch.float64)
        x = torch.randn(4, dtype=torch.float64)
        one = apply_rule(rule, layout, {"x": x, "y": torch.randn(3, dtype=torch.float64)}, states).updates["x"]
        two = apply_rule(rule, layout, {"x": x, "y": 10 * torch.randn(3, dtype=torch.float64)}, states).updates["x"]
        assert torch.equal(one, two) is same, over


@pytest.mark.parametrize("name", ["gac", "ntm"])
def test_direct_call_averages_over_what_it_is_given(name: str) -> None:
    """``rule(grad, state)`` is apply_rule on one tensor holding those coordinates."""
    rule = RULES[name]()
    grad = torch.randn(7, dtype=torch.float64)
    layout = KindLayout({"w": (7,)})
    states = layout.init_state(rule, dtype=torch.float64)
    out = apply_rule(rule, layout, {"w": grad}, states, chunk_size=2)
    u, h = rule(grad, rule.init_state(7))
    assert_close(out.updates["w"], u, rtol=1e-13, atol=1e-15)
    assert_close(out.states["default"], h, rtol=1e-13, atol=1e-15)


# -------------------------------------------------------------------------- chunking: float64 parity


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 1000])
def test_chunked_equals_unchunked_float64(name: str, chunk_size: int) -> None:
    """apply_rule chunked and unchunked give the same updates and states to float64 precision, over
    several steps, kinds, multi-tensor runs and a tensor without a gradient in between."""
    rule = RULES[name]()
    ref_updates, ref_states = _run(rule, None)
    updates, states = _run(rule, chunk_size)
    for got, ref in zip(updates, ref_updates, strict=True):
        assert got.keys() == ref.keys() == {"a", "b", "c", "d"}
        for key in ref:
            assert_close(got[key], ref[key], rtol=1e-12, atol=1e-14)
    for kind in ref_states:
        assert_close(states[kind], ref_states[kind], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["gac", "ntm"])
def test_naive_chunking_would_change_the_means(name: str) -> None:
    """The control of the parity test: calling the rule on each chunk alone (means per chunk) differs."""
    rule = RULES[name]()
    grad = torch.randn(12, dtype=torch.float64)
    state = rule.init_state(12)
    u_all, _ = rule(grad, state)
    u_naive = torch.cat([rule(grad[s : s + 4], state[s : s + 4])[0] for s in range(0, 12, 4)])
    assert (u_all - u_naive).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["gac", "ntm", "gac_tensor"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_skipped_coordinates_do_not_count_in_the_means(name: str, chunk_size: int | None) -> None:
    """A NaN and (with zero_grads='skip') an exact zero get no update, keep their state, and are left
    out of every mean: the other coordinates move as if they were not there."""
    rule = RULES[name]()
    grad = torch.randn(8, dtype=torch.float64)
    grad[2], grad[5] = float("nan"), 0.0
    keep = torch.ones(8, dtype=torch.bool)
    keep[[2, 5]] = False
    layout = KindLayout({"w": (8,)})
    states = layout.init_state(rule, dtype=torch.float64)
    out = apply_rule(rule, layout, {"w": grad}, states, chunk_size=chunk_size, zero_grads="skip")
    u, h = rule(grad[keep], rule.init_state(6))
    assert_close(out.updates["w"][keep], u, rtol=1e-12, atol=1e-14)
    assert_close(out.states["default"][keep], h, rtol=1e-12, atol=1e-14)
    assert (out.updates["w"][~keep] == 0).all() and (out.states["default"][~keep] == 0).all()
    assert int(out.nonfinite) == 1


@pytest.mark.parametrize("name", ["gac", "ntm"])
def test_inplace_equals_functional(name: str) -> None:
    """inplace=True (LearnedOptimizer) and the differentiable path (unroll) give the same numbers, chunked."""
    rule = RULES[name]()
    layout = KindLayout(SHAPES, KINDS)
    states = layout.init_state(rule, dtype=torch.float64)
    ref = apply_rule(rule, layout, _grads(), states, chunk_size=None)
    with torch.no_grad():
        out = apply_rule(rule, layout, _grads(), states, chunk_size=3, inplace=True)
    for key in ref.updates:
        assert_close(out.updates[key], ref.updates[key], rtol=1e-12, atol=1e-14)
    for kind in ref.states:
        assert out.states[kind] is states[kind]
        assert_close(states[kind], ref.states[kind], rtol=1e-12, atol=1e-14)


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()


@pytest.mark.parametrize("name", ["gac", "ntm", "ntm_tensor"])
@pytest.mark.parametrize("wrap", [False, True])
def test_learned_optimizer_chunked_equals_unchunked(name: str, wrap: bool) -> None:
    """LearnedOptimizer(chunk_size=3) trains a model exactly as one call per kind does (float64), also
    through ScaledRule and PerKindRule; compile=True leaves such a rule eager."""
    rule = RULES[name]()
    if wrap:
        networks = {"fc": ScaledRule(rule, 0.5), "default": CoordinatewiseLSTM(hidden_size=3).double()}
        rule = PerKindRule(networks, default="default")
    torch.manual_seed(0)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    finals = []
    for chunk_size, compile in ((1 << 20, False), (3, False), (3, True)):
        model = _model()
        opt = LearnedOptimizer(model.parameters(), rule, chunk_size=chunk_size, kind="fc", compile=compile)
        for _ in range(5):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert (finals[0] - torch.cat([p.detach().reshape(-1) for p in _model().parameters()])).abs().max() > 1e-6
    assert_close(finals[1], finals[0], rtol=1e-12, atol=1e-14)
    assert_close(finals[2], finals[0], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------- save, load, meta-train


@pytest.mark.parametrize("name", ["gac", "ntm", "gac_tensor"])
def test_save_load_round_trip(tmp_path: Path, name: str) -> None:
    rule = RULES[name]()
    per_kind = PerKindRule({"fc": rule, "conv": CoordinatewiseLSTM(3).double()}, "fc")
    for wrapped in (rule, ScaledRule(rule, 2.0), per_kind):
        path = save_rule(wrapped, tmp_path / "r")
        loaded, _ = load_rule(path)
        assert type(loaded) is type(wrapped) and loaded.config() == wrapped.config()
        assert build_rule(wrapped.config()).config() == wrapped.config()
        ref, got = _run(wrapped, None), _run(loaded, 2)
        for a, b in zip(got[0], ref[0], strict=True):
            for key in a:
                assert_close(a[key], b[key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["gac", "ntm"])
def test_meta_gradients_reach_every_weight(name: str) -> None:
    """A differentiable unroll on a quadratic gives every weight of the rule a non-zero meta-gradient."""
    rule = (LSTMGAC if name == "gac" else NTMBFGS)(hidden_size=8)
    task = QuadraticFamily(dim=6, num_functions=4).sample(torch.Generator().manual_seed(0))
    traj = Trajectory.start(rule, task)
    result = unroll(rule, traj, 5, differentiable=True)
    result.meta_loss.backward()
    for pname, p in rule.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("cls", [LSTMGAC, NTMBFGS])
def test_meta_learner_trains_it(tmp_path: Path, cls: type) -> None:
    """MetaLearner meta-trains the rule for a few steps under a Trainer; the weights move and stay finite."""
    torch.manual_seed(0)
    model = MetaLearner(
        rule=cls(hidden_size=8), task_family=QuadraticFamily(dim=4, num_functions=16), horizon=10, unroll=5,
        meta_lr=1e-2, truncations_per_epoch=4, num_val_tasks=1, num_test_tasks=1, lr_grid=[1e-2, 1e-1],
    )
    before = [p.detach().clone() for p in model.rule.parameters()]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, max_steps=4,
        limit_val_batches=0,
    )
    trainer.fit(model)
    assert trainer.global_step == 4
    after = list(model.rule.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_step_time_benchmark_times_both() -> None:
    """benchmarks/step_time.py --rules gac ntm, shrunk: a row each, and the floor model's state sizes."""
    from tests.benchmark_scripts import load_benchmark

    bench = load_benchmark("step_time")
    cfg = dict(size=500, device="cpu", threads=1, steps=2, warmup=1, weights=None, chunk_size=64)
    for name in ("gac", "ntm"):
        row = bench.worker({**cfg, "optimizer": name})
        assert row["step_s"] > 0 and row["params"] == sum(p.numel() for p in bench.mlp(500).parameters())
    assert bench.rule_costs(None, "gac")[0] == bench.rule_costs(None, "learned")[0] == 2 * 2 * 20
    assert bench.rule_costs(None, "ntm")[0] == 2 * 2 * 20 + 2 * 8 + 1
    assert bench.rule_costs(None, "ntm")[1] > bench.rule_costs(None, "gac")[1] == bench.rule_costs(None, "learned")[1]


def test_gac_quadratic_report(tmp_path: Path) -> None:
    """benchmarks/gac_quadratic.py: one row per rule from the latest report of each seed, and a plot."""
    from tests.benchmark_scripts import load_benchmark

    bench = load_benchmark("gac_quadratic")
    for seed, name, ratio in ((0, "quadratic_gac", 0.5), (1, "quadratic_gac", 0.7), (0, "quadratic", 0.9)):
        for version, value in ((0, 99.0), (1, ratio)):  # an older report must not be read
            d = tmp_path / f"seed{seed}" / "runs" / name / "csv" / f"version_{version}"
            d.mkdir(parents=True)
            doc = {"ratio_to_best_baseline": value, "best_baseline": "adam", "lrs": {"adam": 0.316}}
            (d / "comparison.json").write_text(json.dumps(doc))
            (d / "comparison.csv").write_text("step,learned,sgd,adam\n0,1,1,1\n1,0.5,0.9,0.8\n")
    bench.main(["--runs", str(tmp_path), f"{tmp_path}:over=row", "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "gac_quadratic.md").read_text()
    assert "| LSTM+GAC | 2 | 0: 0.500, 1: 0.700 | 0.600 | 0.700 | adam (0.316) |" in text
    assert "| LSTM+GAC, over=row | 2 |" in text
    assert "| LSTM (coordinatewise) | 1 | 0: 0.900 |" in text and "NTM-BFGS" not in text
    assert (tmp_path / "out" / "gac_quadratic.png").stat().st_size > 0


def test_base_class_sharing_defaults() -> None:
    """A coordinatewise rule: no means, "kind", and steps() a generator that yields nothing and returns forward."""
    from lightning_l2l.nets.base import run_steps

    rule = CoordinatewiseLSTM(hidden_size=3).double()
    g, h = torch.randn(4, dtype=torch.float64), rule.init_state(4)
    assert rule.shared_stages("conv") == 0 and rule.shared_over("conv") == "kind"
    u, h2 = run_steps(rule.steps(g, h), lambda v: pytest.fail("a coordinatewise rule asked for a mean"))
    ref_u, ref_h = rule(g, h)
    assert torch.equal(u, ref_u) and torch.equal(h2, ref_h)


class _Miscounting(LSTMGAC):
    """Says it needs one more mean than its steps() asks for."""

    def shared_stages(self, kind: str = "default") -> int:
        return super().shared_stages(kind) + 1


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_a_rule_whose_stages_do_not_match_its_steps_is_refused(chunk_size: int | None) -> None:
    rule = _Miscounting(hidden_size=4, global_cells=1).double()
    layout = KindLayout({"w": (5,)})
    with pytest.raises(ValueError, match="steps returned after 2 means; shared_stages says 3"):
        apply_rule(rule, layout, {"w": torch.randn(5, dtype=torch.float64)}, layout.init_state(rule), chunk_size=chunk_size)


@pytest.mark.parametrize("name", ["gac_row", "ntm_row"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_over_row_is_each_function_of_a_quadratic_batch_alone(name: str, chunk_size: int | None) -> None:
    """over="row": each row of a (functions, dim) tensor is its own group, as if optimised alone (the
    paper's optimizee is one 10-d function); a vector is one group."""
    rule = RULES[name]()
    layout = KindLayout({"theta": (4, 5), "bias": (3,)})
    states = layout.init_state(rule, dtype=torch.float64)
    grads = {"theta": torch.randn(4, 5, dtype=torch.float64), "bias": torch.randn(3, dtype=torch.float64)}
    for _ in range(2):
        out = apply_rule(rule, layout, grads, states, chunk_size=chunk_size)
        for i in range(4):
            u, _ = rule(grads["theta"][i], layout.state_of(states, "theta")[5 * i : 5 * i + 5])
            assert_close(out.updates["theta"][i], u, rtol=1e-12, atol=1e-14)
        u, _ = rule(grads["bias"], layout.state_of(states, "bias"))
        assert_close(out.updates["bias"], u, rtol=1e-12, atol=1e-14)
        states = out.states
        grads = {k: torch.randn_like(v) for k, v in grads.items()}
