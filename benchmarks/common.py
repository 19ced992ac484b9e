"""What every benchmark shares: the file list, the loader timing, the row tables."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pipelines import imageio
from pipelines.tables import markdown_table


def single_thread() -> None:
    """One torch and one OpenCV thread in this process, like a DataLoader worker."""
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def list_images(folder: Path, limit: int | None = None) -> list[str]:
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in imageio.IMAGE_EXTENSIONS)
    return files[:limit] if limit else files


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


def failure(err: BaseException) -> str:
    """One line for a benchmark row: the exception's type and the start of its message."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:160]}"


def cell(key: str, value: object) -> str:
    """A table cell: ratios (``x_...``) to 2 decimals, other floats to 1, None empty."""
    if isinstance(value, float):
        return f"{value:.2f}" if key.startswith("x_") else f"{value:.1f}"
    return "" if value is None else str(value)


def format_rows(title: str, rows: list[dict]) -> str:
    """A titled Markdown table (``pipelines.tables.markdown_table``) of rows that may lack some
    columns (an error row has no timing): every column any row has, in order of appearance, a
    missing value or None left empty; "" for no rows."""
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = markdown_table([{k: cell(k, r.get(k)) for k in keys} for r in rows])
    return f"\n## {title}\n\n{table}"
