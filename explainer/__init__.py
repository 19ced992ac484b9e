"""LIME for image classifiers, written from scratch (not the ``lime`` package, which
``python -m benchmarks.lime_comparison`` compares against).

``explain_image(image, predict_fn, segments, ...) -> Explanation`` is the entry point; the steps
(perturbations, perturbed images, the model's decision, labels, distances, weights, explanation
model) are importable from ``explainer.core``, superpixels from ``explainer.segmentation``, models
and the torch adapter from ``explainer.models``, figures from ``explainer.figures``.
"""
from .core import (ARGMAX, DEFAULT_BATCH_SIZE, DEFAULT_SIGMA, Explanation, SurrogateSettings, ThresholdDecision,
                   cosine_distance, explain_image, kernel_weights, pixel_overlap, relabel_segments,
                   sample_perturbations)
from .models import TorchPredictor
from .segmentation import SEGMENTATIONS, SegmentationSettings, segment

__all__ = [
    "ARGMAX", "DEFAULT_BATCH_SIZE", "DEFAULT_SIGMA", "Explanation", "SEGMENTATIONS", "SegmentationSettings",
    "SurrogateSettings", "ThresholdDecision", "TorchPredictor", "cosine_distance", "explain_image", "kernel_weights",
    "pixel_overlap", "relabel_segments", "sample_perturbations", "segment",
]
