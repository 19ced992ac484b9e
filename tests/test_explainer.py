"""Tests of the from-scratch LIME (``explainer``): scripted probability functions whose answer is
known (one superpixel, two, a constant, three samples of one class in a thousand, a model's own
threshold), fidelity as weighted ROC AUC or R^2, the distance and kernel edge cases, seeding,
segment relabelling, what a user's predict_fn receives, the batched mask gather against a
per-sample loop, the torch adapter and inception transform, the figures' statements, the
segmentations, the brief synthetic training, and the LIME benchmark's pieces."""
from __future__ import annotations

import dataclasses

import ast
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from matplotlib.figure import Figure
from skimage.measure import label as connected_components
from sklearn.metrics import roc_auc_score
from torch import nn

from benchmarks import lime_comparison
from explainer import figures
from explainer.core import (ARGMAX, Explanation, PerturbedBatches, SurrogateSettings, ThresholdDecision,
                            cosine_distance, explain_image, iter_perturbed_arrays, iter_perturbed_batches,
                            kernel_weights, perturbed_arrays, pixel_overlap, relabel_segments, sample_perturbations)
from explainer.models import (IMAGENET_MEAN, IMAGENET_STD, BriefTraining, TorchPredictor, explanation_image,
                              inception_transform, seeded_init, train_briefly_on_synthetic)
from explainer.segmentation import SEGMENTATIONS, SegmentationSettings, clusters_to_superpixels, segment
from models.engine import bf16_native
from models.vgg16dwsep import VGG16DWSep
from tests.helpers import SMALL_224, real_files

SIDE, CELL = 32, 8
RELEVANT = (3, 7)


