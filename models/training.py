"""The training run: loaders, model, optimizer, early stopping, checkpoints, modelo.h5, test metrics.

``run`` is what ``python train.py`` runs; ``evaluate_weights`` is ``--eval-only``.  The loop
never asks which loader back end it has: every loader yields ``(images, labels)`` on ``device``
and has ``set_epoch``.  All randomness derives from ``config.seed`` (``pipelines.seeds``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models.config import COMPARED_EVAL_TRANSFORMS, RunConfig, eval_gain, stored_decision
from models.early_stopping import EarlyStopping
from models.engine import (bootstrap_intervals, choose_threshold, classification_metrics, cross_fitted_metrics,
                           plot_confusion_matrix, plot_learning_curves, precision_label, precision_options, predict,
                           resolve_device, tta_labels, tta_probabilities, train_one_epoch)
from models.h5io import read_modelo_metadata, save_modelo_h5
from models.inference import load_with_decision
from models.vgg16dwsep import (VGG16DWSep, count_parameters, freeze_first_convs, imagenet_vgg16_state_dict,
                               load_vgg16_first_convs, trainable_parameters)
from pipelines.data import DatasetIndex, index_dataset
from pipelines.files import atomic_path
from pipelines.loaders import (PURPOSE_TEST, PURPOSE_TRAIN, PURPOSE_TTA, PURPOSE_VAL, LoaderSettings, make_loader,
                               make_samplers, resolve_backend)
from pipelines.samplers import RepeatSampler, unshard
from pipelines.seeds import Stream, derive_seed

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
#: checkpoint layout; a checkpoint of another version is refused rather than half-read
CHECKPOINT_VERSION = 2


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torchrun started a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def loader_settings(config: RunConfig, backend: str, eval_transform: str | None = None) -> LoaderSettings:
    rank, world_size = world()
    transform = eval_transform or config.eval_transform
    return LoaderSettings(backend=backend, batch_size=config.batch_size, num_workers=config.num_workers,
                          seed=config.seed, train_subset=config.train_subset, rank=rank, world_size=world_size,
                          eval_gain=eval_gain(transform), decoded_cache=config.decoded_cache,
                          image_size=config.image_size)


def eval_augments(eval_transform: str) -> bool:
    """Whether evaluation images go through the training Compose (the brief's reading)."""
    return eval_transform == "brief"


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


def build_model(config: RunConfig, device: torch.device) -> VGG16DWSep:
    """VGG16DWSep with its first two convolutions from ImageNet VGG16 (or random without the
    weights), frozen; initialised from the run's INIT stream."""
    torch.manual_seed(derive_seed(config.seed, Stream.INIT))
    model = VGG16DWSep(num_classes=2, input_size=config.image_size)
    if config.pretrained:
        load_vgg16_first_convs(model, imagenet_vgg16_state_dict(config.vgg16_weights))
    else:
        logger.warning("!! --no-pretrained: the first two convolutions start from random weights "
                       "(recorded in modelo.h5 and metrics.json) !!")
    freeze_first_convs(model)
    return model.to(device, memory_format=torch.channels_last)


def first_convs_note(config: RunConfig) -> str:
    """What the first two convolutions are in this run, for modelo.h5 and metrics.json."""
    if config.pretrained:
        return "ImageNet VGG16 features.0/features.2, frozen"
    return "NONE: first two convolutions random (--no-pretrained), frozen"


def rng_state() -> dict[str, Any]:
    """torch's generators (dropout draws from them); everything else is seeded explicitly."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, **state: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save({"version": CHECKPOINT_VERSION, **state}, tmp)


def versions() -> dict[str, str]:
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def decision_rule(config: RunConfig, threshold: float) -> dict[str, Any]:
    """What modelo.h5 stores of how the model decides: PNEUMONIA (class 1) when P >= threshold."""
    return {"positive_class": 1, "threshold": threshold if config.decision == "threshold" else 0.5,
            "rule": config.decision, "eval_transform": config.eval_transform}


def model_metadata(config: RunConfig, index: DatasetIndex, best: dict, pretrained_note: str) -> dict:
    return {"settings": config.asdict(), "best": best, "pretrained": pretrained_note,
            "decision": decision_rule(config, best["threshold"]), "recipe": config.recipe,
            "departures_from_brief": config.departures(),
            "data": {"root": str(index.root), "train": index.class_counts("train"),
                     "test": index.class_counts("test")},
            "versions": versions()}


#: Settings a resumed run must share with its checkpoint: the split, the samplers' orders, the
#: optimiser, the selection and where the best weights so far are; the number of torchrun
#: processes is checked beside them. Others may change (--epochs to go further, --device, --tta, ...).
RESUME_MUST_MATCH = ("data_dir", "seed", "train_subset", "batch_size", "lr", "weight_decay", "paciencia",
                     "image_size", "weights_out", "demo", "pretrained", "eval_transform", "decision")
#: Settings that may change on resume, with a warning: the run goes on, but its augmentation stream
#: (seeded per worker) or its numerics are no longer those of one uninterrupted run.
RESUME_WARN = ("loader", "amp", "decoded_cache", "num_workers", "device")


def _same_setting(key: str, saved: Any, ours: Any) -> bool:
    if key in ("data_dir", "weights_out") and saved is not None and ours is not None:
        return saved == ours or Path(saved).resolve() == Path(ours).resolve()
    return saved == ours


def check_resumed_settings(saved: dict, config: RunConfig, ckpt_path: Path, saved_world_size: int | None = None,
                           world_size: int = 1) -> None:
    """Refuse to resume with other settings than the checkpoint's, for those in ``RESUME_MUST_MATCH``
    and the number of processes (it shards each epoch's order); warn for those in ``RESUME_WARN``."""
    ours = config.asdict()
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


def load_checkpoint(ckpt_path: Path, config: RunConfig, world_size: int = 1) -> dict:
    """The checkpoint of the run to resume, checked against this run's settings before anything
    costly (indexing, decoding a cache, building the model) is done. Loaded with
    ``weights_only=True``: tensors and plain containers only, so a planted file cannot run code."""
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for code, RuntimeError/EOFError for a damaged file
        raise ValueError(f"--resume: {ckpt_path} is not a checkpoint this version can load safely "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        found = ckpt.get("version") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"--resume: {ckpt_path} has checkpoint version {found!r}, this code reads "
                         f"{CHECKPOINT_VERSION}; start a new run with another --out")
    check_resumed_settings(ckpt.get("settings", {}), config, ckpt_path, ckpt.get("world_size"), world_size)
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


def warn_if_overwriting(config: RunConfig) -> None:
    """A new run replaces --weights-out at its first epoch (the default, ./modelo.h5, is shared by
    every --out); say whose best weights are about to go, so they can be copied first."""
    path = Path(config.weights_out)
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


def sampler_order(sampler, epoch: int) -> np.ndarray:
    """The index order ``sampler`` gives in ``epoch`` (it is left set to that epoch)."""
    sampler.set_epoch(epoch)
    order = np.fromiter(iter(sampler), dtype=np.int64)
    sampler.set_epoch(epoch)
    return order


@dataclasses.dataclass
class Validation:
    """Builds the validation loaders of a run and scores one epoch's model on them."""

    config: RunConfig
    index: DatasetIndex
    samplers: Any
    backend: str
    device: torch.device
    caches: dict
    opts: dict

    def __post_init__(self) -> None:
        transforms = COMPARED_EVAL_TRANSFORMS if self.config.compare_eval else (self.config.eval_transform,)
        self.loaders = {t: make_loader(self.index, "train", self.samplers.val, augment=eval_augments(t),
                                       settings=loader_settings(self.config, self.backend, t), device=self.device,
                                       caches=self.caches, purpose=PURPOSE_VAL + COMPARED_EVAL_TRANSFORMS.index(t))
                        for t in transforms}

    def score(self, model: torch.nn.Module, epoch: int) -> tuple[dict, dict]:
        """This run's validation metrics (loss, the decision's threshold chosen on these images, and
        the metrics under it) and, with ``compare_eval``, every candidate's."""
        candidates = {}
        ours = None
        groups = sampler_order(self.samplers.val, epoch) if self.config.compare_eval else None
        for transform, loader in self.loaders.items():
            loader.set_epoch(epoch)
            probs, labels, loss = predict_all(model, loader, self.device, len(self.samplers.val),
                                              seed=derive_seed(self.config.seed, Stream.EVAL, epoch), **self.opts)
            threshold = choose_threshold(labels, probs[:, 1])
            by_rule = {"argmax": classification_metrics(labels, probs, threshold=0.5),  # as the test decides it
                       "threshold": classification_metrics(labels, probs, threshold=threshold)}
            if transform == self.config.eval_transform:
                ours = by_rule[self.config.decision] | {"loss": loss, "chosen_threshold": threshold}
            if groups is not None:
                crossed = cross_fitted_metrics(labels, probs, groups, seed=derive_seed(self.config.seed, Stream.CROSS_FIT))
                candidates[transform] = {"loss": loss} | {
                    rule: {k: m[k] for k in ("accuracy", "f1", "balanced_accuracy", "recall", "specificity")}
                    for rule, m in (("argmax", by_rule["argmax"]), ("threshold_cross_fitted", crossed))}
        assert ours is not None
        return ours, candidates


@dataclasses.dataclass
class Run:
    """What one training run carries from epoch to epoch."""

    config: RunConfig
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
        return Path(self.config.out)

    def save_best(self) -> None:
        save_modelo_h5(self.config.weights_out, self.model, class_names=self.index.classes,
                       metadata=model_metadata(self.config, self.index, self.best, self.pretrained_note))

    def reconcile_best_weights(self, last_epoch: int) -> None:
        """After a resume: the log is the checkpoint's history, and modelo.h5 holds the best epoch the
        checkpoint names (written from the checkpoint when the run died between the two files)."""
        with atomic_path(self.out / LOG) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in self.history))
        path = Path(self.config.weights_out)
        try:
            on_disk = read_modelo_metadata(path)["metadata"]["best"]["epoch"] if path.exists() else None
        except (OSError, ValueError, KeyError, TypeError):
            on_disk = None
        if self.best and on_disk != self.best["epoch"]:
            if self.best["epoch"] != last_epoch:
                raise ValueError(f"--resume: {path} holds epoch {on_disk}, the checkpoint's best is epoch "
                                 f"{self.best['epoch']} and its weights are not in the checkpoint; start a new run")
            logger.warning("--resume: %s held epoch %s; writing the checkpoint's best, epoch %d", path, on_disk,
                           last_epoch)
            self.save_best()

    def record(self, row: dict, improved: bool, stop: bool) -> None:
        """Main process only: checkpoint, best weights, log line, learning curves (each atomic). The
        checkpoint goes first: should the run die before modelo.h5 is written, ``--resume`` writes it
        from the checkpoint (``reconcile_best_weights``) and rewrites the log from its history."""
        start = time.perf_counter()
        save_checkpoint(self.out / CHECKPOINT, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                        early_stopping=self.stopper.state_dict(), rng=rng_state(), epoch=row["epoch"],
                        history=self.history, best=self.best, settings=self.config.asdict(),
                        stopped=stop, world_size=self.world_size)
        if improved:
            self.save_best()
        append_jsonl(self.out / LOG, row)
        plot_learning_curves(self.history, self.out / "learning_curves.png")
        logger.info("epoch %d: files written in %.1f s (%scheckpoint, curves)", row["epoch"],
                    time.perf_counter() - start, "modelo.h5, " if improved else "")


