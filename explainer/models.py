"""The models LIME explains here, their input transforms, and the adapter that turns a torch
model into a ``predict_fn`` (N x H x W x 3 images -> N x C probabilities).

inception_v3 sees 299 x 299 images normalised with the ImageNet mean and std; VGG16DWSep sees
224 x 224 images scaled to [0, 1] and then as its modelo.h5's stored evaluation transform says
(``eval_multiplier``: x1.35 for the default recipe, one seeded noise draw for the brief's).  The
explainer works on one 299 x 299 image in [0, 1] for both; the adapter resizes and scales or
normalises each batch for its model, on the model's device.
"""
from __future__ import annotations

import logging
import os
import tempfile
import urllib.error
import urllib.parse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T

from models.config import eval_gain
from models.engine import autocast, precision_options, train_one_epoch
from models.h5io import load_modelo_h5, save_modelo_h5
from models.vgg16dwsep import VGG16DWSep, read_state_dict_file
from pipelines.synthetic import CLASSES as SYNTHETIC_CLASSES
from pipelines.synthetic import make_synthetic_dataset
from pipelines.transforms import NOISE_HIGH, NOISE_LOW, get_toolchain, noise_field

from .core import ARGMAX, Decision, ThresholdDecision

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPLAIN_SIZE = 299
"""Side of the image the explainer segments and perturbs (inception_v3's input)."""
INCEPTION_WEIGHTS = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
DEFAULT_MODELO = Path("modelo.h5")
"""The VGG16DWSep explained when no weights are named: train.py's default ``--weights-out``, in
the current directory."""


class WeightsUnavailable(FileNotFoundError):
    """No real weights for a model that is only explained with them: the caller skips it."""


