"""DALI loader for the chest X-ray classifier, on the GPU or on the CPU.

The processing is written once, as pure graph functions (`eval_graph`, `train_graph`) that
take the DALI device they run on; `loader_pipeline` is the thin pipeline wrapper and
`DaliLoader` drives it from a sampler, one epoch per `iter()`.

Feeding: a batch-mode `fn.external_source` whose source returns the encoded files of batch
`BatchInfo.iteration` of the current epoch, so the last, partial batch of an epoch is
delivered too (DALI's parallel per-sample external source drops it,
https://github.com/NVIDIA/DALI/issues/5199) and duplicate indices are delivered once per
occurrence.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from os import PathLike
from typing import Protocol

import nvidia.dali.experimental.dynamic as ndd
import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline

logger = logging.getLogger(__name__)

MAX_ROTATION_DEG = 20.0
FLIP_PROBABILITY = 0.5
NOISE_RANGE = (1.2, 1.5)
PREFETCH_QUEUE_DEPTH = 2


class IndexSampler(Protocol):
    """What the loader needs of a sampler: re-iterable indices (a fresh order per
    iteration, duplicates allowed) and their count."""

    def __iter__(self) -> Iterator[int]: ...

    def __len__(self) -> int: ...


class ImageDecodeError(ValueError):
    """A file that the DALI image decoder cannot decode."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot decode image {path!r}: {reason}")
        self.path = path


def dali_device(device_id: int | None) -> str:
    """DALI device of everything after decoding: 'gpu' for a GPU id, 'cpu' for None."""
    return "cpu" if device_id is None else "gpu"


