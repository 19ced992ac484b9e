"""What feeding the DALI loader costs the thread that iterates it (the training loop's thread).

DALI calls a non-parallel external source from the thread that schedules the pipeline, so reading
the batch's files (and, on the CPU, drawing its noise) came out of the training loop's time.  With
``DaliLoader(read_ahead=...)`` > 0 (default ``pipelines.dali.READ_AHEAD``) a thread of its own feeds the batches ahead.  This runs the DALI
loader (training augmentation, batch 16) over the same files with both settings, interleaved, and
prints images per second and the iterating thread's CPU milliseconds per batch (``time.thread_time``).

    python scripts/dali_feed_cost.py [--data ../shared/data/chest_xray_fullres] [--passes 3] [--repeats 3]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import SHARED_DATA, run_cli, script_parser  # noqa: E402

import pipelines.dali as dali  # noqa: E402
from report import markdown_table  # noqa: E402

BATCH = 16


def one_pass(files: list[str], passes: int, threads: int, device_id: int | None, seed: int,
             read_ahead: int) -> tuple[float, float]:
    """(images/s, CPU ms of the iterating thread per batch), after the first batch."""
    order = list(range(len(files))) * passes
    loader = dali.DaliLoader(files, [0] * len(files), order, batch_size=BATCH, augment=True, num_threads=threads,
                             device_id=device_id, seed=seed, read_ahead=read_ahead)
    it = iter(loader)
    next(it)
    start, cpu, n = time.perf_counter(), time.thread_time(), 0
    for _x, y in it:
        n += len(y)
    if device_id is not None:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start), (time.thread_time() - cpu) / (n / BATCH) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "chest_xray_fullres",
                        help="folder of JPEGs (recursive)")
    parser.add_argument("--passes", type=int, default=3, help="passes over the files per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per setting, interleaved (median)")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads")
    parser.add_argument("--gpu", action="store_true", help="DALI on cuda:0 (default: the CPU)")
    args = parser.parse_args(argv)
    files = sorted(str(p) for p in args.data.rglob("*.jpeg"))
    if not files:
        print(f"no JPEGs under {args.data}", file=sys.stderr)
        return 2
    settings = {"in the iterating thread (read_ahead 0)": 0, f"fed ahead by its own thread (read_ahead {dali.READ_AHEAD})": dali.READ_AHEAD}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
    for r in range(args.repeats):
        for name, ahead in settings.items():
            results[name].append(one_pass(files, args.passes, args.threads, 0 if args.gpu else None, r, ahead))
    rows = [{"feeding": name, "img/s": f"{statistics.median(v[0] for v in values):.0f}",
             "iterating thread CPU ms / batch": f"{statistics.median(v[1] for v in values):.2f}"}
            for name, values in results.items()]
    print(f"DALI {'GPU' if args.gpu else 'CPU'} loader, training augmentation, batch {BATCH}, {args.threads} threads, "
          f"{len(files)} files of {args.data} x {args.passes}, median of {args.repeats}")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
