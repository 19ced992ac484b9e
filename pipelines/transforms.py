"""The training and evaluation transforms, one definition per toolchain.

The brief's training transform, in this order:

1. resize to 224 x 224 (aspect ratio not kept),
2. scale to [0, 1] dividing by 255,
3. horizontal flip with probability 1/2,
4. rotation about the centre by an angle drawn uniformly in [-20, 20] degrees (fill 0),
5. every value of every channel multiplied by its own number drawn uniformly in [1.2, 1.5].

Evaluation is read in two ways: the brief's, the whole training Compose with a seeded generator,
and the default recipe's, steps 1 and 2 then x1.35, the noise's mean (``get_toolchain(eval_gain=1.35)``);
a toolchain's ``eval`` is steps 1 and 2.  Each toolchain is a decoder (``pipelines.imageio``)
plus a ``torchvision.transforms.Compose`` of these steps written with one library; all end in a
float32 3 x 224 x 224 tensor.  Two are kept: ``cv2`` (the default, what training uses) and
``plain`` (PIL + torchvision as listed, the reference it is measured against; the chains it won
over live in ``benchmarks.toolchains``).  Randomness comes from torch's generator, which
``DataLoader`` seeds per worker from its own seeded generator, so a seed fixes the whole run.
Resizing is bilinear with antialiasing in the plain chain and area averaging
(``cv2.INTER_AREA``) in the cv2 chain; rotation is bilinear in both, and a positive angle
turns the image counter-clockwise, as in ``torchvision.transforms.functional.rotate``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from . import imageio

SIZE = imageio.TARGET_SIZE
FLIP_P = 0.5
MAX_ANGLE = 20.0
NOISE_LOW, NOISE_HIGH = 1.2, 1.5


def draw_flip() -> bool:
    return bool(torch.rand(()) < FLIP_P)


def draw_angle() -> float:
    return float(torch.empty(()).uniform_(-MAX_ANGLE, MAX_ANGLE))


def noise_field(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 values drawn uniformly in [NOISE_LOW, NOISE_HIGH] from ``generator`` (a fixed,
    seeded draw of step 5's multipliers, for diagnostics and LIME)."""
    return NOISE_LOW + (NOISE_HIGH - NOISE_LOW) * torch.rand(shape, generator=generator)


class MultiplicativeNoise(torch.nn.Module):
    """Multiply every value of a C x H x W tensor by its own U[low, high] number."""

    def __init__(self, low: float = NOISE_LOW, high: float = NOISE_HIGH) -> None:
        super().__init__()
        if not 0 <= low <= high:
            raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.empty_like(x).uniform_(self.low, self.high)

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


# --- OpenCV (numpy H x W x 3) steps ----------------------------------------------------------
# A grayscale file arrives as one plane seen three times (``imageio.gray_as_rgb``); these steps
# then work on that one plane, which is exact because the channels are equal until the noise.

def on_planes(fn: Callable[[np.ndarray], np.ndarray], arr: np.ndarray) -> np.ndarray:
    """Apply an image function once to the shared plane, or to the whole H x W x 3 array."""
    if imageio.shared_channels(arr):
        return imageio.gray_as_rgb(fn(np.ascontiguousarray(arr[:, :, 0])))
    return fn(np.ascontiguousarray(arr))


class CvResize:
    def __init__(self, size: int = SIZE) -> None:
        self.size = size

    def resize(self, arr: np.ndarray) -> np.ndarray:
        import cv2

        return cv2.resize(arr, (self.size, self.size), interpolation=cv2.INTER_AREA)

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        if arr.shape[:2] == (self.size, self.size):
            return arr
        return on_planes(self.resize, arr)


class CvToFloat01:
    def __call__(self, arr: np.ndarray) -> np.ndarray:
        return on_planes(lambda a: a.astype(np.float32) * np.float32(1.0 / 255.0), arr)


class CvRandomFlip:
    def __call__(self, arr: np.ndarray) -> np.ndarray:
        return arr[:, ::-1] if draw_flip() else arr


def rotation_matrix(angle: float, width: int, height: int) -> np.ndarray:
    """2 x 3 affine matrix turning by ``angle`` degrees counter-clockwise about the pixel centre."""
    import cv2

    return cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), angle, 1.0)


class CvRandomRotate:
    def __call__(self, arr: np.ndarray) -> np.ndarray:
        import cv2

        h, w = arr.shape[:2]
        matrix = rotation_matrix(draw_angle(), w, h)
        return on_planes(lambda a: cv2.warpAffine(a, matrix, (w, h), flags=cv2.INTER_LINEAR,
                                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0), arr)


class HwcToTensor:
    """H x W x 3 array -> contiguous float32 3 x H x W tensor."""

    def __call__(self, arr: np.ndarray) -> torch.Tensor:
        out = np.empty((3, *arr.shape[:2]), dtype=arr.dtype)
        out[...] = arr[None, :, :, 0] if imageio.shared_channels(arr) else arr.transpose(2, 0, 1)
        return torch.from_numpy(out)


