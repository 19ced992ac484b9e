"""Benchmarks: transform toolchains (per step), ``num_workers`` sweep, loaders, training fed by them.

    python -m benchmarks                      # transforms, workers, loaders: tables on stdout (make bench)
    python -m benchmarks --sections transforms --json out.json
    python -m benchmarks --sections training  # training fed by each loader (meant for a GPU)

Single-process timings run with one torch and one OpenCV thread, like a DataLoader worker.
Every ratio in a table is measured in the same run on the same files.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.common import format_rows, list_images, single_thread
from benchmarks.loaders import bench_loaders, bench_workers
from benchmarks.training import bench_training_feed
from benchmarks.toolchains import (PARITY_MEAN_TOL, PARITY_P99_TOL, TOOLCHAINS, bench_transforms, decode_only_ms,
                                   format_transform_table)
from models.engine import resolve_device
from pipelines.cli import SHARED_DATA
from pipelines.files import atomic_path
from pipelines.transforms import DEFAULT_TOOLCHAIN

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED_DATA,
                   help="folder holding chest_xray_fullres/ and chest_xray_224/ (default: %(default)s)")
    p.add_argument("--sections", nargs="+", default=["transforms", "workers", "loaders"],
                   choices=["transforms", "workers", "loaders", "training"],
                   help="what to measure (default: %(default)s); 'training' trains VGG16DWSep fed by each "
                        "loader against the same batches already on the device (benchmarks.training; "
                        "slow on a CPU, meant for a GPU)")
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
        rows = bench_loaders(datasets, args.batch_sizes, max(1, args.repeats), min_images=args.min_images)
        results["loaders"] = rows
        text.append(format_rows("loaders (img/s, same files, same run)", rows))
        save(results, args.json)
    if "training" in args.sections:
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
