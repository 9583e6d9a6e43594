"""Learned rule against tuned baselines: curves, a text table, a CSV and a plot in the paper's style."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lightning_l2l.evaluation.baselines import DEFAULT_LR_GRID, PAPER_BASELINES, baseline_curve, tune_baseline
from lightning_l2l.nets import UpdateRule
from lightning_l2l.tasks import Task
from lightning_l2l.trajectory import rule_curve

__all__ = ["Comparison", "compare", "mean_curve", "LEARNED"]

LEARNED = "learned"


def mean_curve(curves: Sequence[Tensor], tasks: Sequence[Task]) -> Tensor:
    """Mean loss per problem over tasks, each task weighted by its number of problems."""
    weights = torch.tensor([float(t.num_problems) for t in tasks])
    stacked = torch.stack([c.double().cpu() for c in curves])  # (tasks, steps + 1)
    return (stacked * weights[:, None]).sum(0) / weights.sum()


@dataclass
class Comparison:
    """Mean loss-per-problem curves of several optimizers on the same test tasks.

    Attributes:
        curves: ``{optimizer: (steps + 1,) curve}``; the learned rule is under ``"learned"``.
        lrs: tuned learning rate per baseline (``None`` for the learned rule).
        grid_edge: baselines whose tuned rate sits at the edge of the grid.
        num_problems: problems (e.g. quadratics) the curves average over.
    """

    curves: dict[str, Tensor]
    lrs: dict[str, float | None] = field(default_factory=dict)
    grid_edge: list[str] = field(default_factory=list)
    num_problems: int = 0

    @property
    def num_steps(self) -> int:
        return len(next(iter(self.curves.values()))) - 1

    def final(self, name: str) -> float:
        return float(self.curves[name][-1])

    def best_baseline(self) -> str:
        names = [n for n in self.curves if n != LEARNED]
        return min(names, key=self.final)

    def ratio(self, name: str = LEARNED) -> float:
        """Final loss of ``name`` over that of the best baseline (below 1: ``name`` wins)."""
        best = self.final(self.best_baseline())
        return self.final(name) / best if best > 0 else math.inf

    def default_steps(self) -> list[int]:
        n = self.num_steps
        return sorted({0, *(s for s in (10, 25, 50, 100, 200) if s < n), n})

    def table(self, steps: Sequence[int] | None = None) -> str:
        """A markdown table: mean loss per problem at chosen steps, and the ratio to the best baseline."""
        steps = list(steps) if steps is not None else self.default_steps()
        best = self.final(self.best_baseline())
        header = ["optimizer", "lr", *(f"step {s}" for s in steps), "final / best baseline"]
        rows = [header, ["---"] * len(header)]
        for name, curve in sorted(self.curves.items(), key=lambda kv: float(kv[1][-1])):
            lr = self.lrs.get(name)
            rows.append(
                [name, "-" if lr is None else f"{lr:.3g}", *(f"{float(curve[s]):.4g}" for s in steps),
                 f"{float(curve[-1]) / best:.3f}" if best > 0 else "inf"]
            )
        return "\n".join("| " + " | ".join(r) + " |" for r in rows)

    def to_csv(self, path: str | Path) -> Path:
        """One row per step, one column per optimizer."""
        path = Path(path)
        names = list(self.curves)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", *names])
            for s in range(self.num_steps + 1):
                writer.writerow([s, *(f"{float(self.curves[n][s]):.6g}" for n in names)])
        return path

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Log-scale loss against step, as in the paper's Figure 4."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        styles = {
            LEARNED: dict(color="tab:orange", lw=2.2, label="LSTM (learned)"),
            "adam": dict(color="tab:green", label="ADAM"),
            "rmsprop": dict(color="tab:purple", label="RMSprop"),
            "nag": dict(color="tab:red", label="NAG"),
            "sgd": dict(color="tab:blue", label="SGD"),
        }
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, curve in self.curves.items():
            style = dict(styles.get(name, {"label": name}))
            lr = self.lrs.get(name)
            if lr is not None:
                style["label"] = f"{style['label']} (lr {lr:.2g})"
            ax.plot(range(len(curve)), curve.double().clamp_min(1e-12).numpy(), **style)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean per problem)")
        if title:
            ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def save(self, directory: str | Path, stem: str = "comparison", title: str = "") -> dict[str, Path]:
        """Write ``STEM.md`` (table), ``STEM.csv`` (curves) and ``STEM.png`` (plot) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        table = directory / f"{stem}.md"
        table.write_text(self.table() + "\n")
        return {"table": table, "csv": self.to_csv(directory / f"{stem}.csv"),
                "plot": self.plot(directory / f"{stem}.png", title)}


def compare(
    rule: UpdateRule | None,
    val_tasks: Sequence[Task],
    test_tasks: Sequence[Task],
    num_steps: int,
    baselines: Sequence[str] = PAPER_BASELINES,
    lr_grid: Sequence[float] = DEFAULT_LR_GRID,
    learned_curves: Sequence[Tensor] | None = None,
    device: torch.device | str | None = None,
) -> Comparison:
    """Tune each baseline on ``val_tasks``, run everything on ``test_tasks``, return the curves.

    Args:
        rule: the learned rule (frozen); ``None`` when ``learned_curves`` are given or to compare
            baselines only.
        learned_curves: already computed curves of the learned rule on ``test_tasks``.
    """
    curves: dict[str, Tensor] = {}
    lrs: dict[str, float | None] = {}
    if learned_curves is None and rule is not None:
        learned_curves = [rule_curve(rule, t, num_steps, device) for t in test_tasks]
    if learned_curves is not None:
        curves[LEARNED] = mean_curve(learned_curves, test_tasks)
        lrs[LEARNED] = None
    edge = []
    for name in baselines:
        tuned = tune_baseline(name, val_tasks, num_steps, lr_grid, device)
        lrs[name] = tuned.lr
        if tuned.at_grid_edge:
            edge.append(name)
        curves[name] = mean_curve([baseline_curve(name, tuned.lr, t, num_steps, device) for t in test_tasks], test_tasks)
    return Comparison(curves, lrs, edge, sum(t.num_problems for t in test_tasks))
