"""Training and evaluation as plain importable functions (the split of torchvision's
``references/classification`` and MAE's ``engine_finetune``): one epoch of training, prediction,
metrics, test-time-augmentation voting and the figures of a run.

Every function takes a loader of the project's one interface: an iterable of
``(float32 N x 3 x H x W, int64 N)`` batches already on ``device``, with ``len()``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from torch import nn
from tqdm import tqdm

from pipelines.files import atomic_path

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]

TRAIN_KEYS = ("loss", "accuracy", "images", "seconds", "images_per_s")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device a command line asks for, chosen once at the edge: ``auto`` = CUDA when present
    (GPU ``local_rank``, torchrun's LOCAL_RANK), else the CPU; ``cuda`` without an index = GPU
    ``local_rank``.  Raises ValueError for an unknown device, another device type than cpu and
    cuda, CUDA on a machine without it, or a GPU index the machine does not have."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only auto, cpu, cuda and cuda:N are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"numbered from 0")
    return device


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: CUDA, or a CPU with AVX512-BF16/AMX
    (oneDNN's check). Elsewhere bf16 autocast on the CPU is emulated and slower than fp32."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def precision_options(device: torch.device, use_amp: bool) -> dict[str, Any]:
    """Channels-last always (oneDNN and cuDNN both run these convolutions faster in NHWC); bf16
    autocast when ``use_amp`` and the device does bf16 natively (see ``bf16_native``).

    Step times of each setting: measured by ``train.py --count-params``, RESULTS.md.
    """
    return {"amp_dtype": torch.bfloat16 if use_amp and bf16_native(device) else None, "channels_last": True}


def precision_label(opts: dict[str, Any]) -> str:
    return ("bf16 autocast" if opts["amp_dtype"] is not None else "fp32") + (
        " + channels-last" if opts["channels_last"] else "")


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``amp_dtype`` on ``device``'s type, or nothing when ``amp_dtype`` is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def _prepare(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _batches(loader: Iterable[Batch], max_batches: int | None) -> tuple[Iterable[Batch], int | None]:
    """The loader cut to ``max_batches`` and the number of batches it will give (None if unknown)."""
    try:
        total: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is None:
        return loader, total
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")
    cut = (batch for _, batch in zip(range(max_batches), loader))
    return cut, max_batches if total is None else min(total, max_batches)


LOSS_CHECK_EVERY_CUDA = 32


def loss_check_interval(device: torch.device, check_every: int | None) -> int:
    """Batches between two reads of the training loss on the host: ``check_every`` when given,
    else 1 on the CPU (reading a CPU tensor costs nothing) and ``LOSS_CHECK_EVERY_CUDA`` on a GPU,
    where each read waits for the step's kernels to finish and leaves the GPU idle while the host
    queues the next step's."""
    if check_every is None:
        return LOSS_CHECK_EVERY_CUDA if torch.device(device).type == "cuda" else 1
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be None or an int >= 1, got {check_every!r}")
    return check_every


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    epoch: int,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    max_batches: int | None = None,
    check_every: int | None = None,
) -> dict[str, float]:
    """One pass of cross-entropy training; returns ``TRAIN_KEYS`` (loss and accuracy averaged
    per image, throughput in images per second).

    ``amp_dtype`` runs the forward pass under ``torch.autocast`` (bfloat16: float16 would need
    a gradient scaler, which this loop does not have). A non-finite loss raises
    ``FloatingPointError`` naming its batch. The losses are read on the host every
    ``check_every`` batches (``loss_check_interval``: every batch on the CPU, every 32 on a GPU,
    so that no step waits for the one before it); a check comes before that batch's optimizer
    step, so with 1 the weights stay those of the last finite batch, and with k > 1 up to k - 1
    steps may have used a non-finite loss before the error (the epoch's checkpoint and modelo.h5
    on disk are older and untouched). The progress bar's loss is updated at each check.
    """
    if amp_dtype == torch.float16:
        raise ValueError("amp_dtype torch.float16 needs gradient scaling; use torch.bfloat16")
    device = torch.device(device)
    every = loss_check_interval(device, check_every)
    batches, total = _batches(loader, max_batches)
    model.train()
    loss_sum, images_seen, checked = 0.0, 0, 0
    pending: list[tuple[torch.Tensor, int]] = []  # (loss, batch size) of the batches not read yet
    correct = torch.zeros((), dtype=torch.int64, device=device)
    start = time.perf_counter()
    bar = tqdm(batches, total=total, desc=f"epoch {epoch}", disable=not progress, leave=False)

    def read_losses() -> None:
        nonlocal loss_sum, checked
        values = torch.stack([loss for loss, _ in pending]).tolist()  # one host sync
        for value, (_, batch_size) in zip(values, pending):
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite training loss {value} at epoch {epoch}, batch {checked}")
            loss_sum += value * batch_size
            checked += 1
        pending.clear()
        bar.set_postfix(loss=f"{loss_sum / images_seen:.4f}", refresh=False)

    for images, labels in bar:
        with autocast(device, amp_dtype):
            logits = model(_prepare(images, channels_last))
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        batch_size = labels.shape[0]
        images_seen += batch_size
        pending.append((loss.detach(), batch_size))
        if len(pending) == every:
            read_losses()
        optimizer.step()
        correct += (logits.detach().argmax(dim=1) == labels).sum()
    if pending:
        read_losses()
    bar.close()
    if images_seen == 0:
        raise ValueError(f"the training loader gave no batches in epoch {epoch}")
    seconds = time.perf_counter() - start
    stats = {
        "loss": loss_sum / images_seen,
        "accuracy": correct.item() / images_seen,
        "images": images_seen,
        "seconds": seconds,
        "images_per_s": images_seen / seconds,
    }
    logger.debug("epoch %d train: %s", epoch, stats)
    return stats


