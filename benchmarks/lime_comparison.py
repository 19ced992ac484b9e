"""Benchmark: our LIME against the ``lime`` package's ``LimeImageExplainer``, measured side by
side in one run on the same image, segmentation, number of samples and ``predict_fn`` (a
torchvision resnet18 with seeded random weights and ImageNet normalisation, on the CPU).

    python -m benchmarks.lime_comparison [--samples 1000] [--repeats 3] [--predict-fn user torch]
    python -m benchmarks.lime_comparison --sweep 8 16 32 64 --sweep-samples 128    # choose the batch size
    python -m benchmarks.lime_comparison --sigma-table                             # kernel widths, no model

``--predict-fn user`` (the default) is what a user writes for ``lime``: a plain function of an
N x H x W x 3 numpy batch, ``torch.from_numpy(batch).permute(0, 3, 1, 2)``, normalised, fp32;
``torch`` is the project's ``explainer.models.TorchPredictor`` (its own buffer on the device,
channels-last, bf16 where native).  Rows: perturbation-image generation alone (ours: one gather
per batch, into new arrays for a user function and into the reused buffer for the predictor; lime:
its per-sample copy-and-loop, run through ``data_labels`` with a classifier that does nothing)
and the whole explanation (model calls included; lime at its default 10 images per call, ours at
``explainer.core.DEFAULT_BATCH_SIZE``).  Each repeat runs ours then lime, so both see the same
background load; the table shows the median and the minimum.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from tqdm import tqdm

from explainer.core import (DEFAULT_BATCH_SIZE, DEFAULT_SIGMA, cosine_distance, effective_sample_size, explain_image,
                            iter_perturbed_arrays, iter_perturbed_batches, kernel_weights, sample_perturbations)
from explainer.models import (EXPLAIN_SIZE, IMAGENET_MEAN, IMAGENET_STD, TorchPredictor, explanation_image,
                              seeded_init)
from explainer.segmentation import SegmentationSettings, slic_segments
from pipelines.cli import SHARED_DATA, run_cli, script_parser
from pipelines.synthetic import chest_xray
from pipelines.tables import markdown_table

logger = logging.getLogger(__name__)

SIZE = 224
DEFAULT_IMAGE = SHARED_DATA / "chest_xray_224" / "test" / "PNEUMONIA"
LIME_BATCH_SIZE = 10
PREDICT_FNS = ("user", "torch")


@dataclass(frozen=True)
class BenchSettings:
    samples: int = 1000
    perturbation_samples: int = 1000
    repeats: int = 1
    perturbation_repeats: int = 5
    batch_size: int = DEFAULT_BATCH_SIZE
    lime_batch_size: int = LIME_BATCH_SIZE
    predict_fns: tuple[str, ...] = ("user",)
    seed: int = 0
    sigma: float = DEFAULT_SIGMA
    image: Path | None = None

    def __post_init__(self) -> None:
        for name in ("samples", "perturbation_samples", "repeats", "perturbation_repeats", "batch_size",
                     "lime_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        unknown = set(self.predict_fns) - set(PREDICT_FNS)
        if unknown or not self.predict_fns:
            raise ValueError(f"--predict-fn takes {PREDICT_FNS}, got {self.predict_fns}")


def bench_image(path: Path | None, size: int = SIZE) -> np.ndarray:
    """A size x size x 3 float32 chest X-ray in [0, 1]: ``path``, else the first real one in
    ../shared/data, else a synthetic one."""
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


def bench_network(seed: int, name: str = "resnet18") -> tuple[nn.Module, int]:
    """A torchvision model with seeded random weights (timings do not depend on the weights) and its input side."""
    build, size = BENCH_MODELS[name]
    return seeded_init(build, seed).eval(), size


def bench_predictor(seed: int, name: str = "resnet18") -> TorchPredictor:
    """The project's predictor of ``bench_network`` (CUDA when present)."""
    network, size = bench_network(seed, name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return TorchPredictor(network, device, size, IMAGENET_MEAN, IMAGENET_STD)


def user_predict_fn(network: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """What a user hands ``lime``: N x H x W x 3 numpy images in [0, 1] -> N x C softmax
    probabilities, the network in fp32 on the CPU, no knowledge of who calls it."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(batch).permute(0, 3, 1, 2)
            return network((x - mean) / std).softmax(dim=1).numpy()

    return predict


def predict_fn_of(kind: str, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    return user_predict_fn(bench_network(seed)[0]) if kind == "user" else bench_predictor(seed)


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
                       device: torch.device | None) -> None:
    """Every perturbed image as ``explain_image`` builds it: new arrays for a plain function
    (``device`` None), the reused buffer on ``device`` for the project's predictor."""
    z = sample_perturbations(int(segments.max()) + 1, samples, np.random.default_rng(seed))
    batches: Iterator = (iter_perturbed_arrays(image, segments, z, batch_size) if device is None
                         else iter_perturbed_batches(image, segments, z, batch_size, device))
    for _, images in batches:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        del images


def lime_perturbations(image: np.ndarray, segments: np.ndarray, samples: int, batch_size: int, seed: int) -> None:
    from lime.lime_image import LimeImageExplainer

    fudged = np.zeros_like(image)  # hide_color=0, as ours
    LimeImageExplainer(random_state=seed).data_labels(image, fudged, segments, lambda x: np.zeros((len(x), 2)),
                                                      samples, batch_size=batch_size)


def lime_explanation(image: np.ndarray, segments: np.ndarray, predict_fn: Callable, settings: BenchSettings):
    from lime.lime_image import LimeImageExplainer

    explainer = LimeImageExplainer(random_state=settings.seed)
    return explainer.explain_instance(image, predict_fn, top_labels=1, hide_color=0, num_samples=settings.samples,
                                      batch_size=settings.lime_batch_size, segmentation_fn=lambda _: segments,
                                      random_seed=settings.seed)


def _row(step: str, ours: list[float], lime: list[float], settings: BenchSettings) -> dict[str, object]:
    return {"step": step, "ours": statistics.median(ours), "lime": statistics.median(lime), "ours_min": min(ours),
            "lime_min": min(lime), "ours_note": f"batch {settings.batch_size}",
            "lime_note": f"batch {settings.lime_batch_size}"}


def compare(settings: BenchSettings) -> list[dict[str, object]]:
    """Median and minimum seconds of ours and lime (interleaved runs) for perturbation generation
    and the whole explanation, per kind of ``predict_fn``."""
    image = bench_image(settings.image)
    segments = slic_segments(image, SegmentationSettings())
    predict_fns = {kind: predict_fn_of(kind, settings.seed) for kind in settings.predict_fns}
    for predict_fn in predict_fns.values():
        predict_fn(image[None].copy())  # warm-up
    n, k = settings.perturbation_samples, int(segments.max()) + 1
    rows = []
    for kind, predict_fn in predict_fns.items():
        ours, lime = [], []
        device = getattr(predict_fn, "device", None)
        for _ in range(settings.perturbation_repeats):
            ours.append(timed(lambda: ours_perturbations(image, segments, n, settings.batch_size, settings.seed,
                                                         device)))
            lime.append(timed(quietly(lambda: lime_perturbations(image, segments, n, settings.lime_batch_size,
                                                                 settings.seed))))
        into = "new arrays" if device is None else f"reused buffer on {device}"
        rows.append(_row(f"perturbed images ({n} samples, K={k}, {settings.perturbation_repeats} runs; ours into "
                         f"{into})", ours, lime, settings))
    times: dict[str, tuple[list[float], list[float]]] = {kind: ([], []) for kind in predict_fns}
    for _ in tqdm(range(settings.repeats), desc="repeats", disable=settings.repeats == 1):
        for kind, predict_fn in predict_fns.items():
            ours, lime = times[kind]
            ours.append(timed(lambda: explain_image(image, predict_fn, segments, num_samples=settings.samples,
                                                    sigma=settings.sigma, seed=settings.seed,
                                                    batch_size=settings.batch_size, progress=True)))
            lime.append(timed(quietly(lambda: lime_explanation(image, segments, predict_fn, settings))))
    for kind, (ours, lime) in times.items():
        rows.append(_row(f"full explanation, {kind} predict_fn ({settings.samples} samples, {settings.repeats} runs)",
                         ours, lime, settings))
    return rows


def sweep(batch_sizes: list[int], samples: int, seed: int, repeats: int, image_path: Path | None,
          model: str = "resnet18") -> list[dict]:
    """Milliseconds per model image of our explanation (the project's predictor) at each batch
    size, batch sizes interleaved within each repeat so that they share the background load; the
    mean is the expected cost under the mix of loads seen, the min the cost with the least interference."""
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


def comparison_table(rows: list[dict]) -> str:
    return markdown_table([{"step": row["step"], "ours median (s)": row["ours"], "lime median (s)": row["lime"],
                            "speed-up": f"{row['lime'] / row['ours']:.2f}x", "ours min": row["ours_min"],
                            "lime min": row["lime_min"],
                            "speed-up of min": f"{row['lime_min'] / row['ours_min']:.2f}x",
                            "ours": row["ours_note"], "lime": row["lime_note"]} for row in rows], digits=2)


def get_args_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__, prog="python -m benchmarks.lime_comparison")
    parser.add_argument("--samples", type=int, default=1000, help="samples of the full explanations")
    parser.add_argument("--perturbation-samples", type=int, default=None,
                        help="samples of the perturbation-only rows (default: --samples)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the full explanations (median shown)")
    parser.add_argument("--perturbation-repeats", type=int, default=5, help="runs of the perturbation-only rows")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="our images per model call")
    parser.add_argument("--lime-batch-size", type=int, default=LIME_BATCH_SIZE,
                        help="lime's images per model call (its default 10)")
    parser.add_argument("--predict-fn", nargs="+", choices=PREDICT_FNS, default=["user"],
                        help="user: a plain function of numpy batches, as written for lime; torch: the project's "
                             "TorchPredictor; both explainers get the same one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and the perturbations")
    parser.add_argument("--image", type=Path, default=None,
                        help="image to explain (default: the first PNEUMONIA test image of ../shared/data, "
                             "else a synthetic one)")
    parser.add_argument("--sweep", type=int, nargs="+", default=None, metavar="B",
                        help="instead: time our explanation at these batch sizes")
    parser.add_argument("--sweep-samples", type=int, default=128, help="samples per explanation of --sweep")
    parser.add_argument("--sweep-model", choices=sorted(BENCH_MODELS), default="resnet18",
                        help="network of --sweep (random weights)")
    parser.add_argument("--sigma-table", action="store_true",
                        help="instead: the kernel weights' spread and effective sample size for several sigmas")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    if args.sigma_table:
        print(markdown_table(sigma_table([0.1, 0.25, 0.25 * 2**0.5, 0.5, 1.0], [20, 80, 200])))
        return 0
    if args.sweep:
        print(f"our explanation of {args.sweep_model} on {device}, {args.sweep_samples} samples, {args.repeats} interleaved runs")
        print(markdown_table(sweep(args.sweep, args.sweep_samples, args.seed, args.repeats, args.image,
                                   args.sweep_model), digits=1))
        return 0
    settings = BenchSettings(samples=args.samples, perturbation_samples=args.perturbation_samples or args.samples,
                             repeats=args.repeats, perturbation_repeats=args.perturbation_repeats,
                             batch_size=args.batch_size, lime_batch_size=args.lime_batch_size,
                             predict_fns=tuple(dict.fromkeys(args.predict_fn)), seed=args.seed, image=args.image)
    rows = compare(settings)
    print(f"ours vs lime {importlib.metadata.version('lime')} on {device}, SLIC superpixels of a {SIZE} x {SIZE} "
          f"chest X-ray, hide colour 0, resnet18 (random weights)")
    print(comparison_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
