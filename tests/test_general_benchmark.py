"""benchmarks/general.py, shrunk: user-style models no meta-training saw, as a user would train them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_l2l.nets import MomentMLP, save_rule
from tests.benchmark_scripts import load_benchmark
from tests.image_data import FASHION_SAMPLE_DIR


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("general")


@pytest.mark.parametrize("name", ["conv_tanh", "resnet_bn", "gru", "autoencoder", "vit", "logreg"])
def test_every_problem_builds_and_trains(bench, name):
    """Each model runs forward and backward on its data; held-out examples are not training examples."""
    problem = bench.PROBLEMS[name]
    x, y, ex, ey = problem.data()
    assert x.shape[1:] == ex.shape[1:] and len(x) > len(ex) > 0
    if name != "autoencoder":  # for the autoencoder the targets are the inputs
        assert not any(torch.equal(ex[0], row) for row in x[:2000])
    losses = bench.train(problem, 0, bench.baseline("adam", 1e-2), 5)
    assert set(losses) == {0, 5} and all(math.isfinite(v) for v in losses.values())


def test_mnist_split_holds_out_a_fifth_of_each_class(bench):
    _, y, _, ey = bench._mnist(14)
    assert len(y) == 4000 and len(ey) == 1000
    assert torch.bincount(ey).tolist() == [100] * 10


def test_divergence_is_recorded_as_inf_from_then_on(bench):
    losses = bench.train(bench.PROBLEMS["logreg"], 0, bench.baseline("sgd", 1e6), 1000)
    assert losses[200] == losses[500] == losses[1000] == math.inf


def test_report_shrunk_writes_tables_and_caches_baselines(bench, tmp_path, capsys):
    args = ["--problems", "logreg", "gru", "--weights", "conv", "--baselines", "adam", "nag", "--seeds", "2",
            "--val-seeds", "1", "--steps", "6", "--out", str(tmp_path)]
    bench.main(args)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["problems"]) == {"logreg", "gru"}
    rows = results["problems"]["logreg"]["rows"]
    assert set(rows) == {"adam (tuned)", "nag (tuned)", "adam 1e-3 (untuned)", "conv"}
    assert len(rows["conv"]["6"]) == 2  # (mean, standard error) at the last step
    summary = (tmp_path / "summary.md").read_text()
    assert "| logreg | conv |" in summary and "x Adam(1e-3) @6" in summary
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any(n.startswith("general-tune-logreg-adam") for n in cached)
    assert any(n.startswith("general-runs-logreg-adam-0.001") for n in cached)
    bench.main(args)  # the second run reads the baselines back: the same numbers
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["problems"]["logreg"]["rows"]["adam (tuned)"] == rows["adam (tuned)"]
    assert again["problems"]["logreg"]["rows"]["conv"] == rows["conv"]


def test_select_ranks_checkpoints_against_adam(bench, tmp_path, capsys):
    save_rule(MomentMLP(), tmp_path / "start")
    saved = str(tmp_path / "start.safetensors")
    bench.main(["--select", saved, "init:1e-3", "--select-tasks", "2", "--select-steps", "5",
                "--select-lrs", "1", "0.5", "--select-decay", "0", "2", "--data-dir", str(FASHION_SAMPLE_DIR),
                "--select-cache", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("general-val-*-adam-*.json"))) == 2 * 3  # 2 tasks x 3 Adams
    lines = {line.split(": @")[0]: line for line in out.splitlines() if ": @5: mean" in line}
    expected = {"Adam 1e-3", "Adam 0.003", "Adam 0.01"} | {
        f"{label}{decay}{mult}" for label in (saved, "init:1e-3") for decay in ("", " decay 2^0.5") for mult in ("", " x0.5")
    }
    assert set(lines) == expected
    # MomentMLP() is Adam at 1e-3 with a clipped step (not reached in 5 steps): level with Adam(1e-3)
    for label in (saved, "init:1e-3"):
        assert "@5: mean +0.000 ± 0.000" in lines[label] or "@5: mean -0.000 ± 0.000" in lines[label]
        # at x0.5 it is that Adam at 5e-4, and with decay its steps shrink: other losses
        assert lines[f"{label} x0.5"].split("median")[0] != lines[label].split("median")[0]
        assert lines[f"{label} decay 2^0.5"].split("median")[0] != lines[label].split("median")[0]
    assert "loss up >1% from - to 5" in lines["Adam 1e-3"]


def test_select_decay_needs_a_moment_rule(bench, tmp_path):
    from lightning_l2l.nets import CoordinatewiseLSTM

    save_rule(CoordinatewiseLSTM(hidden_size=4), tmp_path / "lstm")
    with pytest.raises(SystemExit, match="MomentMLP"):
        bench.main(["--select", str(tmp_path / "lstm.safetensors"), "--select-tasks", "1", "--select-steps", "2",
                    "--select-decay", "10", "--data-dir", str(FASHION_SAMPLE_DIR), "--select-cache", ""])


def test_select_architectures_draws_the_named_ones(bench, tmp_path, capsys):
    """--select-architectures: validation tasks of those architectures, cached apart from the default mixture's."""
    bench.main(["--select", "init:1e-3", "--select-tasks", "2", "--select-steps", "5", "--select-architectures",
                "linear", "--data-dir", str(FASHION_SAMPLE_DIR), "--select-cache", str(tmp_path / "cache")])
    assert "init:1e-3: @5: mean" in capsys.readouterr().out
    cached = [p.name for p in (tmp_path / "cache").glob("general-val-*-adam-*.json")]
    assert len(cached) == 2 * 3 and all("-linear-77-" in n for n in cached)