def grid_segments(side: int = SIDE, cell: int = CELL, offset: int = 0) -> np.ndarray:
    """side x side labels of (side / cell)^2 square cells, row-major, starting at ``offset``."""
    rows, cols = np.mgrid[0:side, 0:side] // cell
    return rows * (side // cell) + cols + offset


class BrightPairClassifier:
    """Class 1 iff the mean of superpixels 3 and 7 is bright (both must be on), else class 0."""

    def __init__(self, segments: np.ndarray, relevant: tuple[int, ...] = RELEVANT) -> None:
        self.region = np.isin(segments, relevant)
        self.calls: list[int] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(len(images))
        bright = images[:, self.region].mean(axis=(1, 2)) > 0.75
        return np.stack([~bright, bright], axis=1).astype(np.float64)


@pytest.fixture(scope="module")
def bright_image() -> np.ndarray:
    return np.full((SIDE, SIDE, 3), 0.9, dtype=np.float32)


def explain_bright(image: np.ndarray, segments: np.ndarray, **kw) -> Explanation:
    """Explain the classifier of the grid's superpixels 3 and 7 with ``segments`` (the grid, maybe relabelled)."""
    return explain_image(image, BrightPairClassifier(grid_segments()), segments, num_samples=400, seed=0, **kw)


# --- the known answer --------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["logistic", "tree"])
def test_classifier_of_two_superpixels_gets_exactly_them_on_top(bright_image: np.ndarray, family: str) -> None:
    explanation = explain_bright(bright_image, grid_segments(), surrogate=SurrogateSettings(family=family))
    assert explanation.label == 1
    assert not explanation.single_class
    assert set(explanation.ranked()[:2].tolist()) == set(RELEVANT)
    others = np.delete(explanation.coefficients, RELEVANT)
    assert explanation.coefficients[list(RELEVANT)].min() > 5 * np.abs(others).max()
    assert explanation.fidelity_metric == "weighted ROC AUC" and explanation.fidelity > 0.95
    assert explanation.target == "class" and explanation.fallback_reason is None and not explanation.insensitive


def test_l1_with_a_superpixel_budget_keeps_only_the_relevant_ones(bright_image: np.ndarray) -> None:
    explanation = explain_bright(bright_image, grid_segments(), surrogate=SurrogateSettings(max_superpixels=2))
    assert set(np.flatnonzero(explanation.coefficients).tolist()) == set(RELEVANT)
    assert explanation.kind == "logistic-l1"


def test_labels_starting_anywhere_give_the_same_explanation(bright_image: np.ndarray) -> None:
    base = explain_bright(bright_image, grid_segments())
    shifted = explain_bright(bright_image, grid_segments(offset=1) * 10 - 7)  # 3, 13, 23, ...
    np.testing.assert_array_equal(shifted.segments, grid_segments())
    np.testing.assert_array_equal(shifted.coefficients, base.coefficients)


def test_relabel_segments_keeps_order_and_rejects_bad_input() -> None:
    segments = np.array([[5, 5, 9], [-2, 9, 100]])
    np.testing.assert_array_equal(relabel_segments(segments), [[1, 1, 2], [0, 2, 3]])
    with pytest.raises(ValueError, match="integer"):
        relabel_segments(segments.astype(float))
    with pytest.raises(ValueError, match="H x W"):
        relabel_segments(segments[0])


def test_same_seed_same_explanation_other_seed_other_perturbations(bright_image: np.ndarray) -> None:
    first, again = explain_bright(bright_image, grid_segments()), explain_bright(bright_image, grid_segments())
    np.testing.assert_array_equal(first.perturbations, again.perturbations)
    np.testing.assert_array_equal(first.coefficients, again.coefficients)
    other = explain_image(bright_image, BrightPairClassifier(grid_segments()), grid_segments(), num_samples=400, seed=1)
    assert not np.array_equal(other.perturbations, first.perturbations)


def test_model_is_called_in_batches_of_the_given_size(bright_image: np.ndarray) -> None:
    classifier = BrightPairClassifier(grid_segments())
    explain_image(bright_image, classifier, grid_segments(), num_samples=150, batch_size=64)
    assert classifier.calls == [64, 64, 22]


# --- perturbations, distance, kernel -----------------------------------------------------------

def test_perturbations_are_bernoulli_half_with_the_control_first() -> None:
    z = sample_perturbations(80, 1000, np.random.default_rng(0))
    assert z.shape == (1000, 80) and z.dtype == np.uint8
    assert z[0].all()
    assert set(np.unique(z).tolist()) == {0, 1}
    assert abs(z[1:].mean() - 0.5) < 0.01
    with pytest.raises(ValueError):
        sample_perturbations(80, 1, np.random.default_rng(0))


def test_cosine_distance_edge_cases() -> None:
    z = np.array([np.ones(10), np.zeros(10), np.r_[np.ones(5), np.zeros(5)], np.eye(10)[0]])
    with np.errstate(all="raise"):
        d = cosine_distance(z)
    np.testing.assert_allclose(d, [0.0, 1.0, 1 - np.sqrt(0.5), 1 - np.sqrt(0.1)], atol=1e-12)
    assert d[0] == 0.0  # exactly: the control image has weight exactly 1


def test_kernel_weights_lie_in_0_1_and_need_a_positive_sigma() -> None:
    z = sample_perturbations(20, 500, np.random.default_rng(0))
    z[1] = 0
    with np.errstate(all="raise"):
        weights = kernel_weights(cosine_distance(z), 0.25)
    assert weights[0] == 1.0
    assert np.all(weights > 0) and np.all(weights <= 1)
    np.testing.assert_allclose(weights[1], np.exp(-1 / 0.25**2))
    assert kernel_weights(np.array([2.0]), 0.25)[0] > 0
    for sigma in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="sigma"):
            kernel_weights(np.array([0.5]), sigma)


# --- scripted probabilities: what an explanation may claim ----------------------------------------

def grid_image(side: int = SIDE) -> np.ndarray:
    return np.full((side, side, 3), 0.9, dtype=np.float32)


