"""Tests of VGG16DWSep: the separable convolution, the layer table, output and flatten sizes,
parameter counts, loading and freezing the ImageNet convolutions, and the offline error when
the ImageNet weights are missing."""

from __future__ import annotations

import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import (
    DWSepConv2d,
    VGG16DWSep,
    count_parameters,
    imagenet_vgg16_state_dict,
    load_vgg16_first_convs,
    parameter_table,
    trainable_parameters,
)

SMALL = 32
"""A small input_size: the whole model runs in milliseconds."""

TABLE = "C64 C64 M S128 S128 M S256 B S256 B S256 M S512 B S512 B S512 M"
"""The features table: C = Conv2d 3x3, S = DWSepConv2d 3x3 (each followed by ReLU),
B = BatchNorm2d, M = MaxPool2d 2x2 stride 2."""

TORCHVISION_VGG16_SHAPES = {
    "features.0.weight": (64, 3, 3, 3),
    "features.0.bias": (64,),
    "features.2.weight": (64, 64, 3, 3),
    "features.2.bias": (64,),
    "features.5.weight": (128, 64, 3, 3),
    "classifier.6.bias": (1000,),
}
"""Shapes of some keys of torchvision's vgg16 state dict: the four loaded and two others."""


def _sep_params(c_in: int, c_out: int, k: int = 3) -> int:
    return c_in * k * k + c_in + c_in * c_out + c_out


def _conv_params(c_in: int, c_out: int, k: int = 3) -> int:
    return c_in * c_out * k * k + c_out


def _expected_parameters(input_size: int, separable: bool) -> int:
    """Parameter count from the table, computed independently of the model code."""
    total, c_in = 0, 3
    for token in TABLE.split():
        kind, c_out = token[0], int(token[1:] or 0)
        if kind == "C" or (kind == "S" and not separable):
            total, c_in = total + _conv_params(c_in, c_out), c_out
        elif kind == "S":
            total, c_in = total + _sep_params(c_in, c_out), c_out
        elif kind == "B":
            total += 2 * c_in
    flat = 512 * (input_size // 16) ** 2
    return total + flat * 1024 + 1024 + 1024 * 512 + 512 + 512 * 2 + 2


@pytest.fixture(scope="module")
def model_224_run() -> tuple[torch.Tensor, tuple[int, ...]]:
    """One forward of batch 1 at 224 x 224: (logits, features output shape)."""
    torch.manual_seed(0)
    model = VGG16DWSep().eval()
    shapes: list[tuple[int, ...]] = []
    model.features.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    with torch.inference_mode():
        logits = model(torch.rand(1, 3, 224, 224))
    return logits, shapes[0]


# DWSepConv2d


@pytest.mark.parametrize("c_in, c_out, k, pad", [(4, 6, 3, 1), (3, 8, 5, 2), (8, 2, 1, 0)])
def test_dwsep_structure_and_parameter_count(c_in: int, c_out: int, k: int, pad: int) -> None:
    module = DWSepConv2d(c_in, c_out, kernel_size=k, padding=pad)
    assert module.depthwise.groups == c_in
    assert module.depthwise.weight.shape == (c_in, 1, k, k)
    assert module.depthwise.stride == (1, 1)
    assert module.pointwise.weight.shape == (c_out, c_in, 1, 1)
    assert count_parameters(module) == _sep_params(c_in, c_out, k)
    assert count_parameters(DWSepConv2d(c_in, c_out, k, pad, bias=False)) == c_in * k * k + c_in * c_out


def test_dwsep_equals_two_manual_convolutions() -> None:
    torch.manual_seed(0)
    module = DWSepConv2d(5, 7, kernel_size=3, padding=1)
    x = torch.randn(2, 5, 9, 11)
    depthwise = F.conv2d(x, module.depthwise.weight, module.depthwise.bias, padding=1, groups=5)
    expected = F.conv2d(depthwise, module.pointwise.weight, module.pointwise.bias)
    out = module(x)
    assert out.shape == (2, 7, 9, 11)
    torch.testing.assert_close(out, expected)


def test_dwsep_has_no_activation_between_the_convolutions() -> None:
    """Depthwise negates the input, pointwise negates again: only without an activation in
    between does a positive input come back unchanged (a ReLU would give zeros)."""
    module = DWSepConv2d(1, 1, kernel_size=3, padding=1)
    with torch.no_grad():
        module.depthwise.weight.zero_()
        module.depthwise.weight[0, 0, 1, 1] = -1.0
        module.depthwise.bias.zero_()
        module.pointwise.weight.fill_(-1.0)
        module.pointwise.bias.zero_()
    x = torch.rand(1, 1, 6, 6) + 0.5
    torch.testing.assert_close(module(x), x)


# VGG16DWSep structure


def _expected_layers(separable: bool) -> list[tuple[type[nn.Module], int]]:
    """(type, output channels or 0) per features layer, ReLU after every convolution."""
    layers: list[tuple[type[nn.Module], int]] = []
    for token in TABLE.split():
        if token[0] in "CS":
            conv = DWSepConv2d if token[0] == "S" and separable else nn.Conv2d
            layers += [(conv, int(token[1:])), (nn.ReLU, 0)]
        else:
            layers.append((nn.BatchNorm2d if token == "B" else nn.MaxPool2d, 0))
    return layers


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, DWSepConv2d):
        return layer.pointwise.out_channels
    return layer.out_channels if isinstance(layer, nn.Conv2d) else 0


