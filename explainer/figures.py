"""Figures of an explanation (matplotlib ``Figure`` objects, no pyplot state), written atomically.

Every figure takes a ``title`` that the caller fills (``run_title``: the model, its weights, the
segmentation, the number of samples and sigma; any language).  Under it each importance figure
states the surrogate, its fidelity and, when they apply, why it explains the probability rather
than y, and that the prediction is insensitive to the superpixels: then it shows the spread of the
probability instead of ranking superpixels.
"""
from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from skimage.segmentation import mark_boundaries

from pipelines.files import atomic_path

from .core import Explanation, pixel_overlap

FOR_COLOUR = np.array([0.1, 0.85, 0.2])
AGAINST_COLOUR = np.array([0.95, 0.15, 0.1])


def save_figure(figure: Figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight")
    return Path(path)


def run_title(model: str, weights: str, segmentation: str, num_superpixels: int, num_samples: int,
              sigma: float, prediction: str) -> str:
    return (f"{model} - weights: {weights}\n{segmentation}: {num_superpixels} superpixels - "
            f"{num_samples} samples - sigma {sigma:g} - explaining {prediction}")


def _clean(axes) -> None:
    axes.set_xticks([])
    axes.set_yticks([])


def highlighted(image: np.ndarray, segments: np.ndarray, chosen: np.ndarray, colour: np.ndarray,
                dim: float = 0.35) -> np.ndarray:
    """The image with ``chosen`` superpixels tinted by ``colour`` and outlined, the rest dimmed."""
    inside = np.isin(segments, chosen)[..., None]
    tinted = 0.65 * image + 0.35 * colour
    out = np.where(inside, tinted, dim * image)
    return mark_boundaries(np.clip(out, 0, 1), np.where(inside[..., 0], segments, -1), color=tuple(colour))


def coefficient_map(explanation: Explanation) -> np.ndarray:
    return explanation.coefficients[explanation.segments]


def _show_coefficients(figure: Figure, axes, explanation: Explanation) -> None:
    values = coefficient_map(explanation)
    limit = float(np.abs(values).max()) or 1.0
    shown = axes.imshow(values, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit))
    axes.imshow(mark_boundaries(np.zeros_like(explanation.image), explanation.segments, color=(0, 0, 0)),
                alpha=0.15)
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.02, label=f"coefficient ({explanation.kind})")


def plot_segments(image: np.ndarray, segments: np.ndarray, title: str, path: str | Path) -> Path:
    """The image and its superpixel boundaries (``mark_boundaries``), each superpixel numbered."""
    figure = Figure(figsize=(11, 5.6))
    left, right = figure.subplots(1, 2)
    left.imshow(image)
    left.set_title("input (299 x 299)")
    right.imshow(mark_boundaries(image, segments, color=(1, 1, 0)))
    right.set_title(f"{segments.max() + 1} superpixels")
    labels = np.arange(segments.max() + 1)
    for label, (row, col) in zip(labels, ndimage.center_of_mass(np.ones(segments.shape), segments, labels)):
        right.text(col, row, str(label), fontsize=6, color="cyan", ha="center", va="center")
    for axes in (left, right):
        _clean(axes)
    figure.suptitle(title, fontsize=9)
    return save_figure(figure, path)


def plot_perturbations(explanation: Explanation, class_names: Sequence[str], title: str, path: str | Path,
                       rows: Sequence[int] = (1, 2, 3)) -> Path:
    """Perturbed images (switched-off superpixels black) with their vector's count of superpixels
    on, their top class, y, distance and weight."""
    rows = [row for row in rows if row < len(explanation.y)]
    figure = Figure(figsize=(4.2 * len(rows), 4.8))
    axes_row = np.atleast_1d(figure.subplots(1, len(rows)))
    for axes, row in zip(axes_row, rows):
        z = explanation.perturbations[row]
        perturbed = explanation.image * z[explanation.segments][..., None]
        axes.imshow(mark_boundaries(perturbed, explanation.segments, color=(0.4, 0.4, 0.4)))
        kept = "keeps" if explanation.y[row] else "loses"
        axes.set_title(f"perturbation {row}: {int(z.sum())}/{len(z)} on\n{kept} {class_names[explanation.label]!r} "
                       f"(p={explanation.probabilities[row]:.2f})\nd={explanation.distances[row]:.3f}, "
                       f"pi={explanation.weights[row]:.3f}", fontsize=8)
        _clean(axes)
    figure.suptitle(title, fontsize=9)
    return save_figure(figure, path)


