"""Decoded cache: each file decoded and resized to size x size once, kept in host memory.

Resizing is the last deterministic step of the training transform (flip, rotation and noise
come after it), so an epoch may start from the resized uint8 image instead of the JPEG.
The cache decodes and resizes with the DALI loader's own graph (`pipelines.dali.decode_resize`)
on the CPU rather than with OpenCV's DCT-downscaling decoder, which is faster to fill: a cached
`DaliLoader` on the CPU then delivers exactly the images of an uncached one (on a GPU only
close to them: the uncached GPU loader decodes with nvJPEG and resizes on the GPU, which round
differently from libjpeg-turbo and the CPU resize), and the result is closer to PIL's decode
and bilinear resize (on the 160 full-resolution files, mean |difference| 0.09 / 255, 99th
percentile 1 / 255, against 0.70 / 255 and 6 / 255 for `load_cv2_reduced` +
`cv2.resize(INTER_AREA)`).

Memory: a grayscale image is kept as one plane (50 KB at 224 x 224), a colour one as
three. Grayscale means a 1-component JPEG or an RGB one whose decoded channels are equal,
as every file of chest_xray_224 (RGB JPEGs of gray content); since the channels are equal,
the cached training graph then also works on one plane until the noise, exactly. The 5216
training images take 262 MB, where three planes each would take 785 MB.

    cache = DecodedCache(files).fill(progress=True)
    loader = DaliLoader(files, labels, sampler, augment=True, cache=cache)

`python -m benchmarks --sections loaders` times DALI on the CPU with and without the cache
and our torchvision chain over the same cache (`benchmarks.loaders.bench_cached_loaders`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import closing
from functools import partial
from os import PathLike

import numpy as np
import torch
from nvidia.dali.tensors import TensorListCPU
from torch.utils.data import Dataset
from torchvision.transforms import Compose

from . import imageio
from .dali import DECODED, ENCODED, GRAY_FLAG, FedPipeline, batch_plan, decode_resize, encoded_batch

logger = logging.getLogger(__name__)


class DecodedCache:
    """`size` x `size` uint8 images of `files`, decoded and resized once by DALI on the CPU.

    Filled up front by `fill()` (`num_threads` DALI threads, `batch_size` files per batch)
    or lazily by `images()`; a file that does not decode raises `ImageDecodeError` naming
    it. Fill it before forking DataLoader workers: a worker's lazy fill stays in the worker.
    """

    def __init__(
        self,
        files: Sequence[str | PathLike[str]],
        size: int = imageio.TARGET_SIZE,
        *,
        num_threads: int = 2,
        batch_size: int = 32,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.files = [str(f) for f in files]
        self.size = size
        # np.zeros leaves untouched rows (those of RGB files) unallocated by the OS.
        self._planes = np.zeros((len(self.files), size, size, 1), np.uint8)
        self._rgb: dict[int, np.ndarray] = {}
        self._filled = np.zeros(len(self.files), bool)
        self._decoder = FedPipeline(
            self.files,
            partial(encoded_batch, self.files),
            [ENCODED, GRAY_FLAG],
            lambda fed: decode_resize(fed[0], fed[1], "cpu", size),
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=None,
            seed=0,
        )
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.files)

    @property
    def nbytes(self) -> int:
        """Bytes of the filled images: one plane per grayscale image, three per colour one."""
        rgb = sum(a.nbytes for a in self._rgb.values())
        return int(self._filled.sum() - len(self._rgb)) * self._planes[0].nbytes + rgb

    @property
    def filled(self) -> int:
        return int(self._filled.sum())

    def fill(self, progress: bool = False) -> DecodedCache:
        """Decode every file not cached yet; a tqdm bar when `progress`. Returns the cache."""
        missing = np.flatnonzero(~self._filled)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self.files), initial=len(self.files) - missing.size,
                       unit="img", desc="decoding into the cache")
        self._decode(missing, bar)
        if bar is not None:
            bar.close()
        return self

    def images(self, indices: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """The cached images of `indices` (decoded first where missing): read-only
        size x size x 1 views for grayscale images, size x size x 3 for colour ones."""
        indices = np.asarray(indices, dtype=np.int64)
        missing = np.unique(indices[~self._filled[indices]])
        if missing.size:
            self._decode(missing)
        return [self._image(i) for i in indices]

    def rgb(self, i: int) -> np.ndarray:
        """Image i as size x size x 3; a grayscale one is its plane seen three times
        (`imageio.gray_as_rgb`), which our OpenCV transforms process as one plane."""
        (image,) = self.images([i])
        return imageio.gray_as_rgb(image[:, :, 0]) if image.shape[2] == 1 else image

    def _image(self, i: int) -> np.ndarray:
        image = self._rgb.get(int(i))
        if image is None:
            image = self._planes[i]
        view = image.view()
        view.flags.writeable = False
        return view

    def _decode(self, indices: np.ndarray, bar=None) -> None:
        batches = batch_plan(indices, self.batch_size)
        with closing(self._decoder.epoch(batches)) as outputs:
            for k, (images,) in enumerate(outputs):
                self._store(batches[k], images)
                if bar is not None:
                    bar.update(len(batches[k]))
        if self._filled.all():
            self._decoder.release()  # a full cache holds no DALI threads when workers fork

    def _store(self, indices: np.ndarray, images: TensorListCPU) -> None:
        for k, i in enumerate(indices):
            image = np.asarray(images[k])
            if image.shape[2] == 1 or imageio.equal_channels(image):
                self._planes[i] = image[:, :, :1]
            else:
                self._rgb[int(i)] = image.copy()
        self._filled[indices] = True


class CachedImageDataset(Dataset):
    """Map-style dataset of `(transform(cache.rgb(i)), label)`: our torchvision chain
    started after its resize, for `transform` = the OpenCV steps from `CvToFloat01` on.
    Fills the cache at construction, before DataLoader workers fork."""

    def __init__(self, cache: DecodedCache, labels: Sequence[int], transform: Compose) -> None:
        if len(labels) != len(cache):
            raise ValueError(f"{len(cache)} cached images but {len(labels)} labels")
        self.cache = cache.fill()
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.cache.rgb(i)), self.labels[i]
