"""The transform benchmark: each toolchain's decoder and steps timed, and how close each one is to plain.

The library (``pipelines.transforms``) keeps the chains training uses: ``cv2`` (the default) and
``plain``, PIL + torchvision as listed, the reference.  The benchmark also times three chains that
lost to cv2 (RESULTS.md, "Transform toolchains, workers, loaders"), defined here with their steps:

- ``pil``: PIL full decode + our PIL/torch steps;
- ``pil_draft``: PIL decode with JPEG draft downscaling (1/2, 1/4 or 1/8 inside libjpeg) + the same steps;
- ``skimage``: scikit-image decode, resize and rotation.

Resizing is bilinear with antialiasing in the PIL and scikit-image chains; rotation is bilinear with
zero fill, positive angles counter-clockwise, as in the library's chains.  Timings run in one process
(``python -m benchmarks --sections transforms``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from pipelines import imageio
from pipelines import transforms as library
from pipelines.tables import markdown_table
from pipelines.transforms import (SIZE, CvRandomFlip, CvToFloat01, HwcNoiseToTensor, HwcToTensor,
                                  MultiplicativeNoise, Toolchain, draw_angle, draw_flip)

logger = logging.getLogger(__name__)

#: A downscaling decoder is accepted when its evaluation output differs from the plain
#: chain's (full decode + antialiased bilinear resize) by at most this much, on [0, 1] values.
PARITY_MEAN_TOL = 2.0 / 255
PARITY_P99_TOL = 12.0 / 255


def load_skimage(path: str) -> np.ndarray:
    """scikit-image decode (RGB uint8 H x W x 3); 4-channel (RGBA, CMYK) and 16-bit files via PIL's
    conversion (``imageio.load_pil``)."""
    from skimage import color, io

    arr = io.imread(str(path))
    if arr.dtype != np.uint8 or (arr.ndim == 3 and arr.shape[-1] != 3):
        return np.asarray(imageio.load_pil(path))
    return np.ascontiguousarray(color.gray2rgb(arr) if arr.ndim == 2 else arr)


# --- PIL + torch steps --------------------------------------------------------------------

class PilResize:
    """Resize a PIL image to size x size with antialiased bilinear filtering (no-op when already there)."""

    def __init__(self, size: int = SIZE) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size == (self.size, self.size):
            return img
        return img.resize((self.size, self.size), Image.BILINEAR)


class PilToFloat01:
    """PIL RGB image -> float32 3 x H x W tensor in [0, 1] (x / 255)."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = torch.from_numpy(np.array(img, dtype=np.uint8))
        return arr.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


class TensorRandomFlip:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1) if draw_flip() else x


