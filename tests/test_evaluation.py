"""Tuned baselines and learned-vs-baseline comparisons (tables, CSV, plots)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lightning_l2l.evaluation import (
    BASELINES,
    LEARNED,
    Comparison,
    TunedBaseline,
    baseline_curve,
    compare,
    mean_curve,
    tune_baseline,
)
from lightning_l2l.nets import CoordinatewiseLinear, CoordinatewiseLSTM
from lightning_l2l.tasks import QuadraticFamily, QuadraticTask
from lightning_l2l.trajectory import Trajectory, rule_curve, unroll

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tasks(quadratic_family: QuadraticFamily) -> list[QuadraticTask]:
    """Four tiny quadratic tasks from one generator."""
    gen = torch.Generator().manual_seed(1)
    return [quadratic_family.sample(gen) for _ in range(4)]


@pytest.fixture
def comparison() -> Comparison:
    """Hand-made curves over 4 steps: adam is the best baseline, learned beats it by half."""
    return Comparison(
        curves={
            LEARNED: torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64),
            "sgd": torch.tensor([4.0, 3.5, 3.0, 2.5, 2.0], dtype=torch.float64),
            "adam": torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64),
        },
        lrs={LEARNED: None, "sgd": 0.1, "adam": 0.01},
        grid_edge=["sgd"],
        num_problems=8,
    )


# ------------------------------------------------------------------------------------------ baselines


def test_sgd_small_lr_decreases_loss(quadratic_task: QuadraticTask) -> None:
    """SGD at a tiny learning rate lowers the quadratic loss monotonically; curve[0] is f(theta_0)."""
    curve = baseline_curve("sgd", 1e-2, quadratic_task, 10)
    assert curve.shape == (11,)
    assert_close(curve[0], quadratic_task.loss(quadratic_task.init_params()) / quadratic_task.num_problems)
    assert (curve[1:] <= curve[:-1]).all()
    assert curve[-1] < 0.9 * curve[0]


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_optimises(name: str, quadratic_task: QuadraticTask) -> None:
    """Each baseline runs, leaves theta_0 alone, and improves the loss at a sensible rate."""
    theta0 = quadratic_task.theta0.clone()
    curve = baseline_curve(name, 1e-2, quadratic_task, 10)
    assert torch.isfinite(curve).all()
    assert curve[-1] < curve[0]
    assert torch.equal(quadratic_task.theta0, theta0)


def test_sgd_baseline_matches_learned_sgd(quadratic_task64: QuadraticTask) -> None:
    """The "sgd" baseline curve equals the unroll of a -lr*g rule (same loss per problem, step for step)."""
    rule = CoordinatewiseLinear(0.05).double()
    with torch.no_grad():
        rule.scale.fill_(-0.05)
    learned = unroll(rule, Trajectory.start(rule, quadratic_task64), 10, differentiable=False).curve
    assert_close(baseline_curve("sgd", 0.05, quadratic_task64, 10), learned, rtol=1e-12, atol=1e-12)


def test_lbfgs_baseline_is_torch_lbfgs_one_evaluation_per_step(quadratic_task64: QuadraticTask) -> None:
    """The "lbfgs" baseline is torch.optim.LBFGS(max_iter=1) driven the usual way, with a closure: one
    gradient per step (curvature pairs kept across steps), the same losses step for step."""
    params = {n: p.clone().requires_grad_() for n, p in quadratic_task64.init_params().items()}
    opt = torch.optim.LBFGS(list(params.values()), lr=0.5, max_iter=1, history_size=10)
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = quadratic_task64.loss(params)
        loss.backward()
        return loss

    expected = []
    for _ in range(8):
        expected.append(float(opt.step(closure)) / quadratic_task64.num_problems)
    assert calls == 8
    curve = baseline_curve("lbfgs", 0.5, quadratic_task64, 8)
    assert_close(curve[:8], torch.tensor(expected, dtype=curve.dtype), rtol=1e-10, atol=1e-12)
    assert curve[-1] < 0.5 * curve[0]


def test_diverging_lr_gives_inf(quadratic_task: QuadraticTask) -> None:
    """A learning rate that diverges ends in inf (and stays non-finite) instead of raising."""
    curve = baseline_curve("sgd", 1e3, quadratic_task, 40)
    assert curve.shape == (41,)
    assert curve[-1].item() == math.inf
    bad = (~torch.isfinite(curve)).nonzero()
    first_bad = int(bad[0])
    assert (~torch.isfinite(curve[first_bad:])).all()
    assert torch.isfinite(curve[:first_bad]).all()


def test_unknown_baseline_lists_available(quadratic_task: QuadraticTask) -> None:
    """An unknown name raises ValueError naming it and every available baseline."""
    with pytest.raises(ValueError) as err:
        baseline_curve("adagrad", 0.1, quadratic_task, 2)
    msg = str(err.value)
    assert "'adagrad'" in msg
    for name in ("sgd", "nag", "rmsprop", "adam"):
        assert name in msg


def test_tune_baseline_picks_best(tasks: list[QuadraticTask]) -> None:
    """The tuned lr is the grid point with the smallest mean final loss; diverging rates score inf."""
    grid = (1e-4, 1e-2, 1e3)
    tuned = tune_baseline("sgd", tasks[:2], 5, grid)
    assert tuned.name == "sgd"
    assert list(tuned.scores) == list(grid)
    assert tuned.lr == min(tuned.scores, key=tuned.scores.__getitem__)
    assert tuned.lr == 1e-2
    assert tuned.scores[1e3] == math.inf
    expected = sum(float(baseline_curve("sgd", 1e-2, t, 5)[-1]) for t in tasks[:2]) / 2
    assert tuned.scores[1e-2] == pytest.approx(expected)
    assert not tuned.at_grid_edge


def test_tune_baseline_at_grid_edge(tasks: list[QuadraticTask]) -> None:
    """A grid of too-small rates puts the best at its largest point: at_grid_edge says widen it."""
    tuned = tune_baseline("sgd", tasks[:1], 5, (1e-6, 1e-5, 1e-4))
    assert tuned.lr == 1e-4 and tuned.at_grid_edge


@pytest.mark.parametrize("lr, edge", [(0.01, True), (0.1, False), (1.0, True)])
def test_at_grid_edge(lr: float, edge: bool) -> None:
    """at_grid_edge is true exactly for the smallest and largest grid rates (grid order irrelevant)."""
    assert TunedBaseline("sgd", lr, {1.0: 3.0, 0.01: 2.0, 0.1: 1.0}).at_grid_edge is edge


def test_tune_baseline_needs_tasks() -> None:
    """No validation tasks: ValueError."""
    with pytest.raises(ValueError, match="at least one"):
        tune_baseline("sgd", [], 3, (0.1,))


# ----------------------------------------------------------------------------------------- Comparison


def test_mean_curve_weights_by_problems(generator: torch.Generator) -> None:
    """Tasks are weighted by their number of problems."""
    small = QuadraticFamily(dim=2, num_functions=1).sample(generator)
    big = QuadraticFamily(dim=2, num_functions=3).sample(generator)
    curves = [torch.tensor([4.0, 0.0]), torch.tensor([0.0, 4.0])]
    assert_close(mean_curve(curves, [small, big]), torch.tensor([1.0, 3.0], dtype=torch.float64))


def test_comparison_summary(comparison: Comparison) -> None:
    """final, best_baseline and ratio follow the curves; the learned rule is never a baseline."""
    assert comparison.num_steps == 4
    assert comparison.final("sgd") == 2.0
    assert comparison.best_baseline() == "adam"
    assert comparison.ratio() == pytest.approx(0.5)
    assert comparison.ratio("sgd") == pytest.approx(4.0)
    assert comparison.default_steps() == [0, 4]


def test_comparison_table(comparison: Comparison) -> None:
    """The markdown table has every optimizer, its lr, the chosen steps and the ratio column."""
    table = comparison.table(steps=[0, 2, 4])
    lines = table.splitlines()
    assert lines[0] == "| optimizer | lr | step 0 | step 2 | step 4 | final / best baseline |"
    assert len(lines) == 2 + 3
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert set(rows) == {LEARNED, "sgd", "adam"}
    assert rows[LEARNED].endswith("| 0.500 |") and "| - |" in rows[LEARNED]
    assert rows["sgd"].endswith("| 4.000 |") and "| 0.1 |" in rows["sgd"]
    assert rows["adam"].endswith("| 1.000 |")
    assert [line.split(" | ")[0].strip("| ") for line in lines[2:]] == [LEARNED, "adam", "sgd"]  # best first
    assert "final / best baseline" in comparison.table()


def test_comparison_csv(comparison: Comparison, tmp_path: Path) -> None:
    """to_csv writes a header and one row per step (steps + 1), one column per optimizer."""
    path = comparison.to_csv(tmp_path / "c.csv")
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["step", LEARNED, "sgd", "adam"]
    assert len(rows) == 1 + comparison.num_steps + 1
    assert [int(r[0]) for r in rows[1:]] == list(range(5))
    assert [float(r[1]) for r in rows[1:]] == [4.0, 2.0, 1.0, 0.5, 0.25]


def test_comparison_plot_and_save(comparison: Comparison, tmp_path: Path) -> None:
    """plot writes a non-empty PNG; save writes the table, CSV and plot side by side."""
    png = comparison.plot(tmp_path / "c.png", title="tiny")
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    files = comparison.save(tmp_path / "out", stem="cmp")
    assert {k: p.name for k, p in files.items()} == {"table": "cmp.md", "csv": "cmp.csv", "plot": "cmp.png"}
    assert files["plot"].read_bytes()[:8] == PNG_MAGIC
    assert files["table"].read_text().startswith("| optimizer |")


def test_comparison_plot_survives_zero_and_inf(tmp_path: Path) -> None:
    """Log-scale plotting of a curve that reaches 0 or inf still writes a PNG."""
    comp = Comparison({LEARNED: torch.tensor([1.0, 0.0]), "sgd": torch.tensor([1.0, math.inf])})
    assert comp.plot(tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_end_to_end(tasks: list[QuadraticTask], lstm_rule: CoordinatewiseLSTM) -> None:
    """compare() tunes each baseline on validation tasks and runs everything on the test tasks."""
    val, test = tasks[:2], tasks[2:]
    grid = (1e-3, 1e-2, 1e-1)
    comp = compare(lstm_rule, val, test, 5, baselines=("sgd", "adam"), lr_grid=grid)
    assert list(comp.curves) == [LEARNED, "sgd", "adam"]
    assert all(c.shape == (6,) for c in comp.curves.values())
    assert comp.num_problems == 8
    assert comp.lrs[LEARNED] is None
    for name in ("sgd", "adam"):
        assert comp.lrs[name] == tune_baseline(name, val, 5, grid).lr
        assert (name in comp.grid_edge) == tune_baseline(name, val, 5, grid).at_grid_edge
        ref = mean_curve([baseline_curve(name, comp.lrs[name], t, 5) for t in test], test)
        assert_close(comp.curves[name], ref)
    learned = mean_curve([rule_curve(lstm_rule, t, 5) for t in test], test)
    assert_close(comp.curves[LEARNED], learned)
    best = min(comp.final("sgd"), comp.final("adam"))
    assert comp.ratio() == pytest.approx(comp.final(LEARNED) / best)
    assert "sgd" in comp.table() and "adam" in comp.table()


def test_compare_with_given_curves_or_no_rule(tasks: list[QuadraticTask]) -> None:
    """Precomputed learned curves are used as given; without a rule only baselines are compared."""
    val, test = tasks[:1], tasks[1:3]
    given = [torch.full((4,), 1.0), torch.full((4,), 3.0)]
    comp = compare(None, val, test, 3, baselines=("sgd",), lr_grid=(1e-2,), learned_curves=given)
    assert_close(comp.curves[LEARNED], torch.full((4,), 2.0, dtype=torch.float64))
    assert comp.grid_edge == ["sgd"]  # a one-point grid is always at its edge
    only = compare(None, val, test, 3, baselines=("sgd",), lr_grid=(1e-2,))
    assert list(only.curves) == ["sgd"]


def test_json_cached_computes_once_per_key(tmp_path) -> None:
    from lightning_l2l.evaluation import digest, json_cached

    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"curve": [2.3, 1.0], "lr": 0.1}

    key = f"curves_{digest({'task': 3, 'lrs': [0.1, 1.0]})}"
    assert digest({"lrs": [0.1, 1.0], "task": 3}) == digest({"task": 3, "lrs": [0.1, 1.0]}) != digest({"task": 4})
    assert json_cached(tmp_path, key, compute) == {"curve": [2.3, 1.0], "lr": 0.1}
    assert json_cached(tmp_path, key, compute) == {"curve": [2.3, 1.0], "lr": 0.1}  # read back from the file
    assert len(calls) == 1 and (tmp_path / f"{key}.json").is_file()
    assert json_cached(None, key, compute)["lr"] == 0.1 and len(calls) == 2  # no cache: computed every time


def test_weights_digest_is_the_hash_of_the_weights_file(tmp_path) -> None:
    import hashlib
    import shutil

    from lightning_l2l.pretrained import path, weights_digest

    shipped = path("quadratic")
    assert weights_digest("quadratic") == hashlib.sha256(shipped.read_bytes()).hexdigest()[:12]
    copy = tmp_path / "rule.safetensors"
    shutil.copy(shipped, copy)
    assert weights_digest(str(copy)) == weights_digest(copy) == weights_digest("quadratic")
    copy.write_bytes(copy.read_bytes() + b" ")
    assert weights_digest(copy) != weights_digest("quadratic")
    with pytest.raises(FileNotFoundError):
        weights_digest(str(tmp_path / "missing.safetensors"))


def test_rule_fingerprint_follows_what_the_rule_computes() -> None:
    from lightning_l2l.evaluation import rule_fingerprint
    from lightning_l2l.nets import PerKindRule
    from lightning_l2l.pretrained import resolve

    rule, _ = resolve("quadratic")
    same, _ = resolve("quadratic")
    assert rule_fingerprint(rule) == rule_fingerprint(same)  # deterministic
    with torch.no_grad():
        same.out.bias.add_(1e-6)  # a change far below any printed digit still changes the hash
    assert rule_fingerprint(same) != rule_fingerprint(rule)
    scaled, _ = resolve("quadratic")
    scaled.output_scale *= 1.5  # same weights, other computation: what a code change looks like
    assert rule_fingerprint(scaled) != rule_fingerprint(rule)
    two = PerKindRule({"conv": CoordinatewiseLSTM(hidden_size=4), "fc": CoordinatewiseLSTM(hidden_size=4)}, default="fc")
    other = PerKindRule({"conv": two.networks["conv"], "fc": CoordinatewiseLSTM(hidden_size=4)}, default="fc")
    assert rule_fingerprint(two) != rule_fingerprint(other)  # every kind's network counts
    conv_default = PerKindRule(dict(two.networks), default="conv")  # same networks, others routed to conv
    assert rule_fingerprint(conv_default) != rule_fingerprint(two)
