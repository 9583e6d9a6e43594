"""Table and plot of LSTM / LSTM+GAC / NTM-BFGS against tuned baselines on held-out quadratics (docs/gac.md).

    python benchmarks/gac_quadratic.py --runs runs/gac_exp runs/gac_exp_row:over=row --out docs/results/gac

Reads the reports ``l2l test --ckpt_path best`` writes (``comparison.json`` and ``comparison.csv``)
under ``RUNS/seedN/runs/{quadratic,quadratic_gac,quadratic_ntm}/csv/version_*/`` (the latest version
of each), one per meta-training seed and rule, as ``runs/gac_exp/run_jobs.sh``-style runs leave them:
``l2l fit --config configs/{meta,quadratic_gac,quadratic_ntm}.yaml --seed_everything N --model.seed N``,
then ``l2l test`` of that run with ``--seed_everything 0 --model.seed 0``, so that every seed is tested
on the same 256 held-out quadratics against the same tuned baselines. Writes ``gac_quadratic.md``
(ratio to the best tuned baseline at the last step, per seed, mean and worst) and ``gac_quadratic.png``
(mean learning curves; the baselines of one report). ``DIR:NOTE`` labels that directory's rules
with ``NOTE`` (runs with ``--model.rule.init_args.over row``, say).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

RULES = {"quadratic": "LSTM (coordinatewise)", "quadratic_gac": "LSTM+GAC", "quadratic_ntm": "NTM-BFGS"}


def latest_report(run: Path) -> Path | None:
    """The newest ``csv/version_*`` of ``run`` that holds a comparison report."""
    versions = [p for p in (run / "csv").glob("version_*") if (p / "comparison.json").is_file()]
    return max(versions, key=lambda p: int(p.name.split("_")[1]), default=None)


def collect(runs: Path, note: str = "") -> dict[str, dict[int, Path]]:
    """``{label: {seed: report dir}}`` (rules without a report left out)."""
    out: dict[str, dict[int, Path]] = {}
    for name, label in RULES.items():
        for seed_dir in sorted(runs.glob("seed*"), key=lambda p: int(p.name.removeprefix("seed"))):
            report = latest_report(seed_dir / "runs" / name)
            if report is not None:
                out.setdefault(f"{label}, {note}" if note else label, {})[int(seed_dir.name.removeprefix("seed"))] = report
    return out


def curves(report: Path) -> dict[str, list[float]]:
    with open(report / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in rows[0] if k != "step"}


def table(found: dict[str, dict[int, Path]]) -> str:
    lines = [
        "| rule | seeds | ratio to best tuned baseline at the last step, per seed | mean | worst | best baseline (lr) |",
        "|---|---|---|---|---|---|",
    ]
    for label, reports in found.items():
        docs = {seed: json.loads((p / "comparison.json").read_text()) for seed, p in sorted(reports.items())}
        ratios = [d["ratio_to_best_baseline"] for d in docs.values()]
        per_seed = ", ".join(f"{s}: {d['ratio_to_best_baseline']:.3f}" for s, d in docs.items())
        base = {f"{d['best_baseline']} ({d['lrs'][d['best_baseline']]:.3g})" for d in docs.values()}
        lines.append(
            f"| {label} | {len(ratios)} | {per_seed} | {statistics.mean(ratios):.3f} | {max(ratios):.3f} | "
            f"{', '.join(sorted(base))} |"
        )
    return "\n".join(lines)


def plot(found: dict[str, dict[int, Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    baselines = None
    for label, reports in found.items():
        all_curves = [curves(p) for p in reports.values()]
        n = len(all_curves[0]["learned"])
        mean = [statistics.mean(c["learned"][t] for c in all_curves) for t in range(n)]
        ax.plot(mean, label=f"{label} (mean of {len(all_curves)} seeds)", linewidth=2)
        baselines = baselines or all_curves[0]
    for key in ("sgd", "nag", "rmsprop", "adam"):
        if baselines and key in baselines:
            ax.plot(baselines[key], "--", linewidth=1, label=f"{key} (tuned)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean loss on 256 held-out 10-d quadratics")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=["runs/gac_exp"],
                        help="directories holding seedN/ runs, each as DIR or DIR:NOTE")
    parser.add_argument("--out", default="docs/results/gac", help="where to write the table and the plot")
    args = parser.parse_args(argv)
    found: dict[str, dict[int, Path]] = {}
    for item in args.runs:
        path, _, note = item.partition(":")
        found.update(collect(Path(path), note))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(found)
    (out / "gac_quadratic.md").write_text(text + "\n")
    plot(found, out / "gac_quadratic.png")
    print(text)


if __name__ == "__main__":
    main()