@pytest.mark.parametrize("separable", [True, False])
def test_features_follow_the_table(separable: bool) -> None:
    with torch.device("meta"):
        model = VGG16DWSep(input_size=SMALL, separable=separable)
    got = [(type(layer), _out_channels(layer)) for layer in model.features]
    assert got == _expected_layers(separable)
    for layer in model.features:
        conv = layer.depthwise if isinstance(layer, DWSepConv2d) else layer
        if isinstance(conv, nn.Conv2d):
            assert (conv.kernel_size, conv.padding, conv.stride) == ((3, 3), (1, 1), (1, 1))
        if isinstance(layer, nn.MaxPool2d):
            assert (layer.kernel_size, layer.stride, layer.padding) == (2, 2, 0)
        if isinstance(layer, nn.BatchNorm2d):
            assert layer.num_features in (256, 512)
    assert isinstance(model.features[0], nn.Conv2d) and isinstance(model.features[2], nn.Conv2d)


def test_classifier_follows_the_table() -> None:
    with torch.device("meta"):
        model = VGG16DWSep(num_classes=2, input_size=224)
    kinds = [type(layer) for layer in model.classifier]
    assert kinds == [nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    linears = [(m.in_features, m.out_features) for m in model.classifier if isinstance(m, nn.Linear)]
    assert linears == [(512 * 14 * 14, 1024), (1024, 512), (512, 2)]
    assert [m.p for m in model.classifier if isinstance(m, nn.Dropout)] == [0.7, 0.5]


def test_output_and_flatten_shape_at_224(model_224_run: tuple[torch.Tensor, tuple[int, ...]]) -> None:
    logits, feature_shape = model_224_run
    assert feature_shape == (1, 512, 14, 14)
    assert logits.shape == (1, 2)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("input_size, num_classes", [(SMALL, 2), (64, 3)])
def test_output_shape_at_small_sizes(input_size: int, num_classes: int) -> None:
    model = VGG16DWSep(num_classes=num_classes, input_size=input_size).eval()
    with torch.inference_mode():
        logits = model(torch.rand(3, 3, input_size, input_size))
    assert logits.shape == (3, num_classes)


def test_wrong_input_side_raises_value_error() -> None:
    model = VGG16DWSep(input_size=SMALL)
    with pytest.raises(ValueError, match="32 x 32"):
        model(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("input_size", [0, -16, 100, 225, 224.0])
def test_invalid_input_size_raises(input_size: object) -> None:
    with pytest.raises(ValueError, match="input_size"):
        VGG16DWSep(input_size=input_size)  # type: ignore[arg-type]


# Parameter counts


@pytest.mark.parametrize("input_size", [SMALL, 224])
def test_parameter_counts_separable_and_standard(input_size: int) -> None:
    with torch.device("meta"):
        separable = VGG16DWSep(input_size=input_size)
        standard = VGG16DWSep(input_size=input_size, separable=False)
    assert count_parameters(separable) == _expected_parameters(input_size, separable=True)
    assert count_parameters(standard) == _expected_parameters(input_size, separable=False)
    assert count_parameters(standard) > count_parameters(separable)


def test_parameter_table_locates_the_big_linear() -> None:
    with torch.device("meta"):
        model = VGG16DWSep()
    table = parameter_table(model)
    assert sum(row["parameters"] for row in table) == count_parameters(model)
    biggest = max(table, key=lambda row: row["parameters"])
    assert biggest == {"name": "classifier.1", "type": "Linear", "parameters": 512 * 14 * 14 * 1024 + 1024}
    assert {"name": "features.5", "type": "DWSepConv2d", "parameters": _sep_params(64, 128)} in table


# ImageNet convolutions


def _fake_vgg16_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {key: torch.randn(shape, generator=generator) for key, shape in TORCHVISION_VGG16_SHAPES.items()}


def test_load_first_convs_copies_freezes_and_survives_adam_step() -> None:
    torch.manual_seed(0)
    model = VGG16DWSep(input_size=SMALL)
    state = _fake_vgg16_state_dict()
    load_vgg16_first_convs(model, state)
    frozen = {"features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias"}
    parameters = dict(model.named_parameters())
    for key in frozen:
        assert torch.equal(parameters[key], state[key])
        assert not parameters[key].requires_grad
    trainable_ids = {id(p) for p in trainable_parameters(model)}
    assert trainable_ids == {id(p) for k, p in parameters.items() if k not in frozen}
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - sum(
        parameters[k].numel() for k in frozen
    )

    before = {k: p.detach().clone() for k, p in parameters.items()}
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-4, weight_decay=1e-5)
    loss = F.cross_entropy(model(torch.rand(4, 3, SMALL, SMALL)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    optimizer.step()
    for key in frozen:
        assert parameters[key].grad is None
        assert torch.equal(parameters[key], before[key])
    assert not torch.equal(parameters["features.5.depthwise.weight"], before["features.5.depthwise.weight"])
    assert not torch.equal(parameters["classifier.1.weight"], before["classifier.1.weight"])


@pytest.mark.parametrize("key", ["features.0.weight", "features.2.bias"])
def test_load_first_convs_shape_mismatch_names_the_key(key: str) -> None:
    model = VGG16DWSep(input_size=SMALL)
    before = model.features[0].weight.detach().clone()
    state = _fake_vgg16_state_dict()
    state[key] = torch.zeros(7)
    with pytest.raises(ValueError, match=key):
        load_vgg16_first_convs(model, state)
    assert torch.equal(model.features[0].weight, before)
    assert model.features[0].weight.requires_grad


def test_load_first_convs_missing_key_names_it() -> None:
    state = _fake_vgg16_state_dict()
    del state["features.2.weight"]
    with pytest.raises(ValueError, match="features.2.weight"):
        load_vgg16_first_convs(VGG16DWSep(input_size=SMALL), state)


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty torch hub dir; any download attempt fails as it would offline."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(f"offline test: no download of {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    yield tmp_path
    torch.hub.set_dir(previous)


def test_imagenet_weights_missing_offline_raises_file_not_found(empty_hub: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        imagenet_vgg16_state_dict()
    message = str(info.value)
    assert "--vgg16-weights" in message and "--no-pretrained" in message
    assert str(empty_hub / "checkpoints" / "vgg16-397923af.pth") in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message


def test_imagenet_weights_found_in_hub_cache(empty_hub: Path) -> None:
    state = _fake_vgg16_state_dict()
    (empty_hub / "checkpoints").mkdir()
    torch.save(state, empty_hub / "checkpoints" / "vgg16-397923af.pth")
    loaded = imagenet_vgg16_state_dict()
    assert torch.equal(loaded["features.2.weight"], state["features.2.weight"])


def test_imagenet_weights_from_explicit_path(tmp_path: Path) -> None:
    state = _fake_vgg16_state_dict()
    torch.save(state, tmp_path / "vgg16.pth")
    loaded = imagenet_vgg16_state_dict(tmp_path / "vgg16.pth")
    assert torch.equal(loaded["features.0.weight"], state["features.0.weight"])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        imagenet_vgg16_state_dict(tmp_path / "missing.pth")
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(ValueError, match="notes.pth is not a torch state dict file of VGG16"):
        imagenet_vgg16_state_dict(tmp_path / "notes.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        imagenet_vgg16_state_dict(tmp_path / "list.pth")


def test_initialisation_keeps_the_image_signal_well_above_batch_norm_eps():
    """With PyTorch's default init the first BatchNorm saw a per-channel variance of ~1e-5 (its
    eps) and the logits differed between images by ~1e-8; the VGG-style init keeps both usable."""
    from models.vgg16dwsep import initialise

    torch.manual_seed(0)
    model = VGG16DWSep(input_size=64).eval()
    first_bn = next(m for m in model.features if isinstance(m, torch.nn.BatchNorm2d))
    seen = {}
    first_bn.register_forward_hook(lambda m, inputs, out: seen.setdefault("x", inputs[0]))
    images = torch.rand(8, 3, 64, 64) * torch.linspace(0.3, 1.0, 8).view(8, 1, 1, 1)  # different brightness
    with torch.no_grad():
        logits = model(images)
    assert seen["x"].var(dim=(0, 2, 3)).median() > 10 * first_bn.eps  # default init: ~1 eps
    assert logits.std(dim=0).min() > 1e-4
    depthwise = model.features[5].depthwise
    assert depthwise.weight.std().item() == pytest.approx(1 / 3, rel=0.1)  # fan-in 9, gain 1
    assert all(not m.bias.detach().any() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    initialise(model)  # idempotent in distribution, and callable on its own
