"""Meta-training throughput per precision: fp32 against bf16-mixed (and 16-mixed on a GPU).

    python benchmarks/precision_throughput.py                         # configs/conv.yaml, every precision
    python benchmarks/precision_throughput.py --precisions 32-true bf16-mixed --steps 50 --json out.json

Builds the ``MetaLearner`` of ``--config`` exactly as ``l2l fit --config`` does (the shipped conv
config by default: the two-LSTM rule on the conv-net task), then, for each precision, meta-trains
it with a real Lightning ``Trainer(precision=...)`` on the chosen accelerator for ``--warmup`` +
``--steps`` meta-steps, validation and checkpoints off. Each precision starts from the same weights
and the same task stream. Timed: the meta-steps after the warm-up (one meta-step = one truncation of
``unroll`` optimizee steps, forward with graph, backward, clip, Adam step), with CUDA synchronised
around each. Prints a markdown table: meta-steps/s, optimizee steps/s (``unroll`` per meta-step: the
truncations that end a trajectory early count as full ones), coordinate-steps/s, peak memory during
that precision's run (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, reset before each
run on Linux), and the speed-up over the first precision listed.

Default precisions: ``32-true`` and ``bf16-mixed`` everywhere, plus ``16-mixed`` (Lightning's gradient
scaling) on a GPU. Task data as in the config (Fashion-MNIST for conv:
``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _memory import peak_bytes, reset_peak  # benchmarks/_memory.py
from lightning.pytorch.callbacks import Callback

from lightning_l2l.cli import L2LCLI
from lightning_l2l.meta import MetaLearner

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(Callback):
    """Wall time of every training step (CUDA synchronised before and after)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start = 0.0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._sync(pl_module)
        self.durations.append(time.perf_counter() - self._start)


def measure(config: str, precision: str, accelerator: str, steps: int, warmup: int,
            overrides: list[str]) -> dict[str, Any]:
    """Meta-train ``config``'s MetaLearner for ``warmup + steps`` meta-steps under ``precision``; rates."""
    # seed 0 unless the config (or an override) sets one: every precision starts from the same weights
    cli = L2LCLI(MetaLearner, args=["--seed_everything=0", "--config", config, *overrides], run=False)
    model: MetaLearner = cli.model
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_steps=warmup + steps, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer], default_root_dir=None,
    )
    reset_peak(trainer.strategy.root_device)
    trainer.fit(model)
    timed = timer.durations[warmup:]
    if not timed:
        raise SystemExit(f"no timed meta-steps: --steps must be >= 1 (got {steps})")
    task = model.task_family.sample(torch.Generator().manual_seed(0))  # the coordinates of one optimizee
    coords = sum(p.numel() for p in task.init_params().values()) * model.hparams.tasks_per_step
    per_step = statistics.median(timed)
    unroll = model.hparams.unroll
    return {
        "precision": precision, "device": str(trainer.strategy.root_device), "timed_meta_steps": len(timed),
        "median_s_per_meta_step": per_step, "meta_steps_per_s": 1 / per_step,
        "optimizee_steps_per_s": unroll / per_step, "coordinate_steps_per_s": coords * unroll / per_step,
        "coordinates": coords, "unroll": unroll, "peak_memory_mb": peak_bytes(trainer.strategy.root_device) / 2**20,
        "rule_weights_finite": all(bool(torch.isfinite(p).all()) for p in model.rule.parameters()),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "conv.yaml"))
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (a GPU where there is one)")
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="Lightning precisions (default: 32-true bf16-mixed, and 16-mixed on a GPU)")
    parser.add_argument("--steps", type=int, default=30, help="timed meta-steps per precision")
    parser.add_argument("--warmup", type=int, default=5, help="untimed meta-steps first")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("overrides", nargs="*", help="extra `l2l fit` arguments for the model, after `--`")
    args = parser.parse_args(argv)
    gpu = args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available())
    precisions = args.precisions or (["32-true", "bf16-mixed", "16-mixed"] if gpu else ["32-true", "bf16-mixed"])
    if "16-mixed" in precisions and not gpu:
        raise SystemExit("16-mixed needs a GPU (Lightning's gradient scaling is CUDA-only); "
                         "on CPU compare 32-true with bf16-mixed")
    rows = [measure(args.config, p, args.accelerator, args.steps, args.warmup, args.overrides) for p in precisions]
    print(f"\nMeta-training throughput, {Path(args.config).name} {' '.join(args.overrides)}".rstrip())
    print(f"{rows[0]['device']}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} CPU threads; median of {args.steps} meta-steps after {args.warmup} warm-up\n")
    print("| precision | meta-steps/s | optimizee steps/s | coordinate-steps/s | peak memory (MiB) | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        speedup = r["meta_steps_per_s"] / rows[0]["meta_steps_per_s"]
        print(f"| {r['precision']} | {r['meta_steps_per_s']:.3g} | {r['optimizee_steps_per_s']:.3g} | "
              f"{r['coordinate_steps_per_s']:.3g} | {r['peak_memory_mb']:.0f} | {speedup:.2f}x |")
    if args.json:
        used = sys.argv[1:] if argv is None else argv
        Path(args.json).write_text(json.dumps({"argv": used, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