def inception_transform() -> T.Compose:
    """inception_v3's input transform: resize the shorter side to 299, centre-crop 299 x 299, to
    a [0, 1] tensor, normalise with the ImageNet mean and std."""
    return T.Compose([T.Resize(EXPLAIN_SIZE), T.CenterCrop(EXPLAIN_SIZE), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise ValueError(f"cannot read {path} as an image: {error}") from error


def explanation_image(path: str | os.PathLike[str], crop: bool = True, size: int = EXPLAIN_SIZE) -> np.ndarray:
    """The image LIME explains: float32 size x size x 3 in [0, 1].

    ``crop=True`` is inception_v3's transform before normalisation (resize the shorter side,
    centre crop); ``crop=False`` squashes to size x size without keeping the aspect ratio, as the
    VGG16DWSep training transform does.
    """
    steps = [T.Resize(size), T.CenterCrop(size)] if crop else [T.Resize((size, size))]
    tensor = T.Compose([*steps, T.ToTensor()])(load_rgb(path))
    return tensor.permute(1, 2, 0).numpy().copy()


class TorchPredictor:
    """``predict_fn`` for a torch classifier: N x H x W x 3 images in [0, 1] (numpy, or a tensor on
    ``device``) -> N x C softmax probabilities (numpy float32).

    Each call is one forward pass in eval mode under ``torch.inference_mode()``; the images are
    resized to ``input_size`` when they differ, multiplied by ``multiplier`` when given (a number,
    or a fixed 3 x input_size x input_size tensor: the same for every image of every call), then
    normalised with ``mean``/``std`` when given.
    Channels-last, and bfloat16 autocast where the device does bf16 natively (CUDA, AVX512-BF16 or
    AMX CPUs: ``models.engine.precision_options``, the same choice as training) unless ``amp=False``.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, input_size: int,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 amp: bool = True, multiplier: float | torch.Tensor | None = None) -> None:
        self.device = torch.device(device)
        self.amp_dtype = precision_options(self.device, amp)["amp_dtype"]
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.input_size = input_size
        self.mean = None if mean is None else torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = None if std is None else torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.multiplier = None if multiplier is None else torch.as_tensor(multiplier, dtype=torch.float32,
                                                                          device=self.device)
        if self.multiplier is not None and self.multiplier.ndim != 0 \
                and tuple(self.multiplier.shape) != (3, input_size, input_size):
            raise ValueError(f"multiplier must be a number or a 3 x {input_size} x {input_size} tensor, "
                             f"got shape {tuple(self.multiplier.shape)}")

    def model_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """N x 3 x input_size x input_size float32 on the device, channels-last."""
        x = torch.as_tensor(images, device=self.device)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected N x H x W x 3 images, got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        if self.multiplier is not None:
            x = x * self.multiplier
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            logits = self.model(self.model_input(images))
        return logits.float().softmax(dim=1).cpu().numpy()


@dataclass(frozen=True)
class LoadedModel:
    """A classifier ready to explain: its predictor, class names, where its weights come from and
    its decision rule (the class it gives an image, from its probabilities)."""

    name: str
    predictor: TorchPredictor
    class_names: list[str]
    weights_note: str
    crop: bool
    """Whether the explanation image is centre-cropped (inception) or squashed (VGG16DWSep)."""
    decision: Decision = ARGMAX
    synthetic: bool = False
    """Trained on synthetic data (a demonstration of the mechanics, not of the disease)."""


def seeded_init(build, seed: int) -> nn.Module:
    """``build()`` with torch's global generator seeded by ``seed`` and restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def inception_hub_file() -> Path:
    name = os.path.basename(urllib.parse.urlparse(INCEPTION_WEIGHTS.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def inception_state_dict(path: str | os.PathLike[str] | None) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet inception_v3 weights from ``path``, else from torch hub's cache
    (downloaded there when online, as torchvision does).  ``WeightsUnavailable`` saying how to
    get them when neither has them: inception_v3 is only explained with its ImageNet weights."""
    if path is not None:
        return read_state_dict_file(path, "inception_v3")
    cached = inception_hub_file()
    try:
        return INCEPTION_WEIGHTS.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
        raise WeightsUnavailable(
            f"no ImageNet inception_v3 weights: not in torch hub's cache ({cached}) and not downloadable "
            f"({getattr(error, 'reason', error)}); download {INCEPTION_WEIGHTS.url} to {cached} or pass "
            f"--weights PATH") from error


def load_inception_v3(weights: str | os.PathLike[str] | None, device: torch.device, amp: bool = True) -> LoadedModel:
    """torchvision's inception_v3 with its ImageNet weights (``weights`` file or the hub cache;
    never random ones).  ``transform_input=True`` as torchvision sets for its ImageNet weights:
    they expect Google's [-1, 1] scaling, which it derives from the ImageNet-normalised input."""
    state = inception_state_dict(weights)
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    # keys first (torch reports a shape mismatch before them); BatchNorm's num_batches_tracked is
    # filled in by load_state_dict for files saved before it existed
    missing = sorted(k for k in set(model.state_dict()) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{weights or 'the cached file'} does not hold torchvision's inception_v3 weights: "
                         f"{len(missing)} keys missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]})")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # same names, other shapes: torch's first line is only a header
        details = "; ".join(line.strip() for line in str(error).splitlines()[1:3] if line.strip())
        raise ValueError(f"{weights or 'the cached file'}: {details or error}") from None
    note = f"ImageNet ({Path(weights).name if weights else 'torchvision IMAGENET1K_V1'})"
    predictor = TorchPredictor(model, device, EXPLAIN_SIZE, IMAGENET_MEAN, IMAGENET_STD, amp=amp)
    return LoadedModel("inception_v3", predictor, list(INCEPTION_WEIGHTS.meta["categories"]), note, crop=True)


@dataclass(frozen=True)
class BriefTraining:
    """A handful of VGG16DWSep training steps on a tiny synthetic set: what ``explain.py --demo``
    explains without weights, labelled as such.  Measured here: after 12 steps (or 30) from random
    initialisation the outputs barely vary between images, so every perturbation keeps the class
    and the explanation falls back to near-zero probability slopes; pass a trained modelo.h5 for
    a meaningful one."""

    steps: int = 12
    batch_size: int = 8
    images_per_class: int = 16
    lr: float = 1e-4
    seed: int = 0


def synthetic_tensors(root: Path, images_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic train split under ``root`` as (N x 3 x 224 x 224 in [0, 1], N labels), read
    with the project's evaluation transform."""
    make_synthetic_dataset(root, n_train=(images_per_class, images_per_class), n_test=(0, 0), seed=seed,
                           min_size=256, max_size=320)
    chain = get_toolchain()
    images, labels = [], []
    for label, class_name in enumerate(SYNTHETIC_CLASSES):
        for path in sorted((root / "train" / class_name).glob("*.jpeg")):
            images.append(chain.eval(chain.loader(str(path))))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def train_briefly_on_synthetic(settings: BriefTraining = BriefTraining(), device: torch.device | str = "cpu",
                               progress: bool = False) -> tuple[VGG16DWSep, dict[str, float]]:
    """A VGG16DWSep (random init, seeded) trained for ``settings.steps`` Adam steps on random
    batches of a tiny synthetic set; returns the model in eval mode and the training stats."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(settings.seed)
    with tempfile.TemporaryDirectory(prefix="synthetic-") as folder:
        images, labels = synthetic_tensors(Path(folder), settings.images_per_class, settings.seed)
    model = seeded_init(VGG16DWSep, settings.seed).to(device)
    batches = [(images[rows].to(device), labels[rows].to(device))
               for rows in (torch.randint(len(labels), (settings.batch_size,), generator=generator)
                            for _ in range(settings.steps))]
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)  # dropout
        stats = train_one_epoch(model, batches, optimizer, device, epoch=0, progress=progress)
    logger.info("VGG16DWSep briefly trained on synthetic data: %d steps of %d images, loss %.3f, accuracy %.2f",
                settings.steps, settings.batch_size, stats["loss"], stats["accuracy"])
    return model.eval(), stats


def eval_multiplier(metadata: dict, size: int, seed: int) -> tuple[float | torch.Tensor | None, str]:
    """What a modelo.h5's evaluation images were multiplied by after /255, for LIME's model calls,
    and how the explanation's note says so: its stored ``decision["eval_transform"]`` is ``gain``
    (x the noise's mean) or ``brief`` (the training Compose: here its noise only, one seeded draw
    shared by every perturbed image, without the flip and rotation that would move the superpixels,
    so the model's answers differ between perturbations only by the superpixels switched off)."""
    transform = (metadata.get("decision") or {}).get("eval_transform")
    if transform == "brief":
        noise = noise_field((3, size, size), torch.Generator().manual_seed(seed))
        return noise, f", inputs x one U[{NOISE_LOW:g}, {NOISE_HIGH:g}] draw per value (its evaluation noise, seed {seed})"
    if transform == "gain":
        return eval_gain(transform), f", inputs x{eval_gain(transform):g} (its evaluation gain)"
    return None, ""


def decision_from_metadata(metadata: dict, path: str | os.PathLike[str]) -> Decision:
    """A modelo.h5's decision rule: its metadata's ``"decision": {"positive_class": 1,
    "threshold": t}`` (class 1 when P(class 1) >= t) as a ``ThresholdDecision``; the argmax when
    the key is absent.  ValueError naming the file for anything else under that key."""
    rule = metadata.get("decision")
    if rule is None:
        return ARGMAX
    expected = "{'positive_class': 0 or 1, 'threshold': a probability, ...}"
    numbers = ("positive_class", "threshold")
    if not isinstance(rule, dict) or not set(numbers) <= set(rule) \
            or not all(isinstance(rule[key], (int, float)) and not isinstance(rule[key], bool) for key in numbers):
        raise ValueError(f"{path}: metadata 'decision' must be {expected}, got {rule!r}")
    try:
        return ThresholdDecision(rule["positive_class"], float(rule["threshold"]))
    except ValueError as error:
        raise ValueError(f"{path}: metadata 'decision': {error}") from None


def trained_on_synthetic(metadata: dict) -> bool:
    """Whether a modelo.h5's metadata says it was trained on synthetic data (``train.py --demo``,
    or the brief training of ``load_vgg16dwsep(..., demo=True)``)."""
    return bool(metadata.get("synthetic_data") or metadata.get("settings", {}).get("demo"))


def load_vgg16dwsep(weights: str | os.PathLike[str] | None, device: torch.device, *, demo: bool = False,
                    seed: int = 0, training: BriefTraining = BriefTraining(),
                    save_to: str | os.PathLike[str] | None = None, amp: bool = True) -> LoadedModel:
    """VGG16DWSep from a ``modelo.h5`` (``weights``, else ``./modelo.h5``), with its decision rule
    (``decision_from_metadata``) and its inputs scaled as its evaluation images were
    (``eval_multiplier``).

    A model trained on synthetic data is explained only with ``demo=True``; ``demo=True`` without
    ``weights`` trains one briefly (``train_briefly_on_synthetic``), written to ``save_to`` as a
    modelo.h5 when given so that a later run can pass it as ``weights``.  FileNotFoundError when
    no weights are named, ``./modelo.h5`` is missing and ``demo`` is off."""
    if weights is None and not demo:
        if not DEFAULT_MODELO.is_file():
            raise FileNotFoundError(f"no --weights and no {DEFAULT_MODELO} in {Path.cwd()}: train one with train.py, "
                                    "pass --weights PATH, or --demo for a model trained briefly on synthetic data")
        weights = DEFAULT_MODELO
    if weights is None:
        logger.warning("--demo: training VGG16DWSep briefly on synthetic data (%d steps)", training.steps)
        model, stats = train_briefly_on_synthetic(training, device, progress=True)
        class_names = list(SYNTHETIC_CLASSES)
        note = f"briefly trained on synthetic data ({training.steps} steps, NOT a real model)"
        if save_to is not None:
            save_modelo_h5(save_to, model, class_names=class_names,
                           metadata={"note": note, "synthetic_data": True, "training": asdict(training),
                                     "stats": stats})
            logger.info("wrote %s (pass it as --weights with --demo to skip the training)", save_to)
        predictor = TorchPredictor(model, device, model.input_size, amp=amp)
        return LoadedModel("vgg16dwsep", predictor, class_names, note, crop=False, synthetic=True)
    model, meta = load_modelo_h5(weights, device)
    metadata = meta.get("metadata", {})
    synthetic = trained_on_synthetic(metadata)
    if synthetic and not demo:
        raise ValueError(f"{weights} was trained on synthetic data; pass --demo to explain it anyway")
    decision = decision_from_metadata(metadata, weights)
    if isinstance(decision, ThresholdDecision) and meta["num_classes"] != 2:
        raise ValueError(f"{weights}: a threshold decision needs two classes, the model has {meta['num_classes']}")
    multiplier, how = eval_multiplier(metadata, model.input_size, seed)
    note = f"modelo.h5 at {weights}{how}" + (" (trained on SYNTHETIC data)" if synthetic else "")
    predictor = TorchPredictor(model, device, model.input_size, amp=amp, multiplier=multiplier)
    return LoadedModel("vgg16dwsep", predictor, list(meta["class_names"]), note, crop=False, decision=decision,
                       synthetic=synthetic)
