"""Benchmark: our LIME against the ``lime`` package's ``LimeImageExplainer``, measured side by
side in one run on the same image, segmentation, number of samples and model (a torchvision
resnet18 with seeded random weights, ImageNet normalisation, on the CPU unless CUDA is present).

    python -m explainer.bench [--samples 1000] [--repeats 1]
    python -m explainer.bench --sweep 8 16 32 64 --sweep-samples 128    # choose the batch size
    python -m explainer.bench --sigma-table                             # kernel widths, no model

Rows: perturbation-image generation alone (ours: one gather per batch; lime: its per-sample
copy-and-loop, run through ``data_labels`` with a classifier that does nothing) and the whole
explanation (model calls included; lime with its default 10 images per call).  Each repeat runs
ours then lime, so both see the same background load; the table shows the median.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from tqdm import tqdm

from pipelines.synthetic import chest_xray

from .core import (DEFAULT_BATCH_SIZE, DEFAULT_SIGMA, cosine_distance, effective_sample_size, explain_image,
                   iter_perturbed_batches, kernel_weights, sample_perturbations)
from .models import EXPLAIN_SIZE, IMAGENET_MEAN, IMAGENET_STD, TorchPredictor, seeded_init
from .segmentation import SegmentationSettings, slic_segments

logger = logging.getLogger(__name__)

SIZE = 224
DEFAULT_IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224" / "test" / "PNEUMONIA"
LIME_BATCH_SIZE = 10


@dataclass(frozen=True)
class BenchSettings:
    samples: int = 1000
    perturbation_samples: int = 1000
    repeats: int = 1
    perturbation_repeats: int = 5
    batch_size: int = DEFAULT_BATCH_SIZE
    lime_batch_size: int = LIME_BATCH_SIZE
    seed: int = 0
    sigma: float = DEFAULT_SIGMA
    image: Path | None = None


def bench_image(path: Path | None, size: int = SIZE) -> np.ndarray:
    """A size x size x 3 float32 chest X-ray in [0, 1]: ``path``, else the first real one in
    ../shared/data, else a synthetic one."""
    from .models import explanation_image

    if path is None and DEFAULT_IMAGE.is_dir():
        path = next(iter(sorted(DEFAULT_IMAGE.glob("*.jpeg"))), None)
    if path is not None:
        return explanation_image(path, crop=False, size=size)
    plane = chest_xray(np.random.default_rng(0), size, size, pneumonia=True).astype(np.float32) / 255
    return np.repeat(plane[..., None], 3, axis=2)


BENCH_MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), SIZE),
    "inception_v3": (lambda: torchvision.models.inception_v3(weights=None, init_weights=True), EXPLAIN_SIZE),
}


def bench_predictor(seed: int, name: str = "resnet18") -> TorchPredictor:
    """A torchvision model with seeded random weights (timings do not depend on the weights)."""
    build, size = BENCH_MODELS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return TorchPredictor(seeded_init(build, seed), device, size, IMAGENET_MEAN, IMAGENET_STD)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def quietly(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with stderr swallowed (lime's unconditional tqdm bar)."""
    def run() -> object:
        with contextlib.redirect_stderr(io.StringIO()):
            return fn()
    return run


