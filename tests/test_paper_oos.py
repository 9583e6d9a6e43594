"""benchmarks/paper_oos.py: the --labels plot of each rule's ratio to the best tuned baseline, and its arguments."""

from __future__ import annotations

import json
import math

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


@pytest.fixture
def shrunk(bench, monkeypatch):
    """The flows of the script at a few steps, two-rate grids and one MNIST-digits problem each (the real
    families, data loaders, baselines and rule runs; only the sizes are smaller)."""
    monkeypatch.setattr(bench, "GRIDS", {"sgd": (-0.5, -0.25), "nag": (-1.0, -0.75), "rmsprop": (-2.0, -1.75),
                                         "adam": (-2.0, -1.75)})
    monkeypatch.setattr(bench, "STEPS", {"mnist": (3, 6), "conv": (3,)})
    monkeypatch.setattr(bench, "REPORT_STEPS", {"mnist": (3, 6, 9), "conv": (3, 6)})
    full = bench.select_problems
    monkeypatch.setattr(bench, "select_problems", lambda kind, relu: dict(list(full(kind, relu).items())[:1]))
    monkeypatch.setattr(bench, "report_problems", lambda kind: {"mnist base": lambda s: bench.mlp("mnist", eval_split=s)})
    return bench


def test_select_scores_candidates_on_validation_tasks_and_names_the_lowest(shrunk, tmp_path, capsys):
    shrunk.main(["--select", "mnist", "mnist", "quadratic", "--select-relu", "no", "--tune-tasks", "1",
                 "--select-tasks", "2", "--out", str(tmp_path), "--tag", "_t", "--cache", str(tmp_path / "cache")])
    text = (tmp_path / "select_mnist_t.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"mnist", "quadratic"}
    scores = {name: float(rows[name].rsplit("|", 2)[1]) for name in ("mnist", "quadratic")}
    best = min(scores, key=scores.__getitem__)
    assert f"Lowest score: `{best}`" in text
    assert f"lowest score: {best}" in capsys.readouterr().out
    assert any((tmp_path / "cache").iterdir())  # the baseline runs were cached


def test_report_scores_test_pools_once_and_reuses_the_cache(shrunk, tmp_path, monkeypatch):
    argv = ["--report", "mnist", "--weights", "mnist", "--labels", "mnist", "--tune-tasks", "1", "--seeds", "2",
            "--pool-sizes", "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    shrunk.main(argv)
    results = json.loads((tmp_path / "mnist.json").read_text())
    base = results["problems"]["mnist base"]
    assert base["steps"] == [3, 6, 9]
    assert {"sgd (tuned)", "nag (tuned)", "rmsprop (tuned)", "adam (tuned)", "adam 1e-3 (untuned)",
            "mnist"} <= set(base["rows"])
    for label, row in base["rows"].items():
        assert len(row) == 3 and all(math.isfinite(m) and m > 0 for m, _ in row), label
    assert "mnist base, paper's metric (training-pool loss)" in results["problems"]
    assert (tmp_path / "mnist.png").read_bytes()[:4] == b"\x89PNG"
    assert "| mnist base | mnist |" in (tmp_path / "mnist.md").read_text()
    # a second run reads every run from the cache: nothing is trained again, the same numbers

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was recomputed")

    monkeypatch.setattr(shrunk, "baseline_losses_at", no_training)
    monkeypatch.setattr(shrunk, "rule_runs", no_training)
    shrunk.main(argv[:-4] + ["--out", str(tmp_path / "again"), "--cache", str(tmp_path / "cache")])
    again = json.loads((tmp_path / "again" / "mnist.json").read_text())
    assert again["problems"]["mnist base"]["rows"] == base["rows"]


def test_merge_puts_separate_reports_in_one_table_and_refuses_other_baselines(shrunk, tmp_path):
    common = ["--tune-tasks", "1", "--seeds", "2", "--pool-sizes", "--cache", str(tmp_path / "cache")]
    for name in ("mnist", "quadratic"):
        shrunk.main(["--report", "mnist", "--weights", name, "--out", str(tmp_path / name)] + common)
    shrunk.main(["--merge", str(tmp_path / "mnist" / "mnist.json"), str(tmp_path / "quadratic" / "mnist.json"),
                 "--labels", "M", "Q", "--out", str(tmp_path / "merged")])
    merged = json.loads((tmp_path / "merged" / "mnist.json").read_text())
    alone = json.loads((tmp_path / "quadratic" / "mnist.json").read_text())
    rows = merged["problems"]["mnist base"]["rows"]
    assert {"mnist", "quadratic"} <= set(rows)
    assert rows["quadratic"] == alone["problems"]["mnist base"]["rows"]["quadratic"]
    assert (tmp_path / "merged" / "mnist.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "merged" / "mnist.md").read_text()
    assert "| mnist base | mnist |" in text and "| mnist base | quadratic |" in text
    assert "| M (1) @3 |" in text

    # one label for both: summarised as seeds of one rule, the geometric mean of their ratios and the range
    shrunk.main(["--merge", str(tmp_path / "mnist" / "mnist.json"), str(tmp_path / "quadratic" / "mnist.json"),
                 "--labels", "R", "R", "--out", str(tmp_path / "seeds")])
    res = merged["problems"]["mnist base"]
    ratios = [res["rows"][w][0][0] / shrunk._best(res, 0)[1] for w in ("mnist", "quadratic")]
    cell = f"{math.sqrt(ratios[0] * ratios[1]):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
    row = next(line for line in (tmp_path / "seeds" / "mnist.md").read_text().splitlines()
               if line.startswith("| mnist base | "))  # the seed summary comes first
    assert row.split(" | ")[1] == cell
    assert (tmp_path / "seeds" / "mnist.png").read_bytes()[:4] == b"\x89PNG"

    # reports whose baselines differ (other test tasks or another cache) do not merge
    alone["problems"]["mnist base"]["rows"]["adam (tuned)"][0][0] *= 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mnist.json").write_text(json.dumps(alone))
    with pytest.raises(SystemExit, match="same --cache"):
        shrunk.main(["--merge", str(tmp_path / "mnist" / "mnist.json"), str(tmp_path / "other" / "mnist.json"),
                     "--labels", "M", "Q", "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="2 rules"):
        shrunk.main(["--merge", str(tmp_path / "mnist" / "mnist.json"), str(tmp_path / "quadratic" / "mnist.json"),
                     "--labels", "only-one", "--out", str(tmp_path / "bad")])
