"""Explain one image classification with LIME (``explainer``): figures and explanation.json in
--out and, with --json, the same report on stdout.

    python explain.py --image x.jpeg --model vgg16dwsep --weights modelo.h5 --segmentation slic colour \\
        --family logistic tree --samples 1000 --sigma 0.25 --seed 0 --out out/explain --json

Which model: inception_v3 is explained only with its ImageNet weights (torch hub's cache, or
--weights PATH); without them it is skipped with one line on stderr (exit 0, no figures).
vgg16dwsep explains --weights PATH, else ./modelo.h5, else refuses; a model trained on synthetic
data only with --demo, which without --weights trains one briefly on synthetic data. y follows the
model's decision rule: a modelo.h5 whose metadata holds "decision": {"positive_class": 1,
"threshold": t} is PNEUMONIA when P(PNEUMONIA) >= t; otherwise the top class.

What the report says besides the ranking: the surrogate's fidelity (weighted ROC AUC of the
classifier against y, or weighted R2 of the probability model); when y's smaller class holds fewer
than max(10, 1 %) of the samples, that the probability of the class is explained instead and why;
when that probability spans less than 0.05 over the perturbed images, that the prediction is
insensitive to the superpixels (the figures then rank none). Expected errors (a missing image or
weights file, a bad value) end with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from explainer.core import DEFAULT_BATCH_SIZE, DEFAULT_SIGMA, Explanation, SurrogateSettings, explain_image, pixel_overlap
from explainer.figures import plot_grid, plot_importance, plot_perturbations, plot_segments, run_title
from explainer.models import (BriefTraining, LoadedModel, WeightsUnavailable, explanation_image, load_inception_v3,
                              load_vgg16dwsep)
from explainer.segmentation import SEGMENTATIONS, SegmentationSettings, describe, segment
from models.engine import resolve_device
from pipelines.cli import run_cli, script_parser
from pipelines.files import atomic_path

logger = logging.getLogger("explain")

FAMILIES = ("logistic", "tree")
SYNTHETIC_MODEL = "synthetic_modelo.h5"


@dataclass(frozen=True)
class ExplainSettings:
    image: Path
    out: Path
    model: str = "inception_v3"
    weights: Path | None = None
    demo: bool = False
    segmentations: tuple[str, ...] = ("slic",)
    families: tuple[str, ...] = ("logistic",)
    samples: int = 1000
    sigma: float = DEFAULT_SIGMA
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    top_k: int = 5
    C: float = 1.0
    l1: bool = False
    max_superpixels: int | None = None
    tree_depth: int = 3
    train_steps: int = BriefTraining.steps
    device: str = "auto"
    json: bool = False
    amp: bool = True

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"--samples must be >= 2 (the brief asks for >= 1000), got {self.samples}")
        if not self.sigma > 0 or not np.isfinite(self.sigma):
            raise ValueError(f"--sigma must be a positive number, got {self.sigma}")
        for name in ("batch_size", "top_k", "train_steps", "tree_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.demo and self.model != "vgg16dwsep":
            raise ValueError("--demo is for --model vgg16dwsep; inception_v3 is explained only with its ImageNet weights")

    def surrogate(self, family: str) -> SurrogateSettings:
        return SurrogateSettings(family=family, C=self.C, l1=self.l1, max_superpixels=self.max_superpixels,
                                 tree_depth=self.tree_depth)


def get_args_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__, prog="explain.py")
    parser.add_argument("--image", type=Path, required=True, help="the image to explain (any format PIL reads)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the figures and explanation.json")
    chosen = parser.add_argument_group("the model")
    chosen.add_argument("--model", choices=("inception_v3", "vgg16dwsep"), default="inception_v3",
                        help="the network to explain: torchvision's ImageNet inception_v3 (299 x 299, centre crop), "
                             "or this project's VGG16DWSep (a modelo.h5 of train.py; the image squashed as in training)")
    chosen.add_argument("--weights", type=Path, default=None,
                        help="inception_v3: a torchvision state dict (.pth; default: torch hub's cache, else the model "
                             "is skipped); vgg16dwsep: a modelo.h5 (default: ./modelo.h5, else refused)")
    chosen.add_argument("--demo", action="store_true",
                        help="vgg16dwsep only: allow a model trained on synthetic data; without --weights, train one "
                             "for --train-steps steps (the figures then show the mechanics, not the disease)")
    chosen.add_argument("--train-steps", type=int, default=BriefTraining.steps,
                        help="--demo without --weights: Adam steps of the brief synthetic training")
    chosen.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs; auto = CUDA when present")
    chosen.add_argument("--no-amp", action="store_true",
                        help="fp32 model calls (default: bf16 autocast on CUDA and on CPUs with native bf16)")
    lime = parser.add_argument_group("LIME")
    lime.add_argument("--segmentation", nargs="+", choices=sorted(SEGMENTATIONS), default=["slic"],
                      help="superpixel methods, each explained on its own perturbations: slic (the brief's, 80 "
                           "segments), kmeans and birch (clusters of (x, y, gray) pixels), colour (k-means in RGB, "
                           "the bonus)")
    lime.add_argument("--family", nargs="+", choices=FAMILIES, default=["logistic"],
                      help="explanation models g, fitted on the same model outputs: logistic (the brief's weighted "
                           "LogisticRegression), tree (the bonus's non-linear family: a weighted decision tree on y, or "
                           "a regression tree on the probability when y is too unbalanced)")
    lime.add_argument("--samples", type=int, default=1000,
                      help="perturbations per segmentation, the first being the image itself")
    lime.add_argument("--sigma", type=float, default=DEFAULT_SIGMA,
                      help="kernel width of pi = exp(-d^2 / sigma^2), d the cosine distance to the image")
    lime.add_argument("--seed", type=int, default=0,
                      help="seed of the clusterings, the perturbations and the --demo training")
    lime.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="perturbed images per model call")
    lime.add_argument("--C", type=float, default=1.0,
                      help="inverse strength of the logistic regression's penalty Omega(g) (smaller: simpler g)")
    lime.add_argument("--l1", action="store_true",
                      help="L1 penalty instead of L2: the smaller --C, the fewer superpixels keep a coefficient")
    lime.add_argument("--max-superpixels", type=int, default=None,
                      help="L1 with the largest C that keeps at most this many superpixels (default: no limit)")
    lime.add_argument("--tree-depth", type=int, default=3, help="depth of the tree family")
    report = parser.add_argument_group("output")
    report.add_argument("--top-k", type=int, default=5,
                        help="superpixels shown for and against in the figures and compared between explanations")
    report.add_argument("--json", action="store_true",
                        help="print the report (explanation.json) on stdout instead of a summary")
    return parser


def settings_from_args(args: argparse.Namespace) -> ExplainSettings:
    return ExplainSettings(
        image=args.image, out=args.out, model=args.model, weights=args.weights, demo=args.demo,
        segmentations=tuple(dict.fromkeys(args.segmentation)), families=tuple(dict.fromkeys(args.family)),
        samples=args.samples, sigma=args.sigma, seed=args.seed, batch_size=args.batch_size, top_k=args.top_k,
        C=args.C, l1=args.l1, max_superpixels=args.max_superpixels, tree_depth=args.tree_depth,
        train_steps=args.train_steps, device=args.device, json=args.json, amp=not args.no_amp)


def load_model(settings: ExplainSettings, device: torch.device) -> LoadedModel:
    if settings.model == "inception_v3":
        return load_inception_v3(settings.weights, device, amp=settings.amp)
    return load_vgg16dwsep(settings.weights, device, demo=settings.demo, seed=settings.seed,
                           training=BriefTraining(steps=settings.train_steps, seed=settings.seed),
                           save_to=settings.out / SYNTHETIC_MODEL, amp=settings.amp)


@dataclass(frozen=True)
class SegmentationResult:
    method: str
    segments: np.ndarray
    explanations: dict[str, Explanation]
    """One per family, all fitted on the same model outputs."""
    model_seconds: float


def explain_segmentation(settings: ExplainSettings, loaded: LoadedModel, image: np.ndarray, method: str,
                         label: int | None) -> SegmentationResult:
    """Superpixels by ``method``, one set of model calls, one explanation per family; the
    seconds cover the model calls and the first fit.  ``label`` None: the class the model's
    decision rule gives the control image."""
    segments = segment(image, method, SegmentationSettings(seed=settings.seed))
    first, *others = settings.families
    start = time.perf_counter()
    explanation = explain_image(image, loaded.predictor, segments, num_samples=settings.samples, sigma=settings.sigma,
                                seed=settings.seed, batch_size=settings.batch_size, label=label,
                                decision=loaded.decision, surrogate=settings.surrogate(first), progress=True)
    seconds = time.perf_counter() - start
    explanations = {first: explanation, **{family: explanation.refit(settings.surrogate(family)) for family in others}}
    return SegmentationResult(method, segments, explanations, seconds)


def explain_every_segmentation(settings: ExplainSettings, loaded: LoadedModel, image: np.ndarray) -> list[SegmentationResult]:
    """Every requested segmentation explains the class the model gives the control image (the
    first perturbation of the first run, so no extra model call)."""
    results: list[SegmentationResult] = []
    label = None
    for method in settings.segmentations:
        results.append(explain_segmentation(settings, loaded, image, method, label))
        label = next(iter(results[-1].explanations.values())).label
    return results


def prediction_of(explanation: Explanation, loaded: LoadedModel) -> dict[str, Any]:
    return {"class": explanation.label, "name": loaded.class_names[explanation.label],
            "probability": explanation.control_probability, "decision": explanation.decision}


def comparisons(results: list[SegmentationResult], top_k: int) -> list[dict[str, Any]]:
    """Per family, each segmentation against the first (the bonus: colour against SLIC): the share
    of pixels their top-k superpixels in favour have in common and each one's fidelity."""
    first, *others = results
    rows = []
    for other in others:
        for family, explanation in other.explanations.items():
            reference = first.explanations[family]
            rows.append({"family": family, "segmentations": [first.method, other.method], "top_k": top_k,
                         "top_k_pixel_jaccard": pixel_overlap(reference, explanation, top_k),
                         "kinds": [reference.kind, explanation.kind],
                         "fidelity_metrics": [reference.fidelity_metric, explanation.fidelity_metric],
                         "fidelities": [reference.fidelity, explanation.fidelity],
                         "insensitive": [reference.insensitive, explanation.insensitive]})
    return rows


