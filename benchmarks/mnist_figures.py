"""Figures 4-6 of Andrychowicz et al. (2016), section 3.2: learned rules vs tuned baselines on MNIST MLPs.

    python benchmarks/mnist_figures.py                          # shipped `mnist` (+ `mnist_mix` if shipped)
    python benchmarks/mnist_figures.py --weights mnist runs/mnist/checkpoints/best.ckpt --out /tmp/figs

Problems (every network is an MLP on MNIST, cross-entropy, minibatches of 128, parameters
~ N(0, 0.01^2)):

- Figure 4 centre: the base network (1 hidden layer of 20 sigmoid units), 100 steps;
- Figure 4 right: the base network for 200 steps (the rule was meta-trained on 100);
- Figure 5: 40 hidden units; 2 hidden layers; ReLU activations (100 steps);
- Figure 6: the loss at step 100 as the width (5 ... 80) and the depth (1, 2, 3 layers) vary.

Protocol, for every problem separately: each baseline (SGD, NAG, RMSprop, Adam) gets the learning
rate with the lowest mean full-data loss at the horizon on ``--num-val`` validation tasks (a fresh
network each, trained on the validation digit pool) over a log grid 10^-5 ... 10 (25 values); then
every optimizer runs on ``--num-test`` test tasks (seeds: fresh parameters and minibatch
sequences, trained on the test digit pool, which neither meta-training nor validation sees).
Curves are the mean full-data loss (the loss on the whole pool) over the test tasks.

Writes into ``--out``: ``fig4.png``, ``fig5.png``, ``fig6.png``, ``results.md`` (table),
``results.csv`` (final losses, one row per problem and optimizer), ``curves.csv`` (mean curves)
and ``results.json`` (also per-seed final losses); logs them to W&B (offline by default).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_l2l.evaluation import (
    BASELINES,
    DEFAULT_LR_GRID,
    baseline_curve,
    digest,
    json_cached,
    rule_fingerprint,
    tune_baseline,
)
from lightning_l2l.nets import UpdateRule
from lightning_l2l.pretrained import available, resolve, weights_digest
from lightning_l2l.tasks import MNISTFamily
from lightning_l2l.trajectory import rule_curve

ROOT = Path(__file__).resolve().parents[1]
BASELINE_NAMES = ("adam", "rmsprop", "nag", "sgd")
LABELS = {"adam": "ADAM", "rmsprop": "RMSprop", "nag": "NAG", "sgd": "SGD"}
COLORS = {"adam": "tab:green", "rmsprop": "tab:purple", "nag": "tab:red", "sgd": "tab:blue"}
LEARNED_COLORS = ("tab:orange", "black", "tab:brown", "tab:pink")
VAL_SEED, TEST_SEED = 1_000_003, 2_000_003  # the seed streams MetaLearner uses for seed 0


@dataclass(frozen=True)
class Problem:
    width: int = 20
    depth: int = 1
    activation: str = "sigmoid"
    horizon: int = 100

    @property
    def key(self) -> str:
        return f"{self.activation}_w{self.width}_d{self.depth}_h{self.horizon}"

    @property
    def title(self) -> str:
        layers = f"{self.depth} layer{'s' if self.depth != 1 else ''}"
        return f"{self.width} {self.activation} units x {layers}, {self.horizon} steps"

    def family(self, split: str) -> MNISTFamily:
        return MNISTFamily(self.width, self.depth, self.activation, split=split)


BASE = Problem()
FIG4 = {"Base network, 100 steps (Fig. 4 centre)": BASE,
        "Base network, 200 steps (Fig. 4 right)": Problem(horizon=200)}
FIG5 = {"40 hidden units (Fig. 5 left)": Problem(width=40), "2 hidden layers (Fig. 5 centre)": Problem(depth=2),
        "ReLU (Fig. 5 right)": Problem(activation="relu")}
FIG6_WIDTHS = (5, 10, 20, 40, 80)
FIG6_DEPTHS = (1, 2, 3)


def load_rules(weights: list[str]) -> tuple[dict[str, UpdateRule], dict[str, str]]:
    """``{label: rule}`` and ``{label: digest of its weights}`` (labels: the shipped name or file stem)."""
    rules, digests = {}, {}
    for w in weights:
        rule, meta = resolve(w)
        label = w if w in available() else Path(w).stem
        rules[label] = rule.eval().requires_grad_(False)
        digests[label] = weights_digest(w)
    return rules, digests


def run_problem(problem: Problem, rules: dict[str, UpdateRule], digests: dict[str, str], args: argparse.Namespace,
                cache_dir: Path | None) -> dict[str, Any]:
    """Per-seed test curves of every optimizer on ``problem``.

    Cached on disk by their inputs: the tuned baselines per problem, each learned rule per problem,
    weights digest and rule fingerprint (adding a rule does not re-run the baselines; changed code
    for a rule step re-runs its curves).
    """
    grid = list(args.lr_grid)
    start = time.perf_counter()
    val_gen, test_gen = torch.Generator().manual_seed(VAL_SEED), torch.Generator().manual_seed(TEST_SEED)
    val = [problem.family("val").sample(val_gen) for _ in range(args.num_val)]
    test = [problem.family("test").sample(test_gen) for _ in range(args.num_test)]
    curves: dict[str, list[list[float]]] = {}
    lrs: dict[str, float | None] = {}
    for label, rule in rules.items():
        # keyed by the weights and by what the code computes with them (a changed rule step re-runs)
        ident = [problem.key, digests[label], rule_fingerprint(rule), args.num_test]
        curves[label] = json_cached(
            cache_dir, f"{problem.key}_{label}_{digest(ident)}",
            lambda rule=rule: [rule_curve(rule, t, problem.horizon).tolist() for t in test],
        )
        lrs[label] = None

    def baselines() -> dict[str, Any]:
        out: dict[str, Any] = {"curves": {}, "lrs": {}, "grid_edge": []}
        for name in BASELINE_NAMES:
            tuned = tune_baseline(name, val, problem.horizon, grid)
            out["lrs"][name] = tuned.lr
            if tuned.at_grid_edge:
                out["grid_edge"].append(name)
            out["curves"][name] = [baseline_curve(name, tuned.lr, t, problem.horizon).tolist() for t in test]
        return out

    ident = [problem.key, args.num_val, args.num_test, grid]
    base = json_cached(cache_dir, f"{problem.key}_baselines_{digest(ident)}", baselines)
    curves.update(base["curves"])
    lrs.update(base["lrs"])
    result = {"problem": problem.__dict__, "key": problem.key, "curves": curves, "lrs": lrs,
              "grid_edge": base["grid_edge"], "learned": list(rules), "seconds": round(time.perf_counter() - start, 1)}
    print(f"  {problem.key}: {result['seconds']} s", flush=True)
    return result


# ------------------------------------------------------------------------------------------ summaries


def finals(result: dict[str, Any], name: str, step: int | None = None) -> torch.Tensor:
    """Per-seed losses of ``name`` at ``step`` (default: the horizon)."""
    c = torch.tensor(result["curves"][name], dtype=torch.float64)  # (seeds, steps + 1)
    return c[:, -1 if step is None else step]


def mean_sem(x: torch.Tensor) -> tuple[float, float]:
    if not torch.isfinite(x).all():
        return math.inf, math.nan
    return float(x.mean()), float(x.std() / math.sqrt(len(x))) if len(x) > 1 else 0.0


def best_baseline(result: dict[str, Any], step: int | None = None) -> str:
    return min(BASELINE_NAMES, key=lambda b: mean_sem(finals(result, b, step))[0])


def summary_rows(results: dict[str, dict[str, Any]], learned: list[str]) -> list[dict[str, Any]]:
    rows = []
    for title, r in results.items():
        best = best_baseline(r)
        best_mean = mean_sem(finals(r, best))[0]
        for name in [*learned, *BASELINE_NAMES]:
            m, s = mean_sem(finals(r, name))
            rows.append({"problem": title, "key": r["key"], "horizon": r["problem"]["horizon"], "optimizer": name,
                         "lr": r["lrs"][name], "final_loss_mean": m, "final_loss_sem": s,
                         "num_seeds": len(r["curves"][name]), "ratio_to_best_baseline": m / best_mean,
                         "best_baseline": best, "lr_at_grid_edge": name in r["grid_edge"]})
    return rows


def markdown_table(results: dict[str, dict[str, Any]], learned: list[str]) -> str:
    names = [*learned, *BASELINE_NAMES]
    header = ["problem", *(f"LSTM `{n}`" for n in learned), *(LABELS[b] for b in BASELINE_NAMES),
              *(f"`{n}` / best baseline" for n in learned)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    for title, r in results.items():
        best = best_baseline(r)
        best_mean = mean_sem(finals(r, best))[0]
        cells = [title]
        for n in names:
            m, s = mean_sem(finals(r, n))
            lr = r["lrs"][n]
            text = f"{m:.4f} ± {s:.4f}" if math.isfinite(m) else "diverged"
            if lr is not None:
                text += f" (lr {lr:.3g}{', edge' if n in r['grid_edge'] else ''})"
            cells.append(f"**{text}**" if n == best else text)
        cells += [f"{mean_sem(finals(r, n))[0] / best_mean:.3f}" for n in learned]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def plot_curves(panels: dict[str, dict[str, Any]], learned: list[str], path: Path) -> Path:
    """One panel per problem: mean full-data loss (log scale) against step, as the paper's Figures 4 and 5."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (title, r) in zip(axes[0], panels.items(), strict=True):
        for name in BASELINE_NAMES:
            c = torch.tensor(r["curves"][name], dtype=torch.float64).mean(0)
            ax.plot(c.clamp_min(1e-6).numpy(), color=COLORS[name], lw=1.4,
                    label=f"{LABELS[name]} (lr {r['lrs'][name]:.2g})")
        for i, name in enumerate(learned):
            c = torch.tensor(r["curves"][name], dtype=torch.float64).mean(0)
            ax.plot(c.clamp_min(1e-6).numpy(), color=LEARNED_COLORS[i], lw=2.2, label=f"LSTM `{name}`")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("full-data loss (test digits)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_fig6(grid: dict[tuple[int, int], dict[str, Any]], learned: list[str], path: Path) -> Path:
    """Final loss against width, one panel per depth: learned (solid) vs tuned baselines (dashed)."""
    plt = _plt()
    depths = sorted({d for _, d in grid})
    fig, axes = plt.subplots(1, len(depths), figsize=(4.3 * len(depths), 3.6), squeeze=False, sharey=True)
    for ax, depth in zip(axes[0], depths, strict=True):
        widths = sorted(w for w, d in grid if d == depth)
        for name in BASELINE_NAMES:
            ys = [mean_sem(finals(grid[(w, depth)], name))[0] for w in widths]
            ax.plot(widths, ys, "--", color=COLORS[name], marker="o", ms=3, lw=1.2, label=LABELS[name])
        for i, name in enumerate(learned):
            ys = [mean_sem(finals(grid[(w, depth)], name))[0] for w in widths]
            ax.plot(widths, ys, "-", color=LEARNED_COLORS[i], marker="o", ms=4, lw=2.2, label=f"LSTM `{name}`")
        if depth == BASE.depth:
            ax.axvline(BASE.width, color="grey", ls=":", lw=1)  # where the rule was meta-trained
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.xaxis.set_minor_locator(matplotlib_ticker().NullLocator())
        ax.set_title(f"{depth} hidden layer{'s' if depth > 1 else ''} (sigmoid)", fontsize=10)
        ax.set_xlabel("hidden units")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("final loss (step 100)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_weights = [w for w in ("mnist", "mnist_mix") if w in available()]
    parser.add_argument("--weights", nargs="+", default=default_weights,
                        help="shipped names or .safetensors/.ckpt paths (default: the shipped mnist rules)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "mnist"))
    parser.add_argument("--num-val", type=int, default=4, help="validation tasks the baselines are tuned on")
    parser.add_argument("--num-test", type=int, default=10, help="test tasks (seeds) every curve averages over")
    parser.add_argument("--figures", default="4,5,6", help="comma-separated subset of 4,5,6")
    parser.add_argument("--fig6-widths", default=",".join(map(str, FIG6_WIDTHS)))
    parser.add_argument("--fig6-depths", default=",".join(map(str, FIG6_DEPTHS)))
    parser.add_argument("--lr-grid", type=lambda v: [float(x) for x in v.split(",") if x], default=list(DEFAULT_LR_GRID),
                        help="comma-separated learning rates the baselines are tuned over (default: 10^-5 ... 10, 25 values)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=str(ROOT / "runs" / "mnist_figures" / "cache"),
                        help="per-problem results are reused from here ('' disables)")
    parser.add_argument("--wandb", default="offline", choices=("offline", "online", "disabled"))
    parser.add_argument("--wandb-dir", default=str(ROOT / "runs" / "mnist_figures"))
    args = parser.parse_args(argv)
    if not args.weights:
        raise SystemExit("no learned rule to compare: pass --weights NAME_OR_PATH (no `mnist` weights are shipped)")
    assert set(BASELINE_NAMES) <= set(BASELINES)
    torch.set_num_threads(args.threads)
    rules, digests = load_rules(args.weights)
    learned = list(rules)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    figures = {int(f) for f in args.figures.split(",") if f}
    results: dict[str, dict[str, Any]] = {}
    plots: dict[str, Path] = {}

    def run(title: str, problem: Problem) -> dict[str, Any]:
        results[title] = run_problem(problem, rules, digests, args, cache_dir)
        return results[title]

    start = time.perf_counter()
    if 4 in figures:
        plots["fig4"] = plot_curves({t: run(t, p) for t, p in FIG4.items()}, learned, out / "fig4.png")
    if 5 in figures:
        plots["fig5"] = plot_curves({t: run(t, p) for t, p in FIG5.items()}, learned, out / "fig5.png")
    if 6 in figures:
        grid = {}
        for d in (int(x) for x in args.fig6_depths.split(",")):
            for w in (int(x) for x in args.fig6_widths.split(",")):
                grid[(w, d)] = run(f"{w} units x {d} layer{'s' if d > 1 else ''} (Fig. 6)", Problem(width=w, depth=d))
        plots["fig6"] = plot_fig6(grid, learned, out / "fig6.png")

    rows = summary_rows(results, learned)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with (out / "curves.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["problem", "optimizer", "step", "mean_loss"])
        for title, r in results.items():
            for name, per_seed in r["curves"].items():
                mean = torch.tensor(per_seed, dtype=torch.float64).mean(0)
                writer.writerows([title, name, s, f"{float(v):.6g}"] for s, v in enumerate(mean))
    table = markdown_table(results, learned)
    (out / "results.md").write_text(
        f"Mean full-data loss on held-out test digits at the last step (± standard error over {args.num_test} "
        f"seeds); baselines at their learning rate tuned per problem on {args.num_val} validation tasks "
        f"(bold: best baseline). Weights: {', '.join(f'`{k}` ({v})' for k, v in digests.items())}.\n\n{table}\n")
    (out / "results.json").write_text(json.dumps({"weights": digests, "num_val": args.num_val,
                                                  "num_test": args.num_test, "results": results}) + "\n")
    print(table)
    print(f"\n{time.perf_counter() - start:.0f} s; wrote {', '.join(str(p) for p in plots.values())}, "
          f"{out / 'results.md'}, {out / 'results.csv'}, {out / 'curves.csv'}")
    if args.wandb != "disabled":
        import wandb

        Path(args.wandb_dir).mkdir(parents=True, exist_ok=True)
        run_ = wandb.init(project="lightning_l2l", name="mnist_figures", mode=args.wandb, dir=args.wandb_dir,
                          config={"weights": digests, "num_val": args.num_val, "num_test": args.num_test})
        run_.log({**{f"mnist/{k}": wandb.Image(str(p)) for k, p in plots.items()},
                  "mnist/results": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        run_.finish()


if __name__ == "__main__":
    main()
