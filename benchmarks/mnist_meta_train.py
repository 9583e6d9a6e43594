"""Meta-train on MNIST with a wall clock: when does the rule beat tuned baselines on validation tasks?

    python benchmarks/mnist_meta_train.py [--config configs/mnist.yaml] [--threads 1]
        [--baselines adam nag] [-- CLI overrides]

Runs exactly ``l2l fit --config CONFIG [overrides]`` (same checkpoints, logs and seed) with one
extra callback that records the wall time, meta-step and ``val/final_loss`` (mean full-data loss
at the horizon on the validation tasks) after every validation. After the fit, it tunes each
baseline's learning rate on the same validation tasks over the same log grid (10^-5 ... 10, 25
values) and reports the first validation at which the learned rule's loss beats each tuned baseline
(Adam, the issue's yardstick, and NAG, the strongest on the base network), as a markdown table and
``RUN_DIR/meta_train_time.json`` (keys ``tuned_<name>``, ``first_beats_<name>``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_l2l.cli import L2LCLI
from lightning_l2l.evaluation import BASELINES, tune_baseline
from lightning_l2l.meta import MetaLearner

ROOT = Path(__file__).resolve().parents[1]


class WallClock(Callback):
    """Wall time, step and validation loss after every (non-sanity) validation."""

    def __init__(self) -> None:
        self.start = 0.0
        self.records: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val/final_loss")
        record = {"wall_s": round(time.perf_counter() - self.start, 1), "meta_step": trainer.global_step,
                  "val_final_loss": None if loss is None else float(loss)}
        self.records.append(record)
        print(f"[wall clock] {record}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "mnist.yaml"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: share the machine)")
    parser.add_argument("--init", default=None,
                        help="start from this rule (a MetaLearner .ckpt, an exported .safetensors or a shipped name) "
                             "instead of the config's: the same as `--model.init_weights`")
    parser.add_argument("--baselines", nargs="+", default=["adam", "nag"], choices=sorted(BASELINES),
                        help="baselines to tune on the validation tasks and time the rule against")
    parser.add_argument("overrides", nargs="*", help="extra `l2l fit` arguments, after `--`")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = WallClock()
    init = [f"--model.init_weights={args.init}"] if args.init else []
    cli = L2LCLI(MetaLearner, args=["--config", args.config, *init, *args.overrides], run=False)
    cli.trainer.callbacks.append(clock)
    start = time.perf_counter()
    cli.trainer.fit(cli.model)
    fit_s = time.perf_counter() - start
    model: MetaLearner = cli.model
    summary: dict[str, Any] = {
        "config": args.config, "overrides": args.overrides, "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "fit_wall_s": round(fit_s, 1), "num_val_tasks": len(model.val_tasks),
    }
    scores: dict[str, float] = {}
    for name in args.baselines:
        tuned = tune_baseline(name, model.val_tasks, model.hparams.horizon, model.lr_grid)
        scores[name] = tuned.scores[tuned.lr]
        summary[f"tuned_{name}"] = {"lr": tuned.lr, "val_final_loss": scores[name], "at_grid_edge": tuned.at_grid_edge}
        summary[f"first_beats_{name}"] = next(
            (r for r in clock.records if r["val_final_loss"] is not None and r["val_final_loss"] < scores[name]), None
        )
    summary["validations"] = clock.records
    out = Path(cli.trainer.default_root_dir) / "meta_train_time.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for name in args.baselines:
        lr = summary[f"tuned_{name}"]["lr"]
        print(f"tuned {name} (lr {lr:.3g}) on the {len(model.val_tasks)} validation tasks: {scores[name]:.4g}")
    print("\n| wall time (s) | meta-step | val/final_loss | " + " | ".join(f"/ tuned {n}" for n in args.baselines) + " |")
    print("| ---: | ---: | ---: | " + " | ".join("---:" for _ in args.baselines) + " |")
    for r in clock.records:
        v = r["val_final_loss"]
        ratios = " | ".join(f"{v / scores[n]:.3f}" for n in args.baselines)
        print(f"| {r['wall_s']} | {r['meta_step']} | {v:.4g} | {ratios} |")
    for name in args.baselines:
        first = summary[f"first_beats_{name}"]
        if first is None:
            print(f"the rule never beat tuned {name} on the validation tasks")
        else:
            print(f"first beats tuned {name} after {first['wall_s']} s ({first['meta_step']} meta-steps)")
    print(f"whole fit {fit_s:.0f} s; wrote {out}")
    return summary


if __name__ == "__main__":
    main()