class TensorRandomRotate:
    """Rotation about the centre, bilinear, zeros outside (grid_sample's zero padding)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rotate(x, draw_angle(), interpolation=InterpolationMode.BILINEAR, fill=None)


# --- scikit-image steps ----------------------------------------------------------------------

class SkResize:
    def __init__(self, size: int = SIZE) -> None:
        self.size = size

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        from skimage.transform import resize

        return resize(arr, (self.size, self.size), order=1, anti_aliasing=True,
                      preserve_range=True).astype(np.float32)


class SkRandomRotate:
    def __call__(self, arr: np.ndarray) -> np.ndarray:
        from skimage.transform import rotate

        return rotate(arr, draw_angle(), order=1, mode="constant", cval=0.0).astype(np.float32)


# --- the compared chains ---------------------------------------------------------------------

def _pil_torch(loader: Callable[[str], object], name: str, description: str, size: int = SIZE) -> Toolchain:
    return Toolchain(
        name, description, loader,
        T.Compose([PilResize(size), PilToFloat01(), TensorRandomFlip(), TensorRandomRotate(),
                   MultiplicativeNoise()]),
        T.Compose([PilResize(size), PilToFloat01()]))


def _skimage(size: int = SIZE) -> Toolchain:
    return Toolchain(
        "skimage", "scikit-image decode, resize and rotate, numpy noise seeded from torch", load_skimage,
        T.Compose([SkResize(size), CvToFloat01(), CvRandomFlip(), SkRandomRotate(), HwcNoiseToTensor()]),
        T.Compose([SkResize(size), CvToFloat01(), HwcToTensor()]))


COMPARISON_ONLY: dict[str, Callable[[int], Toolchain]] = {
    "pil": lambda size=SIZE: _pil_torch(imageio.load_pil, "pil", "PIL full decode + our PIL/torch steps", size),
    "pil_draft": lambda size=SIZE: _pil_torch(imageio.load_pil_draft, "pil_draft",
                                              "PIL decode with JPEG draft downscaling + our PIL/torch steps", size),
    "skimage": _skimage,
}

#: Every chain the benchmark times: the library's first (plain, the reference, then cv2), then the others.
TOOLCHAINS: tuple[str, ...] = ("plain", "pil", "pil_draft", "cv2", "skimage")


def get_chain(name: str, size: int = SIZE) -> Toolchain:
    """A compared chain by name: the library's own (``pipelines.transforms.get_toolchain``) or one of
    ``COMPARISON_ONLY``."""
    if name in COMPARISON_ONLY:
        return COMPARISON_ONLY[name](size)
    if name in library.TOOLCHAINS:
        return library.get_toolchain(name, size=size)
    raise ValueError(f"unknown toolchain {name!r}; choose one of {list(TOOLCHAINS)}")


def eval_output(chain: Toolchain, path: str) -> torch.Tensor:
    return chain.eval(chain.loader(path))


def parity(name: str, files: list[str]) -> tuple[float, float]:
    """Mean and 99th percentile |difference| of ``name``'s evaluation output against plain's."""
    chain, plain = get_chain(name), get_chain("plain")
    diffs = [torch.abs(eval_output(chain, f) - eval_output(plain, f)).flatten() for f in files]
    d = torch.cat(diffs)
    return float(d.mean()), float(torch.quantile(d[:: max(1, d.numel() // 5_000_000)], 0.99))


@dataclass
class ChainTiming:
    dataset: str
    toolchain: str
    images: int
    steps_ms: dict[str, float]
    total_ms: float
    images_per_s: float
    speedup_vs_plain: float = 1.0
    parity_mean: float | None = None
    parity_p99: float | None = None
    parity_ok: bool | None = None


def step_name(step: object) -> str:
    return type(step).__name__


def time_chain(name: str, files: list[str], repeats: int, seed: int = 0) -> tuple[dict[str, float], float]:
    """Mean ms per image of the decoder and each training step, and of the whole chain."""
    chain = get_chain(name)
    torch.manual_seed(seed)
    steps = list(chain.train.transforms)
    totals = {"decode": 0.0} | {f"{i}:{step_name(s)}": 0.0 for i, s in enumerate(steps)}
    keys = list(totals)
    n = 0
    whole = 0.0
    for _ in range(repeats):
        for path in files:
            t0 = time.perf_counter()
            x = chain.loader(path)
            t1 = time.perf_counter()
            totals["decode"] += t1 - t0
            for key, step in zip(keys[1:], steps):
                ta = time.perf_counter()
                x = step(x)
                totals[key] += time.perf_counter() - ta
            whole += time.perf_counter() - t0
            n += 1
    return {k: 1000 * v / n for k, v in totals.items()}, 1000 * whole / n


def bench_transforms(datasets: dict[str, list[str]], toolchains: list[str], repeats: int) -> list[ChainTiming]:
    rows: list[ChainTiming] = []
    for ds_name, files in datasets.items():
        plain_ms = None
        for name in ["plain"] + [t for t in toolchains if t != "plain"]:
            time_chain(name, files[:4], 1)  # warm-up: imports, allocator
            steps, total = time_chain(name, files, repeats)
            row = ChainTiming(ds_name, name, len(files) * repeats, steps, total, 1000 / total)
            if name == "plain":
                plain_ms = total
            else:
                row.speedup_vs_plain = plain_ms / total
                row.parity_mean, row.parity_p99 = parity(name, files)
                row.parity_ok = row.parity_mean <= PARITY_MEAN_TOL and row.parity_p99 <= PARITY_P99_TOL
            rows.append(row)
            logger.info("%s %s: %.2f ms/img", ds_name, name, total)
    return rows


def decode_only_ms(files: list[str], name: str = library.DEFAULT_TOOLCHAIN) -> float:
    chain = get_chain(name)
    t0 = time.perf_counter()
    for f in files:
        chain.loader(f)
    return 1000 * (time.perf_counter() - t0) / len(files)


def transform_table_row(r: ChainTiming) -> dict[str, str]:
    par = "reference" if r.parity_mean is None else (
        f"{255 * r.parity_mean:.2f} / {255 * r.parity_p99:.1f} {'ok' if r.parity_ok else 'FAIL'}")
    return {"toolchain": r.toolchain, "decode": f"{r.steps_ms['decode']:.2f}",
            "steps (ms, in order)": " / ".join(f"{v:.2f}" for k, v in r.steps_ms.items() if k != "decode"),
            "total ms/img": f"{r.total_ms:.2f}", "img/s": f"{r.images_per_s:.0f}",
            "x plain": f"{r.speedup_vs_plain:.2f}", "parity mean / p99 (x255)": par}


def format_transform_table(rows: list[ChainTiming]) -> str:
    """One Markdown table per data set (``pipelines.tables.markdown_table``), under a title."""
    out = []
    for ds in dict.fromkeys(r.dataset for r in rows):
        sub = [r for r in rows if r.dataset == ds]
        out.append(f"\n## transform chains on {ds} ({sub[0].images} images, 1 process, 1 thread)\n")
        out.append(markdown_table([transform_table_row(r) for r in sub]))
    return "\n".join(out)
