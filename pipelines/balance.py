"""Class balance of train, validation and test: counts and a figure.

    python -m pipelines.balance --data-dir ../shared/data/chest_xray_224 --out results/class_balance.png
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from .data import DatasetIndex, index_dataset
from .files import atomic_path
from .loaders import make_samplers

logger = logging.getLogger(__name__)


def class_balance(index: DatasetIndex, seed: int = 0, val_fraction: float = 0.2) -> dict[str, dict[str, int]]:
    """Per-class counts of train (after the split), validation (as split and as resampled) and test:
    the split and the samplers a training run with this seed uses (``make_samplers``)."""
    targets = np.asarray(index.train.targets)
    samplers = make_samplers(index, seed, val_fraction)
    resampled = Counter(targets[list(samplers.val)].tolist())
    groups = {
        "train": Counter(targets[samplers.train_indices].tolist()),
        "validation": Counter(targets[samplers.val_indices].tolist()),
        "validation (resampled)": resampled,
        "test": Counter(index.test.targets),
    }
    return {g: {name: c.get(i, 0) for i, name in enumerate(index.classes)} for g, c in groups.items()}


def plot_class_balance(balance: dict[str, dict[str, int]], path: str | Path, title: str = "") -> Path:
    """Grouped bars of counts per class, each bar labelled with its count and share of its split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(balance)
    classes = list(next(iter(balance.values())))
    x = np.arange(len(groups))
    width = 0.8 / len(classes)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for k, name in enumerate(classes):
        counts = np.array([balance[g][name] for g in groups])
        totals = np.array([sum(balance[g].values()) for g in groups])
        bars = ax.bar(x + (k - (len(classes) - 1) / 2) * width, counts, width, label=name)
        for bar, c, t in zip(bars, counts, totals):
            ax.annotate(f"{c}\n{100 * c / t:.0f}%", (bar.get_x() + bar.get_width() / 2, c),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, groups)
    ax.set_ylabel("images")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.set_title(title or "samples per class")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Count samples per class in train, validation and test and plot them.")
    p.add_argument("--data-dir", type=Path, required=True, help="folder with train/ and test/")
    p.add_argument("--out", type=Path, default=Path("results/class_balance.png"), help="figure path (PNG)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        index = index_dataset(args.data_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    balance = class_balance(index, args.seed)
    for group, counts in balance.items():
        print(f"{group:>24}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    plot_class_balance(balance, args.out, f"class balance of {args.data_dir.name}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
