"""Synthetic chest-X-ray-like JPEGs in the ImageFolder layout of the Kermany dataset.

``ROOT/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg``. PNEUMONIA images carry bright diffuse
opacities inside the lung fields, so a small CNN separates the classes after the usual
augmentation. Every image has its own generator, keyed by (seed, split, class, index), so
the files are byte-identical for a given seed whatever the other counts are.

CLI: ``python -m pipelines.synthetic --out DIR [--seed N] [--n-train A B] [--n-test A B]
[--bad-files]``.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
CLASSES = ("NORMAL", "PNEUMONIA")
BAD_FILE_NAMES = (
    "empty.jpeg",
    "truncated.jpeg",
    "corrupt_header.jpeg",
    ".DS_Store",
    "Thumbs.db",
    "notes.txt",
)
RGB_EVERY = 5  # image index i is RGB when i % RGB_EVERY == RGB_EVERY - 1
PROGRESSIVE_EVERY = 8  # image index i is progressive when i % PROGRESSIVE_EVERY == 1
MIN_ALLOWED_SIZE = 32
_IMAGE_STREAM, _BAD_FILE_STREAM = 0, 1


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; counts are (NORMAL, PNEUMONIA)."""

    n_train: tuple[int, int] = (24, 48)
    n_test: tuple[int, int] = (12, 20)
    seed: int = 0
    bad_files: bool = False
    min_size: int = 256
    max_size: int = 640

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test"):
            counts = getattr(self, name)
            if len(counts) != 2 or any(int(c) != c or c < 0 for c in counts):
                raise ValueError(f"{name} must be two non-negative integers, got {counts!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if not MIN_ALLOWED_SIZE <= self.min_size < self.max_size:
            raise ValueError(
                f"need {MIN_ALLOWED_SIZE} <= min_size < max_size, "
                f"got min_size={self.min_size}, max_size={self.max_size}"
            )

    def counts(self, split: str) -> tuple[int, int]:
        """(NORMAL, PNEUMONIA) counts of one split."""
        return self.n_train if split == "train" else self.n_test


def make_synthetic_dataset(
    root: str | Path,
    *,
    n_train: tuple[int, int] = (24, 48),
    n_test: tuple[int, int] = (12, 20),
    seed: int = 0,
    bad_files: bool = False,
    min_size: int = 256,
    max_size: int = 640,
) -> Path:
    """Write the synthetic set under ``root`` and return ``root`` as a Path.

    Raises ValueError for bad counts, seed or sizes and FileExistsError when a split
    folder already holds files (nothing is overwritten).
    """
    spec = SyntheticSpec(tuple(n_train), tuple(n_test), seed, bad_files, min_size, max_size)
    root = Path(root)
    _check_empty_splits(root)
    for split_index, split in enumerate(SPLITS):
        for label, class_name in enumerate(CLASSES):
            folder = root / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            _write_class_images(folder, spec, split_index, label)
            if spec.bad_files and split == "train":
                _write_bad_files(folder, spec, split_index, label)
    logger.debug("synthetic set written under %s with %s", root, spec)
    return root


def _check_empty_splits(root: Path) -> None:
    for split in SPLITS:
        folder = root / split
        if folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} already exists and is not empty")


def _image_rng(spec: SyntheticSpec, stream: int, split_index: int, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, stream, split_index, label, index])


def image_file_name(label: int, index: int) -> str:
    """A Kermany-like file name: ``IM-0007-0001.jpeg`` or ``person7_bacteria_7.jpeg``."""
    if label == 0:
        return f"IM-{index:04d}-0001.jpeg"
    kind = "virus" if index % 3 == 2 else "bacteria"
    return f"person{index}_{kind}_{index}.jpeg"


def _write_class_images(folder: Path, spec: SyntheticSpec, split_index: int, label: int) -> None:
    for index in range(spec.counts(SPLITS[split_index])[label]):
        rng = _image_rng(spec, _IMAGE_STREAM, split_index, label, index)
        data = _synthetic_jpeg(
            rng,
            spec,
            pneumonia=bool(label),
            rgb=index % RGB_EVERY == RGB_EVERY - 1,
            progressive=index % PROGRESSIVE_EVERY == 1,
        )
        (folder / image_file_name(label, index)).write_bytes(data)


