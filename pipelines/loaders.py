"""Loaders: one interface for every back end.

A loader is an iterable of ``(float32 N x 3 x 224 x 224, int64 N)`` on the target device with
``len()`` (batches per epoch) and ``set_epoch(e)``; the training loop never asks which back end
it has.  ``make_loaders`` builds train / validation / test loaders from a ``DatasetIndex``:
train iterates a seeded ``SubsetRandomSampler`` over 80 % of the train folder, validation the
``ReplicarMuestreoDePrueba`` order over the other 20 %, test the test folder in order.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, SequentialSampler

from .data import DatasetIndex, with_transform
from .samplers import ReplicarMuestreoDePrueba, SeededSubsetRandomSampler, ShardedSampler, split_train_val
from .seeds import Stream, derive_seed
from .transforms import DEFAULT_TOOLCHAIN, SIZE, check_eval_gain, get_toolchain

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
BACKENDS = ("torchvision", "dali")


@dataclass(frozen=True)
class LoaderSettings:
    backend: str = "torchvision"
    batch_size: int = 16
    num_workers: int = 2
    seed: int = 0
    toolchain: str = DEFAULT_TOOLCHAIN
    val_fraction: float = 0.2
    train_subset: int | None = None
    rank: int = 0
    world_size: int = 1
    eval_gain: float = 1.0
    decoded_cache: bool = False
    image_size: int = SIZE

    def __post_init__(self) -> None:
        check_eval_gain(self.eval_gain)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown loader back end {self.backend!r}; choose one of {BACKENDS}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class Samplers:
    train_indices: np.ndarray
    val_indices: np.ndarray
    train: Sampler[int]
    val: ReplicarMuestreoDePrueba
    test: Sampler[int]


def stratified_subset(indices: np.ndarray, targets: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` of ``indices``, keeping the class proportions (sorted)."""
    if n >= len(indices):
        return indices
    keep, _ = split_train_val(targets[indices], 1 - n / len(indices), seed)
    return np.sort(indices[keep])


