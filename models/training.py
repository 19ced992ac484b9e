"""The training run: loaders, model, optimizer, early stopping, checkpoints, modelo.h5, test metrics.

``train`` is what ``python train.py`` runs; ``evaluate_weights`` is ``--eval-only``.  The loop
never asks which loader back end it has: every loader yields ``(images, labels)`` on ``device``
and has ``set_epoch``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.early_stopping import EarlyStopping
from models.engine import (classification_metrics, evaluate, plot_confusion_matrix, plot_learning_curves,
                           predict, tta_labels, tta_predict, train_one_epoch)
from models.h5io import load_modelo_h5, save_modelo_h5
from models.vgg16dwsep import (VGG16DWSep, count_parameters, imagenet_vgg16_state_dict,
                               load_vgg16_first_convs, trainable_parameters)
from pipelines.data import DatasetIndex, index_dataset
from pipelines.files import atomic_path
from pipelines.loaders import LoaderSettings, make_loader, make_loaders
from pipelines.samplers import RepeatSampler

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


def loader_settings(settings) -> LoaderSettings:
    return LoaderSettings(backend=settings.loader, batch_size=settings.batch_size,
                          num_workers=settings.num_workers, seed=settings.seed,
                          train_subset=settings.train_subset)


def precision_options(device: torch.device, use_amp: bool) -> dict[str, Any]:
    """bf16 autocast and channels-last on CUDA; plain fp32 on the CPU."""
    cuda = device.type == "cuda"
    return {"amp_dtype": torch.bfloat16 if cuda and use_amp else None, "channels_last": cuda}


def build_model(settings, device: torch.device) -> VGG16DWSep:
    model = VGG16DWSep(num_classes=2)
    if settings.pretrained:
        load_vgg16_first_convs(model, imagenet_vgg16_state_dict(settings.vgg16_weights))
    else:
        logger.warning("!! --no-pretrained: the first two convolutions start from random weights "
                       "(recorded in modelo.h5 and metrics.json) !!")
        for p in list(model.features[0].parameters()) + list(model.features[2].parameters()):
            p.requires_grad_(False)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return model.to(device, memory_format=fmt)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, **state: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def versions() -> dict[str, str]:
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def model_metadata(settings, index: DatasetIndex, best: dict, pretrained_note: str) -> dict:
    from pipelines.transforms import get_toolchain

    chain = get_toolchain()
    return {"settings": dataclasses.asdict(settings), "best": best, "pretrained": pretrained_note,
            "train_transform": repr(chain.train), "eval_transform": repr(chain.eval),
            "data": {"root": str(index.root), "train": index.class_counts("train"),
                     "test": index.class_counts("test")},
            "versions": versions()}


def train(settings, device: torch.device, resume: bool = False) -> dict:
    """Train until early stopping or ``settings.epochs``; return the test metrics of the best weights."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    index = index_dataset(settings.data_dir)
    loaders = make_loaders(index, loader_settings(settings), device)
    logger.info("train %d images, validation %d (resampled to the test balance), test %d; %s loader on %s",
                len(loaders.samplers.train_indices), len(loaders.samplers.val), len(index.test),
                settings.loader, device)
    model = build_model(settings, device)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=settings.lr, weight_decay=settings.weight_decay)
    stopper = EarlyStopping(modo="min", paciencia=settings.paciencia)
    logger.info("VGG16DWSep: %s parameters, %s trainable", f"{count_parameters(model):,}",
                f"{count_parameters(model, trainable_only=True):,}")
    history: list[dict] = []
    best: dict = {}
    start_epoch = 0
    ckpt_path = out / CHECKPOINT
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        stopper.load_state_dict(ckpt["early_stopping"])
        set_rng_state(ckpt["rng"])
        history, best, start_epoch = ckpt["history"], ckpt["best"], ckpt["epoch"] + 1
        logger.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
        if ckpt.get("stopped"):
            logger.info("that run had already stopped early: %s", stopper.reason)
            start_epoch = settings.epochs
    elif (out / LOG).exists():
        (out / LOG).unlink()
    opts = precision_options(device, settings.amp)
    pretrained_note = ("ImageNet VGG16 features.0/features.2, frozen" if settings.pretrained
                       else "NONE: first two convolutions random (--no-pretrained), frozen")
    for epoch in range(start_epoch, settings.epochs):
        for loader in (loaders.train, loaders.val):
            loader.set_epoch(epoch)
        tr = train_one_epoch(model, loaders.train, optimizer, device, epoch=epoch, **opts)
        va = evaluate(model, loaders.val, device, **opts)
        improved = stopper.mejor(va["loss"])
        stop = stopper.deberia_parar(va["loss"])
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
               "val_loss": va["loss"], "val_accuracy": va["accuracy"], "val_f1": va["f1"],
               "seconds": tr["seconds"], "train_images_per_s": tr["images_per_s"], "improved": improved}
        history.append(row)
        append_jsonl(out / LOG, row)
        logger.info("epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f f1 %.3f | %.0f img/s%s",
                    epoch, tr["loss"], tr["accuracy"], va["loss"], va["accuracy"], va["f1"],
                    tr["images_per_s"], " *best*" if improved else "")
        if improved:
            best = {"epoch": epoch, "val_loss": va["loss"], "val_accuracy": va["accuracy"], "val_f1": va["f1"]}
            save_modelo_h5(settings.weights_out, model, class_names=index.classes,
                           metadata=model_metadata(settings, index, best, pretrained_note))
        save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                        early_stopping=stopper.state_dict(), rng=rng_state(), epoch=epoch, history=history,
                        best=best, settings=dataclasses.asdict(settings), stopped=stop)
        plot_learning_curves(history, out / "learning_curves.png")
        if stop:
            logger.info("early stopping: %s", stopper.reason)
            break
    if not best:
        raise ValueError(f"no epoch produced a finite validation loss; nothing saved to {settings.weights_out}")
    best_model, _meta = load_modelo_h5(settings.weights_out, device=device)
    metrics = evaluate_test_set(best_model, index, settings, device)
    summary = {"best": best, "test": metrics, "pretrained": pretrained_note, "epochs_run": len(history),
               "weights": str(settings.weights_out), "synthetic_data": settings.demo}
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    plot_confusion_matrix(np.array(metrics["no_tta"]["confusion_matrix"]), index.classes,
                          out / "confusion_matrix.png", title="test set, best weights, no TTA")
    return summary