def unit_interval_floats(bit_generator: np.random.BitGenerator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 draws uniform in [1, 2) with 23 random bits each (the mantissa under a fixed
    exponent), cut from the generator's raw 64-bit output: 0.165 against 0.23 ms for 3 x 224 x 224
    with ``Generator.random(dtype=float32)`` on this CPU."""
    n = int(np.prod(shape))
    bits = bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
    bits >>= np.uint32(9)
    bits |= np.uint32(0x3F800000)  # exponent of 1.0
    return bits.view(np.float32).reshape(shape)


def uniform_float32(bit_generator: np.random.BitGenerator, shape: tuple[int, ...], low: float,
                    high: float) -> np.ndarray:
    """float32 draws uniform in [low, high): ``unit_interval_floats`` u mapped by
    ``low + (high - low) * (u - 1) = (high - low) u + (2 low - high)``, in place."""
    out = unit_interval_floats(bit_generator, shape)
    out *= np.float32(high - low)
    out += np.float32(2 * low - high)
    return out


class HwcNoiseToTensor:
    """Step 5 for H x W x 3 arrays: per-value U[low, high] noise, written straight into a 3 x H x W tensor.

    The noise is drawn with numpy (``unit_interval_floats``, about 2x torch's ``uniform_`` on one
    thread) from a generator seeded by torch's, so torch's seed still fixes everything.  A shared
    grayscale plane is broadcast over the three channels here, the first step where they differ:
    ``x * (low + (high - low) * (u - 1)) = u * (high - low) x + (2 low - high) x`` with u in [1, 2),
    the two factors computed once on the plane.
    """

    def __init__(self, low: float = NOISE_LOW, high: float = NOISE_HIGH) -> None:
        self.noise = MultiplicativeNoise(low, high)  # validates the bounds

    def __call__(self, arr: np.ndarray) -> torch.Tensor:
        low, high = self.noise.low, self.noise.high
        bit_generator = np.random.PCG64(int(torch.randint(0, 2**62, ())))
        h, w = arr.shape[:2]
        if imageio.shared_channels(arr):  # the factors on one plane, then two passes over three
            plane = arr[None, :, :, 0]
            out = unit_interval_floats(bit_generator, (3, h, w))
            out *= plane * np.float32(high - low)
            out += plane * np.float32(2 * low - high)
        else:  # three passes, no temporaries
            out = uniform_float32(bit_generator, (3, h, w), low, high)
            out *= arr.transpose(2, 0, 1)
        return torch.from_numpy(out)


# --- toolchains ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Toolchain:
    """A decoder and the two Compose transforms written with one library."""

    name: str
    description: str
    loader: Callable[[str], object]
    train: T.Compose
    eval: T.Compose


def _plain(size: int = SIZE) -> Toolchain:
    resize = T.Resize((size, size))
    return Toolchain(
        "plain", "PIL full decode + torchvision transforms as listed (baseline)", imageio.load_pil,
        T.Compose([resize, T.ToTensor(), T.RandomHorizontalFlip(FLIP_P),
                   T.RandomRotation(MAX_ANGLE, interpolation=InterpolationMode.BILINEAR, fill=0),
                   MultiplicativeNoise(NOISE_LOW, NOISE_HIGH)]),
        T.Compose([resize, T.ToTensor()]))


def _cv2(size: int = SIZE) -> Toolchain:
    return Toolchain(
        "cv2", "OpenCV IMREAD_REDUCED decode + cv2 resize/warpAffine, numpy noise seeded from torch",
        imageio.load_cv2_reduced,
        T.Compose([CvResize(size), CvToFloat01(), CvRandomFlip(), CvRandomRotate(),
                   HwcNoiseToTensor(NOISE_LOW, NOISE_HIGH)]),
        T.Compose([CvResize(size), CvToFloat01(), HwcToTensor()]))


TOOLCHAINS: dict[str, Callable[[int], Toolchain]] = {
    "plain": _plain,
    "cv2": _cv2,
}

#: Chosen by ``python -m benchmarks`` (RESULTS.md, "Transform toolchains, workers, loaders").
DEFAULT_TOOLCHAIN = "cv2"


class Gain(torch.nn.Module):
    """Multiply a tensor by a constant (evaluation-time match of the training noise's mean)."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        if not gain > 0:
            raise ValueError(f"gain must be > 0, got {gain}")
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain

    def extra_repr(self) -> str:
        return f"gain={self.gain}"


#: E[U(1.2, 1.5)]: training images are on average this much brighter than evaluation images.
NOISE_MEAN = (NOISE_LOW + NOISE_HIGH) / 2


def check_eval_gain(eval_gain: float) -> None:
    if not eval_gain > 0:
        raise ValueError(f"eval_gain must be > 0, got {eval_gain}")


def get_toolchain(name: str = DEFAULT_TOOLCHAIN, eval_gain: float = 1.0, size: int = SIZE) -> Toolchain:
    """The named toolchain at ``size`` x ``size``, its evaluation transform followed by ``Gain(eval_gain)``
    when ``eval_gain != 1``.

    The brief's evaluation transform is resize and /255 only, but its training noise multiplies
    every value by its own U[1.2, 1.5] draw, so a network sees brighter images in training than
    in evaluation; ``eval_gain=NOISE_MEAN`` removes the brightness shift.  The default recipe
    evaluates with it (RESULTS.md, "Choosing the default recipe"); this function's default, 1.0,
    is the plain steps 1 and 2.
    """
    if name not in TOOLCHAINS:
        raise ValueError(f"unknown toolchain {name!r}; choose one of {sorted(TOOLCHAINS)}")
    check_eval_gain(eval_gain)
    chain = TOOLCHAINS[name](size)
    if eval_gain == 1.0:
        return chain
    return dataclasses.replace(chain, eval=T.Compose([*chain.eval.transforms, Gain(eval_gain)]))
