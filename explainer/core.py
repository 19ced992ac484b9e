"""LIME for images, step by step: perturbations, perturbed images, labels, distances, kernel
weights, the weighted explanation model and the explanation object.

The split follows ``lime``'s (segmenter, sampler, kernel, local model, explanation) but not its
speed: the perturbed images of a whole batch come from one gather ``z[:, segments]``, and the
model sees large batches.

Notation of the brief: ``z`` (N x K, 0/1) the perturbations, the first all ones (the control
image); ``y`` (N) 1 where the model's decision on the perturbed image is the explained class (its
top class, or its own rule: ``ThresholdDecision``); ``d`` the cosine distance of each ``z`` to the
all-ones vector; ``pi = exp(-d^2 / sigma^2)`` the sample weights; ``D_p = (z, y)`` the training
set of the explanation model.

What an explanation may claim is checked before it is drawn:

- too few samples of one class in y (fewer than max(10, 1 %) of N, none at all included): no
  classifier is fitted over a handful of samples; the surrogate explains the probability of the
  explained class instead (weighted ridge, or a regression tree for the tree family), and says why;
- fidelity is the surrogate's weighted ROC AUC against y (classifiers) or weighted R^2 against the
  probability (probability surrogates), never accuracy (which a constant guess makes high when one
  class dominates);
- when the explained probability moves by less than 0.05 (max - min over the N perturbed images)
  the prediction is insensitive to the superpixels, and the explanation says so instead of ranking
  them.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import roc_auc_score
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor
from tqdm import tqdm

logger = logging.getLogger(__name__)

DEFAULT_SIGMA = 0.25
"""Kernel width of ``pi = exp(-d^2 / sigma^2)``.

``lime``'s image explainer uses kernel width 0.25 with its cosine distance (its kernel is
``sqrt(exp(-d^2 / w^2))``, i.e. sigma = 0.25 * sqrt(2) = 0.354 in our formula); we keep 0.25 in
ours, a little narrower.  With Bernoulli(1/2) perturbations the cosine distance to the all-ones
vector concentrates at ``1 - sqrt(1/2) = 0.29`` whatever the number K of superpixels, so a width
of the same size makes the weights vary (for K = 80 the middle 95% lie in 0.10-0.47, the control
image has 1) while the effective sample size stays near 90% of N (0.89 for K = 80, 0.72 for
K = 20).  Width 0.1 gives weights below 0.01 and an effective sample size under 1% of N (a few
samples decide the fit); width 1.0 gives every sample nearly the same weight (no longer local).
``python -m benchmarks.lime_comparison --sigma-table`` prints these numbers.
"""

DEFAULT_BATCH_SIZE = 32
"""Perturbed images per model call, measured with ``python -m benchmarks.lime_comparison --sweep``
(our explanation of resnet18 at 224, batch sizes interleaved) on the project's 2-core CPU, which is
shared: the best batch depends on the background load.  Idle (load ~1.8): 12.2, 14.1, 15.9 and
18.5 ms per image at batches of 10, 16, 32 and 64 (small batches stay in cache).  Under a
background training run (load ~3.5): 121, 84, 57 and 49 ms (fewer, larger calls lose less to
the competing threads).  32 is never more than 1.3x from the best of either regime (10 is 2.5x
off under load, 64 is 1.5x off idle).  On a GPU pass a larger batch (hundreds)."""

MIN_MINORITY = 10
MIN_MINORITY_FRACTION = 0.01
"""A classifier is fitted on y only when its smaller class holds at least
max(MIN_MINORITY, MIN_MINORITY_FRACTION * N) samples."""
MIN_PROBABILITY_RANGE = 0.05
"""Below this spread (max - min) of the explained probability over the perturbed images the
prediction is called insensitive to the superpixels."""

Family = Literal["logistic", "tree"]


# --- segments --------------------------------------------------------------------------------

def relabel_segments(segments: np.ndarray) -> np.ndarray:
    """``segments`` (H x W integers, any values) relabelled to 0..K-1 in increasing order of the
    original labels, as int64."""
    segments = np.asarray(segments)
    if segments.ndim != 2:
        raise ValueError(f"segments must be H x W, got shape {segments.shape}")
    if not np.issubdtype(segments.dtype, np.integer):
        raise ValueError(f"segments must hold integer labels, got dtype {segments.dtype}")
    _, inverse = np.unique(segments, return_inverse=True)
    return inverse.reshape(segments.shape).astype(np.int64)


# --- perturbations, distances, weights -------------------------------------------------------

def sample_perturbations(num_superpixels: int, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """N x K uint8 matrix of Bernoulli(1/2) entries whose first row is all ones (the control image)."""
    if num_superpixels < 1:
        raise ValueError(f"need at least one superpixel, got {num_superpixels}")
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (the control image and one perturbation), got {num_samples}")
    z = rng.integers(0, 2, size=(num_samples, num_superpixels), dtype=np.uint8)
    z[0] = 1
    return z


def cosine_distance(z: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Cosine distance ``1 - <z, r> / (|z| |r|)`` of every row of ``z`` to ``reference`` (default:
    the all-ones vector), in [0, 2].  A zero row (every superpixel off) has no direction: its
    distance is defined as 1, the distance of any vector orthogonal to the reference."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"perturbations must be N x K, got shape {z.shape}")
    reference = np.ones(z.shape[1]) if reference is None else np.asarray(reference, dtype=np.float64)
    if reference.shape != (z.shape[1],):
        raise ValueError(f"reference of shape {reference.shape} for perturbations with {z.shape[1]} columns")
    norms = np.sqrt(np.square(z).sum(axis=1) * (reference @ reference))  # exact for 0/1 rows: d(ones) == 0
    similarity = np.divide(z @ reference, norms, out=np.zeros(len(z)), where=norms > 0)
    return np.clip(1.0 - similarity, 0.0, 2.0)


def kernel_weights(distances: np.ndarray, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """``exp(-d^2 / sigma^2)``: 1 at distance 0, in (0, 1] for any finite distance."""
    if not np.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    return np.exp(-np.square(distances) / sigma**2)


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's ``(sum w)^2 / sum w^2``: how many equally weighted samples the weights are worth."""
    return float(weights.sum() ** 2 / np.square(weights).sum())


