"""Tests of the decoded cache (pipelines/decoded_cache.py) and of DaliLoader fed from it.

The augmentation statistics from a cache are tested with the uncached ones in
tests/test_dali.py (flip rate and angles, noise), parametrised over `cached`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from benchmarks.loaders import bench_cached_loaders  # noqa: E402
from pipelines.dali import DaliLoader, ImageDecodeError  # noqa: E402
from pipelines.decoded_cache import DecodedCache  # noqa: E402
from pipelines.imageio import load_cv2_reduced, shared_channels  # noqa: E402
from pipelines.loaders import LoaderSettings, cached_view  # noqa: E402
from tests.test_dali import (  # noqa: E402
    FULLRES,
    SIZE,
    collect,
    index_value,
    real_files,
    requires_cuda,
    write_jpeg,
)

N_FILES = 19


def numbered_pixels(i: int) -> np.ndarray:
    """File i's constant 48 x 64 pixels: grey level `index_value(i)`, as one component for
    even i, slightly tinted RGB (channels v + 6, v, v - 6) for odd i; the decoded mean
    rounds to v either way."""
    v = index_value(i)
    if i % 2 == 0:
        return np.full((48, 64), v, np.uint8)
    return np.broadcast_to(np.array([v + 6, v, v - 6], np.uint8), (48, 64, 3)).copy()


@pytest.fixture(scope="module")
def index_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Constant non-square JPEGs numbered by grey level: even ones grayscale, odd ones
    colour, so the cache stores both kinds."""
    root = tmp_path_factory.mktemp("cache_jpegs")
    return [write_jpeg(root / f"index_{i:02d}.jpeg", numbered_pixels(i)) for i in range(N_FILES)]


def fullres_sample() -> list[str]:
    """Real full-resolution files: every 10th (grayscale) plus the RGB and progressive
    ones of `tests.test_dali.real_files`."""
    every_10th = sorted(str(p) for p in FULLRES.rglob("*.jpeg"))[::10]
    return every_10th + [f for f in real_files() if "chest_xray_fullres" in f]


@pytest.mark.data
def test_rgb_jpegs_of_gray_content_cached_as_one_plane(index_files):
    """The RGB JPEGs of chest_xray_224 and of the fullres set hold gray content (equal
    decoded channels): one plane each; a tinted file keeps three."""
    rgb_of_gray = [f for f in real_files() if "chest_xray_224" in f or "person" in f]
    cache = DecodedCache(rgb_of_gray + [index_files[1]]).fill()
    planes = [image.shape[2] for image in cache.images(range(len(cache)))]
    assert planes == [1] * len(rgb_of_gray) + [3]


def test_one_plane_per_grayscale_file_three_per_rgb_file(index_files):
    cache = DecodedCache(index_files).fill()
    images = cache.images(range(N_FILES))
    assert [image.shape for image in images] == [
        (SIZE, SIZE, 1 if i % 2 == 0 else 3) for i in range(N_FILES)
    ]
    assert all(image.dtype == np.uint8 and not image.flags.writeable for image in images)
    assert [int(np.median(image)) for image in images] == [index_value(i) for i in range(N_FILES)]
    assert cache.nbytes == (10 * 1 + 9 * 3) * SIZE * SIZE
    assert shared_channels(cache.rgb(0)) and not shared_channels(cache.rgb(1))
    assert cache.rgb(0).shape == cache.rgb(1).shape == (SIZE, SIZE, 3)


def test_lazy_fill_decodes_only_what_is_asked_then_fill_completes(index_files):
    cache = DecodedCache(index_files, batch_size=4)
    first = cache.images([5, 2, 5])
    assert cache.filled == 2 and cache.nbytes == (1 + 3) * SIZE * SIZE
    assert np.array_equal(first[0], first[2])
    cache.fill()
    assert cache.filled == N_FILES
    assert np.array_equal(cache.images([5])[0], first[0])


@pytest.mark.parametrize("augment", [False, True])
def test_cached_loader_delivers_sampler_order_duplicates_and_partial_batch(index_files, augment):
    order = [5, 3, 3, 18, 0, 5, 5, 12, 17, 1, 18, 7, 7, 14, 2, 9, 9, 9, 4]
    cache = DecodedCache(index_files)  # filled lazily by the loader
    loader = DaliLoader(index_files, list(range(N_FILES)), order, batch_size=8,
                        augment=augment, cache=cache)
    x, y, sizes = collect(loader)
    assert len(loader) == 3 and sizes == [8, 8, 3]
    assert x.shape == (len(order), 3, SIZE, SIZE) and x.dtype == torch.float32
    assert y.tolist() == order
    if not augment:
        grey = (x.mean(dim=(1, 2, 3)) * 255).round()
        assert grey.tolist() == [index_value(i) for i in order]


@pytest.mark.data
@pytest.mark.parametrize("augment", [False, True])
def test_cached_batches_equal_uncached_ones_on_real_files(augment):
    """Fullres files (grayscale, progressive, RGB) and 224 ones (RGB of gray content,
    cached as one plane). Tolerance 0 on the CPU: the cache holds the loader's own decode and
    resize, and the random draws depend on the seed only, so two epochs from a cache are the
    uncached ones bit for bit (not on a GPU, whose nvJPEG decode and resize round otherwise)."""
    files = fullres_sample() + [f for f in real_files() if "chest_xray_224" in f]
    order = [3, 0, 0, len(files) - 1, *range(len(files))]

    def two_epochs(cache: DecodedCache | None) -> list[torch.Tensor]:
        loader = DaliLoader(files, [0] * len(files), order, batch_size=6, augment=augment,
                            seed=11, cache=cache)
        return [collect(loader)[0] for _ in range(2)]

    uncached, cached = two_epochs(None), two_epochs(DecodedCache(files).fill())
    assert all(torch.equal(a, b) for a, b in zip(uncached, cached))
    assert torch.equal(cached[0], cached[1]) == (not augment)  # new draws each epoch