def write_figures(settings: ExplainSettings, loaded: LoadedModel, image: np.ndarray, results: list[SegmentationResult],
                  label_text: str) -> list[str]:
    """Per segmentation: boundaries, perturbed examples, one importance figure per family; and a
    comparison grid when there is more than one explanation."""
    figures: list[Path] = []
    grid: dict[tuple[str, str], Explanation] = {}
    for result in results:
        title = run_title(loaded.name, loaded.weights_note, describe(result.method, SegmentationSettings()),
                          int(result.segments.max()) + 1, settings.samples, settings.sigma, label_text)
        figures.append(plot_segments(image, result.segments, title, settings.out / f"segments_{result.method}.png"))
        first = next(iter(result.explanations.values()))
        figures.append(plot_perturbations(first, loaded.class_names, title,
                                          settings.out / f"perturbed_{result.method}.png"))
        for family, explanation in result.explanations.items():
            figures.append(plot_importance(explanation, settings.top_k, title,
                                           settings.out / f"importance_{result.method}_{family}.png"))
            grid[(result.method, family)] = explanation
    if len(grid) > 1:
        title = (f"{loaded.name} - weights: {loaded.weights_note}\n{settings.samples} samples - sigma "
                 f"{settings.sigma:g} - explaining {label_text}")
        figures.append(plot_grid(grid, settings.top_k, title, settings.out / "comparison.png"))
    return [str(path) for path in figures]