def _synthetic_jpeg(
    rng: np.random.Generator, spec: SyntheticSpec, *, pneumonia: bool, rgb: bool, progressive: bool
) -> bytes:
    height, width = draw_size(rng, spec.min_size, spec.max_size)
    pixels = chest_xray(rng, height, width, pneumonia=pneumonia)
    quality = int(rng.integers(85, 96))
    return encode_jpeg(pixels, rgb=rgb, progressive=progressive, quality=quality)


def draw_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width), each uniform in [min_size, max_size], never equal."""
    height = int(rng.integers(min_size, max_size + 1))
    width = int(rng.integers(min_size, max_size))  # one value short: skip ``height``
    return height, width + (width >= height)


def chest_xray(rng: np.random.Generator, height: int, width: int, *, pneumonia: bool) -> np.ndarray:
    """A uint8 (height, width) frontal-chest-like image; pneumonia adds lung opacities."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    centre_x = 0.5 + rng.normal(0.0, 0.015)
    body = _soft_ellipse(y, x, (0.58 + rng.normal(0.0, 0.02), centre_x), (0.62, rng.uniform(0.36, 0.42)), 0.08)
    lungs, lung_centres = _lung_fields(rng, y, x, centre_x)
    background, body_level, lung_level = rng.uniform(5, 30), rng.uniform(150, 190), rng.uniform(45, 75)
    image = background + (body_level - background) * body - (body_level - lung_level) * lungs
    image += rng.uniform(18, 30) * _rib_arcs(rng, y, x, centre_x) * body
    if pneumonia:
        haze = rng.uniform(15, 30)  # diffuse: raises the whole lung field, blobs on top
        image += (haze + rng.uniform(90, 120) * _opacities(rng, y, x, lung_centres)) * lungs
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(3, 8))
    sigma = rng.uniform(0.8, 1.6) * min(height, width) / 256
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigma)
    return np.clip(image, 0, 255).astype(np.uint8)


