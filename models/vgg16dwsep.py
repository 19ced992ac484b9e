"""VGG16DWSep: a VGG16-like network whose convolutions after the first block are depthwise
separable, plus helpers to load the first two ImageNet VGG16 convolutions and to count
parameters."""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch
import torchvision
from torch import nn

logger = logging.getLogger(__name__)

POOLINGS = 4
"""Number of 2x2 max-poolings: the feature map side is input_size / 2**POOLINGS."""

FEATURE_CHANNELS = 512

PRETRAINED_CONV_KEYS = ("features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias")
"""The keys of torchvision's VGG16 state dict that `load_vgg16_first_convs` copies."""


class DWSepConv2d(nn.Module):
    """Depthwise (one k x k filter per input channel) then pointwise (1x1) convolution.

    There is no activation between the two: the network applies ReLU after the module.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, padding: int, bias: bool = True
    ) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, kernel_size, stride=1, padding=padding, groups=in_channels, bias=bias
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


@dataclass(frozen=True)
class _Block:
    out_channels: int
    convs: int
    batch_norm: bool
    """BatchNorm2d after each ReLU except the last one of the block."""
    separable: bool
    """Whether the block uses DWSepConv2d (when the network is built separable)."""


_BLOCKS = (
    _Block(64, 2, batch_norm=False, separable=False),
    _Block(128, 2, batch_norm=False, separable=True),
    _Block(256, 3, batch_norm=True, separable=True),
    _Block(FEATURE_CHANNELS, 3, batch_norm=True, separable=True),
)


def _conv3x3(in_channels: int, out_channels: int, separable: bool) -> nn.Module:
    if separable:
        return DWSepConv2d(in_channels, out_channels, kernel_size=3, padding=1)
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


def _make_features(separable: bool) -> nn.Sequential:
    """Conv -> ReLU [-> BatchNorm2d] per convolution, MaxPool2d(2, 2) after each block.

    The first block is always two plain Conv2d, so they are ``features.0`` and ``features.2``
    as in torchvision's vgg16 and can take its ImageNet weights.
    """
    layers: list[nn.Module] = []
    in_channels = 3
    for block in _BLOCKS:
        for index in range(block.convs):
            if index > 0 and block.batch_norm:
                layers.append(nn.BatchNorm2d(in_channels))
            layers.append(_conv3x3(in_channels, block.out_channels, separable and block.separable))
            layers.append(nn.ReLU(inplace=True))
            in_channels = block.out_channels
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def _make_classifier(in_features: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 1024),
        nn.ReLU(inplace=True),
        nn.Dropout(0.7),
        nn.Linear(1024, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    )


class VGG16DWSep(nn.Module):
    """VGG16-like classifier; ``separable=False`` builds it with plain 3x3 convolutions
    everywhere, for parameter and cost comparisons."""

    def __init__(self, num_classes: int = 2, input_size: int = 224, separable: bool = True) -> None:
        super().__init__()
        side = 2**POOLINGS
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0 or input_size % side:
            raise ValueError(f"input_size must be a positive multiple of {side}, got {input_size!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.input_size = input_size
        self.separable = separable
        self.features = _make_features(separable)
        self.classifier = _make_classifier(FEATURE_CHANNELS * (input_size // side) ** 2, num_classes)
        initialise(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"expected N x 3 x {self.input_size} x {self.input_size} input, got {tuple(x.shape)}"
            )
        return self.classifier(self.features(x))


def initialise(model: nn.Module) -> None:
    """torchvision's VGG initialisation, with the depthwise convolutions' own fan-in.

    Full and pointwise convolutions: He normal (fan-out, ReLU gain), bias 0; depthwise: He normal
    over their k x k fan-in with gain 1 (no activation before the pointwise one), bias 0; Linear:
    N(0, 0.01), bias 0; BatchNorm: 1 and 0. PyTorch's default (uniform, variance 1/(3 fan-in), random
    biases) shrinks the signal layer by layer until the biases swamp it: at the first BatchNorm the
    per-channel variance is about 1e-5, the size of its ``eps``, and the image-to-image variation of
    the logits about 1e-8, so the BatchNorm running statistics cannot stand in for the batch
    statistics and the network in eval mode predicted one class for every image (measured on
    chest_xray_224 after one epoch: validation accuracy 0.68 in eval mode, 0.93 with batch
    statistics). ImageNet weights, when loaded, replace the first two convolutions' afterwards.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if module.groups > 1:
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="linear")
            else:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def load_vgg16_first_convs(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy ``features.0`` and ``features.2`` of a torchvision VGG16 state dict into the
    model's parameters of the same names and freeze them (``requires_grad=False``).

    Every key is checked before anything is copied, so a bad state dict leaves the model as it
    was.
    """
    parameters = dict(model.named_parameters())
    for key in PRETRAINED_CONV_KEYS:
        if key not in state_dict:
            raise ValueError(f"VGG16 state dict has no {key!r}")
        if key not in parameters:
            raise ValueError(f"model has no parameter {key!r}")
        expected, got = tuple(parameters[key].shape), tuple(state_dict[key].shape)
        if got != expected:
            raise ValueError(f"shape mismatch for {key!r}: state dict has {got}, model expects {expected}")
    with torch.no_grad():
        for key in PRETRAINED_CONV_KEYS:
            parameters[key].copy_(state_dict[key])
    freeze_first_convs(model)
    logger.info("loaded ImageNet VGG16 %s (frozen)", ", ".join(PRETRAINED_CONV_KEYS))


def freeze_first_convs(model: nn.Module) -> None:
    """Stop the gradient of the two convolutions that come from ImageNet VGG16 (features.0, features.2)."""
    parameters = dict(model.named_parameters())
    for key in PRETRAINED_CONV_KEYS:
        parameters[key].requires_grad_(False)


def _missing_weights_message(url: str, cached_file: Path) -> str:
    return (
        f"ImageNet VGG16 weights not found at {cached_file} (torchvision's cache, "
        f"torch.hub.get_dir()/checkpoints) and they could not be downloaded. On a machine with "
        f"internet, download {url} and copy it to {cached_file}, or pass --vgg16-weights PATH to "
        f"use a local copy, or --no-pretrained to keep them random (and frozen)."
    )


def read_state_dict_file(path: str | os.PathLike[str], what: str) -> dict[str, torch.Tensor]:
    """A torch state dict (``torch.save`` of a dict of tensors, the .pth files torchvision
    publishes) read with ``weights_only=True``; one-line errors for a missing file, a modelo.h5 or
    anything else torch cannot read as one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights file not found: {path}")
    if h5py.is_hdf5(path):  # as models.h5io checks a modelo.h5
        raise ValueError(f"{path} is an HDF5 file (a modelo.h5 of train.py?), not a torch state dict of {what}; "
                         "a modelo.h5 goes to explain.py --model vgg16dwsep --weights, or to train.py "
                         "--eval-only --weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch's own errors: all mean "not a state dict file"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a torch state dict file of {what} ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict (names -> tensors) of {what}")
    return state


def imagenet_vgg16_state_dict(path: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """torchvision's VGG16 ImageNet state dict, from ``path`` when given, else from the torch
    hub cache (downloading when online, as torchvision does).

    Raises FileNotFoundError when the file is missing and cannot be downloaded; it never
    falls back to random weights.
    """
    if path is not None:
        return read_state_dict_file(path, "VGG16")
    weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1
    file_name = os.path.basename(urllib.parse.urlparse(weights.url).path)
    cached_file = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    try:
        return weights.get_state_dict(progress=True, map_location="cpu", weights_only=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        raise FileNotFoundError(_missing_weights_message(weights.url, cached_file)) from error


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer should update (frozen ones left out)."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_table(model: nn.Module) -> list[dict[str, str | int]]:
    """One row ``{name, type, parameters}`` per layer that holds parameters, in model order.

    nn.Sequential containers are opened; any other module (DWSepConv2d included) is one row.
    """
    rows: list[dict[str, str | int]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            qualified = f"{prefix}{name}"
            if isinstance(child, nn.Sequential):
                visit(child, f"{qualified}.")
            elif count_parameters(child):
                rows.append({"name": qualified, "type": type(child).__name__, "parameters": count_parameters(child)})

    visit(model, "")
    return rows
