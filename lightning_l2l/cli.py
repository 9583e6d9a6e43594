"""``l2l``: the command line, a ``LightningCLI`` over :class:`~lightning_l2l.meta.MetaLearner`.

    l2l fit --config configs/meta.yaml                      # meta-train
    l2l test --config configs/meta.yaml --ckpt_path best    # learned rule vs tuned baselines
    l2l export --ckpt runs/quadratic/checkpoints/best.ckpt --out my_rule   # .safetensors + .json

``--ckpt_path best`` in a fresh process (where Lightning itself has no best model yet) resolves
to the file the config's ``ModelCheckpoint`` writes, ``DIRPATH/FILENAME.ckpt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lightning_l2l.meta import MetaLearner

__all__ = ["L2LCLI", "main", "run"]


class L2LCLI(LightningCLI):
    """``LightningCLI`` with ``--ckpt_path best`` resolved from the configured ``ModelCheckpoint``.

    Adds ``--torch_num_threads N``: intra-op CPU threads for this run. Meta-training a small rule
    on small tasks is made of thousands of tiny ops, for which one thread is as fast as several on
    an idle machine and many times faster on a busy one (threads spin-wait for each other).
    """

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (LightningArgumentParser)
        parser.add_argument(
            "--torch_num_threads", type=int | None, default=None,
            help="torch.set_num_threads for this run (default: leave torch's choice)",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        threads = config.get("torch_num_threads")
        if threads is not None:
            if threads < 1:
                raise SystemExit(f"--torch_num_threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)

    def _resolve_best(self, subcommand: str) -> None:
        kwargs = self.config_init[subcommand]
        if kwargs.get("ckpt_path") != "best":
            return
        for cb in self.trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.best_model_path:
                return  # Lightning knows the best model of this process
        checkpoints = [cb for cb in self.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
        if not checkpoints or checkpoints[0].dirpath is None or checkpoints[0].filename is None:
            raise SystemExit(
                "--ckpt_path best needs a ModelCheckpoint with fixed `dirpath` and `filename` in the config "
                "(configs/meta.yaml has one); or pass the path of a .ckpt file"
            )
        cb = checkpoints[0]
        path = Path(cb.dirpath) / f"{cb.filename}{cb.FILE_EXTENSION}"
        if not path.is_file():
            raise SystemExit(
                f"--ckpt_path best: no checkpoint at {path}. Meta-train first with `l2l fit --config ...` "
                "using the same config, or pass the path of a .ckpt file"
            )
        kwargs["ckpt_path"] = str(path)

    def before_test(self) -> None:
        self._resolve_best("test")

    def before_validate(self) -> None:
        self._resolve_best("validate")


def run(argv: list[str] | None = None) -> L2LCLI | None:
    """Run ``l2l`` with ``argv``; returns the CLI object (``None`` for ``l2l export``)."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] == "export":
        from lightning_l2l.export import main as export_main

        export_main(words[1:])
        return None
    return L2LCLI(
        MetaLearner,
        args=None if argv is None else words,  # None: LightningCLI reads sys.argv itself
        save_config_kwargs={"overwrite": True},
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``l2l`` (returns nothing: a console script exits with its return value)."""
    run(argv)


if __name__ == "__main__":  # pragma: no cover
    main()
