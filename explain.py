"""Explain one image classification with LIME (``explainer``): figures to ``--out`` and, with
``--json``, the ranked superpixels and their coefficients on stdout.

    python explain.py --image x.jpeg --model inception_v3 --random-weights --segmentation slic kmeans \\
        --samples 1000 --sigma 0.25 --seed 0 --out out/explain --json

Expected errors (a missing image or weights file, a bad value) end with one line on stderr and
exit status 1; argparse's own errors exit with 2.
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

from explainer.core import DEFAULT_BATCH_SIZE, DEFAULT_SIGMA, Explanation, SurrogateSettings, explain_image
from explainer.figures import plot_grid, plot_importance, plot_perturbations, plot_segments, run_title
from explainer.models import BriefTraining, LoadedModel, explanation_image, load_inception_v3, load_vgg16dwsep
from explainer.segmentation import SEGMENTATIONS, SegmentationSettings, describe, segment
from models.engine import resolve_device
from pipelines.cli import want_traceback
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
    random_weights: bool = False
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
        for name in ("batch_size", "top_k", "train_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.weights is not None and self.random_weights:
            raise ValueError("give either --weights or --random-weights, not both")

    def surrogate(self, family: str) -> SurrogateSettings:
        return SurrogateSettings(family=family, C=self.C, l1=self.l1, max_superpixels=self.max_superpixels,
                                 tree_depth=self.tree_depth)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="explain.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--image", type=Path, required=True, help="image to explain")
    parser.add_argument("--model", choices=("inception_v3", "vgg16dwsep"), default="inception_v3",
                        help="the network to explain: torchvision's ImageNet inception_v3, or this project's "
                             "VGG16DWSep (a modelo.h5 of train.py)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", type=Path, default=None,
                         help="inception_v3: a torchvision state dict (.pth; default: torch hub's cache); "
                              "vgg16dwsep: a modelo.h5 (default: a model briefly trained on synthetic data)")
    weights.add_argument("--random-weights", action="store_true",
                         help="seeded random weights (offline runs and tests; the explanation is meaningless)")
    parser.add_argument("--segmentation", nargs="+", choices=sorted(SEGMENTATIONS), default=["slic"],
                        help="one or more superpixel methods")
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=["logistic"],
                        help="explanation model(s), fitted on the same model outputs")
    parser.add_argument("--samples", type=int, default=1000, help="perturbations (the first is the image itself)")
    parser.add_argument("--sigma", type=float, default=DEFAULT_SIGMA, help="kernel width of exp(-d^2/sigma^2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the superpixels' clustering, the perturbations and random weights")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="perturbed images per model call")
    parser.add_argument("--top-k", type=int, default=5, help="superpixels shown in the figures")
    parser.add_argument("--C", type=float, default=1.0, help="inverse penalty strength of the logistic regression")
    parser.add_argument("--l1", action="store_true", help="L1 penalty: the smaller C, the fewer superpixels")
    parser.add_argument("--max-superpixels", type=int, default=None,
                        help="L1 with the largest C keeping at most this many superpixels")
    parser.add_argument("--tree-depth", type=int, default=3, help="depth of the decision-tree family")
    parser.add_argument("--train-steps", type=int, default=BriefTraining.steps,
                        help="vgg16dwsep without --weights: steps of the brief synthetic training")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs; auto = CUDA when present")
    parser.add_argument("--no-amp", action="store_true",
                        help="fp32 model calls (default: bf16 autocast on CUDA and on CPUs with native bf16)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the figures and explanation.json")
    parser.add_argument("--json", action="store_true", help="print the ranked superpixels as JSON on stdout")
    return parser


def settings_from_args(args: argparse.Namespace) -> ExplainSettings:
    return ExplainSettings(
        image=args.image, out=args.out, model=args.model, weights=args.weights, random_weights=args.random_weights,
        segmentations=tuple(dict.fromkeys(args.segmentation)), families=tuple(dict.fromkeys(args.family)),
        samples=args.samples, sigma=args.sigma, seed=args.seed, batch_size=args.batch_size, top_k=args.top_k,
        C=args.C, l1=args.l1, max_superpixels=args.max_superpixels, tree_depth=args.tree_depth,
        train_steps=args.train_steps, device=args.device, json=args.json, amp=not args.no_amp)


def load_model(settings: ExplainSettings, device: torch.device) -> LoadedModel:
    loaders = {
        "inception_v3": lambda: load_inception_v3(settings.weights, settings.random_weights, device, settings.seed,
                                                  amp=settings.amp),
        "vgg16dwsep": lambda: load_vgg16dwsep(settings.weights, settings.random_weights, device, settings.seed,
                                              BriefTraining(steps=settings.train_steps, seed=settings.seed),
                                              save_to=settings.out / SYNTHETIC_MODEL, amp=settings.amp),
    }
    return loaders[settings.model]()


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
    seconds cover the model calls and the first fit.  ``label`` None: the control image's top class."""
    segments = segment(image, method, SegmentationSettings(seed=settings.seed))
    first, *others = settings.families
    start = time.perf_counter()
    explanation = explain_image(image, loaded.predictor, segments, num_samples=settings.samples, sigma=settings.sigma,
                                seed=settings.seed, batch_size=settings.batch_size, label=label,
                                surrogate=settings.surrogate(first), progress=True)
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
            "probability": explanation.control_probability}


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