def ours_perturbations(image: np.ndarray, segments: np.ndarray, samples: int, batch_size: int, seed: int,
                       device: torch.device) -> None:
    z = sample_perturbations(int(segments.max()) + 1, samples, np.random.default_rng(seed))
    for _, images in iter_perturbed_batches(image, segments, z, batch_size, device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        del images


def lime_perturbations(image: np.ndarray, segments: np.ndarray, samples: int, batch_size: int, seed: int) -> None:
    from lime.lime_image import LimeImageExplainer

    fudged = np.zeros_like(image)  # hide_color=0, as ours
    LimeImageExplainer(random_state=seed).data_labels(image, fudged, segments, lambda x: np.zeros((len(x), 2)),
                                                      samples, batch_size=batch_size)


def lime_explanation(image: np.ndarray, segments: np.ndarray, predictor: TorchPredictor, settings: BenchSettings):
    from lime.lime_image import LimeImageExplainer

    explainer = LimeImageExplainer(random_state=settings.seed)
    return explainer.explain_instance(image, predictor, top_labels=1, hide_color=0, num_samples=settings.samples,
                                      batch_size=settings.lime_batch_size, segmentation_fn=lambda _: segments,
                                      random_seed=settings.seed)


def compare(settings: BenchSettings) -> list[dict[str, object]]:
    """Median and minimum seconds of ours and lime (interleaved runs) for perturbation generation
    and the whole explanation."""
    image = bench_image(settings.image)
    segments = slic_segments(image, SegmentationSettings())
    predictor = bench_predictor(settings.seed)
    predictor(image[None])  # warm-up
    results: dict[str, list[float]] = {key: [] for key in ("ours_perturb", "lime_perturb", "ours_full", "lime_full")}
    n = settings.perturbation_samples
    for _ in range(settings.perturbation_repeats):
        results["ours_perturb"].append(timed(lambda: ours_perturbations(
            image, segments, n, settings.batch_size, settings.seed, predictor.device)))
        results["lime_perturb"].append(timed(quietly(lambda: lime_perturbations(
            image, segments, n, settings.lime_batch_size, settings.seed))))
    explanations = {}
    for _ in tqdm(range(settings.repeats), desc="repeats", disable=settings.repeats == 1):
        results["ours_full"].append(timed(lambda: explanations.__setitem__("ours", explain_image(
            image, predictor, segments, num_samples=settings.samples, sigma=settings.sigma, seed=settings.seed,
            batch_size=settings.batch_size, progress=True))))
        results["lime_full"].append(timed(quietly(lambda: explanations.__setitem__("lime", lime_explanation(
            image, segments, predictor, settings)))))
    medians = {key: statistics.median(values) for key, values in results.items()}
    minima = {key: min(values) for key, values in results.items()}
    ours, lime = explanations["ours"], explanations["lime"]
    lime_top = [feature for feature, weight in lime.local_exp[lime.top_labels[0]] if weight > 0][:5]
    logger.info("top-5 superpixels: ours %s (%s), lime %s (ridge on probability)", ours.top(5).tolist(),
                ours.kind, lime_top)
    k = int(segments.max()) + 1
    notes = {"ours_note": f"batch {settings.batch_size}", "lime_note": f"batch {settings.lime_batch_size}"}
    return [
        {"step": f"perturbed images ({n} samples, K={k}, {settings.perturbation_repeats} runs)",
         "ours": medians["ours_perturb"], "lime": medians["lime_perturb"],
         "ours_min": minima["ours_perturb"], "lime_min": minima["lime_perturb"], **notes},
        {"step": f"full explanation ({settings.samples} samples, {settings.repeats} runs)",
         "ours": medians["ours_full"], "lime": medians["lime_full"],
         "ours_min": minima["ours_full"], "lime_min": minima["lime_full"], **notes},
    ]


def sweep(batch_sizes: list[int], samples: int, seed: int, repeats: int, image_path: Path | None,
          model: str = "resnet18") -> list[dict]:
    """Milliseconds per model image of our explanation at each batch size, batch sizes interleaved
    within each repeat so that they share the background load; the mean is the expected cost
    under the mix of loads seen, the min the cost with the least interference."""
    image = bench_image(image_path, BENCH_MODELS[model][1])
    segments = slic_segments(image, SegmentationSettings())
    predictor = bench_predictor(seed, model)
    predictor(image[None])
    times: dict[int, list[float]] = {size: [] for size in batch_sizes}
    for _ in range(repeats):
        for size in batch_sizes:
            times[size].append(timed(lambda: explain_image(image, predictor, segments, num_samples=samples,
                                                           seed=seed, batch_size=size)))
    return [{"batch_size": size, "median ms/image": 1000 * statistics.median(values) / samples,
             "mean ms/image": 1000 * statistics.fmean(values) / samples, "min ms/image": 1000 * min(values) / samples}
            for size, values in times.items()]


def sigma_table(sigmas: list[float], superpixels: list[int], samples: int = 1000, seed: int = 0) -> list[dict]:
    """Per K and sigma: the weights' range over the perturbations (control image left out) and
    the effective sample size as a share of N."""
    rows = []
    for k in superpixels:
        z = sample_perturbations(k, samples, np.random.default_rng(seed))
        d = cosine_distance(z)
        for sigma in sigmas:
            w = kernel_weights(d, sigma)
            rows.append({"K": k, "sigma": sigma, "median d": float(np.median(d[1:])),
                         "w 2.5%": float(np.quantile(w[1:], 0.025)), "w 97.5%": float(np.quantile(w[1:], 0.975)),
                         "ESS/N": effective_sample_size(w) / samples})
    return rows


def format_table(rows: list[dict], floats: str = "{:.3g}") -> str:
    columns = list(rows[0])
    cells = [[floats.format(row[c]) if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def comparison_table(rows: list[dict]) -> str:
    return format_table([{"step": row["step"], "ours median (s)": row["ours"], "lime median (s)": row["lime"],
                          "speed-up": f"{row['lime'] / row['ours']:.1f}x", "ours min": row["ours_min"],
                          "lime min": row["lime_min"], "speed-up of min": f"{row['lime_min'] / row['ours_min']:.1f}x",
                          "ours": row["ours_note"], "lime": row["lime_note"]} for row in rows], "{:.2f}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m explainer.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000, help="samples of the full explanations")
    parser.add_argument("--perturbation-samples", type=int, default=None,
                        help="samples of the perturbation-only row (default: --samples)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the full explanations (median shown)")
    parser.add_argument("--perturbation-repeats", type=int, default=5, help="runs of the perturbation-only row")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="our model batch")
    parser.add_argument("--lime-batch-size", type=int, default=LIME_BATCH_SIZE, help="lime's batch (its default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image", type=Path, default=None, help="image (default: a chest X-ray from ../shared/data)")
    parser.add_argument("--sweep", type=int, nargs="+", default=None, metavar="B",
                        help="instead: time our explanation at these batch sizes")
    parser.add_argument("--sweep-samples", type=int, default=128)
    parser.add_argument("--sweep-model", choices=sorted(BENCH_MODELS), default="resnet18")
    parser.add_argument("--sigma-table", action="store_true", help="instead: weights and ESS for several sigmas")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    if args.sigma_table:
        print(format_table(sigma_table([0.1, 0.25, 0.25 * 2**0.5, 0.5, 1.0], [20, 80, 200])))
        return 0
    if args.sweep:
        print(f"our explanation of {args.sweep_model} on {device}, {args.sweep_samples} samples, {args.repeats} interleaved runs")
        print(format_table(sweep(args.sweep, args.sweep_samples, args.seed, args.repeats, args.image, args.sweep_model)))
        return 0
    settings = BenchSettings(samples=args.samples, perturbation_samples=args.perturbation_samples or args.samples,
                             repeats=args.repeats, perturbation_repeats=args.perturbation_repeats,
                             batch_size=args.batch_size, lime_batch_size=args.lime_batch_size,
                             seed=args.seed, image=args.image)
    rows = compare(settings)
    print(f"ours vs lime {importlib.metadata.version('lime')} on {device}, "
          f"SLIC superpixels of a {SIZE} x {SIZE} chest X-ray, hide colour 0, resnet18 (random weights)")
    print(comparison_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