def most_confident_copy(probs: np.ndarray, d: int) -> np.ndarray:
    """N x C: for each image, the probabilities of the copy on which the network is most confident."""
    grouped = probs.reshape(-1, d, probs.shape[1])
    best = grouped.max(axis=2).argmax(axis=1)
    return grouped[np.arange(len(grouped)), best]


def evaluate_test_set(model: torch.nn.Module, index: DatasetIndex, settings, device: torch.device) -> dict:
    """Metrics on the test set without TTA and, for each d in ``settings.tta``, with d augmented copies."""
    lsettings = loader_settings(settings)
    opts = precision_options(device, settings.amp)
    plain = make_loader(index, "test", range(len(index.test)), augment=False, settings=lsettings, device=device)
    probs, labels, loss = predict(model, plain, device, **opts)
    results = {"no_tta": classification_metrics(labels, probs) | {"loss": loss}}
    for d in settings.tta:
        torch.manual_seed(settings.seed + d)
        loader = make_loader(index, "test", RepeatSampler(range(len(index.test)), d), augment=True,
                             settings=lsettings, device=device)
        probs_d, labels_d, _ = predict(model, loader, device, **opts)
        y = tta_labels(labels_d, d)
        preds = tta_predict(probs_d, d)
        results[f"tta{d}"] = {
            "max_confidence": classification_metrics(y, most_confident_copy(probs_d, d)),
            "mean_probability": classification_metrics(y, preds["mean_probs"]),
        }
    return results


def evaluate_weights(settings, weights: str | Path, device: torch.device) -> dict:
    model, meta = load_modelo_h5(weights, device=device)
    index = index_dataset(settings.data_dir)
    if list(meta.get("class_names", index.classes)) != index.classes:
        raise ValueError(f"{weights} was trained on classes {meta['class_names']}, "
                         f"but {settings.data_dir} has {index.classes}")
    return {"weights": str(weights), "test": evaluate_test_set(model, index, settings, device)}