def explanation_note(explanation: Explanation, width: int = 160) -> str:
    """The surrogate, its fidelity, y's balance and the decision rule; then, on lines of their own,
    why the probability is explained instead of y, and that the prediction is insensitive; each
    statement wrapped at ``width`` characters."""
    fidelity = "undefined" if explanation.fidelity is None else f"{explanation.fidelity:.3f}"
    lines = [f"{explanation.kind} on the {explanation.target}, {explanation.fidelity_metric} {fidelity}; "
             f"y=1 for {explanation.y.mean():.1%} of samples (decision: {explanation.decision})"]
    if explanation.fallback_reason:
        lines.append(f"PROBABILITY SURROGATE: {explanation.fallback_reason}")
    if explanation.insensitive:
        lines.append(f"INSENSITIVE: {explanation.insensitive_reason}")
    return "\n".join(textwrap.fill(line, width) for line in lines)


def _show_probability_spread(axes, explanation: Explanation) -> None:
    """Histogram of the explained probability over the perturbed images, the control marked."""
    axes.hist(explanation.probabilities[1:], bins=30, color="tab:gray")
    axes.axvline(explanation.control_probability, color="tab:blue", label="control image")
    axes.xaxis.set_major_locator(MaxNLocator(4))
    axes.set_xlabel(f"P(class {explanation.label}) on the perturbed images")
    axes.set_ylabel("perturbed images")
    axes.legend(fontsize=8)


