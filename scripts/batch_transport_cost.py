"""What moving a batch from DataLoader workers to the main process costs, with no image work at all.

Each row is a ``DataLoader`` whose dataset does nothing but hand over a float32 N x 3 x 224 x 224 batch
(``__getitems__``, identity collate), timed like the loader benchmark (``pipelines.bench.loader_images_per_s``:
from the arrival of one batch per worker). The difference between the rows is what our loader pays per
image on top of its transform chain:

- "fresh shared batch": a new shared-memory tensor per batch, as ``default_collate`` makes in a worker;
- "fresh private batch": a new ordinary tensor, which the worker's pickler then copies into shared memory;
- "one reused shared batch": the same shared-memory tensor every time (the floor: only the handle travels).
  Unsafe as a loader (the next batch overwrites the one the consumer holds); here only to show the floor.

Then two rows whose dataset hands over one ready image at a time, through ``TorchvisionLoader``:

- "per-image, DataLoader's collate": ``default_collate`` stacks them into a fresh shared batch;
- "per-image, leased shared slots (ours)": each image is copied into a reused shared slot
  (``pipelines.shared_batches``), which the consumer owns until it drops the batch.

    .venv/bin/python scripts/batch_transport_cost.py                  # 2 workers, batch 16 and 64
    .venv/bin/python scripts/batch_transport_cost.py --workers 4 --batches 200
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import run_cli, script_parser  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from pipelines.bench import loader_images_per_s  # noqa: E402
from pipelines.loaders import TorchvisionLoader  # noqa: E402
from report import markdown_table  # noqa: E402

SIZE = 224


class Batches(Dataset):
    """Hands over whole batches of zeros; `mode` says how each batch's memory is obtained."""

    def __init__(self, n: int, mode: str) -> None:
        self.n, self.mode = n, mode
        self.reused: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (len(indices), 3, SIZE, SIZE)
        if self.mode == "one reused shared batch":
            if self.reused is None or self.reused.shape[0] < len(indices):
                self.reused = torch.zeros(shape).share_memory_()
            images = self.reused[: len(indices)]
        elif self.mode == "fresh shared batch":
            images = torch.empty(shape).share_memory_().zero_()
        else:
            images = torch.zeros(shape)
        return images, torch.zeros(len(indices), dtype=torch.long)


class Images(Dataset):
    """One ready float32 image per index (the same tensor: no image work, only the copy out of it)."""

    def __init__(self, n: int) -> None:
        self.n, self.image = n, torch.full((3, SIZE, SIZE), 0.5)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.image, 0


BATCH_MODES = ["fresh shared batch", "fresh private batch", "one reused shared batch"]
IMAGE_MODES = {"per-image, DataLoader's collate": False, "per-image, leased shared slots (ours)": True}
MODES = BATCH_MODES + list(IMAGE_MODES)


def make_loader(mode: str, n: int, batch_size: int, workers: int):
    if mode in IMAGE_MODES:
        return TorchvisionLoader(Images(n), range(n), batch_size=batch_size, num_workers=workers,
                                 shared_batches=IMAGE_MODES[mode])
    return DataLoader(Batches(n, mode), batch_size=batch_size, num_workers=workers, collate_fn=lambda batch: batch)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64], help="batch sizes to measure")
    parser.add_argument("--batches", type=int, default=100, help="batches per measurement")
    args = parser.parse_args(argv)
    rows = []
    for batch_size in args.batch_sizes:
        for mode in MODES:
            loader = make_loader(mode, batch_size * args.batches, batch_size, args.workers)
            ips = loader_images_per_s(loader, warmup=max(1, args.workers))
            rows.append({"batch": batch_size, "how the batch is made": mode, "img/s": round(ips),
                         "ms per image (wall)": 1000 / ips})
    print(f"{args.workers} workers, float32 3 x {SIZE} x {SIZE} images, {args.batches} batches a row\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
