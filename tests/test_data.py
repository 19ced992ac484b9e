"""Indexing: bad files skipped and counted, bad folders refused, every image mode to 3 channels."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import imageio
from pipelines.data import index_dataset
from pipelines.synthetic import BAD_FILE_NAMES

from .helpers import FULLRES, real_files

ROOT = Path(__file__).resolve().parents[1]


def test_index_counts_and_classes(tiny_folder):
    index = index_dataset(tiny_folder)
    assert index.classes == ["NORMAL", "PNEUMONIA"]
    assert index.class_counts("train") == {"NORMAL": 12, "PNEUMONIA": 20}
    assert index.class_counts("test") == {"NORMAL": 6, "PNEUMONIA": 10}
    assert index.skipped == []


def test_bad_files_are_skipped_counted_and_warned(bad_folder, caplog):
    with caplog.at_level("WARNING"):
        index = index_dataset(bad_folder)
    skipped_names = sorted(Path(p.path).name for p in index.skipped)
    assert skipped_names == sorted(BAD_FILE_NAMES * 2)
    assert index.class_counts("train") == {"NORMAL": 4, "PNEUMONIA": 6}
    per_file = [r for r in caplog.records if r.message.startswith("skipping ")]
    assert len(per_file) == 2 * len(BAD_FILE_NAMES)
    assert "skipped 12 bad file(s)" in caplog.text
    reasons = {Path(p.path).name: p.reason for p in index.skipped}
    assert "0 bytes" in reasons["empty.jpeg"] and "truncated" in reasons["truncated.jpeg"]
    # Every file that made it into the index decodes.
    for path, _ in index.train.samples:
        assert imageio.load_cv2_reduced(path).shape[2] == 3


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("breakage, error, fragment", [
    (lambda r: shutil.rmtree(r / "test"), FileNotFoundError, "test"),
    (lambda r: shutil.rmtree(r / "train"), FileNotFoundError, "train"),
    (lambda r: [p.unlink() for p in (r / "train" / "NORMAL").iterdir()], ValueError, "NORMAL"),
    (lambda r: shutil.rmtree(r / "train" / "NORMAL"), ValueError, "two class folders"),
    (lambda r: (r / "test" / "PNEUMONIA").rename(r / "test" / "VIRAL"), ValueError, "differ"),
])
def test_bad_folders_raise_naming_the_path(tiny_folder, tmp_path, breakage, error, fragment):
    root = copy_tree(tiny_folder, tmp_path / "data")
    breakage(root)
    with pytest.raises(error) as info:
        index_dataset(root)
    assert fragment in str(info.value) and str(root) in str(info.value)


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        index_dataset(tmp_path / "nothere")


def write_modes(folder: Path) -> dict[str, Path]:
    """One file per awkward mode, all with a known gradient."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.float32), (48, 1))
    gray = Image.fromarray(ramp.astype(np.uint8), "L")
    files = {
        "L": (gray, "l.jpeg", {}),
        "RGB": (gray.convert("RGB"), "rgb.jpeg", {}),
        "progressive": (gray, "prog.jpeg", {"progressive": True}),
        "CMYK": (gray.convert("CMYK"), "cmyk.jpeg", {}),
        "RGBA": (gray.convert("RGBA"), "rgba.png", {}),
        "P": (gray.convert("P"), "palette.png", {}),
        "I;16": (Image.fromarray((ramp * 257).astype(np.uint16)), "sixteen.png", {}),
    }
    out = {}
    for mode, (img, name, kw) in files.items():
        img.save(folder / name, **kw)
        out[mode] = folder / name
    return out


@pytest.mark.parametrize("loader", sorted(imageio.LOADERS))
def test_every_mode_comes_out_as_rgb8(tmp_path, loader):
    for mode, path in write_modes(tmp_path).items():
        assert imageio.check_image_file(path) is None, mode
        arr = np.asarray(imageio.LOADERS[loader](str(path)))
        assert arr.shape == (48, 64, 3) and arr.dtype == np.uint8, (mode, arr.shape, arr.dtype)
        # The gradient survives: dark on the left, bright on the right, channels close.
        assert arr[:, :4].mean() < 30 and arr[:, -4:].mean() > 200, mode
        assert np.abs(arr.astype(int) - arr[..., :1]).max() <= 12, mode


@pytest.mark.data
def test_jpeg_header_matches_pil():
    for path in real_files(FULLRES, n=20, step=8):
        with Image.open(path) as img:
            expected = (*img.size, len(img.getbands()))
        assert imageio.jpeg_header(np.fromfile(path, dtype=np.uint8)) == expected


@pytest.mark.slow
def test_check_data_cli(bad_folder, tmp_path):
    run = subprocess.run([sys.executable, "train.py", "--data-dir", str(bad_folder), "--check-data"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "skipped: 12 file(s)" in run.stdout and "truncated.jpeg" in run.stdout
    assert "NORMAL 4, PNEUMONIA 6" in run.stdout
    bad = subprocess.run([sys.executable, "train.py", "--data-dir", str(tmp_path / "none"), "--check-data"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "none" in bad.stderr and "Traceback" not in bad.stderr