def superpixels_on(images: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """N x K: 1 where a superpixel of ``images`` is not blanked."""
    k = int(segments.max()) + 1
    sums = np.stack([images[:, segments == s].sum(axis=(1, 2)) for s in range(k)], axis=1)
    return (sums > 0).astype(np.int64)


def pneumonia_of(p1: np.ndarray) -> np.ndarray:
    """[P(NORMAL), P(PNEUMONIA)] rows."""
    return np.stack([1 - p1, p1], axis=1)


def one_superpixel(images: np.ndarray, which: int = 5, low: float = 0.2, high: float = 0.8) -> np.ndarray:
    """P(PNEUMONIA) is ``high`` when superpixel ``which`` is on, else ``low``: nothing else matters."""
    return pneumonia_of(np.where(superpixels_on(images, grid_segments())[:, which] == 1, high, low))


@pytest.mark.parametrize("family", ["logistic", "tree"])
def test_a_probability_of_one_superpixel_ranks_it_first(family: str) -> None:
    explanation = explain_image(grid_image(), one_superpixel, grid_segments(), num_samples=300,
                                surrogate=SurrogateSettings(family=family))
    assert explanation.label == 1 and explanation.fallback_reason is None and not explanation.insensitive
    np.testing.assert_array_equal(explanation.y, explanation.perturbations[:, 5])
    assert explanation.ranked()[0] == 5
    assert explanation.coefficients[5] > 10 * np.abs(np.delete(explanation.coefficients, 5)).max()
    assert explanation.fidelity_metric == "weighted ROC AUC" and explanation.fidelity == pytest.approx(1.0)


@pytest.mark.parametrize("family", ["logistic", "tree"])
def test_fidelity_is_the_weighted_roc_auc_of_the_classifier(bright_image: np.ndarray, family: str) -> None:
    explanation = explain_bright(bright_image, grid_segments(), surrogate=SurrogateSettings(family=family, C=0.01,
                                                                                          tree_depth=1))
    scores = explanation.model.predict_proba(explanation.perturbations)[:, 1]
    expected = roc_auc_score(explanation.y, scores, sample_weight=explanation.weights)
    assert explanation.fidelity == pytest.approx(expected)
    accuracy = explanation.model.score(explanation.perturbations, explanation.y, sample_weight=explanation.weights)
    assert explanation.fidelity != pytest.approx(accuracy)


def constant(images: np.ndarray) -> np.ndarray:
    return pneumonia_of(np.full(len(images), 0.7))


@pytest.mark.parametrize("spread, insensitive", [(0.0, True), (0.04, True), (0.06, False)])
def test_a_prediction_that_barely_moves_is_reported_insensitive(spread: float, insensitive: bool) -> None:
    explanation = explain_image(grid_image(), lambda images: one_superpixel(images, low=0.7 - spread, high=0.7),
                                grid_segments(), num_samples=100, surrogate=SurrogateSettings(min_minority=1))
    assert explanation.insensitive is insensitive
    assert explanation.probability_range == pytest.approx(spread)
    summary = explanation.summary()
    assert summary["insensitive"] is insensitive and summary["probability_range"] == pytest.approx(spread)
    if insensitive:
        assert "insensitive to the superpixels" in summary["insensitive_reason"]
        assert "max - min over the 100 perturbed images" in summary["insensitive_reason"]


def test_a_constant_prediction_is_insensitive_and_explained_by_its_probability(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="explainer.core"):
        explanation = explain_image(grid_image(), constant, grid_segments(), num_samples=100)
    assert explanation.single_class and explanation.y.all() and explanation.insensitive
    assert explanation.fallback_reason == "every one of the 100 perturbed images keeps class 1"
    assert explanation.kind == "ridge-probability" and explanation.target == "probability"
    assert explanation.fidelity is None and explanation.fidelity_metric == "weighted R2"  # nothing varies
    assert "explains P(class 1) instead" in caplog.text and "insensitive" in caplog.text


def rows_of(z: np.ndarray, rows: tuple[int, ...]) -> set[tuple[int, ...]]:
    return {tuple(z[row].tolist()) for row in rows}


def few_positives(z: np.ndarray, rows: tuple[int, ...], segments: np.ndarray):
    """P(PNEUMONIA) 0.9 on the perturbed images of ``z[rows]``, 0.1 on every other one."""
    positive = rows_of(z, rows)

    def predict(images: np.ndarray) -> np.ndarray:
        on = superpixels_on(images, segments)
        return pneumonia_of(np.array([0.9 if tuple(row.tolist()) in positive else 0.1 for row in on]))

    return predict


@pytest.mark.parametrize("samples, positives, fallback", [(1000, 3, True), (1000, 10, False), (2000, 15, True),
                                                          (2000, 20, False)])
@pytest.mark.parametrize("family", ["logistic", "tree"])
def test_too_few_samples_of_one_class_explain_the_probability(samples: int, positives: int, fallback: bool,
                                                              family: str) -> None:
    """The minority of y needs max(10, 1 % of N) samples: 3 or 15 are too few, 10 of 1000 and 20 of 2000 enough."""
    segments = grid_segments(cell=4)  # 64 superpixels: no two perturbations alike
    z = sample_perturbations(64, samples, np.random.default_rng(0))  # what explain_image draws with seed 0
    predict = few_positives(z, tuple(range(0, 10 * positives, 10)), segments)
    explanation = explain_image(grid_image(), predict, segments, num_samples=samples, seed=0,
                                surrogate=SurrogateSettings(family=family))
    assert explanation.label == 1 and int(explanation.y.sum()) == positives
    summary = explanation.summary()
    assert summary["minority_count"] == positives and summary["minority_needed"] == max(10, samples // 100)
    if fallback:
        assert explanation.fallback_reason == (f"only {positives} of the {samples} perturbed images keep class 1 "
                                               f"(fewer than {max(10, samples // 100)})")
        assert explanation.target == "probability" and explanation.fidelity_metric == "weighted R2"
        assert explanation.kind == {"logistic": "ridge-probability", "tree": "tree-regression-depth3"}[family]
        assert explanation.fidelity is not None  # the probability varies: R^2 is defined
    else:
        assert explanation.fallback_reason is None and summary["fallback_reason"] is None
        assert explanation.target == "class" and explanation.fidelity_metric == "weighted ROC AUC"


def test_a_label_the_model_never_gives_is_explained_by_its_probability() -> None:
    explanation = explain_image(grid_image(), constant, grid_segments(), num_samples=100, label=0,
                                surrogate=SurrogateSettings(family="tree"))
    assert explanation.single_class and not explanation.y.any()
    assert explanation.fallback_reason == "none of the 100 perturbed images is given class 0"
    assert explanation.kind == "tree-regression-depth3" and not explanation.coefficients.any()
    assert explanation.top(3).size == 0


# --- the model's decision rule ---------------------------------------------------------------------

def test_threshold_decision_is_the_models_rule() -> None:
    probabilities = np.array([[0.7, 0.3], [0.8, 0.2], [0.75, 0.25]])
    np.testing.assert_array_equal(ThresholdDecision(1, 0.25)(probabilities), [1, 0, 1])
    np.testing.assert_array_equal(ThresholdDecision(0, 0.75)(probabilities), [1, 0, 0])
    np.testing.assert_array_equal(ThresholdDecision()(probabilities), ARGMAX(probabilities))
    assert str(ThresholdDecision(1, 0.25)) == "class 1 when P(class 1) >= 0.25" and str(ARGMAX) == "argmax"
    for bad in ({"threshold": 1.5}, {"threshold": float("nan")}, {"positive_class": 2}):
        with pytest.raises(ValueError):
            ThresholdDecision(**bad)
    with pytest.raises(ValueError, match="two-class"):
        ThresholdDecision()(np.full((2, 3), 1 / 3))


def test_y_follows_the_decision_rule_not_the_argmax() -> None:
    """P(PNEUMONIA) is 0.4 with superpixel 5 on, 0.2 without: the argmax always says NORMAL, a
    threshold of 0.3 says PNEUMONIA exactly when superpixel 5 is on."""
    def predict(images: np.ndarray) -> np.ndarray:
        return one_superpixel(images, low=0.2, high=0.4)

    by_argmax = explain_image(grid_image(), predict, grid_segments(), num_samples=200)
    assert by_argmax.label == 0 and by_argmax.single_class and by_argmax.decision == "argmax"
    by_rule = explain_image(grid_image(), predict, grid_segments(), num_samples=200,
                            decision=ThresholdDecision(1, 0.3))
    assert by_rule.label == 1 and by_rule.decision == "class 1 when P(class 1) >= 0.3"
    np.testing.assert_array_equal(by_rule.y, by_rule.perturbations[:, 5])
    assert by_rule.kind == "logistic" and by_rule.ranked()[0] == 5
    assert by_rule.refit(SurrogateSettings(family="tree")).decision == by_rule.decision
    assert by_rule.summary()["decision"] == "class 1 when P(class 1) >= 0.3"


# --- what a predict_fn receives --------------------------------------------------------------------

def test_a_plain_predict_fn_gets_new_c_contiguous_arrays(bright_image: np.ndarray) -> None:
    """As under lime: each batch a fresh N x H x W x C array that owns its memory, kept intact after
    later batches (no view of a reused buffer)."""
    received: list[np.ndarray] = []

    def predict(images: np.ndarray) -> np.ndarray:
        received.append(images)
        return BrightPairClassifier(grid_segments())(images)

    explanation = explain_image(bright_image, predict, grid_segments(), num_samples=70, batch_size=32)
    assert [len(batch) for batch in received] == [32, 32, 6]
    for start, batch in zip((0, 32, 64), received):
        assert type(batch) is np.ndarray and batch.dtype == np.float32 and batch.shape[1:] == (SIDE, SIDE, 3)
        assert batch.flags.c_contiguous and batch.flags.owndata and batch.base is None
        for offset, image in enumerate(batch):
            np.testing.assert_array_equal(image, naive_perturbation(bright_image, grid_segments(),
                                                                    explanation.perturbations[start + offset]))
    assert not np.shares_memory(received[0], received[1])


def test_a_predict_fn_with_a_device_gets_tensors_there(bright_image: np.ndarray) -> None:
    classifier = BrightPairClassifier(grid_segments())
    kinds = []

    class OnTheCpu:
        device = torch.device("cpu")

        def __call__(self, images: torch.Tensor) -> np.ndarray:
            kinds.append(type(images))
            return classifier(images.numpy())

    explain_image(bright_image, OnTheCpu(), grid_segments(), num_samples=40, batch_size=32)
    assert kinds == [torch.Tensor, torch.Tensor]


# --- figures say what the explanation may claim ---------------------------------------------------

@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures the plotting functions would have saved."""
    figures_drawn: list[Figure] = []
    monkeypatch.setattr(figures, "save_figure", lambda figure, path: figures_drawn.append(figure) or Path(path))
    return figures_drawn


def suptitle(figure: Figure) -> str:
    return figure._suptitle.get_text()


def test_importance_figure_of_an_insensitive_prediction_ranks_nothing(drawn: list[Figure]) -> None:
    explanation = explain_image(grid_image(), constant, grid_segments(), num_samples=50)
    figures.plot_importance(explanation, 3, "my title", "x.png")
    text = suptitle(drawn[0])
    assert text.startswith("my title\n") and "INSENSITIVE: P(class 1) spans only 0" in text
    assert "PROBABILITY SURROGATE: every one of the 50 perturbed images keeps class 1" in text
    titles = [axes.get_title() for axes in drawn[0].axes]
    assert not any("top" in title for title in titles) and any("none is ranked" in title for title in titles)


def test_importance_figure_states_fidelity_and_the_surrogate(drawn: list[Figure]) -> None:
    explanation = explain_image(grid_image(), one_superpixel, grid_segments(), num_samples=100)
    figures.plot_importance(explanation, 3, "t", "x.png")
    text = suptitle(drawn[0])
    assert "logistic on the class, weighted ROC AUC 1.000" in text and "(decision: argmax)" in text
    assert "INSENSITIVE" not in text and "PROBABILITY SURROGATE" not in text
    assert any(axes.get_title().startswith("top 3 for: 5,") for axes in drawn[0].axes)


def test_grid_compares_the_same_family_across_segmentations(drawn: list[Figure]) -> None:
    slic_like = explain_image(grid_image(), one_superpixel, grid_segments(), num_samples=100,
                              surrogate=SurrogateSettings(family="tree"))
    coarse = grid_segments(cell=16)  # 4 superpixels; superpixel 5 of the grid lies in the first one
    colour_like = explain_image(grid_image(), one_superpixel, coarse, num_samples=100,
                                surrogate=SurrogateSettings(family="tree"))
    overlap = pixel_overlap(slic_like, colour_like, 1)
    assert overlap == pytest.approx(CELL * CELL / (16 * 16))  # the 8 x 8 cell inside its 16 x 16 one
    figures.plot_grid({("slic", "tree"): slic_like, ("colour", "tree"): colour_like}, 1, "t", "x.png")
    titles = [axes.get_title() for axes in drawn[0].axes]
    assert any(f"top-1 pixels shared with slic: {overlap:.2f}" in title for title in titles)
    insensitive = explain_image(grid_image(), constant, grid_segments(), num_samples=50)
    assert pixel_overlap(slic_like, insensitive, 1) is None and figures.top_k_overlap(insensitive, slic_like, 1) is None
    against_only = dataclasses.replace(slic_like, coefficients=-np.abs(slic_like.coefficients) - 0.1)
    assert against_only.top(1).size == 0  # no superpixel in favour: nothing to compare, not a perfect overlap
    assert pixel_overlap(against_only, against_only, 1) is None and pixel_overlap(slic_like, against_only, 1) is None
    assert figures.top_k_overlap(against_only, against_only, 1) is None
    figures.plot_grid({("slic", "tree"): against_only}, 1, "t", "y.png")
    assert any("none in favour; top 1 against" in axes.get_title() for axes in drawn[-1].axes)


# --- the explanation object --------------------------------------------------------------------

def test_image_and_mask_of_the_top_k(bright_image: np.ndarray) -> None:
    explanation = explain_bright(bright_image, grid_segments())
    image, mask = explanation.image_and_mask(2)
    np.testing.assert_array_equal(mask == 1, np.isin(grid_segments(), RELEVANT))
    assert not (mask == -1).any()
    hidden, _ = explanation.image_and_mask(2, hide_rest=True)
    assert hidden[mask == 0].max() == 0 and hidden[mask == 1].min() > 0
    coefficients = explanation.coefficients.copy()
    coefficients[0] = -100.0
    signed = Explanation(**{**explanation.__dict__, "coefficients": coefficients})
    _, mask = signed.image_and_mask(3, positive_only=False)
    assert set(np.unique(mask[grid_segments() == 0]).tolist()) == {-1}
    assert (mask == 1).sum() == 2 * CELL * CELL
    assert signed.against(1).tolist() == [0]


def test_refit_reuses_the_model_outputs(bright_image: np.ndarray) -> None:
    explanation = explain_bright(bright_image, grid_segments())
    tree = explanation.refit(SurrogateSettings(family="tree", tree_depth=2))
    np.testing.assert_array_equal(tree.y, explanation.y)
    assert tree.kind == "tree-depth2"
    wider = explanation.refit(SurrogateSettings(), sigma=1.0)
    assert wider.weights.min() > explanation.weights.min()


def test_summary_ranks_every_superpixel(bright_image: np.ndarray) -> None:
    summary = explain_bright(bright_image, grid_segments()).summary()
    ranked = summary["ranked"]
    assert sorted(row["superpixel"] for row in ranked) == list(range(16))
    assert [row["coefficient"] for row in ranked] == sorted((row["coefficient"] for row in ranked), reverse=True)
    assert all(row["pixels"] == CELL * CELL for row in ranked)


# --- the batched masks ---------------------------------------------------------------------------

def naive_perturbation(image: np.ndarray, segments: np.ndarray, z: np.ndarray) -> np.ndarray:
    """lime's way: copy the image, zero each switched-off superpixel in turn."""
    out = image.copy()
    for superpixel in np.flatnonzero(z == 0):
        out[segments == superpixel] = 0
    return out


@pytest.mark.parametrize("kernels", ["numpy", "torch", "new arrays"])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.float64])
def test_batched_gather_matches_a_per_sample_loop(dtype: type, kernels: str) -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((23, 31, 3)) * 200 + 1).astype(dtype)
    segments = relabel_segments(rng.integers(0, 9, size=(23, 31)))
    z = sample_perturbations(int(segments.max()) + 1, 21, rng)
    z[5] = 0
    if kernels == "new arrays":
        def build(rows: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(perturbed_arrays(image, segments.ravel(), rows.numpy()))
    else:
        build = PerturbedBatches(image, segments, batch_size=8, kernels=kernels)
    starts = []
    for start in range(0, len(z), 8):
        images = build(torch.as_tensor(z[start:start + 8]))  # one buffer: check before the next call
        starts.append(start)
        assert images.dtype == torch.as_tensor(image).dtype and images.shape[1:] == image.shape
        for offset, perturbed in enumerate(images.numpy()):
            np.testing.assert_array_equal(perturbed, naive_perturbation(image, segments, z[start + offset]))
    assert starts == [0, 8, 16] and images.shape[0] == 5


@pytest.mark.parametrize("fresh", [False, True])
def test_iterated_batches_cover_every_perturbation_once(fresh: bool) -> None:
    image = np.ones((6, 5, 3), np.float32)
    segments = np.arange(30).reshape(6, 5) % 4
    z = sample_perturbations(4, 10, np.random.default_rng(0))
    batches = (iter_perturbed_arrays(image, segments, z, batch_size=4) if fresh
               else ((start, images.numpy()) for start, images in iter_perturbed_batches(image, segments, z, 4)))
    seen = np.concatenate([images[:, :, :, 0].reshape(len(images), -1).copy() for _, images in batches])
    np.testing.assert_array_equal(seen, z[:, segments.ravel()])


def test_perturbed_batches_refuse_more_rows_than_the_buffer() -> None:
    build = PerturbedBatches(np.ones((4, 4, 3), np.float32), np.zeros((4, 4), np.int64), batch_size=2)
    with pytest.raises(ValueError, match="buffer"):
        build(torch.ones(3, 1))
    with pytest.raises(ValueError, match="CPU"):
        PerturbedBatches(np.ones((4, 4, 3), np.float32), np.zeros((4, 4), np.int64), 2, "meta", kernels="numpy")


# --- torch adapter and the inception transform ---------------------------------------------------

def tiny_net(classes: int = 5) -> nn.Module:
    return seeded_init(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                             nn.Linear(4, classes)), 0)


