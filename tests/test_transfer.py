"""benchmarks/transfer.py, shrunk: shipped rules on networks they were not meta-trained on."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_l2l.pretrained import WeightsError
from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("transfer")


def test_majority_labels_are_the_most_frequent_symbol_smallest_on_ties(bench):
    tokens, labels = bench.majority_sequences(256, torch.Generator().manual_seed(0))
    assert tokens.shape == (256, 8) and tokens.dtype == torch.long
    for seq, label in zip(tokens.tolist(), labels.tolist(), strict=True):
        counts = [seq.count(s) for s in range(8)]
        assert label == counts.index(max(counts))


def test_tasks_are_fresh_networks_with_a_held_out_loss(bench):
    a, b = bench.tasks("transformer", [5, 6])
    assert a.seed == 5 and b.seed == 6
    pa, pb = a.init_params(), b.init_params()
    assert pa.keys() == pb.keys() and not torch.equal(pa["head.weight"], pb["head.weight"])
    assert torch.equal(a.eval_inputs, b.eval_inputs) and a.eval_inputs.shape == (512, 8)
    assert not torch.equal(a.batch(0)[0], b.batch(0)[0])  # its own minibatch order
    assert math.isfinite(float(a.eval_loss(pa)))
    kinds = a.kinds()  # attention, feed-forward, norms, embedding: the kinds the rules route
    assert kinds["embed.weight"] == "embedding" and kinds["encoder.norm1.weight"] == "norm"
    assert kinds["head.weight"] == "fc" and kinds["position"] == "other"


def test_shrunk_run_rows_table_and_json(bench, tmp_path, capsys):
    out = tmp_path / "transfer.json"
    results = bench.main(["--horizon", "3", "--num-val", "1", "--num-test", "2", "--lr-grid", "0.01", "0.1",
                          "--weights", "quadratic", "mnist", "--json", str(out)])
    assert [r["problem"] for r in results] == ["transformer", "mlp_layernorm"]
    for r in results:
        names = [row["optimizer"] for row in r["rows"]]
        assert names == ["sgd", "nag", "rmsprop", "adam", "quadratic", "mnist"]
        best = next(row for row in r["rows"] if row["optimizer"] == r["best_baseline"])
        assert best["x_best_baseline"] == 1.0 and best["diff_vs_best"] == 0.0
        for row in r["rows"]:
            assert len(row["finals"]) == 2 and (row["lr"] in (0.01, 0.1)) != row["learned"]
            assert row["lr_at_grid_edge"] == (row["lr"] in (0.01, 0.1))  # a 2-point grid: always an edge
            if not row["learned"]:  # the best baseline is the one with the lowest mean
                assert row["mean_final_loss"] >= best["mean_final_loss"]
            assert 0 <= row["diverged"] <= 2
    printed = capsys.readouterr().out
    assert "| `mnist` (learned) | shipped |" in printed and "best tuned baseline" in printed
    assert json.loads(out.read_text())[0]["rows"][0]["optimizer"] == "sgd"

    # --tune-rule-lr: a row per rule at the multiplier with the lowest validation loss, from the grid
    tuned = bench.main(["--horizon", "3", "--num-val", "1", "--num-test", "2", "--lr-grid", "0.01", "0.1",
                        "--weights", "mnist", "--problems", "transformer", "--tune-rule-lr"])[0]
    assert [row["optimizer"] for row in tuned["rows"]][-2:] == ["mnist", "mnist (lr tuned)"]
    row = tuned["rows"][-1]
    assert row["learned"] and row["lr"] in bench.RULE_LR_GRID
    assert row["lr_at_grid_edge"] == (row["lr"] in (bench.RULE_LR_GRID[0], bench.RULE_LR_GRID[-1]))
    assert "| `mnist` (learned, lr tuned) |" in capsys.readouterr().out


def test_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.main(["--num-test", "1"])
    with pytest.raises(WeightsError, match="unknown weights 'mnst'"):
        bench.main(["--weights", "mnst"])