def predict(
    model: nn.Module,
    loader: Iterable[Batch],
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Softmax probabilities (N x C, float64), labels (N) and mean cross-entropy over the loader.

    Runs in eval mode under ``torch.inference_mode()`` and puts the model back in the mode it
    had. Softmax and loss are computed in float32 even under autocast; results stay on the
    device until one transfer at the end. With ``seed``, torch's global generator is seeded for
    the pass and put back afterwards: a loader without workers draws its augmentation from it, and
    the caller's own stream (training's dropout) must not depend on how often it predicted.
    """
    if seed is not None:
        where = torch.device(device)
        forked = [where.index or 0] if where.type == "cuda" else []  # manual_seed seeds CUDA too: put it back
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(seed)
            return predict(model, loader, device, amp_dtype=amp_dtype, channels_last=channels_last,
                           progress=progress)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    probs, labels, loss_sum = [], [], torch.zeros((), dtype=torch.float64, device=device)
    try:
        with torch.inference_mode():
            for images, batch_labels in tqdm(loader, desc="predict", disable=not progress, leave=False):
                with autocast(device, amp_dtype):
                    logits = model(_prepare(images, channels_last))
                logits = logits.float()
                loss_sum += F.cross_entropy(logits, batch_labels, reduction="sum").double()
                probs.append(logits.softmax(dim=1))
                labels.append(batch_labels)
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("the loader gave no batches to predict")
    all_labels = torch.cat(labels).cpu().numpy().astype(np.int64)
    all_probs = torch.cat(probs).cpu().numpy().astype(np.float64)
    return all_probs, all_labels, loss_sum.item() / len(all_labels)


def decide(probs: np.ndarray, threshold: float | None = None, positive: int = 1) -> np.ndarray:
    """Predicted classes: the argmax of each row, or, with ``threshold``, ``positive`` where its
    probability is >= ``threshold`` and the other class elsewhere (two classes only)."""
    probs = np.asarray(probs)
    if threshold is None:
        return probs.argmax(axis=1)
    if probs.ndim != 2 or probs.shape[1] != 2:
        raise ValueError(f"a decision threshold needs N x 2 probabilities, got {probs.shape}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return np.where(probs[:, positive] >= threshold, positive, 1 - positive)


def classification_metrics(labels: Sequence[int] | np.ndarray, probs: np.ndarray, positive: int = 1,
                           threshold: float | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, and for class ``positive`` against the rest: F1, precision,
    recall (sensitivity), specificity (recall of the rest) and ROC AUC of ``probs[:, positive]``
    (None when the labels hold one class only); the C x C confusion matrix (rows true, columns
    predicted) as nested lists; ``n``; the ``threshold`` used. Classes come from
    ``decide(probs, threshold)``. Undefined ratios are 0."""
    labels = np.asarray(labels)
    probs = np.asarray(probs)
    if probs.ndim != 2 or len(labels) != len(probs) or labels.ndim != 1:
        raise ValueError(f"expected labels N and probs N x C, got {labels.shape} and {probs.shape}")
    if not 0 <= positive < probs.shape[1]:
        raise ValueError(f"positive class {positive} out of range for {probs.shape[1]} classes")
    predictions = decide(probs, threshold, positive)
    is_positive, predicted_positive = labels == positive, predictions == positive
    one_class = np.unique(labels).size < 2

    def for_positive(score) -> float:
        return float(score(labels, predictions, labels=[positive], average=None, zero_division=0)[0])

    recall = for_positive(recall_score)
    specificity = float(recall_score(~is_positive, ~predicted_positive, zero_division=0))
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": (recall + specificity) / 2,
        "f1": for_positive(f1_score),
        "precision": for_positive(precision_score),
        "recall": recall,
        "specificity": specificity,
        "roc_auc": None if one_class else float(roc_auc_score(is_positive, probs[:, positive])),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=range(probs.shape[1])).tolist(),
        "n": int(len(labels)),
        "threshold": threshold,
    }


