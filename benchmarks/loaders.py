"""Loader benchmark: the plain torchvision baseline, our torchvision loader, DALI on CPU and GPU, the
decoded-cache loaders, and our loader's ``num_workers`` sweep.

Every loader reads the same files in the same order (the file list repeated ``repeats`` times),
applies the full training augmentation and delivers float32 N x 3 x 224 x 224 batches (on the GPU
for DALI GPU, on the CPU otherwise).  Images per second exclude the first batch of each worker
(worker and pipeline start-up; ``benchmarks.common.warmup_batches``).

    python -m benchmarks --sections loaders
    python -m benchmarks --sections workers
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import failure, folder_dataset, loader_images_per_s, repeated_sampler
from pipelines.loaders import LoaderSettings, TorchvisionLoader, cached_view
from pipelines.transforms import DEFAULT_TOOLCHAIN

from benchmarks.toolchains import get_chain

logger = logging.getLogger(__name__)


def torchvision_loader(files: list[str], order: list[int], toolchain: str, batch_size: int,
                       workers: int, device: torch.device | str = "cpu") -> TorchvisionLoader:
    """``TorchvisionLoader`` over ``files`` with ``toolchain``'s decoder and training transform,
    batches delivered on ``device``."""
    chain = get_chain(toolchain)
    return TorchvisionLoader(folder_dataset(files, chain.loader, chain.train), order,
                             batch_size=batch_size, num_workers=workers, device=device)


def dali_loader(files: list[str], order: list[int], batch_size: int, workers: int, device_id: int | None):
    from pipelines.dali import DaliLoader

    return DaliLoader(files, [0] * len(files), order, batch_size=batch_size, augment=True, seed=0,
                      device_id=device_id, num_threads=workers)


def dali_importable() -> bool:
    """Whether DALI imports; when not, says that the DALI rows are skipped."""
    if importlib.util.find_spec("nvidia.dali") is None:
        logger.warning("DALI not installed: DALI rows skipped (pip install '.[dali]')")
        return False
    return True


def bench_workers(files: list[str], workers: list[int], repeats: int, batch_size: int) -> list[dict]:
    """Our loader (the default chain) over ``files`` with each ``num_workers`` value."""
    order = repeated_sampler(len(files), repeats)
    rows = []
    for w in workers:
        ips = loader_images_per_s(torchvision_loader(files, order, DEFAULT_TOOLCHAIN, batch_size, w))
        rows.append({"num_workers": w, "batch_size": batch_size, "images_per_s": ips})
        logger.info("num_workers=%d: %.1f img/s", w, ips)
    return rows


def loader_factories(workers: int) -> dict[str, object]:
    """name -> factory(files, order, batch_size); DALI entries only where DALI imports."""
    factories = {
        "torchvision plain (PIL + transforms as listed)":
            lambda f, o, b: torchvision_loader(f, o, "plain", b, workers),
        f"torchvision ours ({DEFAULT_TOOLCHAIN})":
            lambda f, o, b: torchvision_loader(f, o, DEFAULT_TOOLCHAIN, b, workers),
    }
    if not dali_importable():
        return factories
    factories["DALI CPU"] = lambda f, o, b: dali_loader(f, o, b, workers, None)
    if torch.cuda.is_available():
        factories["DALI GPU"] = lambda f, o, b: dali_loader(f, o, b, workers, 0)
    return factories


def bench_loaders(datasets: dict[str, list[str]], batch_sizes: list[int], repeats: int,
                  workers: int | None = None, min_images: int = 0) -> list[dict]:
    """Every loader of ``loader_factories`` on each data set, ``repeats`` passes over its files, or
    more where needed for ``min_images`` images (a small file set on a many-core machine)."""
    workers = workers or os.cpu_count() or 1
    rows = []
    for ds_name, files in datasets.items():
        passes = max(repeats, math.ceil(min_images / len(files)))
        order = repeated_sampler(len(files), passes)
        baselines: dict[int, float] = {}
        for batch_size in batch_sizes:
            for name, factory in loader_factories(workers).items():
                row = {"data": ds_name, "loader": name, "batch": batch_size, "workers": workers, "images": len(order)}
                try:
                    ips = loader_images_per_s(factory(files, order, batch_size))
                except Exception as err:  # noqa: BLE001 - one failing back end must not cost the other rows
                    logger.exception("%s, %s, batch %d failed", ds_name, name, batch_size)
                    rows.append(row | {"images_per_s": None, "x_plain": None, "error": failure(err)})
                    continue
                baselines.setdefault(batch_size, ips)
                rows.append(row | {"images_per_s": ips, "x_plain": ips / baselines[batch_size]})
                logger.info("%s, %s, batch %d: %.1f img/s", ds_name, name, batch_size, ips)
        try:
            rows += cached_rows(ds_name, files, batch_sizes, passes, workers, baselines)
        except Exception as err:  # noqa: BLE001
            logger.exception("%s, decoded-cache loaders failed", ds_name)
            rows.append({"data": ds_name, "loader": "decoded-cache loaders", "error": failure(err)})
    return rows


def cached_rows(ds_name: str, files: list[str], batch_sizes: list[int], repeats: int, workers: int,
                baselines: dict[int, float]) -> list[dict]:
    """The decoded-cache loaders (DALI CPU and our chain over one cache, filled once), with x_plain;
    none where DALI does not import (the cache decodes with it)."""
    if importlib.util.find_spec("nvidia.dali") is None:
        return []
    rows = bench_cached_loaders(files, batch_sizes, repeats, workers, include_uncached=False)
    for r in rows:
        r["data"] = ds_name
        if r["batch"] in baselines:
            r["x_plain"] = r["images_per_s"] / baselines[r["batch"]]
    return rows


def data_name(files: Sequence[str]) -> str:
    """The data set's name for a benchmark row: the folder holding all the files."""
    return Path(os.path.commonpath([os.path.dirname(f) for f in files])).name


