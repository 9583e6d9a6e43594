"""Conv nets (section 3.3, Figure 7): learned rules against tuned baselines on held-out 10-, 5- and 2-class problems.

    python benchmarks/conv_compare.py \\
        --rule two=runs/conv/checkpoints/best.ckpt:10,5,2 \\
        --rule one=runs/conv_one_lstm/checkpoints/best.ckpt:10,5,2 \\
        --rule sub=runs/conv_sub/checkpoints/best.ckpt:5,2 \\
        --out docs/results/conv

Defaults are the published protocol (docs/results/conv): 4 validation tasks, 32 test tasks per problem.
A rule is ``LABEL=WEIGHTS[:PROBLEMS]``: a shipped name, a ``.safetensors`` file or a ``MetaLearner``
checkpoint, and the problems (numbers of classes) to run it on. The labels of each problem are
:data:`PROBLEMS` (10: all; 5: labels 0-4; 2: labels 2 and 4, Pullover vs Coat, a confusable pair:
the first two labels, T-shirt vs Trouser, are separated by every optimizer to a loss below 1e-3 in
100 steps); its networks, data and evaluation loss are those of ``--config``'s ``test_family``
(configs/conv.yaml: Fashion-MNIST, 3 conv layers of 8 channels), with ``classes`` replaced.

For each problem: every baseline (SGD, NAG, RMSprop, Adam) is tuned on ``--num-val`` validation
tasks (images of the validation pool, seed stream of ``MetaLearner``'s validation tasks) by the
mean loss at the horizon over a half-decade grid that is widened until the best rate is interior,
then refined to a quarter decade; then every optimizer runs on the same ``--num-test`` test tasks
(images of the test pool, which neither meta-training, checkpoint selection nor tuning sees; one
seed per task: network initialisation and minibatch sequence). Losses are the tasks'
``eval_loss`` (the loss on 500 fixed images of the task's pool) at every step.

A learned rule runs as meta-trained (update multiplier 1, the paper's protocol). With ``--tune-rule-lr``
(all rules, or the labels given) it also runs at an update multiplier, ``LearnedOptimizer(lr=...)``,
tuned on the same validation tasks by the same procedure and resolution as the baselines' rates
(quarter decades around 1, widened while the best is at an edge): rows ``LABEL (lr tuned)``, whose
``lr`` column is that multiplier. The baselines get one tuned number each; so does the rule there.

Writes into ``--out``: ``summary.md`` (table: mean ± s.e.m. over test tasks at the horizon, ratio to
the best tuned baseline, the paired difference to it (every optimizer runs on the same test tasks:
mean ± s.e.m. of the per-task differences; a rule beats the baseline clearly where the difference
is below zero by more than two of its standard errors), test tasks won), ``results.json``
(everything, incl. per-task curves), ``curves_<k>class.csv`` (mean curves) and ``figure7.png`` (one panel per problem, log scale).
Baseline tuning and curves are cached in ``--cache`` (keyed by their inputs), so adding a rule
re-runs only that rule.

``--previous docs/results/conv/results.json`` starts from an earlier report of the same protocol
(config family, horizon, numbers of validation and test tasks; anything else is refused): its
baselines' tuning and test curves are taken instead of recomputed (the tasks are the same, and a
re-run on the same kind of CPU reproduces them bit for bit), and its learned rules that no ``--rule``
names again are carried into the new report as they were (``results.json``'s ``meta.rules`` says
which were carried and from where); ``--drop LABEL`` leaves one out. A rule given again with
``--rule`` is run afresh. This is how a new rule joins the published table on a machine that no
longer has the earlier rules' weights. Another CPU runs other float kernels: a trajectory then
departs from the published one in the last bits within a few steps and, the training of a small
conv net being chaotic, ends up to a few percent away at step 100 per task, while means over the
test tasks agree within their standard errors; a rule measured afresh beside carried ones says so.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_l2l.evaluation import (
    PAPER_BASELINES,
    baseline_curve,
    digest,
    json_cached,
    rule_fingerprint,
    tune_baseline,
)
from lightning_l2l.pretrained import resolve, weights_digest
from lightning_l2l.tasks import ConvFamily, Task
from lightning_l2l.trajectory import rule_curve, rule_final_loss

ROOT = Path(__file__).resolve().parents[1]
BASELINES = PAPER_BASELINES
LABELS = {"sgd": "SGD", "nag": "NAG", "rmsprop": "RMSprop", "adam": "ADAM"}
# the seed streams of MetaLearner's validation and test tasks (seed 0)
VAL_SEED, TEST_SEED = 1_000_003, 2_000_003
#: labels of the 10-, 5- and 2-class problems (LSTM-sub, configs/conv_sub.yaml, meta-trains on 5-9)
PROBLEMS = {10: list(range(10)), 5: [0, 1, 2, 3, 4], 2: [2, 4]}
#: suffix of the rows of a learned rule run at a learning-rate multiplier tuned like the baselines' rates
TUNED = " (lr tuned)"
# first guesses of each baseline's half-decade grid (exponents of 10), widened while the best is at an edge
START_GRID = {"sgd": (-1.5, 0.0), "nag": (-2.0, -0.5), "rmsprop": (-3.0, -1.5), "adam": (-2.5, -1.0)}


def family_args(config: Path) -> dict[str, Any]:
    """``init_args`` of the config's ``test_family`` (YAML anchors resolved)."""
    model = yaml.safe_load(config.read_text())["model"]
    return dict(model["test_family"]["init_args"])


