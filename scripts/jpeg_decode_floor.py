"""How fast can a chest X-ray JPEG be decoded on one core: the floor under every CPU loader's speed.

Each row decodes the same files, read into memory once (no file I/O), on one thread, best of
``--repeats`` passes, milliseconds per image:

- PIL, whole file to RGB: the decode of the plain torchvision baseline (ImageFolder's loader);
- PIL with JPEG draft downscaling (1/2, 1/4 or 1/8 inside libjpeg);
- OpenCV at a fixed scale, 1/1, 1/2, 1/4 and 1/8 (``IMREAD_REDUCED_*``), one plane for 1-component
  files; the 1/8 decode keeps only each block's DC coefficient, so it does almost no inverse DCT,
  colour conversion or upsampling: what remains is reading the file's entropy-coded data, which no
  output scale avoids;
- OpenCV at the smallest scale that keeps both sides >= 224: what our loader does
  (``pipelines.imageio.load_cv2_reduced``, less its file read and header parse);
- simplejpeg (libjpeg-turbo, ``fastdct`` and ``fastupsample``), at the same scale, when installed
  (it is not a project dependency: ``pip install simplejpeg`` to add the row);
- DALI's CPU decoder (``fn.decoders.image``, one thread, batch 16), whole file: DALI 2.4 has no
  reduced-scale decode. CPU time of the whole process per image, so DALI's own threads count; a
  second DALI row adds the loader's resize to 224 x 224, which has to start from the whole image.

    .venv/bin/python scripts/jpeg_decode_floor.py                 # the 160 full-resolution files
    .venv/bin/python scripts/jpeg_decode_floor.py --json /tmp/floor.json
"""
from __future__ import annotations

import importlib.util
import io
import json
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import SHARED_DATA, run_cli, script_parser  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines import imageio  # noqa: E402
from pipelines.bench import list_images  # noqa: E402
from report import markdown_table  # noqa: E402

SIZE = imageio.TARGET_SIZE


def _cv2():
    import cv2

    cv2.setNumThreads(1)
    return cv2


def fixed_scale(factor: int) -> Callable[[np.ndarray, tuple[int, int, int]], np.ndarray]:
    """OpenCV decode at 1/factor of each side, one plane for 1-component files, three otherwise."""
    cv2 = _cv2()
    flags = {1: (cv2.IMREAD_GRAYSCALE, cv2.IMREAD_COLOR),
             2: (cv2.IMREAD_REDUCED_GRAYSCALE_2, cv2.IMREAD_REDUCED_COLOR_2),
             4: (cv2.IMREAD_REDUCED_GRAYSCALE_4, cv2.IMREAD_REDUCED_COLOR_4),
             8: (cv2.IMREAD_REDUCED_GRAYSCALE_8, cv2.IMREAD_REDUCED_COLOR_8)}[factor]

    def decode(data: np.ndarray, header: tuple[int, int, int]) -> np.ndarray:
        return cv2.imdecode(data, flags[0] if header[2] == 1 else flags[1])

    return decode


def smallest_scale() -> Callable[[np.ndarray, tuple[int, int, int]], np.ndarray]:
    """OpenCV decode at the smallest scale keeping both sides >= 224, as our loader chooses it."""
    cv2 = _cv2()

    def decode(data: np.ndarray, header: tuple[int, int, int]) -> np.ndarray:
        width, height, components = header
        return cv2.imdecode(data, imageio._reduced_flag(width, height, SIZE, components == 1))

    return decode


ours = smallest_scale()


def pil_whole(data: np.ndarray, header: tuple[int, int, int]) -> Image.Image:
    """As ImageFolder's loader: open, convert to RGB (a PIL image, not copied to numpy)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def pil_draft(data: np.ndarray, header: tuple[int, int, int]) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.draft(img.mode, (SIZE, SIZE))
        img.load()
        return img


def simplejpeg_decoder() -> Callable | None:
    try:
        import simplejpeg
    except ImportError:
        return None

    def decode(data: np.ndarray, header: tuple[int, int, int]) -> np.ndarray:
        return simplejpeg.decode_jpeg(data.tobytes(), colorspace="GRAY" if header[2] == 1 else "RGB",
                                      min_height=SIZE, min_width=SIZE, fastdct=True, fastupsample=True)

    return decode


DECODERS: dict[str, Callable] = {
    "PIL, whole file to RGB (the plain baseline's decode)": pil_whole,
    "PIL draft (1/2, 1/4 or 1/8 in libjpeg)": pil_draft,
    "OpenCV 1/1": fixed_scale(1),
    "OpenCV 1/2": fixed_scale(2),
    "OpenCV 1/4": fixed_scale(4),
    "OpenCV 1/8 (DC only: the entropy-decoding floor)": fixed_scale(8),
    "OpenCV, smallest scale >= 224 (our loader)": ours,
}
FLOOR_ROW = "OpenCV 1/8 (DC only: the entropy-decoding floor)"
OURS_ROW = "OpenCV, smallest scale >= 224 (our loader)"
PLAIN_ROW = "PIL, whole file to RGB (the plain baseline's decode)"


def read_files(files: list[str]) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """Each file's bytes and JPEG header; non-JPEG files are refused by name."""
    out = []
    for path in files:
        data = np.fromfile(path, dtype=np.uint8)
        header = imageio.jpeg_header(data)
        if header is None or header[2] not in (1, 3):
            raise ValueError(f"{path}: not a 1- or 3-component JPEG")
        out.append((data, header))
    return out


