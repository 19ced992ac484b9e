"""The training transform: every toolchain (the library's and those the benchmark compares with them),
each random step checked statistically."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from benchmarks.toolchains import PARITY_MEAN_TOL, PARITY_P99_TOL, TOOLCHAINS, TensorRandomRotate, get_chain, parity
from pipelines import imageio, transforms
from pipelines.transforms import CvRandomFlip, CvRandomRotate, HwcNoiseToTensor, MultiplicativeNoise, get_toolchain

from .helpers import FULLRES, SMALL_224, real_files

CHAINS = sorted(TOOLCHAINS)


def asymmetric_image(h: int = 224, w: int = 224) -> np.ndarray:
    """uint8 H x W x 3 with a bright block in the top-left quarter only."""
    arr = np.full((h, w, 3), 40, np.uint8)
    arr[: h // 3, : w // 4] = 220
    return arr


@pytest.mark.data
@pytest.mark.parametrize("name", CHAINS)
def test_chain_shapes_dtype_range_and_seed(name):
    chain = get_chain(name)
    path = real_files(FULLRES, n=1)[0]
    torch.manual_seed(0)
    a = chain.train(chain.loader(path))
    torch.manual_seed(0)
    b = chain.train(chain.loader(path))
    torch.manual_seed(1)
    c = chain.train(chain.loader(path))
    assert a.shape == (3, 224, 224) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.5
    assert torch.equal(a, b) and not torch.equal(a, c)
    e = chain.eval(chain.loader(path))
    assert e.shape == (3, 224, 224) and e.dtype == torch.float32 and e.is_contiguous()
    assert 0.0 <= float(e.min()) and float(e.max()) <= 1.0 and float(e.max()) > 0.5


@pytest.mark.data
@pytest.mark.parametrize("name", ["pil_draft", "cv2"])
def test_downscaling_decoders_match_plain_resize(name):
    """The decoder tricks are only allowed within the benchmark's stated tolerance."""
    mean, p99 = parity(name, real_files(FULLRES, n=16, step=10))
    assert mean <= PARITY_MEAN_TOL and p99 <= PARITY_P99_TOL, (mean * 255, p99 * 255)


@pytest.mark.data
def test_224_files_decode_the_same_in_every_chain():
    for path in real_files(SMALL_224 / "train", n=5, step=500):
        ref = get_toolchain("plain").eval(get_toolchain("plain").loader(path))
        for name in CHAINS:
            chain = get_chain(name)
            assert torch.allclose(chain.eval(chain.loader(path)), ref, atol=2 / 255), name


