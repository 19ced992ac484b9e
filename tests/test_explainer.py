"""Tests of the from-scratch LIME (``explainer``): a classifier that depends only on known
superpixels gets exactly those on top, the distance and kernel edge cases, single-class y,
seeding, segment relabelling, the batched mask gather against a per-sample loop, the torch
adapter and inception transform, the segmentations and the brief synthetic training."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.measure import label as connected_components
from torch import nn

from explainer.core import (Explanation, PerturbedBatches, SurrogateSettings, cosine_distance, explain_image,
                            iter_perturbed_batches, kernel_weights, relabel_segments, sample_perturbations)
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
    assert explanation.score > 0.95


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


# --- single-class y ----------------------------------------------------------------------------

def constant_classifier(images: np.ndarray) -> np.ndarray:
    """Always class 0; the class-0 probability rises with the image's mean brightness."""
    p = 0.6 + 0.3 * images.mean(axis=(1, 2, 3))
    return np.stack([p, 1 - p], axis=1)


def test_single_class_falls_back_to_the_probability_with_a_warning(bright_image: np.ndarray,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="explainer.core"):
        explanation = explain_image(bright_image, constant_classifier, grid_segments(), num_samples=100)
    assert explanation.single_class and explanation.y.all()
    assert "every one of the 100 perturbed images keeps class 0" in explanation.reason
    assert "single class" in caplog.text
    assert explanation.kind == "ridge-probability"
    assert np.all(explanation.coefficients > 0)  # every superpixel adds brightness


def test_single_class_zeros_policy_and_a_label_never_on_top(bright_image: np.ndarray) -> None:
    explanation = explain_image(bright_image, constant_classifier, grid_segments(), num_samples=100, label=1,
                                surrogate=SurrogateSettings(on_single_class="zeros"))
    assert explanation.single_class and not explanation.y.any()
    assert "none of the 100" in explanation.reason
    assert not explanation.coefficients.any() and explanation.score is None and explanation.model is None
    assert explanation.top(3).size == 0
    assert explanation.summary()["single_class"] is True


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


@pytest.mark.parametrize("kernels", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.float64])
def test_batched_gather_matches_a_per_sample_loop(dtype: type, kernels: str) -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((23, 31, 3)) * 200 + 1).astype(dtype)
    segments = relabel_segments(rng.integers(0, 9, size=(23, 31)))
    z = sample_perturbations(int(segments.max()) + 1, 21, rng)
    z[5] = 0
    build = PerturbedBatches(image, segments, batch_size=8, kernels=kernels)
    starts = []
    for start in range(0, len(z), 8):
        images = build(torch.as_tensor(z[start:start + 8]))  # one buffer: check before the next call
        starts.append(start)
        assert images.dtype == torch.as_tensor(image).dtype and images.shape[1:] == image.shape
        for offset, perturbed in enumerate(images.numpy()):
            np.testing.assert_array_equal(perturbed, naive_perturbation(image, segments, z[start + offset]))
    assert starts == [0, 8, 16] and images.shape[0] == 5


def test_iterated_batches_cover_every_perturbation_once() -> None:
    image = np.ones((6, 5, 3), np.float32)
    segments = np.arange(30).reshape(6, 5) % 4
    z = sample_perturbations(4, 10, np.random.default_rng(0))
    seen = np.concatenate([images.numpy()[:, :, :, 0].reshape(len(images), -1).copy()
                           for _, images in iter_perturbed_batches(image, segments, z, batch_size=4)])
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

def test_brief_synthetic_training_moves_the_weights() -> None:
    settings = BriefTraining(steps=1, batch_size=2, images_per_class=1, seed=0)
    model, stats = train_briefly_on_synthetic(settings)
    fresh = seeded_init(VGG16DWSep, settings.seed)
    assert isinstance(model, VGG16DWSep) and not model.training
    assert np.isfinite(stats["loss"]) and stats["images"] == 2
    changed = [name for name, p in model.state_dict().items() if not torch.equal(p, fresh.state_dict()[name])]
    assert any(name.startswith("classifier") for name in changed)