def train(config: RunConfig, device: torch.device, resume: bool = False) -> dict:
    """Train until early stopping or ``config.epochs``; return the test metrics of the best weights.

    Under torchrun every rank trains on its share of each epoch's order (DDP averages the
    gradients), validation predictions are gathered so all ranks stop together, and only rank 0
    writes files.
    """
    rank, world_size = world()
    main_process = rank == 0
    Path(config.out).mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(Path(config.out) / CHECKPOINT, config, world_size) if resume else None
    index = index_dataset(config.data_dir)
    backend = resolve_backend(config.loader, device)
    lsettings = loader_settings(config, backend)
    samplers = make_samplers(index, config.seed, lsettings.val_fraction, config.train_subset)
    caches: dict = {}
    train_loader = make_loader(index, "train", samplers.train, augment=True, settings=lsettings, device=device,
                               caches=caches, purpose=PURPOSE_TRAIN)
    opts = precision_options(device, config.amp)
    validation = Validation(config, index, samplers, backend, device, caches, opts)
    logger.info("train %d images, validation %d (resampled to the test balance), test %d; %s loader on %s%s",
                len(samplers.train_indices), len(samplers.val), len(index.test), backend, device,
                f", rank {rank} of {world_size}" if world_size > 1 else "")
    logger.info("recipe %r: %s", config.recipe, ", ".join(f"{k}={v}" for k, v in config.levers().items()))
    model = build_model(config, device)
    run = Run(config, index, model,
              torch.optim.Adam(trainable_parameters(model), lr=config.lr, weight_decay=config.weight_decay),
              EarlyStopping(modo="min", paciencia=config.paciencia),
              first_convs_note(config), world_size)
    logger.info("VGG16DWSep: %s parameters, %s trainable", f"{count_parameters(model):,}",
                f"{count_parameters(model, trainable_only=True):,}")
    start_epoch = 0
    if ckpt is not None:
        run.history, run.best, start_epoch, stopped = restore(ckpt, run.out / CHECKPOINT, model, run.optimizer,
                                                               run.stopper)
        del ckpt
        if main_process:
            run.reconcile_best_weights(start_epoch - 1)
        if backend == "dali":
            logger.warning("--resume with the DALI loader: its random streams restart, so the later epochs' "
                           "augmentation is not that of one uninterrupted run")
        if stopped:
            logger.info("that run had already stopped early")
            start_epoch = config.epochs
    elif main_process:
        warn_if_overwriting(config)
        if (run.out / LOG).exists():
            (run.out / LOG).unlink()
    net = model
    if world_size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if start_epoch == 0:  # each rank its own dropout masks; a resumed run goes on with the checkpoint's stream
        torch.manual_seed(derive_seed(config.seed, Stream.DROPOUT, rank))
    elif world_size > 1:  # the checkpoint holds rank 0's generator: each rank its own stream again
        torch.manual_seed(derive_seed(config.seed, Stream.DROPOUT, rank, start_epoch))
    precision = precision_label(opts)
    logger.info("precision: %s", precision)
    for epoch in range(start_epoch, config.epochs):
        train_loader.set_epoch(epoch)
        tr = train_one_epoch(net, train_loader, run.optimizer, device, epoch=epoch, progress=main_process,
                             **opts)
        val_start = time.perf_counter()
        if world_size > 1:  # every rank validates the weights and BatchNorm statistics rank 0 saves
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        va, candidates = validation.score(model, epoch)
        improved = run.stopper.improves(va["loss"])  # strictly better: only then are the best weights replaced
        stop = run.stopper.deberia_parar(va["loss"])
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
               "val_loss": va["loss"], "val_accuracy": va["accuracy"], "val_f1": va["f1"],
               "val_balanced_accuracy": va["balanced_accuracy"], "val_threshold": va["chosen_threshold"],
               "seconds": tr["seconds"], "val_seconds": time.perf_counter() - val_start,
               "train_images_per_s": tr["images_per_s"] * world_size, "improved": improved}
        if candidates:
            row["candidates"] = candidates
        run.history.append(row)
        if improved:
            run.best = {"epoch": epoch, "val_loss": va["loss"], "val_accuracy": va["accuracy"], "val_f1": va["f1"],
                        "val_balanced_accuracy": va["balanced_accuracy"], "threshold": va["chosen_threshold"]}
        logger.info("epoch %d: train loss %.4f acc %.3f | val loss %.4f acc %.3f f1 %.3f bal %.3f | %.0f img/s%s",
                    epoch, tr["loss"], tr["accuracy"], va["loss"], va["accuracy"], va["f1"],
                    va["balanced_accuracy"], row["train_images_per_s"], " *best*" if improved else "")
        if main_process:
            run.record(row, improved, stop)
        if world_size > 1:
            dist.barrier()
        if stop:
            logger.info("early stopping: %s", run.stopper.reason)
            break
    if not run.best:
        raise ValueError(f"no epoch produced a finite validation loss; nothing saved to {config.weights_out}")
    if config.skip_test:
        logger.info("--skip-test: the test split is not scored")
        decision = stored_decision(read_modelo_metadata(config.weights_out)["metadata"], config.weights_out)
        return {"best": run.best, "test": None, "epochs_run": len(run.history), "weights": str(config.weights_out),
                "recipe": config.recipe, "levers": config.levers(), "decision": decision}
    best_model, _, decision = load_with_decision(config.weights_out, device)
    metrics = evaluate_test_set(best_model, index, config, backend, device, decision["threshold"], caches)
    summary = {"best": run.best, "test": metrics, "pretrained": run.pretrained_note,
               "epochs_run": len(run.history), "weights": str(config.weights_out),
               "synthetic_data": config.demo, "world_size": world_size, "precision": precision,
               "recipe": config.recipe, "levers": config.levers(), "decision": decision, "settings": config.asdict()}
    if main_process:
        with atomic_path(run.out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        plot_confusion_matrix(np.array(metrics["no_tta"]["confusion_matrix"]), index.classes,
                              run.out / "confusion_matrix.png", title="test set, best weights, no TTA")
    return summary


def named_predictions(test: dict) -> list[tuple[str, dict]]:
    """The test block's predictions in reading order, named: no TTA, then each d's two rules."""
    named = [("no TTA", test["no_tta"])]
    named += [(f"TTA d={key[3:]}, {rule.replace('_', ' ')}", metrics) for key, rules in test.items()
              if key.startswith("tta") for rule, metrics in rules.items()]
    return named


def with_intervals(labels: np.ndarray, probs: np.ndarray, threshold: float, seed: int) -> dict:
    """``classification_metrics`` under the threshold, with 95 % bootstrap intervals (``ci95``)."""
    metrics = classification_metrics(labels, probs, threshold=threshold)
    return metrics | {"ci95": bootstrap_intervals(labels, probs, threshold, seed=seed)}


def evaluate_test_set(model: torch.nn.Module, index: DatasetIndex, config: RunConfig, backend: str,
                      device: torch.device, threshold: float, caches: dict | None = None) -> dict:
    """Test metrics under the decision rule (P(PNEUMONIA) >= ``threshold``) without TTA and, for each
    d in ``config.tta``, over d augmented copies per image: the mean probability, and the copy on
    which the network is most confident (the brief's rule), each thresholded. Every figure carries a
    95 % bootstrap interval (``ci95``)."""
    lsettings = loader_settings(config, backend)
    opts = precision_options(device, config.amp)
    n = len(index.test)
    caches = {} if caches is None else caches
    plain = make_loader(index, "test", range(n), augment=eval_augments(config.eval_transform), settings=lsettings,
                        device=device, caches=caches, purpose=PURPOSE_TEST)
    probs, labels, loss = predict_all(model, plain, device, n, seed=derive_seed(config.seed, Stream.TEST), **opts)
    ci_seed = derive_seed(config.seed, Stream.BOOTSTRAP, bits=32)
    results = {"no_tta": with_intervals(labels, probs, threshold, ci_seed) | {"loss": loss}}
    for d in config.tta:
        loader = make_loader(index, "test", RepeatSampler(range(n), d), augment=True, settings=lsettings,
                             device=device, caches=caches, purpose=PURPOSE_TTA + d)
        probs_d, labels_d, _ = predict_all(model, loader, device, n * d, seed=derive_seed(config.seed, Stream.TTA, d),
                                           **opts)
        y = tta_labels(labels_d, d)
        results[f"tta{d}"] = {rule: with_intervals(y, p, threshold, ci_seed)
                              for rule, p in tta_probabilities(probs_d, d).items()}
    return results


#: What ``--eval-only`` takes from the run that wrote the modelo.h5, whatever the command line says:
#: what decides the test pass's draws (seed, transform, batches, workers), its numerics and the rule.
EVAL_ONLY_FROM_RUN = ("seed", "batch_size", "num_workers", "amp", "decoded_cache")


def evaluate_weights(config: RunConfig, weights: str | Path, device: torch.device) -> dict:
    """Test metrics of a modelo.h5 as its training run scored them: its evaluation transform,
    decision rule, image size and ``EVAL_ONLY_FROM_RUN`` settings (``config`` gives the data folder,
    the TTA copies, the loader and the device)."""
    model, meta, decision = load_with_decision(weights, device)
    trained = meta.get("metadata", {}).get("settings", {})
    kept = {key: trained[key] for key in EVAL_ONLY_FROM_RUN if key in trained}
    config = dataclasses.replace(config, eval_transform=decision["eval_transform"], decision=decision["rule"],
                                 image_size=int(meta["input_size"]), **kept)
    logger.info("--eval-only: the run's own %s", ", ".join(f"{k}={v}" for k, v in kept.items()))
    index = index_dataset(config.data_dir)
    if list(meta.get("class_names", index.classes)) != index.classes:
        raise ValueError(f"{weights} was trained on classes {meta['class_names']}, "
                         f"but {config.data_dir} has {index.classes}")
    backend = resolve_backend(config.loader, device)
    return {"weights": str(weights), "decision": decision,
            "test": evaluate_test_set(model, index, config, backend, device, float(decision["threshold"]))}


def start_distributed(device: torch.device) -> bool:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on the CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return True


def run(config: RunConfig, resume: bool = False) -> dict | None:
    """A whole training run as ``python train.py`` makes it: the device (this rank's GPU under
    torchrun), the process group, training, test. Returns the summary on rank 0, None elsewhere."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and config.device.startswith("cuda:"):
        raise ValueError(f"--device {config.device}: under torchrun each process takes its own GPU "
                         "(LOCAL_RANK); give --device cuda or auto")
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        # every batch has the same shape, so cuDNN's autotuned kernels are reused; GPU runs are
        # then not bit-reproducible (CPU runs are)
        torch.backends.cudnn.benchmark = True
    distributed = start_distributed(device)
    try:
        summary = train(config, device, resume=resume)
    finally:
        if distributed:
            dist.destroy_process_group()
    return summary if os.environ.get("RANK", "0") == "0" else None
