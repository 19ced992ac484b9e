"""scripts/jpeg_decode_floor.py: each decoder row decodes what its name says (the scale, the planes),
on real full-resolution files, and the script prints and saves its table. No timing is asserted."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from .helpers import FULLRES, SMALL_224, real_files, load_script


@pytest.fixture(scope="module")
def floor():
    return load_script("jpeg_decode_floor")


@pytest.fixture(scope="module")
def files():
    return real_files(FULLRES, step=11)  # 15 files, both classes, two colour JPEGs, one under 448 px


@pytest.fixture(scope="module")
def encoded(floor, files):
    return floor.read_files(files)


def test_the_files_include_both_kinds(encoded):
    components = {header[2] for _, header in encoded}
    assert components == {1, 3}, components
    assert any(min(w, h) < 2 * 224 for w, h, _ in (header for _, header in encoded))  # decoded at 1/1


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_fixed_scale_decodes_at_that_scale(floor, encoded, factor):
    decode = floor.fixed_scale(factor)
    for data, (width, height, components) in encoded:
        image = decode(data, (width, height, components))
        assert image.shape[:2] == (math.ceil(height / factor), math.ceil(width / factor))
        assert image.ndim == (2 if components == 1 else 3)


def test_ours_is_the_smallest_scale_keeping_224(floor, encoded):
    for data, header in encoded:
        width, height, _ = header
        factor = next((f for f in (8, 4, 2) if min(width, height) // f >= floor.SIZE), 1)
        assert floor.ours(data, header).shape[:2] == (math.ceil(height / factor), math.ceil(width / factor))


def test_ours_matches_the_loader_decode(floor, files, encoded):
    """The row times what pipelines.imageio.load_cv2_reduced decodes (less the file read): the same
    pixels, one plane for gray files, BGR for colour ones (the loader converts to RGB afterwards)."""
    from pipelines import imageio

    for path, (data, header) in zip(files, encoded):
        loader = np.asarray(imageio.load_cv2_reduced(path))
        mine = floor.ours(data, header)
        if mine.ndim == 2:
            assert np.array_equal(loader[:, :, 0], mine)
        else:
            assert np.array_equal(loader, mine[:, :, ::-1])


def test_pil_rows(floor, encoded):
    for data, (width, height, _) in encoded:
        whole = floor.pil_whole(data, (width, height, 0))
        assert whole.mode == "RGB" and whole.size == (width, height)
        draft = floor.pil_draft(data, (width, height, 0))
        assert min(draft.size) >= min(floor.SIZE, width, height)
        if min(width, height) >= 2 * floor.SIZE:  # libjpeg scales it down by 2, 4 or 8
            assert draft.size[0] <= math.ceil(width / 2) and draft.size[1] <= math.ceil(height / 2)


def test_dali_rows_run(floor, encoded):
    pytest.importorskip("nvidia.dali")
    assert floor.dali_cpu_ms(encoded[:4], repeats=1, batch_size=2) > 0
    assert floor.dali_cpu_ms(encoded[:4], repeats=1, resize=True, batch_size=2) > 0


def test_non_jpeg_refused_by_name(floor, tmp_path):
    from PIL import Image

    png = tmp_path / "scan.png"
    Image.new("L", (300, 300)).save(png)
    with pytest.raises(ValueError, match="scan.png"):
        floor.read_files([str(png)])


def test_main_prints_and_saves_the_table(floor, tmp_path, capsys):
    out = tmp_path / "floor.json"
    assert floor.main(["--data", str(SMALL_224 / "test"), "--files", "6", "--repeats", "1", "--no-dali",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    names = [r["decoder"] for r in rows]
    assert names[: len(floor.DECODERS)] == list(floor.DECODERS)
    assert next(r for r in rows if r["decoder"] == floor.FLOOR_ROW)["x_floor"] == 1.0
    assert all(r["ms_per_image"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "| OpenCV 1/8 (DC only: the entropy-decoding floor) |" in printed and "above the floor" in printed


@pytest.mark.parametrize("argv, fragment", [([], "no images under"), (["--files", "0"], "--files must be at least 1"),
                                            (["--repeats", "0"], "--repeats must be at least 1")])
def test_main_refuses_bad_input_in_one_line(floor, tmp_path, capsys, argv, fragment):
    with pytest.raises(SystemExit) as stop:
        floor.main(["--data", str(tmp_path), *argv])
    assert stop.value.code == 2 and fragment in capsys.readouterr().err
