"""LIME for image classifiers, written from scratch (not the ``lime`` package, which
``python -m explainer.bench`` compares against).

``explain_image(image, predict_fn, segments, ...) -> Explanation`` is the entry point; the steps
(perturbations, perturbed images, labels, distances, weights, explanation model) are importable
from ``explainer.core``, superpixels from ``explainer.segmentation``, models and the torch
adapter from ``explainer.models``, figures from ``explainer.figures``.
"""
from .core import (DEFAULT_BATCH_SIZE, DEFAULT_SIGMA, Explanation, SurrogateSettings, cosine_distance,
                   explain_image, kernel_weights, relabel_segments, sample_perturbations)
from .models import TorchPredictor
from .segmentation import SEGMENTATIONS, SegmentationSettings, segment

__all__ = [
    "DEFAULT_BATCH_SIZE", "DEFAULT_SIGMA", "Explanation", "SEGMENTATIONS", "SegmentationSettings", "SurrogateSettings",
    "TorchPredictor", "cosine_distance", "explain_image", "kernel_weights", "relabel_segments",
    "sample_perturbations", "segment",
]
