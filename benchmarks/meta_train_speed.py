"""Meta-training throughput on CPU: optimizee steps and coordinate-steps per second, with a floor.

    python benchmarks/meta_train_speed.py [--threads 1 all] [--truncations 30] [--eager]
    python benchmarks/meta_train_speed.py --recipe configs/mnist.yaml [--threads 1 all] [--steps 100] [--repeats 2]

One "truncation" is what one MetaLearner.training_step does: ``unroll`` optimizee steps with the
coordinatewise LSTM (forward with graph), the backward through all of them, a clip and an Adam step
on the rule. Measured on quadratic tasks of growing size (coordinates = num_functions x dim), with
the paper's LSTM (2 x 20 units, log-sign preprocessing), at one CPU thread and at all of them
(``--threads``). Also times the frozen rule (evaluation / LearnedOptimizer-style, no meta-gradient).

Floor: the network's FLOPs per coordinate-step (forward about 10^4, the backward twice that: 3x the
forward), over the rate of a large float32 matmul measured at the same thread count; "x floor" is a
meta-training optimizee step over it. "x Adam": a meta-training optimizee step over one step of
training the same task with ``torch.optim.Adam`` (loss, backward, step). On CPU in float32 the LSTM
runs its fused kernels (``lightning_l2l/nets/_fused.py``); ``--eager`` adds the same rows with
``L2L_FUSED=0`` (the eager network), run in a subprocess. Prints a markdown table.

``--recipe CONFIG`` times a shipped meta-training recipe instead, as ``l2l fit --config CONFIG`` runs it: the
config's model parsed by the CLI, fitted by a real ``Trainer`` (no logger, no checkpoints) for ``--steps``
meta-steps, with its validations; for each thread count, the fused and the eager network (``L2L_FUSED=0``),
each in its own subprocess, interleaved ``--repeats`` times (the median is reported) so that a busy machine
weighs on both alike. Prints the median meta-step (``training_step``), a validation, and the projected wall
time of the config's ``max_steps`` (meta-steps plus validations), with the speed-up over the eager network at
one thread (what the recipe ran on before the fused kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lightning_l2l.nets import CoordinatewiseLSTM
from lightning_l2l.tasks import QuadraticFamily
from lightning_l2l.trajectory import Trajectory, unroll

SIZES = (128, 1024, 8192)  # quadratics of 10 dimensions per task


def time_truncations(num_functions: int, unroll_len: int, truncations: int) -> tuple[float, float, float]:
    """Seconds per optimizee step: meta-training, the frozen rule, and Adam on the same task."""
    torch.manual_seed(0)
    rule = CoordinatewiseLSTM()
    opt = torch.optim.Adam(rule.parameters(), lr=1e-3)
    family = QuadraticFamily(dim=10, num_functions=num_functions)
    gen = torch.Generator().manual_seed(0)
    traj = Trajectory.start(rule, family.sample(gen))

    def one() -> None:
        nonlocal traj
        if traj.step >= 100:
            traj = Trajectory.start(rule, family.sample(gen))
        result = unroll(rule, traj, unroll_len)
        opt.zero_grad()
        result.meta_loss.backward()
        torch.nn.utils.clip_grad_norm_(rule.parameters(), 1.0)
        opt.step()
        traj.detach()

    for _ in range(3):  # warm-up
        one()
    start = time.perf_counter()
    for _ in range(truncations):
        one()
    train = (time.perf_counter() - start) / (truncations * unroll_len)

    traj = Trajectory.start(rule, family.sample(gen))
    start = time.perf_counter()
    unroll(rule, traj, 100, differentiable=False)
    frozen = (time.perf_counter() - start) / 100

    task = family.sample(gen)
    params = {n: p.detach().clone().requires_grad_() for n, p in task.init_params().items()}
    adam = torch.optim.Adam(params.values(), lr=1e-3)
    for i in range(110):
        if i == 10:
            start = time.perf_counter()
        adam.zero_grad()
        task.loss(params, i).backward()
        adam.step()
    return train, frozen, (time.perf_counter() - start) / 100


def matmul_rate(threads: int) -> float:
    """FLOP/s of a 2048 x 2048 float32 matmul, best of 5."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best


def network_flops() -> int:
    """Forward FLOPs per coordinate of the paper's LSTM: the four gates of both layers and the output."""
    rule = CoordinatewiseLSTM()
    flops, inputs = 0, 2
    for layer in range(rule.num_layers):
        flops += 2 * ((inputs if layer == 0 else rule.hidden_size) + rule.hidden_size) * 4 * rule.hidden_size
    return flops + 2 * rule.hidden_size