def plot_insensitive(explanation: Explanation, title: str, path: str | Path) -> Path:
    """The input with its superpixels and the spread of the explained probability: no ranking."""
    figure = Figure(figsize=(11, 5.6), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.imshow(mark_boundaries(explanation.image, explanation.segments, color=(1, 1, 0)))
    left.set_title("input and superpixels")
    _clean(left)
    _show_probability_spread(right, explanation)
    right.set_title("the prediction is insensitive to the superpixels: none is ranked", fontsize=9)
    figure.suptitle(f"{title}\n{explanation_note(explanation, 110)}", fontsize=9)
    return save_figure(figure, path)


def plot_importance(explanation: Explanation, k: int, title: str, path: str | Path) -> Path:
    """Input with boundaries, the k superpixels most in favour (green), the k most against (red),
    every coefficient painted on its superpixel, and the ranked coefficients as bars; for an
    insensitive prediction ``plot_insensitive`` instead."""
    if explanation.insensitive:
        return plot_insensitive(explanation, title, path)
    figure = Figure(figsize=(17, 7.4))
    grid = figure.add_gridspec(2, 4, height_ratios=(3, 1.3))
    image, segments = explanation.image, explanation.segments
    panels = [figure.add_subplot(grid[0, column]) for column in range(4)]
    panels[0].imshow(mark_boundaries(image, segments, color=(1, 1, 0)))
    panels[0].set_title("input and superpixels")
    favour, against = explanation.top(k), explanation.against(k)
    panels[1].imshow(highlighted(image, segments, favour, FOR_COLOUR))
    panels[1].set_title(f"top {len(favour)} for: {', '.join(map(str, favour)) or 'none'}", fontsize=9)
    panels[2].imshow(highlighted(image, segments, against, AGAINST_COLOUR))
    panels[2].set_title(f"top {len(against)} against: {', '.join(map(str, against)) or 'none'}", fontsize=9)
    _show_coefficients(figure, panels[3], explanation)
    panels[3].set_title("coefficient per superpixel")
    for axes in panels:
        _clean(axes)
    bars = figure.add_subplot(grid[1, :])
    order = explanation.ranked()
    values = explanation.coefficients[order]
    bars.bar(np.arange(len(order)), values, color=np.where(values >= 0, "tab:green", "tab:red"))
    bars.set_xticks(np.arange(len(order)), [str(i) for i in order], fontsize=6, rotation=90)
    bars.axhline(0, color="black", linewidth=0.6)
    bars.set_xlabel("superpixel (ranked)")
    bars.set_ylabel("coefficient")
    figure.suptitle(f"{title}\n{explanation_note(explanation)}", fontsize=9)
    return save_figure(figure, path)


def top_k_overlap(first: Explanation, second: Explanation, k: int) -> float | None:
    """Jaccard index of two explanations' top-k superpixels in favour on the same segmentation; None
    when the prediction is insensitive or either has no superpixel in favour (nothing to compare)."""
    if first.insensitive or second.insensitive:
        return None
    a, b = set(first.top(k).tolist()), set(second.top(k).tolist())
    return len(a & b) / len(a | b) if a and b else None


def _overlap_text(value: float | None) -> str:
    return "n/a (insensitive, or nothing in favour)" if value is None else f"{value:.2f}"


def plot_grid(explanations: Mapping[tuple[str, str], Explanation], k: int, title: str, path: str | Path) -> Path:
    """One row per segmentation, one column per explanation family: the top k superpixels in
    favour with each surrogate's note; from the second family on, the Jaccard overlap of its top k
    superpixels with the first family's, and from the second segmentation on, the Jaccard overlap
    of the pixels its top k cover with those of the same family on the first segmentation."""
    segmentations = list(dict.fromkeys(key[0] for key in explanations))
    families = list(dict.fromkeys(key[1] for key in explanations))
    figure = Figure(figsize=(5.2 * len(families) + 4.4, 5.6 * len(segmentations)), layout="constrained")
    axes = np.atleast_2d(figure.subplots(len(segmentations), len(families) + 1, squeeze=False))
    for row, segmentation in enumerate(segmentations):
        any_explanation = next(e for key, e in explanations.items() if key[0] == segmentation)
        axes[row, 0].imshow(mark_boundaries(any_explanation.image, any_explanation.segments, color=(1, 1, 0)))
        axes[row, 0].set_title(f"{segmentation}: {any_explanation.num_superpixels} superpixels", fontsize=9)
        for column, family in enumerate(families, start=1):
            explanation = explanations.get((segmentation, family))
            if explanation is None:
                continue
            shown, colour, heading = [], FOR_COLOUR, "insensitive: nothing ranked"
            if not explanation.insensitive:
                shown, heading = explanation.top(k), f"top {k} for"
                if len(shown) == 0:  # every coefficient argues against the class: show those instead
                    shown, colour = explanation.against(k), AGAINST_COLOUR
                    heading = f"none in favour; top {k} against (red)"
            axes[row, column].imshow(highlighted(explanation.image, explanation.segments, shown, colour))
            note = f"{family}: {heading}\n{explanation_note(explanation, 62)}"
            first_family = explanations.get((segmentation, families[0]))
            if column > 1 and first_family is not None:
                note += f"\ntop-{k} overlap with {families[0]}: {_overlap_text(top_k_overlap(first_family, explanation, k))}"
            first_segmentation = explanations.get((segmentations[0], family))
            if row > 0 and first_segmentation is not None:
                overlap = pixel_overlap(first_segmentation, explanation, k)
                note += f"\ntop-{k} pixels shared with {segmentations[0]}: {_overlap_text(overlap)}"
            axes[row, column].set_title(note, fontsize=7)
    for ax in axes.ravel():
        _clean(ax)
    figure.suptitle(title, fontsize=9)
    return save_figure(figure, path)