def time_decoder(decode: Callable, encoded: list, repeats: int) -> float:
    """Best wall ms per image over ``repeats`` passes of one thread."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for data, header in encoded:
            if decode(data, header) is None:
                raise ValueError("a decoder returned nothing")
        best = min(best, time.perf_counter() - start)
    return best / len(encoded) * 1e3


def dali_cpu_ms(encoded: list, repeats: int, resize: bool = False, batch_size: int = 16) -> float:
    """CPU ms per image (every thread of the process) of DALI's CPU decoder, whole file, one thread;
    with ``resize``, followed by the loader's own resize to 224 x 224 (``pipelines.dali.decode_resize``)."""
    from nvidia.dali import fn, pipeline_def, types

    from pipelines.dali import decode_resize

    blobs = [data for data, _ in encoded]
    gray = [header[2] == 1 for _, header in encoded]
    batches = [range(i, min(i + batch_size, len(blobs))) for i in range(0, len(blobs), batch_size)]

    def source(info):
        batch = batches[info.iteration % len(batches)]
        return [blobs[i] for i in batch], [np.array(gray[i]) for i in batch]

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, enable_conditionals=True,
                  prefetch_queue_depth=1)
    def decode_pipe():
        jpegs, is_gray = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                            dtype=[types.UINT8, types.BOOL], ndim=[1, 0])
        if resize:
            return decode_resize(jpegs, is_gray, "cpu", SIZE)
        if is_gray:
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY)
        else:
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        return images

    pipe = decode_pipe()
    pipe.build()

    def one_pass() -> None:
        for _ in batches:
            pipe.run()

    best = float("inf")
    for attempt in range(repeats + 1):  # the first pass warms DALI's buffers up and is dropped
        start = time.process_time()
        one_pass()
        if attempt:
            best = min(best, time.process_time() - start)
    return best / len(blobs) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--data", default=str(SHARED_DATA / "chest_xray_fullres"),
                        help="folder of JPEGs, searched recursively (default: %(default)s)")
    parser.add_argument("--files", type=int, default=None, help="use the first N files (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per decoder, best kept (default: 3)")
    parser.add_argument("--no-dali", action="store_true", help="skip the DALI row")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.files is not None and args.files < 1:
        parser.error("--files must be at least 1")

    folder = Path(args.data)
    files = list_images(folder, args.files) if folder.is_dir() else []
    if not files:
        parser.error(f"no images under {folder}")
    encoded = read_files(files)
    decoders = dict(DECODERS)
    extra = simplejpeg_decoder()
    if extra is not None:
        decoders["simplejpeg fastdct + fastupsample, smallest scale >= 224"] = extra

    rows = [{"decoder": name, "ms_per_image": time_decoder(decode, encoded, args.repeats)}
            for name, decode in decoders.items()]
    dali = not args.no_dali and importlib.util.find_spec("nvidia.dali") is not None
    if dali:
        rows.append({"decoder": "DALI CPU decoders.image, whole file (CPU ms, all threads)",
                     "ms_per_image": dali_cpu_ms(encoded, args.repeats)})
        rows.append({"decoder": "DALI CPU, whole file + the loader's resize to 224 (CPU ms, all threads)",
                     "ms_per_image": dali_cpu_ms(encoded, args.repeats, resize=True)})
    by_name = {row["decoder"]: row["ms_per_image"] for row in rows}
    for row in rows:
        row["x_floor"] = row["ms_per_image"] / by_name[FLOOR_ROW]

    sizes = np.array([[h[0], h[1]] for _, h in encoded])
    print(f"# {len(files)} files from {folder}, mean {sizes[:, 0].mean():.0f} x {sizes[:, 1].mean():.0f} px, "
          f"{sum(d.size for d, _ in encoded) / len(files) / 1e3:.0f} kB; one thread, best of {args.repeats}")
    print(markdown_table(rows, digits=2))
    print(f"\nour decode is {by_name[OURS_ROW] - by_name[FLOOR_ROW]:.2f} ms above the floor; the plain baseline's "
          f"decode alone is {by_name[PLAIN_ROW] / by_name[FLOOR_ROW]:.2f} x the floor")
    if extra is None:
        print("(simplejpeg not installed: its row is left out)")
    if not args.no_dali and not dali:
        print("(DALI not installed, the project's [dali] extra: its rows are left out)")
    if args.json:
        args.json.write_text(json.dumps({"files": len(files), "data": str(folder), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