def choose_threshold(labels: Sequence[int] | np.ndarray, positive_probs: np.ndarray, positive: int = 1) -> float:
    """The threshold t on P(``positive``) that maximises accuracy on these labels (rule: ``positive``
    when p >= t). Candidates are 0.5 and the midpoints between consecutive distinct probabilities;
    among those that tie, the one nearest 0.5, so a flat optimum does not drift to an extreme."""
    is_positive = np.asarray(labels) == positive
    p = np.asarray(positive_probs, dtype=np.float64)
    if p.ndim != 1 or len(p) != len(is_positive) or len(p) == 0:
        raise ValueError(f"expected N labels and N probabilities, got {is_positive.shape} and {p.shape}")
    distinct = np.unique(p)
    candidates = np.unique(np.concatenate([[0.0, 0.5, 1.0], (distinct[1:] + distinct[:-1]) / 2]))
    # every candidate's number of correct decisions at once, from the sorted probabilities
    order = np.argsort(p, kind="stable")
    sorted_p, sorted_positive = p[order], is_positive[order]
    positives_below = np.concatenate([[0], np.cumsum(sorted_positive)])
    below = np.searchsorted(sorted_p, candidates, side="left")  # images with p < t: called negative
    correct = (below - positives_below[below]) + (sorted_positive.sum() - positives_below[below])
    best = np.flatnonzero(correct == correct.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def cross_fitted_metrics(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Metrics of the threshold rule where no image is decided with a threshold chosen on itself:
    the distinct ``groups`` (image indices; a replicated validation set repeats some) are split in
    two halves, each half is decided with the threshold chosen on the other, and both are pooled."""
    labels, probs, groups = np.asarray(labels), np.asarray(probs), np.asarray(groups)
    distinct = np.unique(groups)
    first = np.isin(groups, np.random.default_rng(seed).permutation(distinct)[: len(distinct) // 2])
    predictions = np.empty(len(labels), dtype=np.int64)
    for fit, scored in ((first, ~first), (~first, first)):
        if scored.any():
            t = choose_threshold(labels[fit], probs[fit, 1]) if fit.any() else 0.5
            predictions[scored] = decide(probs[scored], t)
    metrics = classification_metrics(labels, np.eye(probs.shape[1])[predictions])
    metrics["roc_auc"] = None if np.unique(labels).size < 2 else float(roc_auc_score(labels == 1, probs[:, 1]))
    metrics["threshold"] = "cross-fitted"
    return metrics


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, threshold: float | None = None, *,
                        n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals (images resampled with replacement, ``n_boot`` times) of
    accuracy, balanced accuracy, F1, recall and specificity of class 1 under ``decide(probs, threshold)``."""
    labels = np.asarray(labels)
    predictions = decide(np.asarray(probs), threshold)
    draws = np.random.default_rng(seed).integers(0, len(labels), size=(n_boot, len(labels)))
    y, p = labels[draws] == 1, predictions[draws] == 1
    tp, tn = (y & p).sum(axis=1), (~y & ~p).sum(axis=1)
    fp, fn = (~y & p).sum(axis=1), (y & ~p).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        specificity = np.where(tn + fp > 0, tn / (tn + fp), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    stats = {"accuracy": (tp + tn) / len(labels), "balanced_accuracy": (recall + specificity) / 2, "f1": f1,
             "recall": recall, "specificity": specificity}
    tail = 100 * (1 - level) / 2
    return {k: [float(v) for v in np.percentile(values, [tail, 100 - tail])] for k, values in stats.items()}


def _grouped(array: np.ndarray, d: int, what: str) -> np.ndarray:
    """``array`` (rows grouped by image, ``d`` copies each) reshaped to N x d x ..."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be an int >= 1, got {d!r}")
    if len(array) % d:
        raise ValueError(f"{what} has {len(array)} rows, not a multiple of d={d}")
    return array.reshape(len(array) // d, d, *array.shape[1:])


def tta_labels(labels: Sequence[int] | np.ndarray, d: int) -> np.ndarray:
    """The N labels of N*d rows made of ``d`` consecutive copies per image; ValueError when a
    group mixes labels (the loader did not repeat each index ``d`` times in a row)."""
    groups = _grouped(np.asarray(labels), d, "labels")
    mixed = np.flatnonzero((groups != groups[:, :1]).any(axis=1))
    if mixed.size:
        raise ValueError(f"labels of TTA group {mixed[0]} differ: {groups[mixed[0]].tolist()} (d={d})")
    return groups[:, 0]


def tta_probabilities(probs: np.ndarray, d: int) -> dict[str, np.ndarray]:
    """Both rules' N x C probabilities over ``d`` augmented copies per image (N*d x C rows grouped by
    image): ``mean_probability``, the copies' mean; ``max_confidence``, the probabilities of the copy
    whose top probability is highest (the brief's rule). ``decide`` turns either into classes."""
    groups = _grouped(np.asarray(probs), d, "probs")
    if groups.ndim != 3:
        raise ValueError(f"probs must be N*d x C, got shape {np.shape(probs)}")
    surest_copy = groups.max(axis=2).argmax(axis=1)
    return {"mean_probability": groups.mean(axis=1), "max_confidence": groups[np.arange(len(groups)), surest_copy]}


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Epochs and values of ``key`` over the rows that have it."""
    rows = [row for row in history if row.get(key) is not None]
    return [row["epoch"] for row in rows], [float(row[key]) for row in rows]


def best_epoch(history: Sequence[dict[str, Any]], key: str = "val_loss") -> int | None:
    """The epoch of the smallest finite ``key``; None when no row has one."""
    epochs, values = _series(history, key)
    finite = [(value, epoch) for epoch, value in zip(epochs, values) if math.isfinite(value)]
    return min(finite)[1] if finite else None


def _save(figure: Figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, bbox_inches="tight")
    return Path(path)


def plot_learning_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Loss (train, val) and accuracy / F1 per epoch in two panels, the best epoch (min
    ``val_loss``) marked; written atomically to ``path`` (format from its suffix)."""
    if not history:
        raise ValueError("history is empty: nothing to plot")
    figure = Figure(figsize=(11, 4.5))
    loss_axes, score_axes = figure.subplots(1, 2)
    panels = (
        (loss_axes, ("train_loss", "val_loss"), "loss"),
        (score_axes, ("train_accuracy", "val_accuracy", "val_f1"), "accuracy / F1"),
    )
    best = best_epoch(history)
    for axes, keys, ylabel in panels:
        for key in keys:
            epochs, values = _series(history, key)
            if epochs:
                axes.plot(epochs, values, marker="o", markersize=3, label=key)
        if best is not None:
            axes.axvline(best, color="grey", linestyle="--", label=f"best epoch {best}")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend()
    return _save(figure, path)


#: The confusion matrix's axis and colour-bar labels: predicted, true, share of the true class.
CONFUSION_LABELS = ("predicted", "true", "share of true class")


def confusion_matrix_figure(cm: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str], title: str = "",
                            labels: Sequence[str] = CONFUSION_LABELS) -> Figure:
    """Counts and row percentages (of each true class) in every cell, coloured by the row
    percentage; ``labels`` names the axes and the colour bar (another language, say)."""
    counts = np.asarray(cm)
    if counts.ndim != 2 or counts.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match class names {list(class_names)}")
    if len(labels) != 3:
        raise ValueError(f"labels: (predicted, true, colour bar), got {list(labels)}")
    predicted, true, share = labels
    row_sums = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)
    figure = Figure(figsize=(1.6 * len(class_names) + 2.5, 1.4 * len(class_names) + 1.5))
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label=share)
    for (row, column), count in np.ndenumerate(counts):
        colour = "white" if shares[row, column] > 0.5 else "black"
        axes.text(column, row, f"{count}\n{100 * shares[row, column]:.1f}%", ha="center", va="center", color=colour)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, labels=list(class_names))
    axes.set_yticks(ticks, labels=list(class_names))
    axes.set_xlabel(predicted)
    axes.set_ylabel(true)
    if title:
        axes.set_title(title)
    return figure


def plot_confusion_matrix(cm: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str],
                          path: str | Path, title: str = "", labels: Sequence[str] = CONFUSION_LABELS) -> Path:
    """``confusion_matrix_figure`` written atomically to ``path``."""
    return _save(confusion_matrix_figure(cm, class_names, title, labels), path)