def _search(loss_at: Callable[[float], float], start: list[float], widen_by: float, max_widen: int,
            refine_by: float | None = None) -> dict[str, Any]:
    """Grid search over exponents ``e`` of ``10**e``: ``start``, widened by ``widen_by`` while the best is at
    an edge (at most ``max_widen`` times), then ``refine_by`` either side of the best where given.

    ``loss_at(value)`` is the mean loss at the horizon on the validation tasks (non-finite: worst).
    """
    scores: dict[float, float] = {}

    def score(e: float) -> float:
        e = round(e, 2)
        if e not in scores:
            loss = loss_at(10**e)
            scores[e] = loss if math.isfinite(loss) else math.inf
        return scores[e]

    for e in start:
        score(e)
    for _ in range(max_widen):
        best = min(scores, key=scores.get)
        if best == min(scores):
            score(best - widen_by)
        elif best == max(scores):
            score(best + widen_by)
        else:
            break
    if refine_by is not None:
        best = min(scores, key=scores.get)
        score(best - refine_by)
        score(best + refine_by)
    best = min(scores, key=scores.get)
    return {"lr": 10**best, "scores": {f"{10**e:.6g}": s for e, s in sorted(scores.items())},
            "at_edge": best in (min(scores), max(scores))}


def tune(name: str, val: list[Task], horizon: int) -> dict[str, Any]:
    """Half-decade grid widened until the best rate is interior, then the quarter decades around it."""
    lo, hi = START_GRID[name]
    return _search(lambda lr: tune_baseline(name, val, horizon, [lr]).scores[lr],
                   torch.arange(lo, hi + 0.01, 0.5).tolist(), widen_by=0.5, max_widen=6, refine_by=0.25)


def tune_rule_lr(rule: Any, val: list[Task], horizon: int) -> dict[str, Any]:
    """A learned rule's update multiplier (``LearnedOptimizer(lr=...)``) tuned as the baselines' rates are.

    The same search and final resolution as :func:`tune`: quarter decades around 1 (0.32 ... 3.2),
    widened while the best is at an edge, by the mean loss at the horizon on the validation tasks.
    """
    def loss_at(lr: float) -> float:
        return sum(float(rule_final_loss(rule, t, horizon, lr=lr)) for t in val) / len(val)

    return _search(loss_at, [-0.5, -0.25, 0.0, 0.25, 0.5], widen_by=0.25, max_widen=4)


def parse_rule(text: str) -> tuple[str, str, list[int]]:
    label, _, rest = text.partition("=")
    weights, _, problems = rest.rpartition(":") if ":" in rest and rest.rsplit(":", 1)[1].replace(",", "").isdigit() \
        else (rest, "", "")
    return label, weights, [int(k) for k in problems.split(",")] if problems else []


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it, else absolute."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def mean_sem(values: list[float]) -> tuple[float, float]:
    x = torch.tensor(values, dtype=torch.float64)
    if not torch.isfinite(x).all():
        return math.inf, math.nan
    return float(x.mean()), float(x.std() / math.sqrt(len(x))) if len(x) > 1 else 0.0