def run(settings: ExplainSettings, device: torch.device) -> dict[str, Any]:
    """Explain the image with every requested segmentation and family; write the figures and
    ``explanation.json``; return the report."""
    if not settings.image.is_file():
        raise FileNotFoundError(f"image not found: {settings.image}")
    loaded = load_model(settings, device)
    image = explanation_image(settings.image, crop=loaded.crop)
    results = explain_every_segmentation(settings, loaded, image)
    prediction = prediction_of(next(iter(results[0].explanations.values())), loaded)
    logger.info("%s predicts %r (class %d, p=%.3f) with weights: %s", loaded.name, prediction["name"],
                prediction["class"], prediction["probability"], loaded.weights_note)
    label_text = f"{prediction['name']!r} (class {prediction['class']}, p={prediction['probability']:.2f})"
    figures = write_figures(settings, loaded, image, results, label_text)
    entries = [{"segmentation": result.method, "family": family, "model_seconds": result.model_seconds,
                **explanation.summary()}
               for result in results for family, explanation in result.explanations.items()]
    report = {"image": str(settings.image), "model": loaded.name, "weights": loaded.weights_note,
              "random_weights": loaded.random, "device": str(device),
              "precision": "fp32" if loaded.predictor.amp_dtype is None else "bf16 autocast", "prediction": prediction,
              "settings": {key: str(value) if isinstance(value, Path) else value
                           for key, value in dataclasses.asdict(settings).items()},
              "explanations": entries, "figures": figures}
    with atomic_path(settings.out / "explanation.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        report = run(settings, resolve_device(settings.device))
    except (OSError, ValueError) as error:  # bad input, missing or unwritable paths: one line, no traceback
        if want_traceback():  # NEUMONIA_DALI_TRACEBACK=1
            raise
        print(f"explain.py: error: {error}", file=sys.stderr)
        return 1
    if settings.json:
        print(json.dumps(report, indent=2))
    else:
        prediction = report["prediction"]
        print(f"{report['model']} ({report['weights']}): {prediction['name']!r} p={prediction['probability']:.3f}")
        for entry in report["explanations"]:
            top = ", ".join(f"{row['superpixel']} ({row['coefficient']:+.3f})" for row in entry["ranked"][:settings.top_k])
            print(f"{entry['segmentation']}/{entry['family']}: top {settings.top_k}: {top}")
        print(f"figures and explanation.json in {settings.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
