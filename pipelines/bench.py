"""Benchmarks: transform toolchains (per step), ``num_workers`` sweep, loaders, training fed by them.

    python -m pipelines.bench                      # transforms, workers, loaders: tables on stdout
    python -m pipelines.bench --sections transforms --json out.json
    python -m pipelines.bench --sections training  # training fed by each loader (meant for a GPU)

Single-process timings run with one torch and one OpenCV thread, like a DataLoader worker.
Every ratio in a table is measured in the same run on the same files.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.engine import resolve_device

from . import imageio
from .cli import SHARED_DATA
from .files import atomic_path
from .transforms import DEFAULT_TOOLCHAIN, TOOLCHAINS, get_toolchain

logger = logging.getLogger(__name__)

#: A downscaling decoder is accepted when its evaluation output differs from the plain
#: chain's (full decode + antialiased bilinear resize) by at most this much, on [0, 1] values.
PARITY_MEAN_TOL = 2.0 / 255
PARITY_P99_TOL = 12.0 / 255


def single_thread() -> None:
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def list_images(folder: Path, limit: int | None = None) -> list[str]:
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in imageio.IMAGE_EXTENSIONS)
    return files[:limit] if limit else files


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
    chain = get_toolchain(name)
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


def eval_output(chain, path: str) -> torch.Tensor:
    return chain.eval(chain.loader(path))


def parity(name: str, files: list[str]) -> tuple[float, float]:
    """Mean and 99th percentile |difference| of ``name``'s evaluation output against plain's."""
    chain, plain = get_toolchain(name), get_toolchain("plain")
    diffs = [torch.abs(eval_output(chain, f) - eval_output(plain, f)).flatten() for f in files]
    d = torch.cat(diffs)
    return float(d.mean()), float(torch.quantile(d[:: max(1, d.numel() // 5_000_000)], 0.99))


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


def decode_only_ms(files: list[str], name: str = DEFAULT_TOOLCHAIN) -> float:
    chain = get_toolchain(name)
    t0 = time.perf_counter()
    for f in files:
        chain.loader(f)
    return 1000 * (time.perf_counter() - t0) / len(files)


def warmup_batches(loader) -> int:
    """Batches to leave out before timing a loader: its worker count (at least 1).

    DataLoader workers start together, so when the first batch arrives the other workers' first
    batches are (almost) done too; timing from the first batch would count their work as free
    and inflate short runs (160 files x 3 passes at batch 64: 659 img/s for our loader against
    499 over 10 passes). A DALI pipeline or a 0-worker loader makes one batch at a time: 1."""
    dataloader = getattr(loader, "dataloader", None)
    return max(1, getattr(dataloader, "num_workers", 0))


def loader_images_per_s(loader, epochs: int = 1, warmup: int | None = None) -> float:
    """Images per second over whole epochs of a loader, timed from the arrival of batch
    `warmup` (default `warmup_batches(loader)`: worker start-up and the batches made
    alongside the first one are not timed).

    Needs more than `warmup` batches in all: otherwise nothing would be timed."""
    warmup = warmup_batches(loader) if warmup is None else warmup
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 batch, got {warmup}")
    n = seen = 0
    start = None
    for _epoch in range(epochs):
        for images, _labels in loader:
            seen += 1
            if seen == warmup:
                start = time.perf_counter()
            elif seen > warmup:
                n += images.shape[0]
    if n == 0:
        raise ValueError(f"a loader benchmark needs more than {warmup} batches (the first {warmup} are not "
                         "timed); use more files, more repeats or a smaller batch size")
    return n / (time.perf_counter() - start)


def repeated_sampler(n_files: int, repeats: int) -> list[int]:
    return [i for _ in range(repeats) for i in range(n_files)]


def folder_dataset(files: list[str], loader, transform):
    """A minimal map-style dataset over a flat list of files (label 0), for loader benchmarks."""
    from torch.utils.data import Dataset

    class Files(Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int):
            return transform(loader(files[i])), 0

    return Files()


def bench_workers(files: list[str], workers: list[int], repeats: int, batch_size: int) -> list[dict]:
    from .loaders import TorchvisionLoader

    chain = get_toolchain(DEFAULT_TOOLCHAIN)
    ds = folder_dataset(files, chain.loader, chain.train)
    rows = []
    for w in workers:
        loader = TorchvisionLoader(ds, repeated_sampler(len(files), repeats), batch_size=batch_size,
                                   num_workers=w)
        ips = loader_images_per_s(loader)
        rows.append({"num_workers": w, "batch_size": batch_size, "images_per_s": ips})
        logger.info("num_workers=%d: %.1f img/s", w, ips)
    return rows


# --- output ------------------------------------------------------------------------------------

def format_transform_table(rows: list[ChainTiming]) -> str:
    out = []
    for ds in dict.fromkeys(r.dataset for r in rows):
        sub = [r for r in rows if r.dataset == ds]
        out.append(f"\n## transform chains on {ds} ({sub[0].images} images, 1 process, 1 thread)\n")
        out.append("| toolchain | decode | steps (ms, in order) | total ms/img | img/s | x plain | parity mean / p99 (x255) |")
        out.append("|---|---|---|---|---|---|---|")
        for r in sub:
            steps = " / ".join(f"{v:.2f}" for k, v in r.steps_ms.items() if k != "decode")
            par = "reference" if r.parity_mean is None else (
                f"{255 * r.parity_mean:.2f} / {255 * r.parity_p99:.1f} {'ok' if r.parity_ok else 'FAIL'}")
            out.append(f"| {r.toolchain} | {r.steps_ms['decode']:.2f} | {steps} | {r.total_ms:.2f} | "
                       f"{r.images_per_s:.0f} | {r.speedup_vs_plain:.2f} | {par} |")
    return "\n".join(out)


def cell(key: str, value: object) -> str:
    """A table cell: ratios (``x_...``) to 2 decimals, other floats to 1, None empty."""
    if isinstance(value, float):
        return f"{value:.2f}" if key.startswith("x_") else f"{value:.1f}"
    return "" if value is None else str(value)


def format_rows(title: str, rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))  # every column any row has, in order of appearance
    out = [f"\n## {title}\n", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = (r.get(k, "") for k in keys)
        out.append("| " + " | ".join(cell(k, v) for k, v in zip(keys, cells)) + " |")
    return "\n".join(out)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED_DATA,
                   help="folder holding chest_xray_fullres/ and chest_xray_224/ (default: %(default)s)")
    p.add_argument("--sections", nargs="+", default=["transforms", "workers", "loaders"],
                   choices=["transforms", "workers", "loaders", "training"],
                   help="what to measure (default: %(default)s); 'training' trains VGG16DWSep fed by each "
                        "loader against the same batches already on the device (pipelines.bench_training; "
                        "about 1.1 s a step at batch 16 on this 2-core CPU, meant for a GPU)")
    p.add_argument("--toolchains", nargs="+", default=list(TOOLCHAINS), choices=list(TOOLCHAINS),
                   help="transforms section: the decode + transform toolchains to time (default: all)")
    p.add_argument("--n224", type=int, default=400,
                   help="files of chest_xray_224's train/ to use, evenly spread (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=10,
                   help="passes over the files per measurement (default 10: with fewer, a loader's start-up "
                        "weighs on its figure)")
    p.add_argument("--min-images", type=int, default=0,
                   help="loaders section: at least this many images per measurement, by more passes over a "
                        "small file set (default: %(default)s, --repeats alone)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4],
                   help="workers section: DataLoader num_workers values to sweep (default: 0 1 2 4)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64],
                   help="loaders section: batch sizes (default: 16 64)")
    p.add_argument("--train-steps", type=int, default=40,
                   help="training section: timed steps per feed, after max(5, 2 x workers) untimed (default: "
                        "%(default)s; a loader slower than training may gain up to 2 x workers / steps)")
    p.add_argument("--train-batch-size", type=int, default=16,
                   help="training section: batch size (default: %(default)s, train.py's)")
    p.add_argument("--device", default="auto",
                   help="training section: cpu, cuda, cuda:N or auto = CUDA when present (default)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here (after each section)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for name in ("n224", "repeats", "train_steps", "train_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name, low in (("workers", 0), ("batch_sizes", 1)):
        bad = [v for v in getattr(args, name) if v < low]
        if bad:
            parser.error(f"--{name.replace('_', '-')}: {bad} out of range (workers >= 0, batch sizes >= 1)")
    if args.min_images < 0:
        parser.error(f"--min-images must be >= 0, got {args.min_images}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fullres_dir, small_dir = args.data / "chest_xray_fullres", args.data / "chest_xray_224"
    for d in (fullres_dir, small_dir):
        if not d.is_dir():
            print(f"error: benchmark data not found: {d} (use --data)", file=sys.stderr)
            return 2
    try:  # the device is chosen here, before any section runs
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    datasets = {"chest_xray_fullres": list_images(fullres_dir),
                "chest_xray_224": list_images(small_dir / "train", None)[:: max(1, 5216 // args.n224)][: args.n224]}
    single_thread()
    results: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                              "cuda": torch.cuda.is_available()},
                                  "tolerance": {"parity_mean": PARITY_MEAN_TOL, "parity_p99": PARITY_P99_TOL}}
    text = []
    if "transforms" in args.sections:
        rows = bench_transforms(datasets, args.toolchains, args.repeats)
        results["transforms"] = [asdict(r) for r in rows]
        fr = datasets["chest_xray_fullres"]
        results["decode_only_ms_fullres"] = decode_only_ms(fr)
        text.append(format_transform_table(rows))
        text.append(f"\ndecode alone ({DEFAULT_TOOLCHAIN} loader) on chest_xray_fullres: "
                    f"{results['decode_only_ms_fullres']:.2f} ms/img")
        save(results, args.json)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if "workers" in args.sections:
        rows = bench_workers(datasets["chest_xray_fullres"], args.workers, max(1, args.repeats), 16)
        results["workers"] = rows
        text.append(format_rows(f"num_workers sweep: default chain ({DEFAULT_TOOLCHAIN}) on "
                                "chest_xray_fullres, batch 16", rows))
        save(results, args.json)
    if "loaders" in args.sections:
        from .bench_loaders import bench_loaders

        rows = bench_loaders(datasets, args.batch_sizes, max(1, args.repeats), min_images=args.min_images)
        results["loaders"] = rows
        text.append(format_rows("loaders (img/s, same files, same run)", rows))
        save(results, args.json)
    if "training" in args.sections:
        from .bench_training import bench_training_feed

        rows = bench_training_feed(datasets["chest_xray_fullres"], args.train_batch_size, args.train_steps,
                                   os.cpu_count() or 1, device)
        results["training"] = rows
        text.append(format_rows(f"training VGG16DWSep on {device}, fed by each loader (chest_xray_fullres; "
                                "img/s of training steps)", rows))
        save(results, args.json)
    print("\n".join(text))
    return 0


def save(results: dict, path: Path | None) -> None:
    """Write the results so far (atomically), so a section that fails or is killed keeps the earlier ones."""
    if path is None:
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