def make_samplers(index: DatasetIndex, seed: int = 0, val_fraction: float = 0.2,
                  train_subset: int | None = None) -> Samplers:
    """The split and the three samplers; ``train_subset`` keeps N train and N/4 validation images.
    Each draws from its own stream of ``seed`` (``pipelines.seeds``)."""
    split_seed = derive_seed(seed, Stream.SPLIT, bits=32)
    train_idx, val_idx = split_train_val(index.train.targets, val_fraction, split_seed)
    targets = np.asarray(index.train.targets)
    if train_subset is not None:
        if train_subset > len(train_idx):
            logger.warning("--train-subset %d: the training split has %d images; all of them are used",
                           train_subset, len(train_idx))
        train_idx = stratified_subset(train_idx, targets, train_subset, split_seed)
        val_idx = stratified_subset(val_idx, targets, max(4, train_subset // 4), split_seed)
    return Samplers(
        train_idx, val_idx,
        train=SeededSubsetRandomSampler(train_idx, seed=derive_seed(seed, Stream.TRAIN_ORDER)),
        val=ReplicarMuestreoDePrueba(index.test.targets, val_idx, targets[val_idx],
                                     seed=derive_seed(seed, Stream.VAL_ORDER)),
        test=SequentialSampler(range(len(index.test))),
    )


def disable_opencv_threads() -> None:
    """Run OpenCV sequentially in this process and in the workers it forks.

    Workers already run in parallel, so OpenCV's pool would only oversubscribe the cores; and a
    worker forked after the parent used that pool deadlocks in its first ``cv2.resize``.
    """
    import cv2

    cv2.setNumThreads(0)


class TorchvisionLoader:
    """A ``DataLoader`` over an ImageFolder and a sampler, delivering batches on ``device``.

    For a CUDA device its pin-memory thread copies each batch to page-locked memory beside the
    training loop, so the copy to the GPU is asynchronous.
    """

    def __init__(self, dataset, sampler: Sampler[int], *, batch_size: int = 16, num_workers: int = 2,
                 device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.device = torch.device(device)
        self.sampler = sampler
        self.seed = seed
        if num_workers > 0:
            disable_opencv_threads()
        self.generator = torch.Generator()
        self.set_epoch(0)
        self.dataloader = DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
            generator=self.generator, pin_memory=self.device.type == "cuda",
            persistent_workers=False, drop_last=False)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (sampler order and worker seeds)."""
        self.generator.manual_seed(derive_seed(self.seed, epoch))
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        non_blocking = self.device.type == "cuda"
        for images, labels in self.dataloader:
            yield images.to(self.device, non_blocking=non_blocking), labels.to(self.device, non_blocking=non_blocking)

    def __len__(self) -> int:
        return len(self.dataloader)


@dataclass
class Loaders:
    train: object
    val: object
    test: object
    samplers: Samplers
    caches: dict = field(default_factory=dict)


def split_cache(index: DatasetIndex, split: str, settings: LoaderSettings, caches: dict):
    """The split's ``DecodedCache``, decoded and resized once (progress bar) and kept in ``caches``.

    Filled here, in the main process, so DataLoader workers forked later share it.
    """
    if not dali_available():
        raise ValueError("--decoded-cache decodes with NVIDIA DALI, which is not installed: "
                         "pip install nvidia-dali-cuda120==2.4.0")
    from .decoded_cache import DecodedCache

    if split not in caches:
        files = [path for path, _ in getattr(index, split).samples]
        caches[split] = DecodedCache(files, size=settings.image_size,
                                     num_threads=max(1, settings.num_workers)).fill(progress=True)
    return caches[split]


def cached_view(cache, targets, augment: bool, settings: LoaderSettings):
    """Our OpenCV chain after its resize, over cached 224 x 224 images."""
    from torchvision.transforms import Compose

    from .decoded_cache import CachedImageDataset

    chain = get_toolchain("cv2", settings.eval_gain, settings.image_size)
    steps = (chain.train if augment else chain.eval).transforms[1:]  # [0] is the resize
    return CachedImageDataset(cache, targets, Compose(steps))


def dali_available() -> bool:
    """Whether NVIDIA DALI imports here."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The loader back end for ``name``: ``auto`` = DALI on CUDA when it imports, else torchvision
    (logged once); ``dali`` where DALI is missing is a ValueError that says how to install it."""
    device = torch.device(device)
    if name == "auto":
        backend = "dali" if device.type == "cuda" and dali_available() else "torchvision"
        logger.info("--loader auto: %s (%s%s)", backend, "CUDA" if device.type == "cuda" else "no CUDA",
                    "" if device.type != "cuda" else (", DALI found" if backend == "dali" else ", DALI not installed"))
        return backend
    if name not in BACKENDS:
        raise ValueError(f"unknown loader {name!r}; choose auto or one of {list(BACKENDS)}")
    if name == "dali" and not dali_available():
        raise ValueError("--loader dali: NVIDIA DALI is not installed; pip install nvidia-dali-cuda120==2.4.0 "
                         "(or the project's extra: pip install -e '.[dali]')")
    return name


#: ``make_loader``'s ``purpose`` of a run's loaders: training, validation (+ the index of its
#: evaluation transform), the test pass, test-time augmentation (+ the number of copies)
PURPOSE_TRAIN, PURPOSE_VAL, PURPOSE_TEST, PURPOSE_TTA = 0, 1, 10, 100


def loader_seed(settings: LoaderSettings, purpose: int = 0) -> int:
    """The seed of a loader's augmentation stream: its own for each DDP rank and each ``purpose``
    (the run's training, validation, test and TTA loaders each pass their own), so no two loaders
    of a run replay each other's draws."""
    return derive_seed(settings.seed, Stream.LOADER, settings.rank, purpose, bits=31)


def make_loader(index: DatasetIndex, split: str, sampler: Sampler[int], *, augment: bool,
                settings: LoaderSettings, device: torch.device | str = "cpu", caches: dict | None = None,
                purpose: int = 0):
    """One loader of the chosen back end over ``index.<split>`` in ``sampler``'s order.

    Under DistributedDataParallel (``world_size > 1``) it delivers this rank's share of that order.
    With ``settings.decoded_cache`` the files are decoded and resized once (``caches`` keeps them
    between loaders of the same split) and every epoch starts from the cached images.
    """
    dataset = getattr(index, split)
    if settings.world_size > 1:
        sampler = ShardedSampler(sampler, settings.rank, settings.world_size)
    cache = split_cache(index, split, settings, {} if caches is None else caches) if settings.decoded_cache else None
    if settings.backend == "dali":
        from .dali import DaliLoader

        device = torch.device(device)
        files = [path for path, _ in dataset.samples]
        return DaliLoader(files, dataset.targets, sampler, batch_size=settings.batch_size,
                          augment=augment, seed=loader_seed(settings, purpose),
                          eval_gain=settings.eval_gain, cache=cache,
                          device_id=(device.index or 0) if device.type == "cuda" else None,
                          num_threads=max(1, settings.num_workers), size=settings.image_size)
    if cache is not None:
        view = cached_view(cache, dataset.targets, augment, settings)
    else:
        chain = get_toolchain(settings.toolchain, settings.eval_gain, settings.image_size)
        view = with_transform(dataset, chain.train if augment else chain.eval)
        view.loader = chain.loader
    return TorchvisionLoader(view, sampler, batch_size=settings.batch_size, num_workers=settings.num_workers,
                             device=device, seed=loader_seed(settings, purpose))


def make_loaders(index: DatasetIndex, settings: LoaderSettings = LoaderSettings(),
                 device: torch.device | str = "cpu") -> Loaders:
    samplers = make_samplers(index, settings.seed, settings.val_fraction, settings.train_subset)
    caches: dict = {}
    kw = dict(settings=settings, device=device, caches=caches)
    return Loaders(
        train=make_loader(index, "train", samplers.train, augment=True, purpose=PURPOSE_TRAIN, **kw),
        val=make_loader(index, "train", samplers.val, augment=False, purpose=PURPOSE_VAL, **kw),
        test=make_loader(index, "test", samplers.test, augment=False, purpose=PURPOSE_TEST, **kw),
        samplers=samplers, caches=caches,
    )

