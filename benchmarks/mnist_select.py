"""Compare candidate MNIST rules on validation-pool tasks that no checkpoint selection has seen.

    python benchmarks/mnist_select.py runs/mnist_stage3/checkpoints/best.ckpt mnist [--num-tasks 16]

``MetaLearner`` keeps the checkpoint with the best ``val/final_loss`` on its first 4 (or 12) validation
tasks; picked among many validations, that number is optimistic. This script draws ``--num-tasks``
other networks from the same validation digit pool (a seed stream neither ``MetaLearner`` nor
``benchmarks/mnist_figures.py`` uses) and prints the mean full-data loss at steps 20, 50 and 100 of
each candidate and of NAG (lr 1) and Adam (lr 0.0316), the baselines' learning rates tuned for the
base network. The test pool stays untouched for the final report.
"""

from __future__ import annotations

import argparse

import torch

from lightning_l2l.evaluation import baseline_curve
from lightning_l2l.pretrained import resolve
from lightning_l2l.tasks import MNISTFamily
from lightning_l2l.trajectory import rule_curve

#: MetaLearner's validation stream is seed + 1_000_003; this one is 77 further on
SELECTION_SEED = 1_000_003 + 77
STEPS = (20, 50, 100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("weights", nargs="+", help="shipped names, .safetensors files or MetaLearner .ckpt files")
    parser.add_argument("--num-tasks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(SELECTION_SEED)
    tasks = [MNISTFamily(split="val").sample(gen) for _ in range(args.num_tasks)]
    print(f"mean full-data loss on {args.num_tasks} validation-pool tasks\n")
    print("| optimizer | " + " | ".join(f"step {s}" for s in STEPS) + " |")
    print("| --- | " + " | ".join("---:" for _ in STEPS) + " |")

    def row(label: str, curves: list[torch.Tensor]) -> None:
        mean = torch.stack(curves).mean(0)
        print(f"| {label} | " + " | ".join(f"{float(mean[s]):.4f}" for s in STEPS) + " |", flush=True)

    for name, lr in (("nag", 1.0), ("adam", 0.0316)):
        row(f"{name} (lr {lr})", [baseline_curve(name, lr, t, max(STEPS)) for t in tasks])
    for weights in args.weights:
        rule, _ = resolve(weights)
        rule.requires_grad_(False)
        row(weights, [rule_curve(rule, t, max(STEPS)) for t in tasks])


if __name__ == "__main__":
    main()
