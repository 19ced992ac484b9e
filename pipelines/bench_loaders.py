"""Loader benchmark: the plain torchvision baseline, our torchvision loader, DALI on CPU and GPU.

Every loader reads the same files in the same order (the file list repeated ``repeats``
times), applies the full training augmentation and delivers float32 N x 3 x 224 x 224 batches
(on the GPU for DALI GPU, on the CPU otherwise).  Images per second exclude the first batch of
each worker (worker and pipeline start-up; ``pipelines.bench.warmup_batches``).  Run through ``python -m pipelines.bench --sections loaders``.
"""
from __future__ import annotations

import logging
import math
import os

import torch

from .bench import folder_dataset, loader_images_per_s, repeated_sampler
from .loaders import TorchvisionLoader
from .transforms import DEFAULT_TOOLCHAIN, get_toolchain

logger = logging.getLogger(__name__)


def torchvision_loader(files: list[str], order: list[int], toolchain: str, batch_size: int,
                       workers: int, shared_batches: bool, device: torch.device | str = "cpu") -> TorchvisionLoader:
    """``shared_batches``: our reused shared batches (``pipelines.shared_batches``), or DataLoader's
    own batch transport, as users write it (the plain baseline); batches delivered on ``device``."""
    chain = get_toolchain(toolchain)
    return TorchvisionLoader(folder_dataset(files, chain.loader, chain.train), order,
                             batch_size=batch_size, num_workers=workers, shared_batches=shared_batches,
                             device=device)


def dali_loader(files: list[str], order: list[int], batch_size: int, workers: int, device_id: int | None):
    from .dali import DaliLoader

    return DaliLoader(files, [0] * len(files), order, batch_size=batch_size, augment=True, seed=0,
                      device_id=device_id, num_threads=workers)


def dali_importable() -> bool:
    """Whether DALI imports; when not, says that the DALI rows are skipped."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        logger.warning("DALI not installed: DALI rows skipped (pip install '.[dali]')")
        return False
    return True


def loader_factories(workers: int) -> dict[str, object]:
    """name -> factory(files, order, batch_size); DALI entries only where DALI imports."""
    factories = {
        "torchvision plain (PIL + transforms as listed)":
            lambda f, o, b: torchvision_loader(f, o, "plain", b, workers, shared_batches=False),
        f"torchvision ours ({DEFAULT_TOOLCHAIN}), DataLoader's batch transport":
            lambda f, o, b: torchvision_loader(f, o, DEFAULT_TOOLCHAIN, b, workers, shared_batches=False),
        f"torchvision ours ({DEFAULT_TOOLCHAIN})":
            lambda f, o, b: torchvision_loader(f, o, DEFAULT_TOOLCHAIN, b, workers, shared_batches=True),
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


def failure(err: BaseException) -> str:
    """One line for a benchmark row: the exception's type and the start of its message."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:160]}"


def cached_rows(ds_name: str, files: list[str], batch_sizes: list[int], repeats: int, workers: int,
                baselines: dict[int, float]) -> list[dict]:
    """The decoded-cache loaders (DALI CPU and our chain over one cache, filled once), with x_plain."""
    try:
        from .decoded_cache import bench_cached_loaders
    except ImportError:
        return []
    rows = bench_cached_loaders(files, batch_sizes, repeats, workers, include_uncached=False)
    for r in rows:
        r["data"] = ds_name
        if r["batch"] in baselines:
            r["x_plain"] = r["images_per_s"] / baselines[r["batch"]]
    return rows
