"""Parameter and multiply-add counts of both variants, against hand-computed values."""
from __future__ import annotations

import torch
from torch import nn

from models.cost import multiply_adds, parameter_summary, step_times
from models.vgg16dwsep import DWSepConv2d


def test_multiply_adds_of_known_layers():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert multiply_adds(conv, 16) == 16 * 16 * 8 * 3 * 9
    dw = DWSepConv2d(4, 8, 3, padding=1)
    x_macs = 10 * 10 * 4 * 9 + 10 * 10 * 8 * 4  # depthwise + pointwise
    assert multiply_adds(nn.Sequential(nn.Conv2d(3, 4, 1), dw), 10) == 10 * 10 * 4 * 3 + x_macs


def hand_macs(separable: bool) -> int:
    """VGG16DWSep at 224, layer by layer (block 1 is always two full 3x3 convolutions)."""
    def conv(cin, cout, side):
        return side * side * (cin * 9 + cin * cout) if separable else side * side * cin * cout * 9
    total = 224 * 224 * 64 * 3 * 9 + 224 * 224 * 64 * 64 * 9
    total += conv(64, 128, 112) + conv(128, 128, 112)
    total += conv(128, 256, 56) + 2 * conv(256, 256, 56)
    total += conv(256, 512, 28) + 2 * conv(512, 512, 28)
    return total + 512 * 14 * 14 * 1024 + 1024 * 512 + 512 * 2


def test_summary_matches_hand_counts():
    sep, std = parameter_summary()
    assert sep["GMACs per image"] * 1e9 == hand_macs(True)
    assert std["GMACs per image"] * 1e9 == hand_macs(False)
    assert sep["classifier"] == std["classifier"] == 512 * 14 * 14 * 1024 + 1024 + 1024 * 512 + 512 + 512 * 2 + 2
    assert sep["parameters"] < std["parameters"] and sep["features"] * 8 < std["features"]
    assert "classifier.1" in sep["largest layer"]


def test_step_times_return_positive_rates():
    t = step_times(True, torch.device("cpu"), batch_size=2, input_size=32, repeats=1, warmup=0)
    assert t["train_step_s"] > 0 and t["inference_images_per_s"] > 0


def test_step_times_put_the_cudnn_benchmark_setting_back(monkeypatch):
    seen = []
    real = torch.nn.Conv2d.forward

    def recording(self, x):
        seen.append(torch.backends.cudnn.benchmark)
        return real(self, x)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", recording)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    step_times(True, torch.device("cpu"), batch_size=2, input_size=32, repeats=1, warmup=0, cudnn_benchmark=True)
    assert seen and all(seen)  # set while timing
    assert torch.backends.cudnn.benchmark is False  # and put back