def bench_cached_loaders(files: list[str], batch_sizes: list[int], repeats: int,
                         workers: int, include_uncached: bool = True) -> list[dict]:
    """Images per second, training augmentation, `files` repeated `repeats` times in order:
    DALI on the CPU uncached and cached, and our torchvision chain over the same cache
    (`workers` DALI threads, at least 1, or DataLoader workers). The cache is filled once,
    beforehand, with as many DALI threads; its fill rate is the first row ("cache fill").
    ``include_uncached=False`` leaves out uncached DALI CPU (for callers that measured it already)."""
    from pipelines.dali import DaliLoader
    from pipelines.decoded_cache import DecodedCache

    order = repeated_sampler(len(files), repeats)
    labels = [0] * len(files)
    name = data_name(files)
    threads = max(1, workers)
    cache = DecodedCache(files, num_threads=threads)
    start = time.perf_counter()
    cache.fill()
    fill_s = time.perf_counter() - start
    megabytes = cache.nbytes / 1e6
    logger.info("cache of %d images filled in %.1f s, %.1f MB", len(cache), fill_s, megabytes)
    rows = [{"data": name, "loader": f"cache fill ({megabytes:.0f} MB)", "batch": cache.batch_size,
             "workers": threads, "images": len(files), "images_per_s": len(files) / fill_s}]
    dataset = cached_view(cache, labels, augment=True, settings=LoaderSettings())
    factories = {
        "DALI CPU": lambda b: DaliLoader(files, labels, order, batch_size=b, augment=True,
                                         num_threads=threads),
        "DALI CPU cached": lambda b: DaliLoader(files, labels, order, batch_size=b, augment=True,
                                                num_threads=threads, cache=cache),
        "torchvision ours (cv2) cached": lambda b: TorchvisionLoader(
            dataset, order, batch_size=b, num_workers=workers),
    }
    if not include_uncached:
        del factories["DALI CPU"]
    for batch_size in batch_sizes:
        for loader_name, factory in factories.items():
            ips = loader_images_per_s(factory(batch_size))
            rows.append({"data": name, "loader": loader_name, "batch": batch_size,
                         "workers": workers, "images": len(order), "images_per_s": ips})
            logger.info("%s, %s, batch %d: %.1f img/s", name, loader_name, batch_size, ips)
    return rows