def plot(results: dict[int, dict[str, Any]], learned: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"sgd": dict(color="tab:blue"), "nag": dict(color="tab:red"), "rmsprop": dict(color="tab:purple"),
              "adam": dict(color="tab:green")}
    learned_styles = [dict(color="tab:orange", lw=2.4), dict(color="black", lw=1.8, ls="--"),
                      dict(color="tab:cyan", lw=2.0, ls="-."), dict(color="tab:brown", lw=1.6, ls=":"),
                      dict(color="tab:olive", lw=1.6, ls=":"), dict(color="tab:pink", lw=1.6, ls=":")]
    names = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}
    fig, axes = plt.subplots(1, len(results), figsize=(4.8 * len(results), 4.0), squeeze=False)
    for ax, (k, r) in zip(axes[0], sorted(results.items(), reverse=True), strict=True):
        for name in BASELINES:
            curve = torch.tensor(r["curves"][name], dtype=torch.float64).mean(0)
            ax.plot(curve.numpy(), lw=1.1, label=f"{LABELS[name]} (lr {r['lrs'][name]:.2g})", **styles[name])
        for i, label in enumerate(learned):
            if label in r["curves"]:
                curve = torch.tensor(r["curves"][label], dtype=torch.float64).mean(0)
                ax.plot(curve.numpy(), label=label, **learned_styles[i % len(learned_styles)])
        ax.set_yscale("log")
        labels = "" if k == 10 else f" (labels {', '.join(map(str, r['classes']))})"
        ax.set_title(f"{names.get(r['dataset'], r['dataset'])}, {k} classes{labels}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss on held-out test tasks (mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_previous(path: Path, family: dict[str, Any], horizon: int, num_val: int,
                  num_test: int) -> tuple[dict[str, Any], str]:
    """An earlier ``results.json``, checked to be of this protocol (else ``SystemExit`` saying what differs),
    and the first 12 hex digits of the sha256 of the bytes it was parsed from (the file is read once)."""
    try:
        data = path.read_bytes()
        previous = json.loads(data)
        meta = previous["meta"]
        if not isinstance(previous["results"], dict):
            raise TypeError("results is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--previous {path}: not a results.json written by conv_compare ({err!r})") from None
    ours = {"family": family, "horizon": horizon, "num_val": num_val, "num_test": num_test}
    differs = [key for key, value in ours.items() if meta.get(key) != value]
    if differs:
        raise SystemExit(f"--previous {path} was run with another protocol ({', '.join(differs)} differ: "
                         f"{ {k: meta.get(k) for k in differs} } here { {k: ours[k] for k in differs} }); "
                         "its numbers cannot join these. Leave --previous out to run everything afresh.")
    return previous, hashlib.sha256(data).hexdigest()[:12]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rule", action="append", default=[], help="LABEL=WEIGHTS[:10,5,2]")
    parser.add_argument("--config", default=str(ROOT / "configs" / "conv.yaml"))
    parser.add_argument("--problems", type=int, nargs="+", default=[10, 5, 2], choices=sorted(PROBLEMS))
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--num-val", type=int, default=4)
    parser.add_argument("--num-test", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "conv"))
    parser.add_argument("--cache", default=str(ROOT / "runs" / "conv_compare_cache"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tune-rule-lr", nargs="*", default=None, metavar="LABEL",
                        help="also run these learned rules (all when no label is given) at an update multiplier "
                             "tuned on the validation tasks as the baselines' rates are")
    parser.add_argument("--plot", nargs="*", default=None, help="labels of the rules to plot (default: all)")
    parser.add_argument("--previous", default=None, metavar="RESULTS_JSON",
                        help="an earlier results.json of the same protocol: reuse its baselines, carry its other rules")
    parser.add_argument("--drop", action="append", default=[], metavar="LABEL",
                        help="with --previous: a rule of the earlier report not to carry over")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, cache = Path(args.out), Path(args.cache) if args.cache else None
    out.mkdir(parents=True, exist_ok=True)
    base = family_args(Path(args.config))
    rules = {}
    learned: dict[str, list[int]] = {}
    for text in args.rule:
        label, weights, problems = parse_rule(text)
        rule, _ = resolve(weights)
        rule = rule.eval().requires_grad_(False)
        # cached curves are keyed by the weights and by what the code computes with them
        rules[label] = (rule, weights_digest(weights), rule_fingerprint(rule))
        learned[label] = problems or list(args.problems)
    unknown = sorted(set(args.tune_rule_lr or ()) - set(rules))
    if unknown:
        parser.error(f"--tune-rule-lr names {unknown}, which are not labels of any --rule (labels: {list(rules)})")
    previous, previous_source = None, None
    if args.previous is not None:
        previous, previous_sha = load_previous(Path(args.previous), base, args.horizon, args.num_val, args.num_test)
        # where carried rows come from, identifiable after this run: --previous may be the results.json it overwrites
        previous_source = f"{_shown(Path(args.previous))} (sha256 {previous_sha})"
    carried: dict[str, Any] = {}  # label -> the previous meta.rules entry, for rules carried over
    if args.drop and previous is None:
        parser.error("--drop leaves out rules carried over from --previous; give --previous too")
    if previous is not None:
        unknown = sorted(set(args.drop) - set(previous["meta"]["rules"]))
        if unknown:
            parser.error(f"--drop {unknown}: no such rule in {args.previous} "
                         f"(its rules: {list(previous['meta']['rules'])})")
        for label, entry in previous["meta"]["rules"].items():
            if label not in rules and label not in args.drop:
                carried[label] = entry
                learned[label] = [int(k) for k, r in previous["results"].items() if label in r["curves"]]
    results: dict[int, dict[str, Any]] = {}
    for k in args.problems:
        start = time.perf_counter()
        fam = {**base, "classes": PROBLEMS[k]}
        ident = {"family": fam, "horizon": args.horizon, "num_val": args.num_val, "num_test": args.num_test}
        val_gen, test_gen = torch.Generator().manual_seed(VAL_SEED), torch.Generator().manual_seed(TEST_SEED)
        val = [ConvFamily(**{**fam, "split": "val"}).sample(val_gen) for _ in range(args.num_val)]
        test = [ConvFamily(**{**fam, "split": "test"}).sample(test_gen) for _ in range(args.num_test)]
        r: dict[str, Any] = {"classes": fam["classes"], "dataset": fam.get("dataset", "fashion_mnist"),
                             "curves": {}, "lrs": {}, "tuning": {}, "val_finals": {}}
        old = None if previous is None else previous["results"].get(str(k))
        for name in BASELINES:
            def run_baseline(name: str = name, val: list[Task] = val, test: list[Task] = test) -> dict[str, Any]:
                tuned = tune(name, val, args.horizon)
                curves = [baseline_curve(name, tuned["lr"], t, args.horizon).tolist() for t in test]
                return {**tuned, "curves": curves}

            if old is not None and name in old["curves"]:
                b = {**old["tuning"][name], "curves": old["curves"][name]}
            else:
                b = json_cached(cache, f"baseline_{name}_{digest(ident)}", run_baseline)
            r["curves"][name], r["lrs"][name] = b["curves"], b["lr"]
            r["tuning"][name] = {key: v for key, v in b.items() if key != "curves"}
            r["val_finals"][name] = [b["scores"][f"{b['lr']:.6g}"]]  # mean over the validation tasks
            print(f"  {k} classes, {name}: lr {b['lr']:.3g}{' (grid edge!)' if b['at_edge'] else ''}", flush=True)
        for label in carried:
            for name in (label, label + TUNED):
                if old is not None and name in old["curves"]:
                    r["curves"][name], r["lrs"][name] = old["curves"][name], old["lrs"][name]
                    r["val_finals"][name] = old["val_finals"][name]
                    if name in old["tuning"]:
                        r["tuning"][name] = old["tuning"][name]
        for label, (rule, wd, fp) in rules.items():
            if k not in learned[label]:
                continue
            r["curves"][label] = json_cached(cache, f"rule_{wd}_{fp}_{digest(ident)}",
                                        lambda rule=rule, test=test: [rule_curve(rule, t, args.horizon).tolist() for t in test])
            r["lrs"][label] = None
            # on the validation tasks too: what choosing among learned rules may look at (never the test)
            r["val_finals"][label] = json_cached(cache, f"val_{wd}_{fp}_{digest(ident)}",
                                            lambda rule=rule, val=val: [float(rule_final_loss(rule, t, args.horizon)) for t in val])
            if args.tune_rule_lr is not None and (not args.tune_rule_lr or label in args.tune_rule_lr):
                def run_tuned(rule: Any = rule, val: list[Task] = val, test: list[Task] = test) -> dict[str, Any]:
                    tuned = tune_rule_lr(rule, val, args.horizon)
                    curves = [rule_curve(rule, t, args.horizon, lr=tuned["lr"]).tolist() for t in test]
                    return {**tuned, "curves": curves}

                t = json_cached(cache, f"rule_tuned_{wd}_{fp}_{digest(ident)}", run_tuned)
                r["curves"][label + TUNED], r["lrs"][label + TUNED] = t["curves"], t["lr"]
                r["tuning"][label + TUNED] = {key: v for key, v in t.items() if key != "curves"}
                r["val_finals"][label + TUNED] = [t["scores"][f"{t['lr']:.6g}"]]
                print(f"  {k} classes, {label}: lr multiplier {t['lr']:.3g}{' (grid edge!)' if t['at_edge'] else ''}",
                      flush=True)
        r["seconds"] = round(time.perf_counter() - start, 1)
        results[k] = r
        print(f"{k} classes done in {r['seconds']} s", flush=True)

    # ---------------------------------------------------------------------------------- report
    rows = []
    lines = [f"| problem | optimizer | test: loss at step {args.horizon} (mean ± s.e.m. over {args.num_test} tasks) | lr | "
             f"/ best tuned baseline | paired difference to best baseline (mean ± s.e.m.) | "
             f"test tasks below best baseline | validation: loss at step {args.horizon} |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k, r in results.items():
        finals = {name: [c[-1] for c in curves] for name, curves in r["curves"].items()}
        best = min(BASELINES, key=lambda b: mean_sem(finals[b])[0])
        best_mean = mean_sem(finals[best])[0]
        order = [n for label in learned for n in (label, label + TUNED) if n in finals]
        order += sorted(BASELINES, key=lambda b: mean_sem(finals[b])[0])
        for name in order:
            m, s = mean_sem(finals[name])
            wins = sum(a < b for a, b in zip(finals[name], finals[best], strict=True))
            # same tasks for every optimizer: the per-task difference is the paired comparison
            diff, diff_sem = mean_sem([a - b for a, b in zip(finals[name], finals[best], strict=True)])
            val_mean = sum(r["val_finals"][name]) / len(r["val_finals"][name])
            row = {"classes": k, "optimizer": name, "final_mean": m, "final_sem": s, "lr": r["lrs"][name],
                   "val_final_mean": val_mean,
                   "ratio_to_best_baseline": m / best_mean, "best_baseline": best,
                   "diff_to_best_baseline_mean": diff, "diff_to_best_baseline_sem": diff_sem,
                   "tasks_below_best_baseline": wins, "num_test_tasks": len(finals[name])}
            rows.append(row)
            lr = "-" if r["lrs"][name] is None else f"{r['lrs'][name]:.3g}"
            shown = LABELS[name] + (" (best)" if name == best else "") if name in BASELINES else name
            won = "-" if name in BASELINES else f"{wins}/{len(finals[name])}"
            paired = "-" if name == best else f"{diff:+.4f} ± {diff_sem:.4f}"
            lines.append(f"| {k} classes | {shown} | {m:.4f} ± {s:.4f} | {lr} | {m / best_mean:.3f} | {paired} | {won} | "
                         f"{val_mean:.4f} |")
        with (out / f"curves_{k}class.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            names = list(r["curves"])
            writer.writerow(["step", *names])
            means = {n: torch.tensor(r["curves"][n], dtype=torch.float64).mean(0) for n in names}
            for step in range(args.horizon + 1):
                writer.writerow([step, *(f"{float(means[n][step]):.6g}" for n in names)])
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    meta = {"rules": {**{label: {**entry, "carried_from": entry.get("carried_from", previous_source)}
                         for label, entry in carried.items()},
                      **{label: {"weights": text.partition("=")[2], "digest": rules[label][1]}
                         for label, text in zip(rules, args.rule, strict=True)}},
            "baselines_from": None if previous is None else (previous["meta"].get("baselines_from")
                                                             or previous_source),
            "config": _shown(Path(args.config)), "family": base,
            "horizon": args.horizon, "num_val": args.num_val, "num_test": args.num_test,
            "machine": platform.processor() or platform.machine(), "threads": args.threads}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "results": results}) + "\n")
    plotted = [n for label in learned for n in (label, label + TUNED) if any(n in r["curves"] for r in results.values())]
    plot(results, plotted if args.plot is None else args.plot, out / "figure7.png")
    print("\n".join(lines))
    print(f"wrote {out}/summary.md, results.json, curves_*class.csv, figure7.png")


if __name__ == "__main__":
    main()