@pytest.mark.data
def test_cache_closer_to_pil_than_the_opencv_reduced_decoder():
    """Why the cache decodes with DALI: against PIL decode + bilinear resize, DALI's
    decode and antialiased resize differ by 0.09 / 255 on average over the 160 fullres
    files, OpenCV's DCT-downscaled decode + INTER_AREA resize by 0.70 / 255."""
    import cv2

    files = fullres_sample()
    cache = DecodedCache(files).fill()
    pil = [np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.int16)
           for f in files]
    cv = [cv2.resize(np.ascontiguousarray(load_cv2_reduced(f)), (SIZE, SIZE),
                     interpolation=cv2.INTER_AREA) for f in files]
    dali_diff = np.mean([np.abs(cache.rgb(i) - p).mean() for i, p in enumerate(pil)])
    cv_diff = np.mean([np.abs(c - p).mean() for c, p in zip(cv, pil)])
    assert dali_diff < 0.3 < cv_diff


def test_cache_of_other_files_rejected(index_files):
    cache = DecodedCache(index_files[:3])
    with pytest.raises(ValueError, match="cache"):
        DaliLoader(index_files[:4], [0] * 4, range(4), augment=False, cache=cache)
    with pytest.raises(ValueError, match="size"):
        DaliLoader(index_files[:3], [0] * 3, range(3), augment=False, cache=cache, size=112)


@pytest.mark.timeout(60)
def test_fill_names_a_corrupt_file(index_files, tmp_path):
    bad = tmp_path / "truncated.jpeg"
    bad.write_bytes(Path(index_files[1]).read_bytes()[:300])
    files = index_files[:6] + [str(bad)] + index_files[6:]
    with pytest.raises(ImageDecodeError) as caught:
        DecodedCache(files, batch_size=4).fill()
    assert caught.value.path == str(bad)


def test_torchvision_chain_over_the_cache(index_files):
    """Our OpenCV chain after its resize, on cached images (grayscale and colour):
    3 x 224 x 224 float32, the cached value times noise in [1.2, 1.5] inside the picture,
    channels differing."""
    cache = DecodedCache(index_files)
    dataset = cached_view(cache, list(range(N_FILES)), augment=True, settings=LoaderSettings())
    torch.manual_seed(0)
    for i in (0, 1):
        x, label = dataset[i]
        assert label == i and x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        value = torch.from_numpy(cache.rgb(i)[SIZE // 2, SIZE // 2] / 255).float()
        noise = x[:, 92:132, 92:132] / value[:, None, None]
        assert 1.2 - 0.02 <= noise.min() and noise.max() <= 1.5 + 0.02
        assert not torch.equal(x[0], x[1])


@pytest.mark.data
@pytest.mark.timeout(180)
def test_bench_rows_and_dataloader_workers_forked_after_dali():
    """The rows benchmarks.loaders.bench_loaders expects; the torchvision row forks a DataLoader worker after
    DALI pipelines ran in this process (a pipeline collected in the worker would hang it)."""
    files = fullres_sample()[:3] + fullres_sample()[-3:]  # NORMAL and PNEUMONIA
    rows = bench_cached_loaders(files, batch_sizes=[4], repeats=2, workers=1)
    assert rows[0]["loader"].startswith("cache fill")
    assert [r["loader"] for r in rows[1:]] == [
        "DALI CPU", "DALI CPU cached", "torchvision ours (cv2) cached"]
    for row in rows:
        assert set(row) == {"data", "loader", "batch", "workers", "images", "images_per_s"}
        assert row["data"] == "chest_xray_fullres" and row["images_per_s"] > 0
    assert [r["images"] for r in rows] == [6, 12, 12, 12]


@pytest.mark.data
@requires_cuda
def test_gpu_cached_loader_on_device_and_eval_equal_to_cpu():
    """From the cache the GPU eval graph only transposes and divides, so it matches the
    CPU's to float rounding, and the uncached GPU loader (nvJPEG, GPU resize) only to within
    the smoke check's 0.005; training batches are on the device, in range."""
    files = fullres_sample()
    cache = DecodedCache(files).fill()

    def epoch(augment: bool, device_id: int | None, cached: bool = True) -> torch.Tensor:
        loader = DaliLoader(files, [0] * len(files), range(len(files)), batch_size=8,
                            augment=augment, device_id=device_id, cache=cache if cached else None)
        x, y, sizes = collect(loader)
        assert sum(sizes) == len(files) and y.tolist() == [0] * len(files)
        return x

    gpu_eval = epoch(False, 0)
    assert gpu_eval.device == torch.device("cuda", 0)
    assert (gpu_eval.cpu() - epoch(False, None)).abs().max() < 1e-6
    assert (epoch(False, 0, cached=False) - gpu_eval).abs().mean() < 0.005  # close, not equal
    train = epoch(True, 0)
    assert train.device == torch.device("cuda", 0) and train.shape == gpu_eval.shape
    assert 0 <= train.min() and 1.0 < train.max() <= 1.5 + 1e-6