def _soft_ellipse(
    y: np.ndarray, x: np.ndarray, centre: tuple[float, float], radii: tuple[float, float], edge: float
) -> np.ndarray:
    """1 inside the ellipse, 0 outside, with a linear ramp ``edge`` wide (in radii)."""
    distance = np.sqrt(((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2)
    return np.clip((1.0 - distance) / edge + 0.5, 0.0, 1.0)


def _lung_fields(
    rng: np.random.Generator, y: np.ndarray, x: np.ndarray, centre_x: float
) -> tuple[np.ndarray, list[tuple[float, float, float, float]]]:
    """Mask of both lungs and their (cy, cx, ry, rx) ellipses."""
    offset, centre_y = rng.uniform(0.16, 0.19), rng.uniform(0.44, 0.50)
    ellipses = [
        (centre_y + rng.normal(0.0, 0.01), centre_x + side * offset, rng.uniform(0.22, 0.27), rng.uniform(0.10, 0.13))
        for side in (-1.0, 1.0)
    ]
    masks = [_soft_ellipse(y, x, (cy, cx), (ry, rx), 0.25) for cy, cx, ry, rx in ellipses]
    return np.maximum(*masks), ellipses


def _rib_arcs(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, centre_x: float) -> np.ndarray:
    """Thin bright arcs bending down away from the midline, in [0, 1]."""
    frequency, curvature = rng.uniform(8.0, 11.0), rng.uniform(1.2, 2.0)
    phase = rng.uniform(0.0, 2 * np.pi)
    bent_y = y - curvature * (x - centre_x) ** 2
    arcs = (0.5 + 0.5 * np.cos(2 * np.pi * frequency * bent_y + phase)) ** 6
    chest_band = np.clip((0.8 - y) / 0.1, 0.0, 1.0) * np.clip((y - 0.15) / 0.1, 0.0, 1.0)
    return arcs * chest_band


def _opacities(
    rng: np.random.Generator, y: np.ndarray, x: np.ndarray, lungs: list[tuple[float, float, float, float]]
) -> np.ndarray:
    """Sum of a few broad Gaussian blobs centred inside the lung ellipses, capped at 1."""
    n_blobs = int(rng.integers(4, 8))
    sides = rng.integers(0, 2, n_blobs)
    sides[0], sides[1] = 0, 1  # at least one blob per lung
    angles, radii = rng.uniform(0, 2 * np.pi, n_blobs), np.sqrt(rng.uniform(0, 0.6, n_blobs))
    sigmas = rng.uniform(0.05, 0.09, n_blobs)
    total = np.zeros(np.broadcast_shapes(y.shape, x.shape), dtype=np.float32)
    for side, angle, radius, sigma in zip(sides, angles, radii, sigmas):
        cy, cx, ry, rx = lungs[side]
        by, bx = cy + radius * ry * np.sin(angle), cx + radius * rx * np.cos(angle)
        total += np.exp(-((y - by) ** 2 + (x - bx) ** 2) / np.float32(2 * sigma**2))
    return np.minimum(total, 1.0)


def encode_jpeg(pixels: np.ndarray, *, rgb: bool, progressive: bool, quality: int) -> bytes:
    """JPEG bytes of a uint8 gray image, stored as 'L' or as gray content in 'RGB'."""
    image = Image.fromarray(pixels)
    if rgb:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, progressive=progressive)
    return buffer.getvalue()


def _write_bad_files(folder: Path, spec: SyntheticSpec, split_index: int, label: int) -> None:
    """Write every name of BAD_FILE_NAMES: broken JPEGs and OS/user litter."""
    rng = _image_rng(spec, _BAD_FILE_STREAM, split_index, label, 0)
    valid = _synthetic_jpeg(rng, spec, pneumonia=bool(label), rgb=False, progressive=False)
    garbage = rng.integers(0, 255, 38, dtype=np.uint8).tobytes()  # never 0xFF: no marker
    contents = {
        "empty.jpeg": b"",
        "truncated.jpeg": valid[: len(valid) // 2],
        "corrupt_header.jpeg": valid[:2] + garbage + valid[40:],
        ".DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(56),
        "Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(56),
        "notes.txt": b"Synthetic set: these files are not images and must be skipped.\n",
    }
    for name in BAD_FILE_NAMES:
        (folder / name).write_bytes(contents[name])


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of the CLI."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.synthetic",
        description="Write a synthetic chest-X-ray set in the Kermany ImageFolder layout "
        "(OUT/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg).",
    )
    parser.add_argument("--out", type=Path, required=True, help="root folder to create (must not hold a split)")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same bytes (default 0)")
    parser.add_argument(
        "--n-train", type=int, nargs=2, default=(24, 48), metavar=("NORMAL", "PNEUMONIA"),
        help="train images per class (default 24 48)",
    )
    parser.add_argument(
        "--n-test", type=int, nargs=2, default=(12, 20), metavar=("NORMAL", "PNEUMONIA"),
        help="test images per class (default 12 20)",
    )
    parser.add_argument(
        "--bad-files", action="store_true",
        help="also write broken and non-image files in train/*/ that a loader must skip",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        make_synthetic_dataset(
            args.out, n_train=tuple(args.n_train), n_test=tuple(args.n_test), seed=args.seed, bad_files=args.bad_files
        )
    except (ValueError, OSError) as error:
        logger.error("%s", error)
        return 1
    n_images = sum(args.n_train) + sum(args.n_test)
    n_bad = len(BAD_FILE_NAMES) * len(CLASSES) if args.bad_files else 0
    logger.info(
        "wrote %d images (train %s, test %s) + %d bad files to %s in %.2f s (seed %d)",
        n_images, tuple(args.n_train), tuple(args.n_test), n_bad, args.out, time.perf_counter() - start, args.seed,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
