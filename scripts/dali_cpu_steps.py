"""Where the DALI CPU loader's time goes: the training graph with its random steps taken away one at a time.

Each row is the DALI CPU training loader (``pipelines.dali.DaliLoader``, augment=True) over the same files, with
``pipelines.dali.train_graph`` replaced by a reduced graph; CPU ms per image counts every thread of the process
(DALI's and the feeding thread), so the differences between rows are what each step costs. Every row is fed
the numpy noise draws of the real loader (0.29 ms per image), used or not: the "+ noise" row measures the
multiplication only. The first row runs twice and its first (warm-up) run is dropped.

    .venv/bin/python scripts/dali_cpu_steps.py                      # 224 set, 400 files x 3, batch 64, 2 threads
    .venv/bin/python scripts/dali_cpu_steps.py --data ../shared/data/chest_xray_fullres --files 160
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import SHARED_DATA, run_cli, script_parser  # noqa: E402

import numpy as np  # noqa: E402
from nvidia.dali import fn, types  # noqa: E402

import pipelines.dali as D  # noqa: E402
from pipelines.bench import list_images, loader_images_per_s, repeated_sampler  # noqa: E402
from report import markdown_table  # noqa: E402


def flip(images):
    return fn.flip(images, horizontal=fn.random.coin_flip(probability=D.FLIP_PROBABILITY))


def rotate(images):
    return D.rotate_ccw(images, fn.random.uniform(range=[-D.MAX_ROTATION_DEG, D.MAX_ROTATION_DEG]))


def three_planes(images, factor=None):
    """CHW with 3 channels, as the real graphs end: a grayscale file's one plane broadcast by a
    multiplication (by ones, or by the noise), so every row pays the same final multiplication."""
    ones = types.Constant(np.ones((3, 1, 1), np.float32), device="cpu")
    return D.to_chw(images) * (ones if factor is None else factor)


VARIANTS = {
    "/255": lambda images, noise: three_planes(images / 255.0),
    "/255 + flip": lambda images, noise: three_planes(flip(images / 255.0)),
    "/255 + flip + rotation": lambda images, noise: three_planes(rotate(flip(images / 255.0))),
    "/255 + noise": lambda images, noise: three_planes(images / 255.0, noise),
    "/255 + flip + rotation + noise (the training graph)": D.train_graph,
}


def main() -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--data", default=str(SHARED_DATA / "chest_xray_224"), help="folder of JPEGs (recursive)")
    parser.add_argument("--files", type=int, default=400, help="files to use (the first N)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the files per row")
    parser.add_argument("--batch-size", type=int, default=64, help="DALI batch size")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads")
    args = parser.parse_args()
    files = list_images(Path(args.data), args.files)
    order = repeated_sampler(len(files), args.repeats)
    warnings.filterwarnings("ignore", message=".*is not used.*")  # the reduced graphs leave the noise unused
    rows = []
    full = D.train_graph
    try:
        for name, graph in [next(iter(VARIANTS.items())), *VARIANTS.items()]:  # the first twice: warm-up
            D.train_graph = graph
            cpu = time.process_time()
            ips = loader_images_per_s(D.DaliLoader(files, [0] * len(files), order, batch_size=args.batch_size,
                                                   augment=True, num_threads=args.threads))
            if name in (row["graph"] for row in rows):
                rows.clear()  # drop the warm-up
            rows.append({"graph": name, "img/s": round(ips), "CPU ms/img": (time.process_time() - cpu) * 1000 / len(order)})
    finally:
        D.train_graph = full
    print(f"DALI CPU loader, {len(files)} files of {args.data} x{args.repeats}, batch {args.batch_size}, "
          f"{args.threads} threads")
    print(markdown_table(rows, digits=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