def settings_record(settings: ExplainSettings) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in dataclasses.asdict(settings).items()}


def run(settings: ExplainSettings, device: torch.device) -> dict[str, Any]:
    """Explain the image with every requested segmentation and family; write the figures and
    ``explanation.json``; return the report.  A model without the real weights it needs
    (inception_v3 without ImageNet weights) is skipped: the report then holds ``skipped``, the
    reason, and nothing is written."""
    if not settings.image.is_file():
        raise FileNotFoundError(f"image not found: {settings.image}")
    try:
        loaded = load_model(settings, device)
    except WeightsUnavailable as missing:
        return {"image": str(settings.image), "model": settings.model, "skipped": str(missing),
                "settings": settings_record(settings)}
    image = explanation_image(settings.image, crop=loaded.crop)
    results = explain_every_segmentation(settings, loaded, image)
    prediction = prediction_of(next(iter(results[0].explanations.values())), loaded)
    logger.info("%s decides %r (class %d, p=%.3f; %s) with weights: %s", loaded.name, prediction["name"],
                prediction["class"], prediction["probability"], prediction["decision"], loaded.weights_note)
    label_text = f"{prediction['name']!r} (class {prediction['class']}, p={prediction['probability']:.2f})"
    figures = write_figures(settings, loaded, image, results, label_text)
    entries = [{"segmentation": result.method, "family": family, "model_seconds": result.model_seconds,
                **explanation.summary()}
               for result in results for family, explanation in result.explanations.items()]
    report = {"image": str(settings.image), "model": loaded.name, "weights": loaded.weights_note,
              "synthetic_data": loaded.synthetic, "device": str(device),
              "precision": "fp32" if loaded.predictor.amp_dtype is None else "bf16 autocast", "prediction": prediction,
              "settings": settings_record(settings), "explanations": entries,
              "comparisons": comparisons(results, settings.top_k), "figures": figures}
    with atomic_path(settings.out / "explanation.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report


def entry_line(entry: dict[str, Any], top_k: int) -> str:
    """One explanation in one line: its surrogate and fidelity, then its top superpixels or why there are none."""
    fidelity = "undefined" if entry["fidelity"] is None else f"{entry['fidelity']:.3f}"
    head = f"{entry['segmentation']}/{entry['family']}: {entry['kind']}, {entry['fidelity_metric']} {fidelity}"
    if entry["insensitive"]:
        return f"{head}; insensitive: P spans {entry['probability_range']:.3g} over the perturbed images, nothing ranked"
    top = ", ".join(f"{row['superpixel']} ({row['coefficient']:+.3f})" for row in entry["ranked"][:top_k])
    return f"{head}; top {top_k}: {top}"


def explain_main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    report = run(settings, resolve_device(settings.device))
    if "skipped" in report:
        print(f"explain.py: {report['model']} skipped: {report['skipped']}", file=sys.stderr)
    if settings.json:
        print(json.dumps(report, indent=2))
    elif "skipped" not in report:
        prediction = report["prediction"]
        print(f"{report['model']} ({report['weights']}): {prediction['name']!r} p={prediction['probability']:.3f} "
              f"({prediction['decision']})")
        for entry in report["explanations"]:
            print(entry_line(entry, settings.top_k))
        print(f"figures and explanation.json in {settings.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(lambda: explain_main(args), prog="explain.py")


if __name__ == "__main__":
    sys.exit(main())
