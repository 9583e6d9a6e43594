"""benchmarks/paper_oos.py: the --labels plot of each rule's ratio to the best tuned baseline, and its arguments."""

from __future__ import annotations

import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("paper_oos")


def _results(ratio: float) -> dict:
    """Two test problems at steps 100/200: adam is the best tuned baseline (loss 1), the rule ``ratio`` times it."""
    rows = {"sgd (tuned)": [(2.0, 0.1), (2.0, 0.1)], "adam (tuned)": [(1.0, 0.1), (1.0, 0.1)],
            "adam 1e-3 (untuned)": [(4.0, 0.1), (4.0, 0.1)], "rule.ckpt": [(ratio, 0.1), (ratio, 0.1)]}
    problem = {"steps": [100, 200], "rows": rows}
    return {"meta": {"steps": [100, 200], "command": "python benchmarks/paper_oos.py", "seeds": 2},
            "problems": {"mnist base": problem, "fashion_mnist base": problem,
                         "fashion_mnist base, 1000 train images, test-pool loss": problem}}


def test_plot_ratios_writes_a_png_and_uses_the_best_tuned_baseline(bench, tmp_path):
    results = _results(1.5)
    assert bench._best(results["problems"]["mnist base"], 0) == ("adam", 1.0)
    path = bench.plot_ratios(results, ["rule.ckpt"], ["rule"], tmp_path / "mnist.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert "1.500 (adam)" in bench.summary(results, [100, 200], ["rule.ckpt"])


def test_labels_must_match_weights(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--report", "mnist", "--weights", "a.ckpt", "b.ckpt", "--labels", "only-one"])
    assert "2 --weights" in capsys.readouterr().err
