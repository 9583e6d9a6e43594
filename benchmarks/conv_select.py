"""Choose among candidate conv rules on validation-pool tasks that no checkpoint selection has seen.

    python benchmarks/conv_select.py runs/conv_s1/checkpoints/*.ckpt conv [--problems 10 5 2] [--num-tasks 16]
    python benchmarks/conv_select.py conv --problems 10 5 2 --num-tasks 24 --lrs 1 1.33 1.78 2.37 3.16
    python benchmarks/conv_select.py runs/conv_stage2/checkpoints/best.ckpt --lrs conv=5.62,fc=1.33 conv=3.16,fc=1.78

``MetaLearner`` keeps the checkpoint with the best ``val/final_loss`` on its 4 validation tasks; picked
among 40 validations, that number is optimistic (the band of one run's validations is as wide as the
noise of 4 tasks). This script draws ``--num-tasks`` other networks per problem from the same
validation image pool (a seed stream neither ``MetaLearner`` nor ``benchmarks/conv_compare.py``
uses), runs every candidate and the four baselines at the learning rates ``conv_compare`` tuned
(read from ``--results``), and prints the mean loss at the horizon, the paired difference to the best
of those baselines on these tasks, and on how many tasks a candidate is below it. The test pool stays
untouched for ``conv_compare``'s final report. Only the loss at the horizon is computed (no curves),
and results are cached in ``--cache``.

``--lrs`` runs every candidate at each of these update multipliers (``LearnedOptimizer(lr=...)``,
rows ``WEIGHTS (lr M)``): the calibration of a rule's step size on these tasks, which ``l2l export
--lr M`` then bakes into the weights. With several problems, a last table gives each candidate's
ratio to the best baseline per problem and the worst of them: the candidate (and multiplier) with
the lowest worst ratio is the one that is best everywhere. A multiplier per parameter kind
(``--lrs conv=5.62,fc=1.33``) scales each network of a ``PerKindRule`` on its own; a one-LSTM rule gets
a copy of it per named kind, other kinds at x1 unless ``default=M`` is named too
(:func:`lightning_l2l.nets.scale_rule`; ``l2l export --lr conv=5.62,fc=1.33`` ships it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_l2l.evaluation import (
    baseline_final_loss,
    digest,
    json_cached,
    rule_fingerprint,
)
from lightning_l2l.nets import parse_multiplier, scale_rule
from lightning_l2l.pretrained import resolve, weights_digest
from lightning_l2l.tasks import ConvFamily
from lightning_l2l.trajectory import rule_final_loss

from conv_compare import (  # isort: skip
    BASELINES, LABELS, PROBLEMS, ROOT, TEST_SEED, VAL_SEED, family_args, mean_sem,
)

#: MetaLearner's and conv_compare's validation stream is VAL_SEED; this one is 77 further on
SELECTION_SEED = VAL_SEED + 77


def _spec(multipliers: dict[str, float], fmt: str = ".3g") -> str:
    """``{"conv": 5.62, "fc": 1.33}`` -> ``"conv=5.62,fc=1.33"`` (kinds sorted: one name, one cache key)."""
    return ",".join(f"{kind}={m:{fmt}}" for kind, m in sorted(multipliers.items()))


def _label(multiplier: float | dict[str, float]) -> str:
    """How a multiplier is named in a row: ``1.78`` or ``conv=5.62,fc=1.33``."""
    return _spec(multiplier) if isinstance(multiplier, dict) else f"{multiplier:.3g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("weights", nargs="+", help="shipped names, .safetensors files or MetaLearner .ckpt files")
    parser.add_argument("--problems", type=int, nargs="+", default=[10], choices=sorted(PROBLEMS))
    parser.add_argument("--num-tasks", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--config", default=str(ROOT / "configs" / "conv.yaml"))
    parser.add_argument("--results", default=str(ROOT / "docs" / "results" / "conv" / "results.json"),
                        help="conv_compare's results.json: the baselines' tuned learning rates")
    parser.add_argument("--cache", default=str(ROOT / "runs" / "conv_select_cache"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="image pool of the tasks: val (selection, the default) or test (a confirmation on fresh "
                             "test-pool tasks, with --seed other than conv_compare's test stream)")
    parser.add_argument("--seed", type=int, default=SELECTION_SEED,
                        help=f"seed of the task stream (default {SELECTION_SEED}, the selection stream)")
    parser.add_argument("--lrs", nargs="+", default=["1"],
                        help="update multipliers to run every candidate at (default: 1, the rule as meta-trained); "
                             "or one per parameter kind: conv=5.62,fc=1.33")
    args = parser.parse_args(argv)
    if args.seed in (VAL_SEED, TEST_SEED):
        parser.error(f"--seed {args.seed} is the seed of conv_compare's validation or test tasks: use another stream")
    multipliers = []
    for text in args.lrs:
        try:
            multipliers.append(parse_multiplier(text))
        except ValueError as err:
            parser.error(f"--lrs: {err}")
    labels = [_label(m) for m in multipliers]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        parser.error(f"--lrs: {args.lrs} give the same row ({', '.join(twice)}) more than once; "
                     "give multipliers that differ in their first three digits")
    torch.set_num_threads(args.threads)
    results = json.loads(Path(args.results).read_text())["results"]
    missing = [k for k in args.problems if str(k) not in results]
    if missing:
        parser.error(f"{args.results} has no tuned learning rates for the {missing}-class problems; "
                     "run benchmarks/conv_compare.py for them first")
    what = "selection" if args.split == "val" else "fresh test"
    cache = Path(args.cache)
    base = family_args(Path(args.config))
    # (row name, cache key, rule to run, lr) for every candidate at every multiplier, built once
    runs: list[tuple[str, str, torch.nn.Module, float]] = []
    for weights in args.weights:
        rule, _ = resolve(weights)
        rule.eval().requires_grad_(False)
        prefix = f"rule_{weights_digest(weights)}_{rule_fingerprint(rule)}_"
        for m in multipliers:
            if isinstance(m, dict):  # per kind: the rule scaled network by network (its own fingerprint), at lr 1
                try:
                    scaled = scale_rule(rule, m)
                except ValueError as err:
                    parser.error(f"--lrs {_spec(m)} for {weights}: {err}")
                runs.append((f"{weights} (lr {_label(m)})",
                             f"{prefix}{{ident}}_{rule_fingerprint(scaled)}_lr{_spec(m, '.6g')}", scaled, 1.0))
            elif m == 1.0:  # keeps the cache key (and name) of the runs made before --lrs existed
                runs.append((weights, f"{prefix}{{ident}}", rule, 1.0))
            else:
                runs.append((f"{weights} (lr {_label(m)})", f"{prefix}{{ident}}_lr{m:.6g}", rule, m))
    ratios: dict[str, dict[int, float]] = {}
    for k in args.problems:
        fam = {**base, "classes": PROBLEMS[k], "split": args.split}
        gen = torch.Generator().manual_seed(args.seed)
        tasks = [ConvFamily(**fam).sample(gen) for _ in range(args.num_tasks)]
        ident = digest({"family": fam, "horizon": args.horizon, "num_tasks": args.num_tasks, "seed": args.seed})
        lrs = results[str(k)]["lrs"]
        finals: dict[str, list[float]] = {}
        for name in BASELINES:
            lr = lrs[name]
            finals[f"{LABELS[name]} (lr {lr:.3g})"] = json_cached(
                cache, f"baseline_{name}_{lr:.6g}_{ident}",
                lambda name=name, lr=lr, tasks=tasks: [float(baseline_final_loss(name, lr, t, args.horizon)) for t in tasks])
        best = min(finals, key=lambda n: mean_sem(finals[n])[0])
        for name, key, run, lr in runs:
            finals[name] = json_cached(
                cache, key.format(ident=ident),
                lambda run=run, tasks=tasks, lr=lr: [float(rule_final_loss(run, t, args.horizon, lr=lr)) for t in tasks])
            ratios.setdefault(name, {})[k] = mean_sem(finals[name])[0] / mean_sem(finals[best])[0]
        pool = "validation" if args.split == "val" else "test"
        print(f"\n{k} classes: loss at step {args.horizon} on {args.num_tasks} {what} tasks "
              f"({pool} pool, seed stream {args.seed}); best baseline here: {best}\n")
        print("| optimizer | mean ± s.e.m. | paired difference to the best baseline | tasks below it |")
        print("| --- | ---: | ---: | ---: |")
        for name, values in finals.items():
            m, s = mean_sem(values)
            diff, diff_sem = mean_sem([a - b for a, b in zip(values, finals[best], strict=True)])
            wins = sum(a < b for a, b in zip(values, finals[best], strict=True))
            paired = "-" if name == best else f"{diff:+.4f} ± {diff_sem:.4f}"
            print(f"| {name} | {m:.4f} ± {s:.4f} | {paired} | {'-' if name == best else wins} |", flush=True)
    if len(args.problems) > 1:
        print(f"\nratio of the mean loss at step {args.horizon} to the best baseline's, per problem "
              f"({args.num_tasks} {what} tasks each)\n")
        print(f"| candidate | {' | '.join(f'{k} classes' for k in args.problems)} | worst |")
        print(f"| --- |{' ---: |' * (len(args.problems) + 1)}")
        for name in sorted(ratios, key=lambda n: max(ratios[n].values())):
            cells = " | ".join(f"{ratios[name][k]:.3f}" for k in args.problems)
            print(f"| {name} | {cells} | {max(ratios[name].values()):.3f} |", flush=True)


if __name__ == "__main__":
    main()
