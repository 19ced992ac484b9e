"""Superpixels: SLIC, and clustering of pixels turned into superpixels.

Clustering segmentations take every pixel as one row of features, cluster the H*W rows with a
scikit-learn algorithm and turn the clusters into superpixels: a cluster split into several
spatial pieces gives one superpixel per 4-connected piece, pieces smaller than ``min_size``
pixels are absorbed by the nearest kept piece, and at most ``max_segments`` (the largest) are
kept.

Feature scaling: each feature column is standardised (zero mean, unit variance over the image),
so x, y and the gray level weigh the same whatever the image size or contrast; ``gray_weight``
then multiplies the gray column: above 1 clusters follow intensity edges more, below 1 they
become compact spatial tiles (the role of SLIC's compactness).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.color import rgb2gray
from skimage.measure import label as connected_components
from skimage.segmentation import slic
from sklearn.cluster import Birch, MiniBatchKMeans
from sklearn.preprocessing import StandardScaler

from .core import relabel_segments

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentationSettings:
    n_segments: int = 80
    """SLIC's target number of superpixels (the brief's 80)."""
    compactness: float = 10.0
    n_clusters: int = 40
    """Clusters of the (x, y, gray) segmentations."""
    colour_clusters: int = 6
    """Clusters of the colour-space segmentation (then split into connected pieces)."""
    gray_weight: float = 2.0
    max_segments: int = 100
    min_size: int = 150
    """Pieces below this many pixels are merged into their nearest neighbour (0.17% of 299^2)."""
    subsample: int = 10_000
    """Rows BIRCH is fitted on (it then labels every pixel by its nearest subcluster)."""
    birch_threshold: float = 0.3
    """BIRCH's subcluster radius, in standardised feature units."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_segments", "n_clusters", "colour_clusters", "max_segments", "subsample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_size < 0 or self.gray_weight <= 0 or self.birch_threshold <= 0:
            raise ValueError(f"need min_size >= 0, gray_weight > 0 and birch_threshold > 0, got "
                             f"{self.min_size}, {self.gray_weight}, {self.birch_threshold}")


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3, got shape {image.shape}")
    return image


def slic_segments(image: np.ndarray, settings: SegmentationSettings = SegmentationSettings()) -> np.ndarray:
    """``skimage.segmentation.slic(image, n_segments, start_label=0)``, relabelled to 0..K-1."""
    segments = slic(_as_rgb(image), n_segments=settings.n_segments, compactness=settings.compactness,
                    start_label=0, channel_axis=-1)
    return relabel_segments(segments)


def spatial_gray_features(image: np.ndarray, gray_weight: float) -> np.ndarray:
    """H*W x 3 rows (x, y, gray level), standardised, the gray column times ``gray_weight``."""
    height, width = image.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width]
    gray = rgb2gray(_as_rgb(image))
    features = np.column_stack([xs.ravel(), ys.ravel(), gray.ravel()]).astype(np.float64)
    features = StandardScaler().fit_transform(features)
    features[:, 2] *= gray_weight
    return features


def colour_features(image: np.ndarray) -> np.ndarray:
    """H*W x 3 rows (R, G, B), each channel standardised (a constant channel stays 0)."""
    return StandardScaler().fit_transform(_as_rgb(image).reshape(-1, 3).astype(np.float64))