def decode_resize_scale(jpegs: DataNode, device: str, size: int) -> DataNode:
    """Decode to RGB (grayscale files give 3 channels), resize to size x size, divide by 255.

    The aspect ratio is not kept. Resizing stays in uint8 (rounded), as PIL does, and the
    division gives float32 HWC.
    """
    decoder_device = "mixed" if device == "gpu" else "cpu"
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
    images = fn.resize(
        images,
        resize_x=size,
        resize_y=size,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    return images / 255.0


def to_chw(images: DataNode) -> DataNode:
    return fn.transpose(images, perm=[2, 0, 1], output_layout="CHW")


def rotate_ccw(images: DataNode, angle: DataNode | float) -> DataNode:
    """Rotate about the centre by `angle` degrees, counter-clockwise on screen for a
    positive angle as torchvision's `F.rotate`; same size, bilinear, filled with 0.

    DALI's own convention already is torchvision's, so the angle is passed unchanged
    (tests/test_dali.py compares the two).
    """
    return fn.rotate(
        images, angle=angle, keep_size=True, fill_value=0.0, interp_type=types.INTERP_LINEAR
    )


def eval_graph(jpegs: DataNode, device: str, size: int = 224) -> DataNode:
    """Evaluation processing: decode, resize, /255; float32 CHW in [0, 1]."""
    return to_chw(decode_resize_scale(jpegs, device, size))


def train_graph(jpegs: DataNode, device: str, size: int = 224) -> DataNode:
    """Training processing: the eval steps, then per sample a horizontal flip with
    probability 1/2, a rotation by a uniform angle in [-20, 20] degrees, and each value of
    each channel multiplied by its own uniform draw in [1.2, 1.5]; float32 CHW."""
    images = decode_resize_scale(jpegs, device, size)
    images = fn.flip(images, horizontal=fn.random.coin_flip(probability=FLIP_PROBABILITY))
    images = rotate_ccw(images, fn.random.uniform(range=[-MAX_ROTATION_DEG, MAX_ROTATION_DEG]))
    noise = fn.random.uniform(range=list(NOISE_RANGE), shape=[size, size, 3], device=device)
    return to_chw(images * noise)


@pipeline_def
def loader_pipeline(source: _EpochSource, augment: bool, device: str, size: int) -> DataNode:
    """Pipeline fed one batch of encoded files per iteration by `source`."""
    jpegs = fn.external_source(
        source=source, batch=True, batch_info=True, dtype=types.UINT8, ndim=1
    )
    graph = train_graph if augment else eval_graph
    return graph(jpegs, device, size)


def read_encoded(path: str) -> np.ndarray:
    """The bytes of a file as a uint8 array (FileNotFoundError names a missing path)."""
    return np.fromfile(path, dtype=np.uint8)


def decode_failure(path: str) -> str | None:
    """Why DALI's CPU decoder fails on this file alone, or None when it decodes.

    Used only after a batch failed, to name the culprit: the pipeline's error names the
    operator, not the sample. Eager (dynamic-mode) DALI needs no pipeline to rebuild.
    """
    try:
        ndd.decoders.image(ndd.tensor(read_encoded(path)), device="cpu").evaluate()
    except RuntimeError as err:
        return str(err.__cause__ or err)
    return None


class _EpochSource:
    """Batch-mode external source: batch `iteration` of the epoch planned by `start`.

    A non-parallel external source is called from the thread that runs the pipeline, so
    this state is only touched from there.
    """

    def __init__(self, files: Sequence[str]) -> None:
        self._files = files
        self._batches: list[np.ndarray] = []

    def start(self, batches: list[np.ndarray]) -> None:
        self._batches = batches

    def stop(self) -> None:
        """Make every later request end the epoch (StopIteration)."""
        self._batches = []

    def __call__(self, info: types.BatchInfo) -> list[np.ndarray]:
        if info.iteration >= len(self._batches):
            raise StopIteration
        return [read_encoded(self._files[i]) for i in self._batches[info.iteration]]


class DaliLoader:
    """Iterable of `(images, labels)` batches decoded and processed by DALI.

    `images` is float32 N x 3 x size x size, `labels` int64 N, both on `cuda:device_id`
    or, with `device_id=None`, on the CPU (DALI then runs every operator on the CPU).
    Each `iter()` is one epoch: the sampler is iterated once and every index it yields is
    delivered once, in its order, in batches of `batch_size`, the last one possibly smaller.
    The DALI random draws come from `seed`; each epoch continues the random streams, so
    epochs differ from each other but a loader built with the same seed, sampler order and
    epoch count repeats them.
    """

    def __init__(
        self,
        files: Sequence[str | PathLike[str]],
        labels: Sequence[int],
        sampler: IndexSampler,
        *,
        batch_size: int = 16,
        augment: bool,
        seed: int = 0,
        device_id: int | None = None,
        num_threads: int = 2,
        size: int = 224,
    ) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.files = [str(f) for f in files]
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.sampler = sampler
        self.batch_size = batch_size
        self.augment = augment
        self.seed = seed
        self.device_id = device_id
        self.num_threads = num_threads
        self.size = size
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        self._source = _EpochSource(self.files)
        self._pipe: Pipeline | None = None
        self._in_epoch = False

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._in_epoch:
            raise RuntimeError("DaliLoader runs one epoch at a time; finish or close the other")
        order = np.fromiter((int(i) for i in self.sampler), dtype=np.int64)
        if order.size and (order.min() < 0 or order.max() >= len(self.files)):
            raise ValueError(f"sampler yielded an index outside [0, {len(self.files)})")
        batches = [order[s : s + self.batch_size] for s in range(0, order.size, self.batch_size)]
        if not batches:
            return
        pipe = self._pipeline()
        self._source.start(batches)
        self._in_epoch = True
        try:
            pipe.schedule_run()
            for k, indices in enumerate(batches):
                images = self._next_images(pipe, batches, k)
                labels = self.labels[torch.from_numpy(indices)].to(self.device)
                pipe.schedule_run()
                yield images, labels
            pipe.reset()
        except GeneratorExit:
            self._end_epoch_early(pipe)
            raise
        except BaseException:
            self._pipe = None  # DALI invalidates a pipeline that failed; build a new one
            raise
        finally:
            self._source.stop()
            self._in_epoch = False

    def _pipeline(self) -> Pipeline:
        """The pipeline, built on first use and again after a failure."""
        if self._pipe is None:
            self._pipe = loader_pipeline(
                self._source,
                self.augment,
                dali_device(self.device_id),
                self.size,
                batch_size=self.batch_size,
                num_threads=self.num_threads,
                device_id=self.device_id,
                seed=self.seed,
                prefetch_queue_depth=PREFETCH_QUEUE_DEPTH,
            )
            self._pipe.build()
        return self._pipe

    def _next_images(self, pipe: Pipeline, batches: list[np.ndarray], k: int) -> torch.Tensor:
        """Images of batch k, shared with DALI through DLPack without a copy (the default
        executor does not reuse output buffers); a DALI failure becomes an error naming
        the file."""
        try:
            (images,) = pipe.outputs()
        except RuntimeError as err:
            # The failure may be reported for batch k or for one prefetched after it.
            suspects = np.concatenate(batches[k : k + PREFETCH_QUEUE_DEPTH + 1])
            raise self._decode_error(suspects, err) from None
        tensor = images.as_tensor()
        if self.device_id is None:
            return torch.from_dlpack(tensor)
        with torch.cuda.device(self.device_id):
            return torch.from_dlpack(tensor)

    def _decode_error(self, suspects: np.ndarray, err: RuntimeError) -> ValueError:
        logger.debug("DALI pipeline failed: %s", err)
        paths = list(dict.fromkeys(self.files[i] for i in suspects))
        for path in paths:
            reason = decode_failure(path)
            if reason is not None:
                return ImageDecodeError(path, reason)
        first_line = next(iter(str(err).strip().splitlines()), type(err).__name__)
        return ValueError(f"DALI failed on a batch of {paths}: {first_line}")

    def _end_epoch_early(self, pipe: Pipeline) -> None:
        """After a break: end the epoch and consume the prefetched batches.

        Keeping the pipeline (rather than building a new one) keeps its random streams, so
        the next epoch still gets fresh draws.
        """
        self._source.stop()
        try:
            pipe.schedule_run()
            while True:
                pipe.outputs()
        except StopIteration:
            pipe.reset()
        except RuntimeError as err:
            logger.warning("DALI failed on a batch prefetched before the break: %s", err)
            self._pipe = None
