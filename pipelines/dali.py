"""DALI loader for the chest X-ray classifier, on the GPU or on the CPU.

The processing is written once, as pure graph functions (`decode_resize`, `eval_graph`,
`train_graph`); `fed_pipeline` is the thin pipeline wrapper and `DaliLoader` drives it from a
sampler, one epoch per `iter()`.

Feeding: a batch-mode `fn.external_source` whose source returns the inputs of batch
`BatchInfo.iteration` of the current epoch, so the last, partial batch of an epoch is
delivered too (DALI's parallel per-sample external source drops it,
https://github.com/NVIDIA/DALI/issues/5199) and duplicate indices are delivered once per
occurrence. The inputs are the encoded files, or with a `DecodedCache` the decoded and
resized images, plus on the CPU the noise of the batch.

Why not DALI's `DALIGenericIterator` (plugin.pytorch) for the outputs: checked with DALI 2.4,
(1) after a `break` it does not drain what it prefetched, and the next epoch delivered the
broken epoch's remaining batches; (2) under the dynamic executor it hands torch a zero-copy
view of DALI's buffer, whose release is not ordered after torch's stream (`_TorchHandOff`);
(3) it calls `as_tensor()` on every output, which fails on the ragged (one- and three-plane)
batches `DecodedCache` decodes. Replacing only `DaliLoader`'s schedule/outputs/reset loop
(`size=-1`, `prepare_first_batch=False`) would still need our break handling, the error
naming the failing file and the copy; no timing difference was found either way.

Where the CPU time goes (one DALI thread, 1.5 MP grayscale JPEGs, ms per image): decode to
RGB 3.8, resize to 224 x 224 4.7, rotate 1.5 (0.7 on one plane), DALI's per-value uniform
noise 1.8 (its CPU generator does not spread over threads), /255, flip, transpose and
multiply about 0.1 each, Python feeding 0.02, the copy into memory torch owns 0.07
(`_TorchHandOff`; DLPack's view of DALI's buffer took 0.004). Hence grayscale files stay one
plane until the noise, and on the CPU numpy draws the noise (0.2 ms per image). With both,
the training loader on chest_xray_fullres takes 6.6 instead of 12.1 CPU ms per image
(1.8-1.9x the images per second of the three-plane graph, same run, 2 threads); from a
`DecodedCache`, 1.1 ms. Tried and not kept: `use_fast_idct` (no measurable gain, and it
changes the decoded values), flip and rotation fused into one `fn.warp_affine` (no gain:
the flip costs 0.03 ms), `prefetch_queue_depth` 3 or 4 and `exec_dynamic=False` (no change
in CPU time per image). Not tried: `fn.readers.file` instead of the Python feeding, which
costs 0.02 ms.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from os import PathLike
from typing import Protocol

import nvidia.dali.experimental.dynamic as ndd
import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray
from nvidia.dali.tensors import TensorListCPU, TensorListGPU

from . import transforms
from .imageio import jpeg_header
from .transforms import check_eval_gain, uniform_float32

logger = logging.getLogger(__name__)

PREFETCH_QUEUE_DEPTH = 2
READ_AHEAD = 2  # batches the feeding thread prepares beyond the one DALI asks for


class IndexSampler(Protocol):
    """What the loader needs of a sampler: re-iterable indices (a fresh order per
    iteration, duplicates allowed) and their count."""

    def __iter__(self) -> Iterator[int]: ...

    def __len__(self) -> int: ...


class ImageCache(Protocol):
    """What the loader needs of a cache of decoded, resized images (`pipelines.decoded_cache.DecodedCache`,
    which imports this module, so it is described here rather than imported): its files, its image size
    and the uint8 size x size x C images of given indices."""

    files: list[str]
    size: int

    def images(self, indices: Sequence[int] | np.ndarray) -> list[np.ndarray]: ...


class ImageDecodeError(ValueError):
    """A file that the DALI image decoder cannot decode."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot decode image {path!r}: {reason}")
        self.path = path


def dali_device(device_id: int | None) -> str:
    """DALI device of everything after decoding: 'gpu' for a GPU id, 'cpu' for None."""
    return "cpu" if device_id is None else "gpu"


# ----- graph functions -------------------------------------------------------------------


