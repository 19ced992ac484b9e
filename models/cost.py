"""What the separable convolutions save: parameters, and the time of a training step and of inference.

    python train.py --count-params [--device cuda] [--batch-size 16]
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from models.engine import autocast
from models.vgg16dwsep import (VGG16DWSep, count_parameters, freeze_first_convs, parameter_table,
                               trainable_parameters)


def multiply_adds(model: nn.Module, input_size: int = 224) -> int:
    """Multiply-accumulates of one forward pass on one image (convolutions and linear layers)."""
    total = 0

    def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * per_output
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return total


def parameter_summary(input_size: int = 224) -> list[dict[str, object]]:
    """Both variants, built on the meta device (no memory): total, features, classifier, largest layer."""
    rows = []
    for separable in (True, False):
        with torch.device("meta"):
            model = VGG16DWSep(input_size=input_size, separable=separable)
        table = parameter_table(model)
        macs = multiply_adds(model, input_size)
        largest = max(table, key=lambda r: r["parameters"])
        rows.append({
            "variant": "VGG16DWSep (separable)" if separable else "same with Conv2d",
            "parameters": count_parameters(model),
            "features": count_parameters(model.features),
            "classifier": count_parameters(model.classifier),
            "largest layer": f"{largest['name']} ({largest['type']}, {largest['parameters']:,})",
            "GMACs per image": macs / 1e9,
            "share of MACs in the two frozen convs": multiply_adds(model.features[:4], input_size) / macs,
        })
    return rows


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def training_setup(device: torch.device, *, input_size: int = 224, separable: bool = True,
                   channels_last: bool = True, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A seeded VGG16DWSep on ``device`` and its Adam, as training builds them for timing: the two
    ImageNet convolutions frozen (no gradient, not in the optimizer), lr 1e-4, weight decay 1e-5."""
    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = VGG16DWSep(input_size=input_size, separable=separable).to(device, memory_format=fmt)
    freeze_first_convs(model)
    return model, torch.optim.Adam(trainable_parameters(model), lr=1e-4, weight_decay=1e-5)


def step_times(separable: bool, device: torch.device, batch_size: int = 16, input_size: int = 224,
               amp_dtype: torch.dtype | None = None, channels_last: bool = False,
               warmup: int = 1, repeats: int = 3, cudnn_benchmark: bool = False) -> dict[str, float]:
    """Seconds per training step (forward, backward, Adam) and per inference batch. ``cudnn_benchmark``
    lets cuDNN time its algorithms on the first calls and keep the fastest (train.py leaves it off: the
    choice may differ from run to run); the setting is put back afterwards."""
    model, optimizer = training_setup(device, input_size=input_size, separable=separable,
                                      channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(batch_size, 3, input_size, input_size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 2, (batch_size,), device=device)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp_dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    def infer() -> None:
        with torch.inference_mode(), autocast(device, amp_dtype):
            model(x)

    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        model.train()
        train_s = time_call(train_step, device, warmup, repeats)
        model.eval()
        infer_s = time_call(infer, device, warmup, repeats)
    finally:
        torch.backends.cudnn.benchmark = before
    return {"train_step_s": train_s, "inference_s": infer_s,
            "train_images_per_s": batch_size / train_s, "inference_images_per_s": batch_size / infer_s}


def timed_precisions(device: torch.device) -> list[tuple[str, dict]]:
    """The precision settings ``train.py --count-params`` times on ``device``: fp32, fp32 +
    channels-last, and where bf16 is native bf16 + channels-last (and with cuDNN's autotuning on CUDA)."""
    from models.engine import bf16_native

    variants = [("fp32", {}), ("fp32 + channels-last", {"channels_last": True})]
    if bf16_native(device):
        variants.append(("bf16 + channels-last", {"amp_dtype": torch.bfloat16, "channels_last": True}))
    if device.type == "cuda":
        variants.append(("bf16 + channels-last + cudnn.benchmark",
                         {"amp_dtype": torch.bfloat16, "channels_last": True, "cudnn_benchmark": True, "warmup": 2}))
    return variants
