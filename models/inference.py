"""Classifying new, unlabelled images with a trained modelo.h5 under its stored decision rule."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from models.config import eval_gain, stored_decision
from models.engine import decide, precision_options, predict, tta_probabilities
from models.h5io import load_modelo_h5
from pipelines.imageio import IMAGE_EXTENSIONS, check_image_file
from pipelines.loaders import TorchvisionLoader
from pipelines.samplers import RepeatSampler
from pipelines.seeds import Stream, derive_seed
from pipelines.transforms import get_toolchain

logger = logging.getLogger(__name__)


def image_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files named by ``paths`` (files, or folders searched recursively, sorted) and the
    files skipped with the reason. A path that does not exist is a FileNotFoundError."""
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        candidates = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in candidates:
            if path.is_dir() and file.suffix.lower() not in IMAGE_EXTENSIONS:
                continue  # a folder's other files (.DS_Store, notes) are not images to classify
            reason = check_image_file(file)
            (skipped.append((file, reason)) if reason else found.append(file))
    return found, skipped


class UnlabelledImages(Dataset):
    """Files decoded and transformed like the test images, with a placeholder label 0."""

    def __init__(self, files: Sequence[Path], transform, loader) -> None:
        self.files, self.transform, self.loader = list(files), transform, loader

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(self.loader(str(self.files[i]))), 0


def load_with_decision(weights: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict, dict[str, Any]]:
    """A modelo.h5's network (eval mode, on ``device``), its attributes and its checked decision rule."""
    model, meta = load_modelo_h5(weights, device=device)
    return model, meta, stored_decision(meta.get("metadata", {}), weights)


def classify_files(weights: str | Path, files: Sequence[Path], device: torch.device, *, copies: int = 1,
                   batch_size: int = 32, num_workers: int = 2, seed: int = 0, amp: bool = True,
                   progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """P(PNEUMONIA) and the decision for each file under the model's stored rule: its evaluation
    transform (seeded by ``seed`` where it draws at random) and its threshold; ``copies`` > 1
    averages that many augmented copies (TTA, mean probability). Returns the rows and the rule."""
    if not files:
        raise ValueError("no image files to classify")
    if copies < 1:
        raise ValueError(f"--tta must be >= 1 copy, got {copies}")
    model, meta, decision = load_with_decision(weights, device)
    positive = int(decision["positive_class"])
    classes = list(meta["class_names"])
    chain = get_toolchain(eval_gain=eval_gain(decision["eval_transform"]), size=int(meta["input_size"]))
    augment = copies > 1 or decision["eval_transform"] == "brief"
    dataset = UnlabelledImages(files, chain.train if augment else chain.eval, chain.loader)
    loader = TorchvisionLoader(dataset, RepeatSampler(range(len(files)), copies), batch_size=batch_size,
                               num_workers=num_workers, device=device, seed=derive_seed(seed, Stream.EVAL, bits=31))
    probs, _, _ = predict(model, loader, device, progress=progress, seed=derive_seed(seed, Stream.EVAL),
                          **precision_options(device, amp))
    probs = tta_probabilities(probs, copies)["mean_probability"]
    predicted = decide(probs, float(decision["threshold"]), positive)
    rows = [{"path": str(f), f"p_{classes[positive]}": float(p), "decision": classes[c]}
            for f, p, c in zip(files, probs[:, positive], predicted)]
    return rows, decision