def decode_resize(jpegs: DataNode, gray: DataNode, device: str, size: int) -> DataNode:
    """Decode and resize to size x size (aspect ratio not kept, linear, antialiased), uint8
    HWC: one channel for the files whose `gray` flag is set, RGB for the others.

    Exact for 1-component JPEGs: decoding one to RGB repeats its single plane three times,
    and resize, /255, flip and rotation treat each channel alone, so the planes stay equal
    until the per-value noise (`eval_graph` repeats the plane). One plane instead of three
    costs 3.1 instead of 3.8 ms to decode and 1.6 instead of 4.7 ms to resize. Needs a
    pipeline with `enable_conditionals=True`. Resizing stays in uint8 (rounded), as PIL does.
    On the GPU (nvJPEG) chroma is upsampled as libjpeg-turbo does (`jpeg_fancy_upsampling`);
    the decoded values still differ from the CPU's by rounding (IDCT), as the resize does.
    """
    decoder = {"device": "mixed", "jpeg_fancy_upsampling": True} if device == "gpu" else {"device": "cpu"}
    if gray:
        images = fn.decoders.image(jpegs, output_type=types.GRAY, **decoder)
    else:
        images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
    return fn.resize(
        images,
        resize_x=size,
        resize_y=size,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )


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


def eval_graph(images: DataNode, device: str, gain: float = 1.0) -> DataNode:
    """Evaluation processing of `decode_resize`'s output: /255, float32 CHW in [0, 1], a
    single plane repeated to 3 channels by the broadcasting division; then times `gain`
    unless 1 (as `pipelines.transforms.Gain`)."""
    by_255 = types.Constant(np.full((3, 1, 1), 255.0, np.float32), device=device)
    images = to_chw(images) / by_255
    return images if gain == 1.0 else images * gain


def train_graph(images: DataNode, noise: DataNode) -> DataNode:
    """Training processing of `decode_resize`'s output: /255, then per sample a horizontal
    flip with probability `FLIP_P`, a rotation by a uniform angle in [-`MAX_ANGLE`, `MAX_ANGLE`]
    degrees, and each value of each of the 3 channels multiplied by its own draw from `noise`
    (float32 3 x H x W, uniform in [`NOISE_LOW`, `NOISE_HIGH`]); float32 CHW. The parameters are
    `pipelines.transforms`' (read when the graph is built), the torchvision chains' own. The
    transposition comes before the multiplication, which broadcasts a grayscale file's single
    plane to the 3 channels."""
    images = fn.flip(images / 255.0, horizontal=fn.random.coin_flip(probability=transforms.FLIP_P))
    images = rotate_ccw(images, fn.random.uniform(range=[-transforms.MAX_ANGLE, transforms.MAX_ANGLE]))
    return to_chw(images) * noise


