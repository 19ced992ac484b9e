"""The training run: loaders, model, optimizer, early stopping, checkpoints, modelo.h5, test metrics.

``train`` is what ``python train.py`` runs; ``evaluate_weights`` is ``--eval-only``.  The loop
never asks which loader back end it has: every loader yields ``(images, labels)`` on ``device``
and has ``set_epoch``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models.early_stopping import EarlyStopping
from models.engine import (classification_metrics, plot_confusion_matrix, plot_learning_curves, precision_label,
                           precision_options, predict, recalibrate_batchnorm, tta_labels, tta_predict,
                           train_one_epoch)
from models.h5io import load_modelo_h5, read_modelo_metadata, save_modelo_h5
from models.vgg16dwsep import (VGG16DWSep, count_parameters, freeze_first_convs, imagenet_vgg16_state_dict,
                               load_vgg16_first_convs, trainable_parameters)
from pipelines.data import DatasetIndex, index_dataset
from pipelines.files import atomic_path
from pipelines.loaders import LoaderSettings, make_loader, make_loaders, make_samplers
from pipelines.samplers import RepeatSampler, unshard
from pipelines.transforms import NOISE_MEAN, eval_intensity_label

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torchrun started a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def loader_settings(settings) -> LoaderSettings:
    rank, world_size = world()
    return LoaderSettings(backend=settings.loader, batch_size=settings.batch_size,
                          num_workers=settings.num_workers, seed=settings.seed,
                          train_subset=settings.train_subset, rank=rank, world_size=world_size,
                          eval_gain=settings.eval_gain, eval_noise=settings.eval_noise,
                          decoded_cache=settings.decoded_cache)


def predict_all(model: torch.nn.Module, loader, device: torch.device, total: int,
                **opts: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """``predict`` over the whole sampler order: under DDP each rank predicts its share and the
    shares are gathered back into the sampler's order (padding dropped), so every rank sees the
    same probabilities and takes the same early-stopping decision."""
    probs, labels, loss = predict(model, loader, device, **opts)
    if world()[1] == 1:
        return probs, labels, loss
    gathered: list[Any] = [None] * world()[1]
    dist.all_gather_object(gathered, (probs, labels))
    probs = unshard([g[0] for g in gathered], total)
    labels = unshard([g[1] for g in gathered], total)
    loss = float(-np.log(np.clip(probs[np.arange(total), labels], 1e-12, None)).mean())
    return probs, labels, loss


def evaluate_all(model: torch.nn.Module, loader, device: torch.device, total: int, **opts: Any) -> dict:
    probs, labels, loss = predict_all(model, loader, device, total, **opts)
    return classification_metrics(labels, probs) | {"loss": loss}


def build_model(settings, device: torch.device) -> VGG16DWSep:
    """VGG16DWSep with its first two convolutions from ImageNet VGG16 (or random with
    --no-pretrained), frozen unless --train-first-convs."""
    model = VGG16DWSep(num_classes=2)
    if settings.pretrained:
        load_vgg16_first_convs(model, imagenet_vgg16_state_dict(settings.vgg16_weights))
    else:
        logger.warning("!! --no-pretrained: the first two convolutions start from random weights "
                       "(recorded in modelo.h5 and metrics.json) !!")
    freeze_first_convs(model, frozen=not settings.train_first_convs)
    if settings.train_first_convs:
        logger.warning("--train-first-convs: the first two convolutions are trained, not frozen as in the brief")
    return model.to(device, memory_format=torch.channels_last)


def first_convs_note(settings) -> str:
    """What the first two convolutions are in this run, for modelo.h5 and metrics.json."""
    state = "trained" if settings.train_first_convs else "frozen"
    if settings.pretrained:
        return f"ImageNet VGG16 features.0/features.2, {state}"
    return f"NONE: first two convolutions random (--no-pretrained), {state}"


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

    chain = get_toolchain(eval_gain=settings.eval_gain, eval_noise=settings.eval_noise)
    return {"settings": dataclasses.asdict(settings), "best": best, "pretrained": pretrained_note,
            "train_transform": repr(chain.train), "eval_transform": repr(chain.eval),
            "data": {"root": str(index.root), "train": index.class_counts("train"),
                     "test": index.class_counts("test")},
            "versions": versions()}


#: Settings a resumed run must share with its checkpoint: the split, the samplers' orders, the
#: optimiser, the selection (validation transform, BatchNorm re-estimate) and where the best weights
#: so far are; the number of torchrun processes is checked beside them. Others may change (--epochs to
#: go further, --device, --tta, ...).
RESUME_MUST_MATCH = ("data_dir", "seed", "train_subset", "batch_size", "lr", "weight_decay", "paciencia",
                     "eval_gain", "eval_noise", "bn_recalibrate", "weights_out", "demo")
#: Settings that may change on resume, with a warning: the run goes on, but its augmentation stream
#: (seeded per worker) or its numerics are no longer those of one uninterrupted run.
RESUME_WARN = ("loader", "amp", "decoded_cache", "num_workers")


def _same_setting(key: str, saved: Any, ours: Any) -> bool:
    if key in ("data_dir", "weights_out") and saved is not None and ours is not None:
        return saved == ours or Path(saved).resolve() == Path(ours).resolve()
    return saved == ours


def check_resumed_settings(saved: dict, settings: Any, ckpt_path: Path, saved_world_size: int | None = None,
                           world_size: int = 1) -> None:
    """Refuse to resume with other settings than the checkpoint's, for those in ``RESUME_MUST_MATCH``
    and the number of processes (it shards each epoch's order and seeds each rank; keys a checkpoint
    predates are not checked); warn for those in ``RESUME_WARN``."""
    ours = dataclasses.asdict(settings)
    saved = dict(saved)
    if saved_world_size is not None:
        saved["world_size"], ours["world_size"] = saved_world_size, world_size
    differ = [k for k in (*RESUME_MUST_MATCH, "world_size") if k in saved
              and not _same_setting(k, saved[k], ours[k])]
    if differ:
        was = ", ".join(f"{k}={saved[k]!r}" for k in differ)
        now = ", ".join(f"{k}={ours[k]!r}" for k in differ)
        raise ValueError(f"--resume: {ckpt_path} was trained with {was}; this run asks for {now}. "
                         "The split, the samplers' order and the selection of the best epoch depend on them: "
                         "give the same options, or another --out for a new run")
    for key in RESUME_WARN:
        if key in saved and saved[key] != ours[key]:
            logger.warning("--resume: %s was %r, now %r: the run continues, but its later epochs are not those "
                           "of one uninterrupted run", key, saved[key], ours[key])


def load_checkpoint(ckpt_path: Path, settings: Any, world_size: int = 1) -> dict:
    """The checkpoint of the run to resume, checked against this run's settings before anything
    costly (indexing, decoding a cache, building the model) is done."""
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    # what the first convolutions are (the optimizer holds only the trainable ones), as saved; a
    # checkpoint without the keys predates them: ImageNet weights asked for, frozen
    saved = ckpt.get("settings", {})
    theirs = {"pretrained": saved.get("pretrained", True), "train_first_convs": saved.get("train_first_convs", False)}
    ours = {key: getattr(settings, key) for key in theirs}
    if theirs != ours:
        raise ValueError(f"--resume: {ckpt_path} was trained with {theirs}, this run asks for {ours} "
                         "(--no-pretrained, --train-first-convs); give the same options or another --out")
    check_resumed_settings(saved, settings, ckpt_path, ckpt.get("world_size"), world_size)
    return ckpt


def restore(ckpt: dict, ckpt_path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            stopper: EarlyStopping) -> tuple[list[dict], dict, int, bool]:
    """Load a checked checkpoint into the run; return (history, best, next epoch, had it stopped early)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    stopper.load_state_dict(ckpt["early_stopping"])
    set_rng_state(ckpt["rng"])
    logger.info("resumed from %s at epoch %d", ckpt_path, ckpt["epoch"] + 1)
    return ckpt["history"], ckpt["best"], ckpt["epoch"] + 1, bool(ckpt.get("stopped"))


