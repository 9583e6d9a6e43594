"""Meta-train and test the quadratic optimizer over several seeds; print the table docs/results.md cites.

    python benchmarks/quadratic_seeds.py --seeds 0 1 2 [--out runs/quadratic_seeds]

For each seed: ``l2l fit`` then ``l2l test --ckpt_path best`` with configs/meta.yaml, the seed
changed everywhere it matters (``seed_everything`` for the rule's initialisation, ``model.seed`` for
the training task stream) and the run written to its own directory. The validation and test tasks
come from seed-offset streams; test tasks (2 x 128 quadratics) are never used for training,
early stopping or baseline tuning. Prints one row per seed and the mean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from lightning_l2l.cli import run

ROOT = Path(__file__).resolve().parents[1]


def seed_config(base: dict, seed: int, out: Path) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg["seed_everything"] = seed
    cfg["model"]["seed"] = seed
    cfg["trainer"]["default_root_dir"] = str(out)
    cfg["trainer"]["enable_progress_bar"] = False
    cfg["trainer"]["logger"] = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                 "init_args": {"save_dir": str(out), "name": "csv"}}]
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(out / "checkpoints")
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default=str(ROOT / "configs" / "meta.yaml"))
    parser.add_argument("--out", default="runs/quadratic_seeds")
    args = parser.parse_args()
    base = yaml.safe_load(Path(args.config).read_text())
    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        config = out / "config.yaml"
        config.write_text(yaml.safe_dump(seed_config(base, seed, out)))
        start = time.perf_counter()
        run(["fit", "--config", str(config)])
        fit_s = time.perf_counter() - start
        cli = run(["test", "--config", str(config), "--ckpt_path", "best"])
        c = cli.model.comparison
        rows.append({"seed": seed, "fit_s": fit_s, "learned": c.final("learned"), "best": c.best_baseline(),
                     "best_final": c.final(c.best_baseline()), "ratio": c.ratio(), "best_lr": c.lrs[c.best_baseline()]})
    print(f"\nQuadratics: learned rule vs best tuned baseline at step 100, 256 held-out quadratics per seed "
          f"({args.config})\n")
    print("| seed | meta-train wall time (s) | learned loss @100 | best baseline | its loss @100 | ratio |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['seed']} | {r['fit_s']:.0f} | {r['learned']:.4f} | {r['best']} (lr {r['best_lr']:.3g}) "
              f"| {r['best_final']:.4f} | {r['ratio']:.3f} |")
    ratios = [r["ratio"] for r in rows]
    spread = f" ± {statistics.stdev(ratios):.3f}" if len(ratios) > 1 else ""
    print(f"| mean | | | | | {statistics.mean(ratios):.3f}{spread} |")


if __name__ == "__main__":
    main()