def uniform_noise(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """n x 3 x size x size float32 draws, uniform in [`NOISE_LOW`, `NOISE_HIGH`]: the CPU's noise
    (numpy draws it 9x faster than DALI's CPU `fn.random.uniform`; `uniform_float32` another 1.4x)."""
    return uniform_float32(rng.bit_generator, (n, 3, size, size), transforms.NOISE_LOW, transforms.NOISE_HIGH)


@dataclass(frozen=True)
class Feed:
    """What one output of the external source carries."""

    dtype: types.DALIDataType
    ndim: int
    layout: str = ""


ENCODED = Feed(types.UINT8, 1)
GRAY_FLAG = Feed(types.BOOL, 0)
DECODED = Feed(types.UINT8, 3, "HWC")
NOISE = Feed(types.FLOAT, 3, "CHW")


def loader_graph(fed: Sequence[DataNode], *, cached: bool, augment: bool, device: str,
                 size: int, eval_gain: float = 1.0) -> DataNode:
    """The loader's processing of the external source's outputs: (encoded files, gray
    flags) or (decoded images,), then in training on the CPU the noise."""
    if cached:
        images = fed[0].gpu() if device == "gpu" else fed[0]
    else:
        images = decode_resize(fed[0], fed[1], device, size)
    if not augment:
        return eval_graph(images, device, eval_gain)
    noise = fed[-1] if device == "cpu" else fn.random.uniform(
        range=[transforms.NOISE_LOW, transforms.NOISE_HIGH], shape=[3, size, size], device=device)
    return train_graph(images, noise)


@pipeline_def(enable_conditionals=True)
def fed_pipeline(
    source: _EpochSource, feeds: Sequence[Feed], process: Callable[[Sequence[DataNode]], DataNode]
) -> DataNode:
    """Pipeline fed one batch per iteration by `source` (outputs described by `feeds`)
    and processed by `process`."""
    fed = fn.external_source(
        source=source,
        num_outputs=len(feeds),
        batch=True,
        batch_info=True,
        dtype=[f.dtype for f in feeds],
        ndim=[f.ndim for f in feeds],
        layout=[f.layout for f in feeds],
        no_copy=True,
    )
    return process(fed)


# ----- feeding ---------------------------------------------------------------------------


def read_encoded(path: str) -> np.ndarray:
    """The bytes of a file as a uint8 array (FileNotFoundError names a missing path)."""
    return np.fromfile(path, dtype=np.uint8)


def is_gray_jpeg(encoded: np.ndarray) -> np.ndarray:
    """A 0-d bool array: True when the bytes are a 1-component (grayscale) JPEG."""
    header = jpeg_header(encoded)
    return np.array(header is not None and header[2] == 1)


def encoded_batch(files: Sequence[str], indices: np.ndarray) -> tuple[list, list]:
    """The encoded files of a batch and their grayscale flags."""
    encoded = [read_encoded(files[i]) for i in indices]
    return encoded, [is_gray_jpeg(e) for e in encoded]


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
    """Batch-mode external source: `feed` of batch `iteration` of the epoch planned by
    `start`.

    A non-parallel external source is called from the thread that runs the pipeline (the
    training loop's), so with `read_ahead` > 0 the feeds are made by one thread of their
    own, up to `read_ahead` batches beyond the one DALI asks for: reading 16 full-resolution
    files (and, on the CPU, drawing the noise) no longer takes the training thread's time.
    One thread, fed in order, so within an epoch the noise draws and any error come as
    without it; the thread lives for one epoch. An epoch ended early finishes the feeds
    already asked for (up to `read_ahead` more than feeding inline would have made), so
    the noise stream, and with it the next epoch, depends on where the epoch ended, never
    on the threads' timing. DALI reads the fed arrays in place (`no_copy`: 0.1 of 1.2 ms
    per image when cached), so the last feeds are kept alive here until the pipeline has
    consumed them, at most `PREFETCH_QUEUE_DEPTH` + 1 iterations later.
    """

    def __init__(self, feed: Callable[[np.ndarray], tuple], read_ahead: int = READ_AHEAD) -> None:
        if read_ahead < 0:
            raise ValueError(f"read_ahead must be >= 0, got {read_ahead}")
        self._feed = feed
        self._read_ahead = read_ahead
        self._batches: list[np.ndarray] = []
        self._in_flight: deque[tuple] = deque(maxlen=PREFETCH_QUEUE_DEPTH + 2)
        self._pool: ThreadPoolExecutor | None = None
        self._ready: dict[int, Future] = {}
        self._submitted = 0

    def start(self, batches: list[np.ndarray]) -> None:
        self.stop()
        self._batches = batches
        if self._read_ahead and batches:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dali-feed")

    def stop(self) -> None:
        """Make every later request end the epoch (StopIteration); end the feeding thread
        once it has made every feed asked of it (not cancelled: how many had started would
        depend on timing), and drop the feeds for batches that will not be asked for."""
        self._batches = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._ready.clear()
        self._submitted = 0

    def __call__(self, info: types.BatchInfo) -> tuple:
        k = info.iteration
        if k >= len(self._batches):
            raise StopIteration
        if self._pool is None:
            fed = self._feed(self._batches[k])
        else:
            while self._submitted < min(len(self._batches), k + 1 + self._read_ahead):
                self._ready[self._submitted] = self._pool.submit(self._feed, self._batches[self._submitted])
                self._submitted += 1
            fed = self._ready.pop(k).result()
        self._in_flight.append(fed)
        return fed


class FedPipeline:
    """A DALI pipeline fed by index batches; `epoch(batches)` yields its outputs per batch.

    Runs one epoch at a time. While batch k is with the caller, the pipeline already works
    on the next ones (the default, dynamic executor does not reuse output buffers, so the
    outputs stay valid). A DALI failure becomes an error naming the file.
    Nothing here refers back to its owner, so a dropped loader frees its pipeline at once
    rather than at a garbage collection, which might come in a forked DataLoader worker
    and hang there in the pipeline's destructor. `read_ahead` batches are fed ahead by a
    thread of their own (`_EpochSource`; 0: in the calling thread).
    """

    def __init__(
        self,
        files: Sequence[str],
        feed: Callable[[np.ndarray], tuple],
        feeds: Sequence[Feed],
        process: Callable[[Sequence[DataNode]], DataNode],
        *,
        batch_size: int,
        num_threads: int,
        device_id: int | None,
        seed: int,
        read_ahead: int = READ_AHEAD,
    ) -> None:
        self.files = files
        self._source = _EpochSource(feed, read_ahead)
        self._feeds = feeds
        self._process = process
        self._options = dict(
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=device_id,
            seed=seed,
            prefetch_queue_depth=PREFETCH_QUEUE_DEPTH,
        )
        self._pipe: Pipeline | None = None
        self._in_epoch = False

    def epoch(self, batches: list[np.ndarray]) -> Iterator[tuple[TensorListCPU, ...]]:
        """The pipeline's outputs for each batch of indices, in order."""
        if self._in_epoch:
            raise RuntimeError("a DALI pipeline runs one epoch at a time; "
                               "finish or close the other")
        if not batches:
            return
        pipe = self._pipeline()
        self._source.start(batches)
        self._in_epoch = True
        try:
            pipe.schedule_run()
            for k in range(len(batches)):
                outputs = self._outputs(pipe, batches, k)
                pipe.schedule_run()
                yield outputs
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

    def release(self) -> None:
        """Drop the pipeline and its threads (a later epoch builds a new one)."""
        if self._in_epoch:
            raise RuntimeError("cannot release a DALI pipeline during its epoch")
        self._pipe = None

    def _pipeline(self) -> Pipeline:
        """The pipeline, built on first use and again after a failure."""
        if self._pipe is None:
            self._pipe = fed_pipeline(self._source, self._feeds, self._process, **self._options)
            self._pipe.build()
        return self._pipe

    def _outputs(self, pipe: Pipeline, batches: list[np.ndarray], k: int) -> tuple:
        try:
            return pipe.outputs()
        except RuntimeError as err:
            # The failure may be reported for batch k or for one prefetched after it.
            suspects = np.concatenate(batches[k : k + PREFETCH_QUEUE_DEPTH + 1])
            raise self._decode_error(suspects, err) from None

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


class _LoaderFeed:
    """The loader's external source outputs for a batch of indices: the encoded files and
    their grayscale flags, or the cached images; then the noise when `noise_rng` is set."""

    def __init__(self, files: Sequence[str], cache: ImageCache | None,
                 noise_rng: np.random.Generator | None, size: int) -> None:
        self.files, self.cache, self.noise_rng, self.size = files, cache, noise_rng, size

    def __call__(self, indices: np.ndarray) -> tuple:
        if self.cache is not None:
            fed: tuple = (self.cache.images(indices),)
        else:
            fed = encoded_batch(self.files, indices)
        if self.noise_rng is None:
            return fed
        return (*fed, uniform_noise(self.noise_rng, len(indices), self.size))


class _TorchHandOff:
    """DALI's outputs of one epoch as batches copied into memory torch owns.

    Not DLPack's zero-copy view: DALI orders only the start of such a loan. In its source
    (the wheel ships no C++), the consumer's stream waits for the buffer's ready event
    (`ToDLMTensor`, dali/python/backend_impl.cc), but the capsule merely holds the buffer's
    shared_ptr, whose release returns the memory to DALI's stream-ordered pool after DALI's own
    stream (`AllocBuffer` makes the allocating stream the deallocation stream, and
    `set_deletion_order` / `free_storage_impl` keep it DALI's: dali/pipeline/data/buffer.cc).
    Nothing waits for torch's stream, so a batch the host drops while its reads are still
    queued (the training loop synchronises every 32 batches, predict() never) could be
    overwritten by DALI first. Hence a copy, queued on torch's current stream by DALI's
    `feed_ndarray` (the outputs are ready: `Pipeline.outputs()` synchronises them with the
    host), whose reuse torch's allocator orders; DALI's output is kept until a CUDA event
    recorded after the copy has completed: at most as many outputs as batches the host runs
    ahead of the GPU. `finish` waits for the last copies. On the CPU the copy is done on
    return: 1.1-1.3 ms per 16 x 3 x 224 x 224 batch in the loader, largely the fresh pages of
    its destination (0.25 ms into reused memory), where DLPack's view took 0.07 ms; about 6% of
    the cached CPU training loader's time per batch (18-21 ms), 1% of the uncached one's.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._kept: deque[tuple[torch.cuda.Event, TensorListGPU]] = deque()

    def __call__(self, images: TensorListCPU | TensorListGPU) -> torch.Tensor:
        tensor = images.as_tensor()
        batch = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
        if self.device.type != "cuda":
            feed_ndarray(tensor, batch)
            return batch
        stream = torch.cuda.current_stream(self.device)
        feed_ndarray(tensor, batch, cuda_stream=stream)
        copied = torch.cuda.Event()
        copied.record(stream)
        self._kept.append((copied, images))
        while self._kept and self._kept[0][0].query():
            self._kept.popleft()
        return batch

    def finish(self) -> None:
        """Wait until the copies still queued are done, then let DALI have their outputs."""
        while self._kept:
            self._kept.popleft()[0].synchronize()


def batch_plan(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[s : s + batch_size] for s in range(0, order.size, batch_size)]


class DaliLoader:
    """Iterable of `(images, labels)` batches decoded and processed by DALI.

    `images` is float32 N x 3 x size x size, `labels` int64 N, both on `cuda:device_id`
    or, with `device_id=None`, on the CPU (DALI then runs every operator on the CPU).
    Each `iter()` is one epoch: the sampler is iterated once and every index it yields is
    delivered once, in its order, in batches of `batch_size`, the last one possibly smaller.
    With a `cache` (a `DecodedCache` of the same files and size) the pipeline is fed the
    cached decoded images, filled lazily where missing, and skips decoding and resizing. On
    the CPU these are the same images bit for bit, since the cache holds this loader's own
    decode and resize; on a GPU they are not: the cache decodes with libjpeg-turbo and resizes
    on the CPU, the uncached GPU loader with nvJPEG and the GPU resize, which round differently.
    `eval_gain` multiplies the evaluation images (not the training ones), as
    `pipelines.transforms.get_toolchain(..., eval_gain)` does.
    The random draws come from `seed` (DALI's for flips and angles, numpy's for the
    noise on the CPU); each epoch continues the random streams, so epochs differ from each
    other but a loader built with the same seed, sampler order and epoch count repeats them.
    `read_ahead` batches are fed ahead by a thread of their own (0: in the iterating thread;
    with a cache always 0). The images are a copy in memory torch owns (`_TorchHandOff`).
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
        size: int = transforms.SIZE,
        cache: ImageCache | None = None,
        eval_gain: float = 1.0,
        read_ahead: int = READ_AHEAD,
    ) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        check_eval_gain(eval_gain)
        self.files = [str(f) for f in files]
        if cache is not None and (cache.files != self.files or cache.size != size):
            raise ValueError(
                f"the cache holds {len(cache.files)} files at size {cache.size}, not these "
                f"{len(self.files)} files at size {size}"
            )
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.sampler = sampler
        self.batch_size = batch_size
        self.augment = augment
        self.seed = seed
        self.device_id = device_id
        self.num_threads = num_threads
        self.size = size
        self.cache = cache
        self.eval_gain = eval_gain
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        device = dali_device(device_id)
        cpu_noise = augment and device == "cpu"
        noise_rng = np.random.default_rng(seed) if cpu_noise else None
        feeds = [DECODED] if cache is not None else [ENCODED, GRAY_FLAG]
        if cpu_noise:
            feeds.append(NOISE)
        self._fed = FedPipeline(
            self.files,
            _LoaderFeed(self.files, cache, noise_rng, size),
            feeds,
            lambda fed: loader_graph(
                fed, cached=cache is not None, augment=augment, device=device, size=size,
                eval_gain=eval_gain,
            ),
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=device_id,
            seed=seed,
            # a cache fills lazily through its own DALI pipeline: in the calling thread, not beside it
            read_ahead=0 if cache is not None else read_ahead,
        )

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` of the sampler's order.

        DALI's own random streams (flips, angles) cannot be rewound: they continue, so a resumed
        run gets fresh draws of the same distributions rather than the interrupted run's.
        """
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = np.fromiter((int(i) for i in self.sampler), dtype=np.int64)
        if order.size and (order.min() < 0 or order.max() >= len(self.files)):
            raise ValueError(f"sampler yielded an index outside [0, {len(self.files)})")
        batches = batch_plan(order, self.batch_size)
        hand_off = _TorchHandOff(self.device)
        try:
            with closing(self._fed.epoch(batches)) as outputs:
                for k, (images,) in enumerate(outputs):
                    yield hand_off(images), self._labels(batches[k])
        finally:
            hand_off.finish()

    def _labels(self, batch: np.ndarray) -> torch.Tensor:
        """The batch's labels on the loader's device. To a GPU they go from pinned memory without
        waiting: a copy from ordinary memory makes torch wait for the GPU to finish all its queued work
        (a host sync per batch, the GPU idle while the next step is queued)."""
        labels = self.labels[torch.from_numpy(batch)]
        if self.device.type != "cuda":
            return labels
        return labels.pin_memory().to(self.device, non_blocking=True)