def test_torch_predictor_normalises_resizes_and_accepts_numpy_or_tensors() -> None:
    net = tiny_net()
    predictor = TorchPredictor(net, "cpu", 16, IMAGENET_MEAN, IMAGENET_STD, amp=False)
    images = np.random.default_rng(0).random((3, 16, 16, 3), dtype=np.float32)
    probs = predictor(images)
    assert probs.shape == (3, 5)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(probs, net(x).softmax(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predictor(torch.from_numpy(images)), probs, rtol=1e-6)
    larger = predictor(np.random.default_rng(1).random((2, 40, 40, 3), dtype=np.float32))
    assert larger.shape == (2, 5)
    assert predictor.model_input(np.zeros((2, 40, 40, 3), np.float32)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="N x H x W x 3"):
        predictor(np.zeros((2, 3, 16, 16), np.float32))
    auto = TorchPredictor(net, "cpu", 16, IMAGENET_MEAN, IMAGENET_STD)  # bf16 where this CPU has it
    assert auto.amp_dtype == (torch.bfloat16 if bf16_native(torch.device("cpu")) else None)
    np.testing.assert_allclose(auto(images), probs, atol=0.02)  # bf16 keeps 8 bits of mantissa


@pytest.mark.data
def test_inception_transform_equals_explanation_image_then_normalisation() -> None:
    path = real_files(SMALL_224 / "test" / "NORMAL", n=1)[0]
    expected = inception_transform()(Image.open(path).convert("RGB"))
    image = explanation_image(path, crop=True)
    assert image.shape == (299, 299, 3) and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1
    predictor = TorchPredictor(nn.Identity(), "cpu", 299, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(predictor.model_input(image[None])[0].numpy(), expected.numpy(), atol=1e-5)


def test_explanation_image_squashes_without_crop(tmp_path) -> None:
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, :100] = 255  # a white left third: cropping to the centre would drop it
    Image.fromarray(wide).save(tmp_path / "wide.png")
    squashed, cropped = explanation_image(tmp_path / "wide.png", crop=False), explanation_image(tmp_path / "wide.png")
    assert squashed[:, :90].min() > 0.99 and cropped[:, 5:90].max() < 0.01
    with pytest.raises(FileNotFoundError, match="missing.png"):
        explanation_image(tmp_path / "missing.png")


# --- segmentations -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xray() -> np.ndarray:
    return explanation_image(real_files(SMALL_224 / "test" / "PNEUMONIA", n=1)[0], crop=False)


@pytest.fixture(scope="module")
def all_segments(xray: np.ndarray) -> dict[str, np.ndarray]:
    return {method: segment(xray, method) for method in SEGMENTATIONS}


@pytest.mark.data
@pytest.mark.parametrize("method", sorted(SEGMENTATIONS))
def test_segmentations_give_connected_superpixels_0_to_k(all_segments: dict[str, np.ndarray], method: str) -> None:
    segments = all_segments[method]
    settings = SegmentationSettings()
    k = int(segments.max()) + 1
    assert segments.shape == (299, 299)
    assert np.array_equal(np.unique(segments), np.arange(k))
    assert 20 <= k <= settings.max_segments
    if method != "slic":
        pieces = connected_components(segments + 1, background=0, connectivity=1)
        assert pieces.max() == k, "a clustering superpixel is split into several pieces"
        assert np.bincount(segments.ravel()).min() >= settings.min_size


@pytest.mark.data
def test_clustering_segmentations_differ_and_are_seeded(xray: np.ndarray, all_segments: dict[str, np.ndarray]) -> None:
    assert not np.array_equal(all_segments["kmeans"], all_segments["birch"])
    np.testing.assert_array_equal(segment(xray, "birch"), all_segments["birch"])


def test_clusters_split_into_pieces_small_ones_merged_and_capped() -> None:
    clusters = np.zeros((20, 20), np.int64)
    clusters[:, 8:12] = 1  # cluster 0 becomes two pieces, left and right
    clusters[0, 0] = 1  # a one-pixel piece of cluster 1
    segments = clusters_to_superpixels(clusters, max_segments=10, min_size=2)
    assert segments.max() + 1 == 3
    assert segments[0, 0] == segments[1, 0]  # merged into its neighbour
    assert len({segments[5, 0], segments[5, 10], segments[5, 19]}) == 3
    assert clusters_to_superpixels(clusters, max_segments=2, min_size=0).max() + 1 == 2
    with pytest.raises(ValueError, match="unknown segmentation"):
        segment(np.zeros((8, 8, 3)), "watershed")


# --- the brief synthetic training ----------------------------------------------------------------

@pytest.mark.slow
def test_brief_synthetic_training_moves_the_weights() -> None:
    settings = BriefTraining(steps=1, batch_size=2, images_per_class=1, seed=0)
    model, stats = train_briefly_on_synthetic(settings)
    fresh = seeded_init(VGG16DWSep, settings.seed)
    assert isinstance(model, VGG16DWSep) and not model.training
    assert np.isfinite(stats["loss"]) and stats["images"] == 2
    changed = [name for name, p in model.state_dict().items() if not torch.equal(p, fresh.state_dict()[name])]
    assert any(name.startswith("classifier") for name in changed)


# --- the LIME benchmark (benchmarks/lime_comparison.py) ------------------------------------------

def test_the_library_never_imports_the_benchmarks() -> None:
    for path in (Path(__file__).resolve().parents[1] / "explainer").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name.split(".")[0] == "benchmarks" for name in names), path