@dataclasses.dataclass
class Run:
    """What one training run carries from epoch to epoch."""

    settings: Any
    index: DatasetIndex
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stopper: EarlyStopping
    pretrained_note: str
    world_size: int = 1
    history: list[dict] = dataclasses.field(default_factory=list)
    best: dict = dataclasses.field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.settings.out)

    def record(self, row: dict, improved: bool, stop: bool) -> None:
        """Main process only: log line, best weights, checkpoint, learning curves (all atomic)."""
        append_jsonl(self.out / LOG, row)
        start = time.perf_counter()
        if improved:
            save_modelo_h5(self.settings.weights_out, self.model, class_names=self.index.classes,
                           metadata=model_metadata(self.settings, self.index, self.best, self.pretrained_note))
        save_checkpoint(self.out / CHECKPOINT, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                        early_stopping=self.stopper.state_dict(), rng=rng_state(), epoch=row["epoch"],
                        history=self.history, best=self.best, settings=dataclasses.asdict(self.settings),
                        stopped=stop, world_size=self.world_size)
        plot_learning_curves(self.history, self.out / "learning_curves.png")
        logger.info("epoch %d: files written in %.1f s (%scheckpoint, curves)", row["epoch"],
                    time.perf_counter() - start, "modelo.h5, " if improved else "")