def time_recipe(config: str, steps: int, threads: int) -> dict[str, Any]:
    """Median seconds of a meta-step and of a validation of ``l2l fit --config CONFIG`` over ``steps`` meta-steps."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_l2l.cli import L2LCLI
    from lightning_l2l.meta import MetaLearner

    class Clock(Callback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.vals: list[float] = []
            self.t0 = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.steps.append(time.perf_counter() - self.t0)

        def on_validation_start(self, *args: Any) -> None:
            self.t0 = time.perf_counter()

        def on_validation_end(self, *args: Any) -> None:
            self.vals.append(time.perf_counter() - self.t0)

    cli = L2LCLI(MetaLearner, args=["--config", config, "--torch_num_threads", str(threads)], run=False,
                 save_config_callback=None)
    model = cli.model
    max_steps, every = cli.trainer.max_steps, model.hparams.truncations_per_epoch
    clock = Clock()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[clock])
    trainer.fit(model)
    warm = clock.steps[3:] or clock.steps
    step_s = sorted(warm)[len(warm) // 2]
    val_s = sorted(clock.vals)[len(clock.vals) // 2] if clock.vals else 0.0
    return dict(threads=torch.get_num_threads(), fused=os.environ.get("L2L_FUSED") != "0", step_s=step_s,
                val_s=val_s, max_steps=max_steps, every=every, total_s=max_steps * step_s + max_steps // every * val_s)


def recipe(config: str, thread_counts: list[int], steps: int, repeats: int) -> list[dict[str, Any]]:
    """Fused and eager at each thread count, each in a subprocess, interleaved ``repeats`` times."""
    runs: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    for _ in range(repeats):
        for threads in thread_counts:
            for fused in (True, False):
                cmd = [sys.executable, __file__, "--worker", "recipe", "--recipe", config, "--steps", str(steps),
                       "--threads", str(threads)]
                env = {**os.environ, "L2L_FUSED": "1" if fused else "0", "WANDB_MODE": "disabled"}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    raise SystemExit(f"recipe worker failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
                runs.setdefault((threads, fused), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for rs in runs.values():
        row = dict(rs[0])
        for key in ("step_s", "val_s", "total_s"):
            row[key] = statistics.median(r[key] for r in rs)
        row["repeats"] = len(rs)
        rows.append(row)
    return rows


def recipe_table(rows: list[dict[str, Any]]) -> str:
    base = next((r["total_s"] for r in rows if r["threads"] == 1 and not r["fused"]), None)
    lines = ["| threads | network | meta-step (ms) | validation (s) | projected fit (min) | x faster than eager, 1 thread |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["threads"], not r["fused"])):
        speed = f"{base / r['total_s']:.2f}" if base else "-"
        lines.append(f"| {r['threads']} | {'fused' if r['fused'] else 'eager'} | {r['step_s'] * 1e3:.0f} | "
                     f"{r['val_s']:.2f} | {r['total_s'] / 60:.1f} | {speed} |")
    return "\n".join(lines)


def measure(threads: int, unroll_len: int, truncations: int) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    rate = matmul_rate(threads)
    rows = []
    for num_functions in SIZES:
        coords = num_functions * 10
        train, frozen, adam = time_truncations(num_functions, unroll_len, max(3, truncations * 128 // num_functions))
        rows.append(dict(threads=threads, coords=coords, train_s=train, frozen_s=frozen, adam_s=adam, matmul=rate,
                         floor_s=coords * 3 * network_flops() / rate,
                         fused=os.environ.get("L2L_FUSED") != "0"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", nargs="+", default=["1", "all"],
                        help="CPU thread counts, 'all': every CPU this process may use (default: 1 all)")
    parser.add_argument("--truncations", type=int, default=30)
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--eager", action="store_true", help="also the eager network (L2L_FUSED=0), in a subprocess")
    parser.add_argument("--recipe", default=None, metavar="CONFIG",
                        help="time this meta-training config (e.g. configs/mnist.yaml) instead of the quadratic sizes")
    parser.add_argument("--steps", type=int, default=100, help="--recipe: meta-steps per timed fit (default 100)")
    parser.add_argument("--repeats", type=int, default=2, help="--recipe: interleaved fits per variant (default 2)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    all_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    thread_counts = list(dict.fromkeys(all_cpus if t == "all" else int(t) for t in args.threads))
    if args.recipe is not None and not Path(args.recipe).is_file():
        raise SystemExit(f"--recipe {args.recipe}: no such config file (e.g. configs/mnist.yaml)")
    if args.worker == "recipe":
        print(json.dumps(time_recipe(args.recipe, args.steps, thread_counts[0])))
        return
    if args.worker:
        print(json.dumps([r for t in thread_counts for r in measure(t, args.unroll, args.truncations)]))
        return
    from lightning_l2l.nets._fused import fused_lstm_status

    why = fused_lstm_status()
    if args.recipe is not None:
        print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.recipe}: "
              f"{args.steps} meta-steps per fit, {args.repeats} interleaved fits per row (medians), fused kernels: "
              f"{'yes' if why is None else 'no (' + why + ')'}\n")
        print(recipe_table(recipe(args.recipe, thread_counts, args.steps, args.repeats)))
        return
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {thread_counts} of "
          f"{all_cpus}, unroll {args.unroll}, CoordinatewiseLSTM(20, 2 layers), fused kernels: "
          f"{'yes' if why is None else 'no (' + why + ')'}\n")
    rows = [r for t in thread_counts for r in measure(t, args.unroll, args.truncations)]
    if args.eager:
        cmd = [sys.executable, __file__, "--worker", "1", "--threads", *map(str, thread_counts),
               "--truncations", str(args.truncations), "--unroll", str(args.unroll)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "L2L_FUSED": "0"})
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    print(table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| threads | network | coordinates | meta-train: optimizee steps/s | meta-train: coordinate-steps/s "
             "| floor (ms per step) | x floor | x Adam | frozen rule: steps/s | frozen rule: coordinate-steps/s |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        c, train, frozen = r["coords"], r["train_s"], r["frozen_s"]
        lines.append(f"| {r['threads']} | {'fused' if r['fused'] else 'eager'} | {c:,} | {1 / train:,.0f} | "
                     f"{c / train:,.3g} | {r['floor_s'] * 1e3:.3f} | {train / r['floor_s']:.1f} | "
                     f"{train / r['adam_s']:.0f} | {1 / frozen:,.0f} | {c / frozen:,.3g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