@pytest.mark.data
def test_grayscale_shared_plane_is_exact():
    """Working on one plane of a grayscale image gives what the 3-channel path gives."""
    chain = get_toolchain("cv2")
    path = next(p for p in real_files(FULLRES) if np.asarray(imageio.load_cv2_reduced(p)).strides[2] == 0)
    shared = imageio.load_cv2_reduced(path)
    full = np.ascontiguousarray(shared)
    for seed in range(3):
        torch.manual_seed(seed)
        a = chain.train(shared)
        torch.manual_seed(seed)
        b = chain.train(full)
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.data
def test_rgb_jpeg_of_gray_content_becomes_one_plane_and_colour_stays_three(tmp_path):
    import cv2

    path = real_files(SMALL_224 / "train", n=1)[0]  # an RGB JPEG whose channels decode equal
    shared = imageio.load_cv2_reduced(path)
    assert imageio.shared_channels(shared)
    assert np.array_equal(shared, cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
    colour = np.zeros((40, 40, 3), np.uint8)
    colour[..., 2] = 200  # red in OpenCV's BGR
    cv2.imwrite(str(tmp_path / "red.jpeg"), colour)
    rgb = imageio.load_cv2_reduced(tmp_path / "red.jpeg")
    assert not imageio.shared_channels(rgb) and rgb[..., 0].mean() > 150 > rgb[..., 2].mean()
    assert imageio.equal_channels(np.zeros((3, 3, 3), np.uint8)) and not imageio.equal_channels(rgb)


def test_flip_rate_is_one_half():
    torch.manual_seed(0)
    img = asymmetric_image()
    flips = sum(CvRandomFlip()(img)[0, 0, 0] != 220 for _ in range(2000))
    # Binomial(2000, 0.5): sd 22; 5 sd = 0.056
    assert abs(flips / 2000 - 0.5) < 0.056


def test_angle_draws_are_uniform_in_range():
    torch.manual_seed(0)
    angles = np.array([transforms.draw_angle() for _ in range(20000)])
    assert angles.min() >= -20 and angles.max() <= 20
    assert angles.min() < -19.9 and angles.max() > 19.9
    hist, _ = np.histogram(angles, bins=8, range=(-20, 20))
    assert np.all(np.abs(hist / 2500 - 1) < 0.1)  # each bin within 10 % of 2500 (sd ~2 %)
    assert abs(angles.std() - 40 / np.sqrt(12)) < 0.2


def test_rotation_keeps_size_fills_zero_and_turns_counter_clockwise():
    img = asymmetric_image().astype(np.float32) / 255
    torch.manual_seed(3)
    angle = transforms.draw_angle()
    torch.manual_seed(3)
    out = CvRandomRotate()(img)
    assert out.shape == img.shape
    assert abs(angle) > 5
    corners = out[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert np.all(corners == 0)
    # Same angle through torchvision's rotate (the reference convention): the same picture.
    ref = F.rotate(torch.from_numpy(img.transpose(2, 0, 1).copy()), angle,
                   interpolation=InterpolationMode.BILINEAR)
    diff = np.abs(out.transpose(2, 0, 1) - ref.numpy())
    assert diff.mean() < 0.01
    torch.manual_seed(3)
    mirrored = F.rotate(torch.from_numpy(img.transpose(2, 0, 1).copy()), -angle,
                        interpolation=InterpolationMode.BILINEAR)
    assert np.abs(out.transpose(2, 0, 1) - mirrored.numpy()).mean() > 5 * diff.mean()
    torch.manual_seed(3)
    tv = TensorRandomRotate()(torch.from_numpy(img.transpose(2, 0, 1).copy()))
    assert (tv.numpy() - ref.numpy()).__abs__().max() < 1e-5


@pytest.mark.parametrize("step", ["torch", "numpy", "numpy_rgb"])
def test_noise_is_per_value_inside_bounds(step):
    torch.manual_seed(0)
    value = 0.5
    if step == "torch":
        out = MultiplicativeNoise()(torch.full((3, 224, 224), value))
    elif step == "numpy":  # one plane seen three times
        out = HwcNoiseToTensor()(imageio.gray_as_rgb(np.full((224, 224), value, np.float32)))
    else:
        out = HwcNoiseToTensor()(np.full((224, 224, 3), value, np.float32))
    ratio = out.numpy() / value
    assert out.shape == (3, 224, 224)
    assert ratio.min() >= 1.2 - 1e-6 and ratio.max() <= 1.5 + 1e-6
    assert abs(ratio.mean() - 1.35) < 0.002  # sd of the mean of 150k U(1.2,1.5) is 2e-4
    assert abs(ratio.std() - 0.3 / np.sqrt(12)) < 0.002
    assert not np.allclose(ratio[0], ratio[1])  # each channel its own draw
    assert len(np.unique(ratio)) > 100_000  # each value its own draw


def test_noise_rejects_bad_bounds():
    with pytest.raises(ValueError):
        MultiplicativeNoise(1.5, 1.2)


def test_unknown_toolchain():
    with pytest.raises(ValueError, match="nope"):
        get_toolchain("nope")
    with pytest.raises(ValueError, match="skimage"):  # the library keeps only what training uses
        get_toolchain("skimage")
    assert set(transforms.TOOLCHAINS) == {"plain", "cv2"} < set(TOOLCHAINS)


@pytest.mark.data
def test_eval_gain_scales_only_the_evaluation_transform():
    path = real_files(FULLRES, n=1)[0]
    plain, gained = get_toolchain("cv2"), get_toolchain("cv2", eval_gain=transforms.NOISE_MEAN)
    x = plain.eval(plain.loader(path))
    assert torch.allclose(gained.eval(gained.loader(path)), x * 1.35, atol=1e-6)
    torch.manual_seed(0)
    a = plain.train(plain.loader(path))
    torch.manual_seed(0)
    assert torch.equal(gained.train(gained.loader(path)), a)
    with pytest.raises(ValueError):
        get_toolchain(eval_gain=0)
