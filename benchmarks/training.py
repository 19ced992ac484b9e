"""Training fed by each loader, against training on the same batches already on the device.

The question a loader has to answer on a GPU machine is not its images per second alone but
whether the training step waits for it.  Each row trains VGG16DWSep as ``train.py`` does (first
two convolutions frozen, Adam, bf16 autocast + channels-last where native) through the training
loop itself, ``models.engine.train_one_epoch``, for the same number of steps at the same batch
size on the same files: first on batches made beforehand and held in the device's memory (the
ceiling: no loading at all), then fed by our torchvision loader and by DALI (GPU where CUDA is,
CPU otherwise).  ``x_resident`` is each row's images per second over the ceiling's; the issue's
target is DALI at 0.9 or more on one H200.  Where the loop reads its loss on the host every k > 1
batches (on a GPU: ``models.engine.loss_check_interval``), a second row trains on the resident
batches reading it after every batch, as the loop did before: what that per-step wait costs.  The
first steps of every row (worker and pipeline start-up, cuDNN's first calls, the batches workers
hold ready) are trained but not timed.

    python -m benchmarks --sections training [--train-steps 200] [--train-batch-size 16]
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable

import torch

from benchmarks.common import failure, repeated_sampler
from benchmarks.loaders import dali_importable, dali_loader, torchvision_loader
from models.cost import training_setup
from models.engine import loss_check_interval, precision_label, precision_options, train_one_epoch
from pipelines.transforms import DEFAULT_TOOLCHAIN

logger = logging.getLogger(__name__)

PREFETCH_FACTOR = 2  # batches each DataLoader worker holds ready (DataLoader's default, which our loader keeps)

RESIDENT = "same batches, already on the device"
RESIDENT_EVERY_STEP = RESIDENT + ", loss read every batch"

Batch = tuple[torch.Tensor, torch.Tensor]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_training(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Batch],
                   device: torch.device, warmup: int, steps: int, opts: dict,
                   check_every: int | None = None) -> tuple[int, float]:
    """Train on the first ``warmup`` batches untimed, then on the next ``steps`` timed; return
    (images, seconds) of the timed ones.  The iterator is run to its end after the clock stops
    (DataLoader joins its workers there).  ``train_one_epoch`` raises ValueError when no batch
    is left to time; ``check_every`` goes to it."""
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 step, got {warmup}")
    it = iter(batches)
    train_one_epoch(model, itertools.islice(it, warmup), optimizer, device, epoch=0, progress=False,
                    check_every=check_every, **opts)
    synchronize(device)
    start = time.perf_counter()
    images = train_one_epoch(model, itertools.islice(it, steps), optimizer, device, epoch=0, progress=False,
                             check_every=check_every, **opts)["images"]
    synchronize(device)
    seconds = time.perf_counter() - start
    for _ in it:  # nothing left but the loader's end of epoch
        pass
    return images, seconds


def feeding_loaders(workers: int, device: torch.device) -> dict[str, Callable[[list[str], list[int], int], Iterable[Batch]]]:
    """name -> factory(files, order, batch_size) of a loader delivering training batches on ``device``."""
    factories: dict[str, Callable] = {
        f"torchvision ours ({DEFAULT_TOOLCHAIN})":
            lambda f, o, b: torchvision_loader(f, o, DEFAULT_TOOLCHAIN, b, workers, device=device),
    }
    if not dali_importable():
        return factories
    on_gpu = device.type == "cuda"
    factories[f"DALI {'GPU' if on_gpu else 'CPU'}"] = \
        lambda f, o, b: dali_loader(f, o, b, workers, (device.index or 0) if on_gpu else None)
    return factories


def bench_training_feed(files: list[str], batch_size: int, steps: int, workers: int, device: torch.device,
                        warmup: int = 5, use_amp: bool = True, check_every: int | None = None) -> list[dict]:
    """One row per feed: the resident batches first (made by our torchvision loader, then moved to
    the device), then each loader of ``feeding_loaders``; ``steps`` timed steps each.

    Every feed first trains ``max(warmup, PREFETCH_FACTOR x workers)`` steps untimed: DataLoader
    workers hold up to PREFETCH_FACTOR batches each ready, made during start-up and the first slow
    steps, which would otherwise come free in the timed ones.  A loader slower than training can
    still be ahead by part of that buffer when the clock starts: its figure may be high by up to
    ``PREFETCH_FACTOR x workers / steps`` (so give ``steps`` well above that).

    ``check_every`` (default ``loss_check_interval``'s for the device) is how often every row reads its
    loss on the host; when it is above 1 the resident batches get a second row with 1, right after the
    first."""
    opts = precision_options(device, use_amp)
    model, optimizer = training_setup(device, channels_last=opts["channels_last"])
    factories = feeding_loaders(workers, device)
    warmup = max(warmup, PREFETCH_FACTOR * workers)
    n_batches = warmup + steps
    order = repeated_sampler(len(files), math.ceil(n_batches * batch_size / len(files)))[: n_batches * batch_size]
    maker = next(iter(factories.values()))
    resident = [(x.to(device).clone(), y.to(device).clone()) for x, y in maker(files, order, batch_size)]
    every = loss_check_interval(device, check_every)
    feeds: dict[str, Callable[[], Iterable[Batch]]] = {RESIDENT: lambda: resident}
    if every > 1:
        feeds[RESIDENT_EVERY_STEP] = lambda: resident
    feeds |= {name: (lambda factory=factory: factory(files, order, batch_size)) for name, factory in factories.items()}
    base = {"batch": batch_size, "steps": steps, "warmup": warmup, "workers": workers,
            "precision": precision_label(opts), "device": str(device)}
    rows: list[dict] = []
    ceiling: float | None = None  # set by the resident row, which comes first
    for name, make in feeds.items():
        row_every = 1 if name == RESIDENT_EVERY_STEP else every
        row = base | {"feed": name, "check_every": row_every}
        try:
            images, seconds = timed_training(model, optimizer, make(), device, warmup, steps, opts, row_every)
        except Exception as err:  # noqa: BLE001 - one failing back end must not cost the other rows
            logger.exception("training fed by %s failed", name)
            rows.append(row | {"images_per_s": None, "x_resident": None, "error": failure(err)})
            continue
        ips = images / seconds
        if name == RESIDENT:
            ceiling = ips
        rows.append(row | {"images": images, "images_per_s": ips, "x_resident": ips / ceiling if ceiling else None})
        logger.info("training fed by %s, batch %d: %.1f img/s", name, batch_size, ips)
    return rows