def kmeans_labels(features: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    model = MiniBatchKMeans(n_clusters=n_clusters, batch_size=4096, n_init=3, random_state=seed)
    return model.fit_predict(features)


def birch_labels(features: np.ndarray, n_clusters: int, seed: int, subsample: int, threshold: float) -> np.ndarray:
    """BIRCH fitted on ``subsample`` random rows (its subclusters then merged into ``n_clusters`` by
    agglomerative clustering), labelling every row by its nearest subcluster."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(features), size=min(subsample, len(features)), replace=False)
    return Birch(n_clusters=n_clusters, threshold=threshold).fit(features[rows]).predict(features)


MERGE_ROUNDS = 5


def clusters_to_superpixels(clusters: np.ndarray, max_segments: int, min_size: int) -> np.ndarray:
    """H x W cluster ids -> superpixels 0..K-1: one per 4-connected piece of a cluster, the
    ``max_segments`` largest pieces of at least ``min_size`` pixels kept (at least one), every
    other pixel given to the nearest kept piece.  Filling by nearest pixel can cut a piece off
    diagonally, so the pieces are recomputed and the merge repeated (a few rounds at most)."""
    pieces = clusters + 1
    for _ in range(MERGE_ROUNDS):
        pieces = connected_components(pieces, background=0, connectivity=1)
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0  # no background: label 0 is unused
        order = np.argsort(-sizes, kind="stable")[:max_segments]
        large = order[sizes[order] >= max(min_size, 1)]
        kept = np.isin(pieces, large if len(large) else order[:1])
        if kept.all():
            break
        _, (rows, cols) = ndimage.distance_transform_edt(~kept, return_indices=True)
        pieces = pieces[rows, cols]
    else:
        pieces = connected_components(pieces, background=0, connectivity=1)
    return relabel_segments(pieces)


def kmeans_segments(image: np.ndarray, settings: SegmentationSettings = SegmentationSettings()) -> np.ndarray:
    """MiniBatchKMeans on (x, y, gray) rows, clusters split into connected superpixels."""
    labels = kmeans_labels(spatial_gray_features(image, settings.gray_weight), settings.n_clusters, settings.seed)
    return clusters_to_superpixels(labels.reshape(image.shape[:2]), settings.max_segments, settings.min_size)


def birch_segments(image: np.ndarray, settings: SegmentationSettings = SegmentationSettings()) -> np.ndarray:
    """BIRCH on (x, y, gray) rows (fitted on a subsample), clusters split into connected superpixels."""
    features = spatial_gray_features(image, settings.gray_weight)
    labels = birch_labels(features, settings.n_clusters, settings.seed, settings.subsample, settings.birch_threshold)
    return clusters_to_superpixels(labels.reshape(image.shape[:2]), settings.max_segments, settings.min_size)


def colour_segments(image: np.ndarray, settings: SegmentationSettings = SegmentationSettings()) -> np.ndarray:
    """MiniBatchKMeans in colour space (H*W x 3, no position), split into connected superpixels."""
    labels = kmeans_labels(colour_features(image), settings.colour_clusters, settings.seed)
    return clusters_to_superpixels(labels.reshape(image.shape[:2]), settings.max_segments, settings.min_size)


SEGMENTATIONS: dict[str, Callable[[np.ndarray, SegmentationSettings], np.ndarray]] = {
    "slic": slic_segments,
    "kmeans": kmeans_segments,
    "birch": birch_segments,
    "colour": colour_segments,
}

DESCRIPTIONS = {
    "slic": "SLIC (n_segments={n_segments}, compactness={compactness:g})",
    "kmeans": "MiniBatchKMeans on (x, y, gray), k={n_clusters}, gray weight {gray_weight:g}",
    "birch": "BIRCH on (x, y, gray), k={n_clusters}, fit on {subsample} pixels, gray weight {gray_weight:g}",
    "colour": "MiniBatchKMeans in RGB, k={colour_clusters}",
}


def segment(image: np.ndarray, method: str, settings: SegmentationSettings = SegmentationSettings()) -> np.ndarray:
    """Superpixels 0..K-1 of ``image`` (H x W x 3) by ``method`` (a key of ``SEGMENTATIONS``)."""
    if method not in SEGMENTATIONS:
        raise ValueError(f"unknown segmentation {method!r}; choose one of {sorted(SEGMENTATIONS)}")
    segments = SEGMENTATIONS[method](image, settings)
    logger.info("%s: %d superpixels", method, segments.max() + 1)
    return segments


def describe(method: str, settings: SegmentationSettings = SegmentationSettings()) -> str:
    return DESCRIPTIONS[method].format(**settings.__dict__)