# --- perturbed images ------------------------------------------------------------------------

class PerturbedBatches:
    """Builds the perturbed images of a batch of perturbations into one reused buffer on a torch
    device: what a ``predict_fn`` with a ``device`` attribute (``explainer.models.TorchPredictor``)
    gets.  Any other ``predict_fn`` gets fresh arrays (``perturbed_arrays``).

    Switched-off superpixels are set to 0 in every channel.  Each call is one gather of the
    batch's masks (``z[:, segments]`` over the flattened segments) and one multiply, written
    into buffers allocated once: fresh batch-sized allocations cost more than the arithmetic
    (page faults).  The image is held channel-planar (C x H x W) so the mask broadcasts over
    whole planes; callers get an N x H x W x C *view* of the planar buffer, which the predictor's
    ``permute(0, 3, 1, 2)`` turns back into contiguous NCHW at no cost.  The buffer is
    overwritten by the next call: copy a batch to keep it.

    On the CPU the two steps run as numpy's single-threaded kernels on the buffers' memory:
    they are memory-bound, and on the project's shared 2-core CPU torch's two-thread kernels
    took 0.39 s per 1,000 images of 224 x 224 against numpy's 0.08 s when another process held
    a core (OpenMP waits for the descheduled thread), for little gain when idle.  Elsewhere
    (CUDA) torch's kernels run on the device.  ``kernels`` overrides the choice ("torch" works
    on any device, "numpy" on the CPU only).
    """

    def __init__(self, image: np.ndarray, segments: np.ndarray, batch_size: int,
                 device: torch.device | str = "cpu", kernels: Literal["numpy", "torch"] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = torch.device(device)
        self.planar = torch.as_tensor(np.ascontiguousarray(image), device=device).permute(2, 0, 1).contiguous()
        self.index = torch.as_tensor(segments, dtype=torch.int64, device=device).reshape(-1)
        channels, height, width = self.planar.shape
        self.masks = torch.empty(batch_size, height * width, dtype=self.planar.dtype, device=device)
        self.buffer = torch.empty(batch_size, channels, height, width, dtype=self.planar.dtype, device=device)
        kernels = kernels or ("numpy" if device.type == "cpu" else "torch")
        if kernels == "numpy" and device.type != "cpu":
            raise ValueError(f"numpy kernels need the CPU, not {device}")
        self._fill = {"numpy": self._fill_numpy, "torch": self._fill_torch}[kernels]

    def _fill_numpy(self, z: torch.Tensor, n: int) -> None:
        masks = self.masks.numpy()[:n]
        np.take(z.numpy(), self.index.numpy(), axis=1, out=masks, mode="clip")  # "clip": unbuffered
        np.multiply(self.planar.numpy(), masks.reshape(n, 1, *self.planar.shape[1:]), out=self.buffer.numpy()[:n])

    def _fill_torch(self, z: torch.Tensor, n: int) -> None:
        masks = torch.index_select(z, 1, self.index, out=self.masks[:n])
        torch.mul(self.planar, masks.view(n, 1, *self.planar.shape[1:]), out=self.buffer[:n])

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """B x H x W x C perturbed images for the rows of ``z`` (B <= batch_size, same device)."""
        n = len(z)
        if n > len(self.buffer):
            raise ValueError(f"{n} perturbations for a buffer of {len(self.buffer)}")
        self._fill(z.to(self.planar.dtype), n)
        return self.buffer[:n].permute(0, 2, 3, 1)


def iter_perturbed_batches(image: np.ndarray, segments: np.ndarray, z: np.ndarray, batch_size: int,
                           device: torch.device | str = "cpu") -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, images)`` for consecutive batches of ``z``: B x H x W x C tensors on
    ``device``, in one buffer overwritten at each step (``PerturbedBatches``)."""
    build = PerturbedBatches(image, segments, min(batch_size, len(z)), device)
    z_t = torch.as_tensor(z, device=device)
    for start in range(0, len(z), batch_size):
        yield start, build(z_t[start:start + batch_size])


def perturbed_arrays(image: np.ndarray, flat_segments: np.ndarray, z: np.ndarray) -> np.ndarray:
    """A new C-contiguous B x H x W x C array (owning its memory, the image's dtype) of the
    perturbed images of the rows of ``z``: what ``lime`` hands a ``predict_fn``, so that a user's
    ``torch.from_numpy(batch).permute(0, 3, 1, 2)`` sees the same channels-last memory as under
    ``lime`` (a strided view of a planar buffer made resnet18 on this CPU 1.24x slower).  One
    gather of the masks, one multiply into the new array; ``flat_segments`` is ``segments.ravel()``."""
    n = len(z)
    masks = np.take(np.asarray(z).astype(image.dtype, copy=False), flat_segments, axis=1)
    out = np.empty((n, *image.shape), dtype=image.dtype)
    np.multiply(image, masks.reshape(n, *image.shape[:2], 1), out=out)
    return out


def iter_perturbed_arrays(image: np.ndarray, segments: np.ndarray, z: np.ndarray,
                          batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, images)`` for consecutive batches of ``z``: a new array per batch
    (``perturbed_arrays``), which the caller may keep."""
    image = np.ascontiguousarray(image)
    flat_segments = np.ascontiguousarray(segments, dtype=np.intp).ravel()
    for start in range(0, len(z), batch_size):
        yield start, perturbed_arrays(image, flat_segments, z[start:start + batch_size])


# --- the model's decision ----------------------------------------------------------------------

class Decision(Protocol):
    """N x C probabilities -> the N classes the model decides."""

    def __call__(self, probabilities: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ArgmaxDecision:
    """The top class."""

    def __call__(self, probabilities: np.ndarray) -> np.ndarray:
        return probabilities.argmax(axis=1)

    def __str__(self) -> str:
        return "argmax"


@dataclass(frozen=True)
class ThresholdDecision:
    """A two-class model's rule: ``positive_class`` when its probability is at least ``threshold``,
    else the other class (threshold 0.5 is the argmax but for exact ties)."""

    positive_class: int = 1
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.positive_class not in (0, 1):
            raise ValueError(f"positive_class must be 0 or 1 (a two-class model), got {self.positive_class!r}")
        if not 0.0 <= self.threshold <= 1.0:  # NaN fails too
            raise ValueError(f"threshold must be a probability in [0, 1], got {self.threshold!r}")

    def __call__(self, probabilities: np.ndarray) -> np.ndarray:
        if probabilities.shape[1] != 2:
            raise ValueError(f"a threshold decision needs a two-class model, got {probabilities.shape[1]} classes")
        positive = probabilities[:, self.positive_class] >= self.threshold
        return np.where(positive, self.positive_class, 1 - self.positive_class)

    def __str__(self) -> str:
        return f"class {self.positive_class} when P(class {self.positive_class}) >= {self.threshold:g}"


ARGMAX = ArgmaxDecision()


# --- explanation models ----------------------------------------------------------------------

@dataclass(frozen=True)
class SurrogateSettings:
    """The explanation model g, its complexity term Omega(g), and when it may be fitted.

    ``logistic``: ``LogisticRegression`` fitted with ``sample_weight=pi``.  ``C`` is the inverse
    strength of the penalty: the fit minimises ``sum_i pi_i * logloss_i + Omega(beta) / C``, with
    ``Omega = |beta|^2 / 2`` (L2, the default: shrinks every coefficient, keeps all K) or
    ``Omega = |beta|_1`` (``l1=True``: sets coefficients to exactly 0, the smaller C the fewer
    superpixels).  Since the weights pi are below 1, the data term is smaller than with unit
    weights, so a given C penalises more than it would without the kernel.  ``max_superpixels``
    (implies L1) picks the largest C on a log grid whose fit keeps at most that many superpixels.

    ``tree``: a ``DecisionTreeClassifier`` of depth ``tree_depth`` fitted with the same weights;
    its "coefficients" are the impurity importances signed by the direction of each superpixel
    (weighted mean of y with it on minus with it off).

    When the smaller class of y holds fewer than max(``min_minority``, ``min_minority_fraction``
    * N) samples (none at all included), neither classifier is fitted: the logistic family
    becomes a weighted ``Ridge`` on the explained class's probability (``lime``'s own model), the
    tree family a ``DecisionTreeRegressor`` of the same depth on it.  ``min_probability_range``:
    below this spread of that probability the prediction is reported insensitive.
    """

    family: Family = "logistic"
    C: float = 1.0
    l1: bool = False
    max_superpixels: int | None = None
    tree_depth: int = 3
    min_minority: int = MIN_MINORITY
    min_minority_fraction: float = MIN_MINORITY_FRACTION
    min_probability_range: float = MIN_PROBABILITY_RANGE

    def __post_init__(self) -> None:
        if self.family not in ("logistic", "tree"):
            raise ValueError(f"family must be 'logistic' or 'tree', got {self.family!r}")
        if not self.C > 0:
            raise ValueError(f"C must be positive, got {self.C}")
        if self.max_superpixels is not None and self.max_superpixels < 1:
            raise ValueError(f"max_superpixels must be >= 1, got {self.max_superpixels}")
        if self.tree_depth < 1:
            raise ValueError(f"tree_depth must be >= 1, got {self.tree_depth}")
        if self.min_minority < 1 or not 0 <= self.min_minority_fraction < 0.5:
            raise ValueError(f"need min_minority >= 1 and 0 <= min_minority_fraction < 0.5, got "
                             f"{self.min_minority} and {self.min_minority_fraction}")
        if not 0 <= self.min_probability_range <= 1:
            raise ValueError(f"min_probability_range must lie in [0, 1], got {self.min_probability_range}")

    def minority_needed(self, num_samples: int) -> int:
        """The fewest samples the smaller class of y needs for a classifier to be fitted."""
        return max(self.min_minority, math.ceil(self.min_minority_fraction * num_samples))


WEIGHTED_AUC = "weighted ROC AUC"
WEIGHTED_R2 = "weighted R2"


@dataclass(frozen=True)
class SurrogateFit:
    model: Any
    coefficients: np.ndarray
    intercept: float | None
    fidelity: float | None
    """Weighted ROC AUC against y (classifiers) or weighted R^2 against the probability; None
    where undefined (a constant probability)."""
    fidelity_metric: str
    kind: str
    target: Literal["class", "probability"]
    C: float | None = None


L1_C_GRID = np.logspace(-3, 3, 49)


def _logistic(C: float, l1: bool, seed: int) -> LogisticRegression:
    if l1:
        return LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", max_iter=1000, random_state=seed)
    return LogisticRegression(C=C, max_iter=1000, random_state=seed)


def _largest_c_within(z: np.ndarray, y: np.ndarray, weights: np.ndarray, limit: int, seed: int) -> float:
    """The largest C of ``L1_C_GRID`` whose L1 fit keeps at most ``limit`` superpixels."""
    chosen = L1_C_GRID[0]
    for C in L1_C_GRID:
        model = _logistic(C, True, seed).fit(z, y, sample_weight=weights)
        if np.count_nonzero(model.coef_) > limit:
            break
        chosen = C
    return float(chosen)


def weighted_auc(model: Any, z: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    """ROC AUC of the classifier's P(y = 1) against y, each sample weighted by pi."""
    return float(roc_auc_score(y, model.predict_proba(z)[:, 1], sample_weight=weights))


def weighted_r2(model: Any, z: np.ndarray, probabilities: np.ndarray, weights: np.ndarray) -> float | None:
    """R^2 of the regression against the probability, weighted by pi; None for a constant
    probability (nothing to explain: scikit-learn would say 0 or 1 by rounding)."""
    if np.ptp(probabilities) == 0:
        return None
    return float(model.score(z, probabilities, sample_weight=weights))


def fit_logistic(z: np.ndarray, y: np.ndarray, weights: np.ndarray, settings: SurrogateSettings, seed: int) -> SurrogateFit:
    l1 = settings.l1 or settings.max_superpixels is not None
    C = settings.C
    if settings.max_superpixels is not None:
        C = _largest_c_within(z, y, weights, settings.max_superpixels, seed)
        logger.info("L1: C = %.3g keeps at most %d superpixels", C, settings.max_superpixels)
    model = _logistic(C, l1, seed).fit(z, y, sample_weight=weights)
    return SurrogateFit(model, model.coef_[0].astype(np.float64), float(model.intercept_[0]),
                        weighted_auc(model, z, y, weights), WEIGHTED_AUC, "logistic-l1" if l1 else "logistic",
                        "class", C)


def signed_directions(z: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per superpixel, the sign of (weighted mean of the target with it on) - (with it off); 0 when undefined."""
    on = z.astype(np.float64) * weights[:, None]
    off = (1.0 - z) * weights[:, None]
    on_sum, off_sum = on.sum(0), off.sum(0)
    mean_on = np.divide(on.T @ target, on_sum, out=np.zeros(z.shape[1]), where=on_sum > 0)
    mean_off = np.divide(off.T @ target, off_sum, out=np.zeros(z.shape[1]), where=off_sum > 0)
    return np.sign(mean_on - mean_off)


def fit_tree(z: np.ndarray, y: np.ndarray, weights: np.ndarray, settings: SurrogateSettings, seed: int) -> SurrogateFit:
    model = DecisionTreeClassifier(max_depth=settings.tree_depth, random_state=seed).fit(z, y, sample_weight=weights)
    coefficients = model.feature_importances_ * signed_directions(z, y.astype(np.float64), weights)
    return SurrogateFit(model, coefficients, None, weighted_auc(model, z, y, weights), WEIGHTED_AUC,
                        f"tree-depth{settings.tree_depth}", "class")


def fit_probability_ridge(z: np.ndarray, probabilities: np.ndarray, weights: np.ndarray,
                          settings: SurrogateSettings, seed: int) -> SurrogateFit:
    """``lime``'s model: a weighted Ridge (alpha 1) on the explained class's probability."""
    model = Ridge(alpha=1.0).fit(z, probabilities, sample_weight=weights)
    return SurrogateFit(model, model.coef_.astype(np.float64), float(model.intercept_),
                        weighted_r2(model, z, probabilities, weights), WEIGHTED_R2, "ridge-probability", "probability")


def fit_probability_tree(z: np.ndarray, probabilities: np.ndarray, weights: np.ndarray,
                         settings: SurrogateSettings, seed: int) -> SurrogateFit:
    """The tree family on the explained class's probability: a weighted regression tree, its
    importances signed by the direction of each superpixel on the probability."""
    model = DecisionTreeRegressor(max_depth=settings.tree_depth, random_state=seed)
    model.fit(z, probabilities, sample_weight=weights)
    coefficients = model.feature_importances_ * signed_directions(z, probabilities, weights)
    return SurrogateFit(model, coefficients, None, weighted_r2(model, z, probabilities, weights), WEIGHTED_R2,
                        f"tree-regression-depth{settings.tree_depth}", "probability")


SurrogateFitter = Callable[[np.ndarray, np.ndarray, np.ndarray, SurrogateSettings, int], SurrogateFit]
#: per family: the classifier on y, and the model of the probability when y is too unbalanced
SURROGATES: dict[str, tuple[SurrogateFitter, SurrogateFitter]] = {
    "logistic": (fit_logistic, fit_probability_ridge),
    "tree": (fit_tree, fit_probability_tree),
}


def minority_count(y: np.ndarray) -> int:
    """Samples of the smaller class of the 0/1 labels y (0 when y has one class)."""
    positives = int(np.count_nonzero(y))
    return min(positives, len(y) - positives)


def unbalanced_reason(y: np.ndarray, label: int, needed: int) -> str | None:
    """Why no classifier is fitted on y (its smaller class has fewer than ``needed`` samples), or None."""
    n, kept = len(y), int(np.count_nonzero(y))
    if kept == n:
        return f"every one of the {n} perturbed images keeps class {label}"
    if kept == 0:
        return f"none of the {n} perturbed images is given class {label}"
    minority = min(kept, n - kept)
    if minority >= needed:
        return None
    which = "keep" if kept < n - kept else "lose"
    return f"only {minority} of the {n} perturbed images {which} class {label} (fewer than {needed})"


def insensitivity_reason(probabilities: np.ndarray, label: int, min_range: float) -> str | None:
    """Why the prediction is insensitive to the superpixels (the explained probability spans less
    than ``min_range``, max - min over the perturbed images), or None."""
    spread = float(np.ptp(probabilities))
    if spread >= min_range:
        return None
    return (f"P(class {label}) spans only {spread:.3g} (max - min over the {len(probabilities)} perturbed "
            f"images, below {min_range:g}): the prediction is insensitive to the superpixels")


# --- the explanation -------------------------------------------------------------------------

@dataclass(frozen=True)
class Explanation:
    """One explained prediction: the training set D_p = (perturbations, y), its weights, the
    fitted explanation model and one coefficient per superpixel (positive: the superpixel
    supports the explained class), with what the fit may claim: its fidelity, why it explains
    the probability rather than y (``fallback_reason``), and whether the prediction moves at all
    (``insensitive_reason``)."""

    image: np.ndarray
    segments: np.ndarray
    label: int
    perturbations: np.ndarray
    y: np.ndarray
    probabilities: np.ndarray
    distances: np.ndarray
    weights: np.ndarray
    model: Any
    coefficients: np.ndarray
    intercept: float | None
    fidelity: float | None
    fidelity_metric: str
    kind: str
    target: str
    sigma: float
    seed: int
    decision: str = "argmax"
    minority_needed: int = MIN_MINORITY
    fallback_reason: str | None = None
    insensitive_reason: str | None = None
    C: float | None = None

    @property
    def num_superpixels(self) -> int:
        return len(self.coefficients)

    @property
    def control_probability(self) -> float:
        return float(self.probabilities[0])

    @property
    def single_class(self) -> bool:
        return minority_count(self.y) == 0

    @property
    def insensitive(self) -> bool:
        return self.insensitive_reason is not None

    @property
    def probability_range(self) -> float:
        return float(np.ptp(self.probabilities))

    def ranked(self) -> np.ndarray:
        """Superpixel indices by decreasing coefficient (ties by index)."""
        return np.argsort(-self.coefficients, kind="stable")

    def top(self, k: int, positive_only: bool = True) -> np.ndarray:
        """The k superpixels with the largest coefficients (only positive ones when
        ``positive_only``), else the k largest in absolute value."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if positive_only:
            order = self.ranked()
            return order[self.coefficients[order] > 0][:k]
        order = np.argsort(-np.abs(self.coefficients), kind="stable")
        return order[self.coefficients[order] != 0][:k]

    def against(self, k: int) -> np.ndarray:
        """The k superpixels with the most negative coefficients."""
        order = np.argsort(self.coefficients, kind="stable")
        return order[self.coefficients[order] < 0][:k]

    def image_and_mask(self, k: int, positive_only: bool = True, hide_rest: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The image and an H x W int mask of the top k superpixels: 1 where a chosen superpixel
        supports the class, -1 where it argues against it (only with ``positive_only=False``),
        0 elsewhere.  ``hide_rest`` sets every pixel outside the chosen superpixels to 0."""
        chosen = self.top(k, positive_only)
        signs = np.zeros(self.num_superpixels, dtype=np.int64)
        signs[chosen] = np.sign(self.coefficients[chosen]).astype(np.int64)
        mask = signs[self.segments]
        image = self.image.copy()
        if hide_rest:
            image[mask == 0] = 0
        return image, mask

    def ranking_table(self) -> list[dict[str, Any]]:
        """Every superpixel by decreasing coefficient, with its size in pixels."""
        sizes = np.bincount(self.segments.ravel(), minlength=self.num_superpixels)
        return [{"rank": rank, "superpixel": int(index), "coefficient": float(self.coefficients[index]),
                 "pixels": int(sizes[index])} for rank, index in enumerate(self.ranked(), start=1)]

    def refit(self, surrogate: SurrogateSettings, sigma: float | None = None) -> Explanation:
        """Another explanation model (or kernel width) on the same perturbations and model outputs."""
        return fit_surrogate(self.image, self.segments, self.perturbations, self.y, self.probabilities, self.label,
                             sigma=self.sigma if sigma is None else sigma, seed=self.seed, surrogate=surrogate,
                             decision=self.decision)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (no arrays but the ranking)."""
        return {"label": self.label, "decision": self.decision, "control_probability": self.control_probability,
                "kind": self.kind, "target": self.target, "fidelity": self.fidelity,
                "fidelity_metric": self.fidelity_metric, "num_samples": len(self.y),
                "num_superpixels": self.num_superpixels, "sigma": self.sigma, "seed": self.seed,
                "intercept": self.intercept, "C": self.C, "kept_class_fraction": float(self.y.mean()),
                "minority_count": minority_count(self.y), "minority_needed": self.minority_needed,
                "single_class": self.single_class, "fallback_reason": self.fallback_reason,
                "probability_range": self.probability_range, "insensitive": self.insensitive,
                "insensitive_reason": self.insensitive_reason,
                "effective_sample_size": effective_sample_size(self.weights),
                "ranked": self.ranking_table()}


def pixel_overlap(first: Explanation, second: Explanation, k: int) -> float | None:
    """Jaccard index of the pixels covered by the two explanations' top-k superpixels in favour
    (comparable across segmentations of the same image); None when either prediction is
    insensitive or either explanation has no superpixel in favour (nothing to compare)."""
    if first.insensitive or second.insensitive:
        return None
    a, b = first.image_and_mask(k)[1] == 1, second.image_and_mask(k)[1] == 1
    if not a.any() or not b.any():
        return None
    return float(np.count_nonzero(a & b) / np.count_nonzero(a | b))


@dataclass(frozen=True)
class Neighbourhood:
    """What the model said on the perturbed images: its decided class for each and the
    probability of the explained class (``label``)."""

    z: np.ndarray
    classes: np.ndarray
    probabilities: np.ndarray
    label: int
    decision: str


def _check_inputs(image: np.ndarray, segments: np.ndarray) -> None:
    if image.ndim != 3:
        raise ValueError(f"image must be H x W x C, got shape {image.shape}")
    if segments.shape != image.shape[:2]:
        raise ValueError(f"segments of shape {segments.shape} do not match the image's {image.shape[:2]}")


def query_model(image: np.ndarray, segments: np.ndarray, z: np.ndarray, predict_fn: Callable[[Any], Any], *,
                batch_size: int = DEFAULT_BATCH_SIZE, label: int | None = None, decision: Decision = ARGMAX,
                progress: bool = False) -> Neighbourhood:
    """Run ``predict_fn`` on the perturbed images of ``z`` in batches and apply ``decision`` to
    its probabilities.

    A ``predict_fn`` with a ``device`` attribute (``TorchPredictor``) gets torch tensors built on
    that device in a reused buffer; any other gets a new C-contiguous numpy array per batch.
    ``label`` defaults to the decided class of the first row of ``z`` (all ones: the control image).
    """
    device = getattr(predict_fn, "device", None)
    if device is None:
        batches: Iterator[tuple[int, Any]] = iter_perturbed_arrays(image, segments, z, batch_size)
    else:
        batches = iter_perturbed_batches(image, segments, z, batch_size, device)
    classes = np.empty(len(z), dtype=np.int64)
    probabilities = np.empty(len(z), dtype=np.float64)
    total = -(-len(z) // batch_size)
    for start, images in tqdm(batches, total=total, desc="model batches", unit="batch", disable=not progress):
        probs = np.asarray(predict_fn(images), dtype=np.float64)
        if probs.ndim != 2 or len(probs) != len(images):
            raise ValueError(f"predict_fn returned shape {probs.shape} for a batch of {len(images)} images; expected N x C")
        decided = np.asarray(decision(probs))
        if label is None:
            label = int(decided[0])
        if not 0 <= label < probs.shape[1]:
            raise ValueError(f"label {label} outside the model's {probs.shape[1]} classes")
        classes[start:start + len(probs)] = decided
        probabilities[start:start + len(probs)] = probs[:, label]
    return Neighbourhood(z, classes, probabilities, int(label), str(decision))


def fit_explanation(image: np.ndarray, segments: np.ndarray, neighbourhood: Neighbourhood, *,
                    sigma: float = DEFAULT_SIGMA, seed: int = 0,
                    surrogate: SurrogateSettings = SurrogateSettings()) -> Explanation:
    """Labels y (1 where the decided class is the explained one), then ``fit_surrogate``."""
    y = (neighbourhood.classes == neighbourhood.label).astype(np.int64)
    return fit_surrogate(image, segments, neighbourhood.z, y, neighbourhood.probabilities, neighbourhood.label,
                         sigma=sigma, seed=seed, surrogate=surrogate, decision=neighbourhood.decision)


def fit_surrogate(image: np.ndarray, segments: np.ndarray, z: np.ndarray, y: np.ndarray, probabilities: np.ndarray,
                  label: int, *, sigma: float = DEFAULT_SIGMA, seed: int = 0,
                  surrogate: SurrogateSettings = SurrogateSettings(), decision: str = "argmax") -> Explanation:
    """Distances, kernel weights and the explanation model: the family's classifier on D_p = (z, y)
    when both classes of y have enough samples, else its model of the explained probability."""
    distances = cosine_distance(z)
    weights = kernel_weights(distances, sigma)
    needed = surrogate.minority_needed(len(y))
    fallback_reason = unbalanced_reason(y, label, needed)
    on_classes, on_probability = SURROGATES[surrogate.family]
    if fallback_reason is None:
        fit = on_classes(z, y, weights, surrogate, seed)
    else:
        fit = on_probability(z, probabilities, weights, surrogate, seed)
        logger.warning("%s: a classifier on y needs at least %d samples of each class; %s explains "
                       "P(class %d) instead (fidelity: %s)", fallback_reason, needed, fit.kind, label,
                       fit.fidelity_metric)
    insensitive_reason = insensitivity_reason(probabilities, label, surrogate.min_probability_range)
    if insensitive_reason is not None:
        logger.warning("%s", insensitive_reason)
    return Explanation(image=image, segments=segments, label=label, perturbations=z, y=y,
                       probabilities=probabilities, distances=distances, weights=weights,
                       model=fit.model, coefficients=fit.coefficients, intercept=fit.intercept,
                       fidelity=fit.fidelity, fidelity_metric=fit.fidelity_metric, kind=fit.kind,
                       target=fit.target, sigma=float(sigma), seed=seed, decision=decision,
                       minority_needed=needed, fallback_reason=fallback_reason,
                       insensitive_reason=insensitive_reason, C=fit.C)


def explain_image(image: np.ndarray, predict_fn: Callable[[Any], Any], segments: np.ndarray, *,
                  num_samples: int = 1000, sigma: float = DEFAULT_SIGMA, seed: int = 0,
                  batch_size: int = DEFAULT_BATCH_SIZE, label: int | None = None, decision: Decision = ARGMAX,
                  surrogate: SurrogateSettings = SurrogateSettings(), progress: bool = False) -> Explanation:
    """Explain ``predict_fn``'s prediction of ``label`` (default: the class ``decision`` gives the
    image) on ``image``.

    ``image`` is H x W x C (its values and dtype reach ``predict_fn`` unchanged, switched-off
    superpixels as 0); ``predict_fn`` maps an N x H x W x C batch to N x C' probabilities: a new
    C-contiguous numpy array per call (as ``lime`` gives), or torch tensors on
    ``predict_fn.device`` in a reused buffer when it has that attribute, as ``TorchPredictor``
    does.  ``decision`` turns probabilities into the model's classes (``ARGMAX``, or
    ``ThresholdDecision`` for a model with its own threshold): y is 1 where it gives ``label``.
    ``segments`` holds H x W integer labels, relabelled to 0..K-1.  The first of the
    ``num_samples`` perturbations is the image itself.  The same seed gives the same explanation.
    """
    image = np.asarray(image)
    segments = relabel_segments(segments)
    _check_inputs(image, segments)
    rng = np.random.default_rng(seed)
    z = sample_perturbations(int(segments.max()) + 1, num_samples, rng)
    neighbourhood = query_model(image, segments, z, predict_fn, batch_size=batch_size, label=label,
                                decision=decision, progress=progress)
    return fit_explanation(image, segments, neighbourhood, sigma=sigma, seed=seed, surrogate=surrogate)
