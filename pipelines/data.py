"""Indexing a Kermany-style ``chest_xray`` folder: ``train/`` and ``test/``, one folder per class.

The brief's "DataFolder" is ``torchvision.datasets.ImageFolder``.  Files are checked cheaply
at index time (``imageio.check_image_file``); bad ones are skipped with one warning line each
and counted, so no epoch ever meets them.
"""
from __future__ import annotations

import copy
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from torchvision.datasets import ImageFolder

from .imageio import FileProblem, check_image_file

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")


@dataclass
class DatasetIndex:
    """The two ImageFolders (no transform attached) and what was skipped while indexing."""

    root: Path
    train: ImageFolder
    test: ImageFolder
    skipped: list[FileProblem] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return list(self.train.classes)

    def class_counts(self, split: str) -> dict[str, int]:
        ds = getattr(self, split)
        counts = Counter(ds.targets)
        return {name: counts.get(i, 0) for i, name in enumerate(ds.classes)}

    def summary(self) -> str:
        lines = [f"dataset {self.root}"]
        for split in SPLITS:
            counts = self.class_counts(split)
            parts = ", ".join(f"{k} {v}" for k, v in counts.items())
            lines.append(f"  {split}: {sum(counts.values())} images ({parts})")
        lines.append(f"  skipped: {len(self.skipped)} file(s)")
        lines.extend(f"    {p.path}: {p.reason}" for p in self.skipped)
        return "\n".join(lines)


def find_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names of one split; errors name the path."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"missing split folder: {split_dir}")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"need at least two class folders in {split_dir}, found {classes or 'none'}")
    return classes


def scan_split(split_dir: Path, classes: list[str]) -> tuple[set[str], list[FileProblem]]:
    """Check every file of every class folder; return the good paths and the problems."""
    good: set[str] = set()
    problems: list[FileProblem] = []
    for name in classes:
        class_dir = split_dir / name
        n_good = 0
        for root, _dirs, files in sorted(os.walk(class_dir, followlinks=True)):
            for fname in sorted(files):
                path = os.path.join(root, fname)
                reason = check_image_file(path)
                if reason is None:
                    good.add(path)
                    n_good += 1
                else:
                    logger.warning("skipping %s: %s", path, reason)
                    problems.append(FileProblem(path, reason))
        if n_good == 0:
            raise ValueError(f"class folder has no usable image: {class_dir}")
    return good, problems


def index_split(split_dir: Path, classes: list[str],
                loader: Callable[[str], object]) -> tuple[ImageFolder, list[FileProblem]]:
    good, problems = scan_split(split_dir, classes)
    ds = ImageFolder(str(split_dir), loader=loader, is_valid_file=good.__contains__,
                     allow_empty=False)
    return ds, problems


def index_dataset(data_dir: str | Path, loader: Callable[[str], object] | None = None) -> DatasetIndex:
    """Index ``data_dir/train`` and ``data_dir/test``.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for fewer than two
    classes, an empty class folder, or class folders that differ between the two splits.
    """
    from .transforms import get_toolchain

    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    train_classes = find_classes(root / "train")
    test_classes = find_classes(root / "test")
    if train_classes != test_classes:
        raise ValueError(f"class folders differ between {root / 'train'} {train_classes} "
                         f"and {root / 'test'} {test_classes}")
    loader = loader or get_toolchain().loader
    train, skipped_train = index_split(root / "train", train_classes, loader)
    test, skipped_test = index_split(root / "test", test_classes, loader)
    skipped = skipped_train + skipped_test
    if skipped:
        logger.warning("skipped %d bad file(s) while indexing %s", len(skipped), root)
    return DatasetIndex(root, train, test, skipped)


def with_transform(dataset: ImageFolder, transform: Callable | None) -> ImageFolder:
    """A shallow copy of ``dataset`` (same samples) with ``transform`` attached."""
    view = copy.copy(dataset)
    view.transform = transform
    return view


def linked_subset(data_dir: str | Path, out_dir: str | Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """A copy of ``data_dir``'s layout under ``out_dir`` made of symbolic links to ``per_class[split]``
    files drawn at random (seeded, without replacement) from each class of each split: a small
    data set for quick runs that copies no image. Refuses a non-empty ``out_dir`` and a class with
    fewer files than asked."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for class_dir in (data_dir / split / c for c in find_classes(data_dir / split)):
            files = sorted(p for p in class_dir.iterdir() if p.is_file())
            if len(files) < n:
                raise ValueError(f"{class_dir} has {len(files)} files, fewer than the {n} asked for")
            target = out_dir / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for k in rng.choice(len(files), n, replace=False):
                (target / files[k].name).symlink_to(files[k].resolve())
    return out_dir