def warn_if_overwriting(settings: Any) -> None:
    """A new run replaces --weights-out at its first epoch (the default, ./modelo.h5, is shared by
    every --out); say whose best weights are about to go, so they can be copied first."""
    path = Path(settings.weights_out)
    if not path.exists():
        return
    try:
        meta = read_modelo_metadata(path)["metadata"]
        whose = (f"run in {meta['settings']['out']!r}, best epoch {meta['best'].get('epoch')}, "
                 f"validation loss {meta['best'].get('val_loss', float('nan')):.4f}")
    except (OSError, ValueError, KeyError, TypeError):
        whose = "not a modelo.h5 this version reads"
    logger.warning("%s exists (%s): this run replaces it at its first epoch; give --weights-out to keep it",
                   path, whose)


def train(settings, device: torch.device, resume: bool = False) -> dict:
    """Train until early stopping or ``settings.epochs``; return the test metrics of the best weights.

    Under torchrun every rank trains on its share of each epoch's order (DDP averages the
    gradients), validation predictions are gathered so all ranks stop together, and only rank 0
    writes files.
    """
    rank, world_size = world()
    main_process = rank == 0
    Path(settings.out).mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(Path(settings.out) / CHECKPOINT, settings, world_size) if resume else None
    index = index_dataset(settings.data_dir)
    loaders = make_loaders(index, loader_settings(settings), device)
    logger.info("train %d images, validation %d (resampled to the test balance), test %d; %s loader on %s%s",
                len(loaders.samplers.train_indices), len(loaders.samplers.val), len(index.test),
                settings.loader, device, f", rank {rank} of {world_size}" if world_size > 1 else "")
    model = build_model(settings, device)
    run = Run(settings, index, model,
              torch.optim.Adam(trainable_parameters(model), lr=settings.lr, weight_decay=settings.weight_decay),
              EarlyStopping(modo="min", paciencia=settings.paciencia),
              first_convs_note(settings), world_size)
    logger.info("VGG16DWSep: %s parameters, %s trainable", f"{count_parameters(model):,}",
                f"{count_parameters(model, trainable_only=True):,}")
    start_epoch = 0
    if ckpt is not None:
        run.history, run.best, start_epoch, stopped = restore(ckpt, run.out / CHECKPOINT, model, run.optimizer,
                                                               run.stopper)
        del ckpt
        if stopped:
            logger.info("that run had already stopped early: %s", run.stopper.reason)
            start_epoch = settings.epochs
    elif main_process:
        warn_if_overwriting(settings)
        if (run.out / LOG).exists():
            (run.out / LOG).unlink()
    net = model
    if world_size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opts = precision_options(device, settings.amp)
    precision = precision_label(opts)
    logger.info("precision: %s; evaluation images %s", precision,
                eval_intensity_label(settings.eval_gain, settings.eval_noise))
    if settings.eval_gain == 1 and not settings.eval_noise and not settings.bn_recalibrate and not settings.demo:
        logger.warning("validation and test images get /255 only while the training noise makes training images "
                       "%.2fx brighter on average; the BatchNorm statistics follow the training brightness, so "
                       "--eval-gain %.2f usually selects and scores the model better (README, 'Train/test "
                       "brightness')", NOISE_MEAN, NOISE_MEAN)
    if settings.bn_recalibrate:
        logger.info("BatchNorm statistics re-estimated before each validation over %d training images "
                    "(--bn-recalibrate)", min(settings.bn_recalibrate, len(loaders.samplers.train_indices)))
    for epoch in range(start_epoch, settings.epochs):
        for loader in (loaders.train, loaders.val):
            loader.set_epoch(epoch)
        tr = train_one_epoch(net, loaders.train, run.optimizer, device, epoch=epoch, progress=main_process, **opts)
        val_start = time.perf_counter()
        if settings.bn_recalibrate:
            recalibrate(model, index, settings, device, augment=False, caches=loaders.caches)
        with torch.random.fork_rng(devices=[]):  # --eval-noise with 0 workers: leave training's stream alone
            torch.manual_seed(settings.seed * 1_000_003 + epoch)
            va = evaluate_all(model, loaders.val, device, len(loaders.samplers.val), **opts)
        improved = run.stopper.mejor(va["loss"])
        stop = run.stopper.deberia_parar(va["loss"])
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
               "val_loss": va["loss"], "val_accuracy": va["accuracy"], "val_f1": va["f1"],
               "seconds": tr["seconds"], "val_seconds": time.perf_counter() - val_start,
               "train_images_per_s": tr["images_per_s"] * world_size,
               "improved": improved}
        run.history.append(row)
        if improved:
            run.best = {"epoch": epoch, "val_loss": va["loss"], "val_accuracy": va["accuracy"], "val_f1": va["f1"]}
        logger.info("epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f f1 %.3f | %.0f img/s%s",
                    epoch, tr["loss"], tr["accuracy"], va["loss"], va["accuracy"], va["f1"],
                    row["train_images_per_s"], " *best*" if improved else "")
        if main_process:
            run.record(row, improved, stop)
        if world_size > 1:
            dist.barrier()
        if stop:
            logger.info("early stopping: %s", run.stopper.reason)
            break
    if not run.best:
        raise ValueError(f"no epoch produced a finite validation loss; nothing saved to {settings.weights_out}")
    best_model, _meta = load_modelo_h5(settings.weights_out, device=device)
    # the saved weights already carry the evaluation statistics (same images, transform and seed)
    metrics = evaluate_test_set(best_model, index, settings, device, loaders.caches,
                                recalibrated=bool(settings.bn_recalibrate))
    summary = {"best": run.best, "test": metrics, "pretrained": run.pretrained_note,
               "epochs_run": len(run.history), "weights": str(settings.weights_out),
               "synthetic_data": settings.demo, "world_size": world_size, "precision": precision,
               "eval_gain": settings.eval_gain, "eval_noise": settings.eval_noise,
               "bn_recalibrate": settings.bn_recalibrate}
    if main_process:
        with atomic_path(run.out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        plot_confusion_matrix(np.array(metrics["no_tta"]["confusion_matrix"]), index.classes,
                              run.out / "confusion_matrix.png", title="test set, best weights, no TTA")
    return summary


def most_confident_copy(probs: np.ndarray, d: int) -> np.ndarray:
    """N x C: for each image, the probabilities of the copy on which the network is most confident."""
    grouped = probs.reshape(-1, d, probs.shape[1])
    best = grouped.max(axis=2).argmax(axis=1)
    return grouped[np.arange(len(grouped)), best]


def recalibration_indices(train_indices: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The training images whose statistics ``--bn-recalibrate n`` uses: a seeded random subset of the
    training split (all of it when n is larger), the same for every pass of a run."""
    rng = np.random.default_rng(seed * 1_000_003 + 17)
    return rng.permutation(np.asarray(train_indices))[: min(n, len(train_indices))]


def recalibrate(model: torch.nn.Module, index: DatasetIndex, settings, device: torch.device, *, augment: bool,
                caches: dict | None = None) -> int:
    """``recalibrate_batchnorm`` over ``settings.bn_recalibrate`` training images under the evaluation
    transform (``augment=False``) or the training augmentation, with its own seeded random stream."""
    lsettings = loader_settings(settings)
    samplers = make_samplers(index, settings.seed, lsettings.val_fraction, settings.train_subset)
    indices = recalibration_indices(samplers.train_indices, settings.bn_recalibrate, settings.seed)
    loader = make_loader(index, "train", indices.tolist(), augment=augment, settings=lsettings, device=device,
                         caches=caches)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed * 1_000_003 + (2 if augment else 1))
        return recalibrate_batchnorm(model, loader, device, **precision_options(device, settings.amp))


def evaluate_test_set(model: torch.nn.Module, index: DatasetIndex, settings, device: torch.device,
                      caches: dict | None = None, recalibrated: bool = False) -> dict:
    """Metrics on the test set without TTA and, for each d in ``settings.tta``, with d augmented copies.

    With ``settings.bn_recalibrate``, each pass first gets BatchNorm statistics of training images under
    its own transform (the TTA passes on a copy of the model); ``recalibrated`` says the model already
    carries the evaluation statistics, as the weights ``train`` saves do."""
    lsettings = loader_settings(settings)
    opts = precision_options(device, settings.amp)
    n = len(index.test)
    caches = {} if caches is None else caches
    if settings.bn_recalibrate and not recalibrated:
        recalibrate(model, index, settings, device, augment=False, caches=caches)
    plain = make_loader(index, "test", range(n), augment=False, settings=lsettings, device=device, caches=caches)
    torch.manual_seed(settings.seed)  # --eval-noise: the same draws every time (for a given --num-workers)
    probs, labels, loss = predict_all(model, plain, device, n, **opts)
    results = {"no_tta": classification_metrics(labels, probs) | {"loss": loss}}
    tta_model = model
    if settings.bn_recalibrate and settings.tta:
        tta_model = copy.deepcopy(model)
        recalibrate(tta_model, index, settings, device, augment=True, caches=caches)
    for d in settings.tta:
        torch.manual_seed(settings.seed + d)
        loader = make_loader(index, "test", RepeatSampler(range(n), d), augment=True,
                             settings=lsettings, device=device, caches=caches)
        probs_d, labels_d, _ = predict_all(tta_model, loader, device, n * d, **opts)
        y = tta_labels(labels_d, d)
        preds = tta_predict(probs_d, d)
        results[f"tta{d}"] = {
            "max_confidence": classification_metrics(y, most_confident_copy(probs_d, d)),
            "mean_probability": classification_metrics(y, preds["mean_probs"]),
        }
    return results


def evaluate_weights(settings, weights: str | Path, device: torch.device, eval_gain: float | None = None,
                     eval_noise: bool | None = None, bn_recalibrate: int | None = None) -> dict:
    """Test metrics of a modelo.h5.  What is not given comes from the model's own settings: with
    neither, its evaluation images are scaled as it was trained with (its ``--eval-gain`` or
    ``--eval-noise``); ``eval_noise=True`` alone means gain 1; ``eval_gain`` alone means no noise;
    ``eval_noise=False`` alone keeps the model's gain. ``bn_recalibrate`` likewise defaults to the model's."""
    model, meta = load_modelo_h5(weights, device=device)
    trained = meta.get("metadata", {}).get("settings", {})
    if eval_noise is None:
        eval_noise = False if eval_gain is not None else bool(trained.get("eval_noise", False))
    if eval_gain is None:
        eval_gain = 1.0 if eval_noise else float(trained.get("eval_gain", 1.0))
    if bn_recalibrate is None:
        bn_recalibrate = int(trained.get("bn_recalibrate", 0))
    settings = dataclasses.replace(settings, eval_gain=eval_gain, eval_noise=eval_noise, bn_recalibrate=bn_recalibrate)
    index = index_dataset(settings.data_dir)
    if list(meta.get("class_names", index.classes)) != index.classes:
        raise ValueError(f"{weights} was trained on classes {meta['class_names']}, "
                         f"but {settings.data_dir} has {index.classes}")
    return {"weights": str(weights), "eval_gain": settings.eval_gain, "eval_noise": settings.eval_noise,
            "bn_recalibrate": settings.bn_recalibrate, "test": evaluate_test_set(model, index, settings, device)}
