"""The settings of a training run: one frozen dataclass, saved in the checkpoint and in modelo.h5.

``train.py`` only parses arguments into a ``RunConfig``; the notebook builds one directly.
A recipe (``RECIPES``) names the values of the levers that change what the brief wrote:
``brief`` is the brief's method with nothing added, ``default`` the one chosen on validation
(RESULTS.md, "Choosing the default recipe"): evaluation images x1.35 and a decision threshold.
Class weights from the test prior, training the first two convolutions, selecting by balanced
accuracy and an exponential moving average of the weights were compared there too and lost, so they
are not options.  Any lever given explicitly overrides its recipe.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipelines.transforms import NOISE_MEAN

#: How validation and test images are transformed: ``brief`` = the training Compose (flip,
#: rotation, noise), seeded, as the brief gives one Compose to train/ and test/ alike;
#: ``gain`` = /255 then x1.35, the mean of the training noise.
EVAL_TRANSFORMS = ("brief", "gain")
#: What ``--compare-eval`` scores on validation each epoch: the two above and /255 alone.
COMPARED_EVAL_TRANSFORMS = ("brief", "gain", "plain")
#: How a probability becomes a class: ``argmax``, or ``threshold`` = PNEUMONIA when
#: P(PNEUMONIA) >= t, t chosen on the validation set replicated to the test's class balance.
DECISIONS = ("argmax", "threshold")
LOADERS = ("auto", "torchvision", "dali")

RECIPES: dict[str, dict[str, Any]] = {
    "brief": {"eval_transform": "brief", "decision": "argmax"},
    "default": {"eval_transform": "gain", "decision": "threshold"},
}
LEVERS = tuple(RECIPES["brief"])


def eval_gain(eval_transform: str) -> float:
    """The constant an evaluation transform multiplies images by after /255: the training noise's
    mean for ``gain``, 1 for the others."""
    return NOISE_MEAN if eval_transform == "gain" else 1.0


def stored_decision(metadata: dict, path: Any) -> dict[str, Any]:
    """A modelo.h5's decision rule (``metadata["decision"]``), checked: ValueError naming the file
    when it is missing (written by an older version) or malformed."""
    decision = metadata.get("decision")
    if decision is None:
        raise ValueError(f"{path} stores no decision rule (written by an older version); train it again")
    wanted = ("positive_class", "threshold", "rule", "eval_transform")
    if not isinstance(decision, dict) or any(k not in decision for k in wanted) \
            or decision["rule"] not in DECISIONS or decision["eval_transform"] not in COMPARED_EVAL_TRANSFORMS \
            or not 0 <= float(decision["threshold"]) <= 1:
        raise ValueError(f"{path}: malformed decision rule {decision!r}")
    return decision


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run."""

    data_dir: str | None = None
    out: str = "out"
    weights_out: str = "modelo.h5"
    recipe: str = "default"
    loader: str = "auto"
    device: str = "auto"
    epochs: int = 30
    batch_size: int = 16
    num_workers: int = 2
    seed: int = 0
    lr: float = 1e-4
    weight_decay: float = 1e-5
    paciencia: int = 5
    pretrained: bool = True
    vgg16_weights: str | None = None
    train_subset: int | None = None
    image_size: int = 224
    tta: tuple[int, ...] = (4, 8)
    amp: bool = True
    demo: bool = False
    decoded_cache: bool = False
    compare_eval: bool = False
    skip_test: bool = False
    # the levers; None = the recipe's value (resolved in __post_init__)
    eval_transform: str | None = None
    decision: str | None = None

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe {self.recipe!r}: choose one of {sorted(RECIPES)}")
        for lever, value in RECIPES[self.recipe].items():
            if getattr(self, lever) is None:
                object.__setattr__(self, lever, value)
        object.__setattr__(self, "tta", tuple(self.tta))
        for name in ("epochs", "batch_size", "paciencia"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if any(d < 1 for d in self.tta):
            raise ValueError(f"--tta values must be >= 1, got {list(self.tta)}")
        if self.train_subset is not None and self.train_subset < 8:
            raise ValueError(f"--train-subset must be >= 8, got {self.train_subset}")
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"--image-size must be a multiple of 32 (five 2x2 poolings), >= 32, got {self.image_size}")
        for name, allowed in (("loader", LOADERS), ("eval_transform", EVAL_TRANSFORMS), ("decision", DECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: choose one of {list(allowed)}")

    def levers(self) -> dict[str, Any]:
        """The lever values of this run (after the recipe was applied)."""
        return {lever: getattr(self, lever) for lever in LEVERS}

    def departures(self) -> dict[str, Any]:
        """The levers on which this run departs from the brief's method."""
        return {k: v for k, v in self.levers().items() if RECIPES["brief"][k] != v}

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