def test_benchmark_user_predict_fn_is_the_predictors_model_on_numpy_batches() -> None:
    net = tiny_net()
    images = np.random.default_rng(0).random((3, 16, 16, 3), dtype=np.float32)
    expected = TorchPredictor(net, "cpu", 16, IMAGENET_MEAN, IMAGENET_STD, amp=False)(images)
    np.testing.assert_allclose(lime_comparison.user_predict_fn(net)(images), expected, rtol=1e-5, atol=1e-6)
    assert not hasattr(lime_comparison.user_predict_fn(net), "device")  # explain_image gives it numpy arrays


def test_benchmark_sigma_table_gives_the_numbers_of_default_sigma() -> None:
    rows = {(row["K"], row["sigma"]): row for row in lime_comparison.sigma_table([0.25], [80, 20])}
    assert rows[(80, 0.25)]["median d"] == pytest.approx(1 - np.sqrt(0.5), abs=0.02)
    assert rows[(80, 0.25)]["ESS/N"] == pytest.approx(0.89, abs=0.01)
    assert rows[(20, 0.25)]["ESS/N"] == pytest.approx(0.72, abs=0.01)
    assert rows[(80, 0.25)]["w 2.5%"] == pytest.approx(0.10, abs=0.01)
    assert rows[(80, 0.25)]["w 97.5%"] == pytest.approx(0.47, abs=0.01)
    with pytest.raises(ValueError, match="--predict-fn"):
        lime_comparison.BenchSettings(predict_fns=("keras",))
