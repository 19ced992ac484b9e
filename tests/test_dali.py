"""Tests of the DALI loader (pipelines/dali.py) on DALI's CPU back end, plus GPU checks.

Statistical tests run on seeded pipelines, so they are deterministic; their tolerances are
still set for the stated sample sizes (about 3.5 standard deviations).
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

import torchvision.transforms.functional as TF  # noqa: E402
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from torch.utils.data import SubsetRandomSampler  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402

import pipelines.dali as dali  # noqa: E402
from pipelines import transforms  # noqa: E402
from pipelines.dali import DaliLoader, ImageDecodeError, rotate_ccw  # noqa: E402
from pipelines.decoded_cache import DecodedCache  # noqa: E402

from .helpers import FULLRES, SMALL_224 as SMALL  # noqa: E402


SIZE = 224
N_INDEX_FILES = 37
GPU_SPIN_CYCLES = 20_000_000  # torch.cuda._sleep: about 10 ms of one GPU thread spinning


def requires_cuda(test):
    """Mark a test ``gpu`` and skip it where CUDA is absent (one decorator for both)."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


def index_value(i: int) -> int:
    """Grey level of the synthetic file i, so an image says which file it came from."""
    return 20 + 5 * i


def write_jpeg(path: Path, pixels: np.ndarray) -> str:
    """A JPEG of an H x W x 3 (RGB) or H x W (grayscale, one component) uint8 array."""
    Image.fromarray(pixels).save(path, quality=95)
    return str(path)


def bar_image() -> np.ndarray:
    """A bright horizontal bar left of the centre: its side shows a flip, its slope the angle."""
    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
    pixels[106:119, 12:100] = 255
    return pixels


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny folder of synthetic JPEGs: constant files numbered by grey level (not square,
    so resizing changes the aspect ratio), a bar image, white RGB and grayscale images and
    corrupt files."""
    root = tmp_path_factory.mktemp("jpegs")
    index_files = [
        write_jpeg(root / f"index_{i:02d}.jpeg", np.full((48, 64, 3), index_value(i), np.uint8))
        for i in range(N_INDEX_FILES)
    ]
    good_bytes = Path(index_files[0]).read_bytes()
    corrupt = {
        "truncated": good_bytes[: len(good_bytes) // 2],
        "text": b"this is not a JPEG file\n" * 20,
        "empty": b"",
    }
    for name, data in corrupt.items():
        (root / f"{name}.jpeg").write_bytes(data)
    return {
        "index": index_files,
        "bar": write_jpeg(root / "bar.jpeg", bar_image()),
        "white": write_jpeg(root / "white.jpeg", np.full((SIZE, SIZE, 3), 200, np.uint8)),
        "white_gray": write_jpeg(root / "white_gray.jpeg", np.full((SIZE, SIZE), 200, np.uint8)),
        "corrupt": {name: str(root / f"{name}.jpeg") for name in corrupt},
    }


class RecordingSampler:
    """Re-iterable sampler: a fresh random order each epoch, remembered for the checks."""

    def __init__(self, indices: list[int], seed: int) -> None:
        self._sampler = SubsetRandomSampler(indices, generator=torch.Generator().manual_seed(seed))
        self.epochs: list[list[int]] = []

    def __iter__(self):
        order = [int(i) for i in self._sampler]
        self.epochs.append(order)
        return iter(order)

    def __len__(self) -> int:
        return len(self._sampler)


def collect(loader: DaliLoader) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One epoch: all images, all labels and the batch sizes."""
    batches = list(loader)
    sizes = [len(labels) for _, labels in batches]
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), sizes


def index_loader(files: list[str], sampler, **kwargs) -> DaliLoader:
    return DaliLoader(files, list(range(len(files))), sampler, **kwargs)


def pil_reference(path: str) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)


def bar_geometry(image: torch.Tensor) -> tuple[bool, float]:
    """(flipped, angle in degrees, counter-clockwise positive) of the bar in a CHW image,
    from the centroid and the principal axis of its bright pixels. In numpy: torch's thread
    pool makes these many small steps ten times slower when the cores are busy."""
    ys, xs = np.nonzero(image.numpy().mean(0) > 0.5)
    x = xs - xs.mean()
    y = -(ys - ys.mean())  # y up, so positive angles turn counter-clockwise
    angle = 0.5 * math.atan2(2 * float((x * y).sum()), float((x * x).sum() - (y * y).sum()))
    return bool(xs.mean() > SIZE / 2), math.degrees(angle)


# ----- shapes, values, order -------------------------------------------------------------


@pytest.mark.parametrize("augment", [False, True])
def test_partial_last_batch_shapes_and_range(images, augment):
    loader = index_loader(images["index"], range(N_INDEX_FILES), batch_size=16, augment=augment)
    batches = list(loader)
    assert len(loader) == 3
    assert [len(y) for _, y in batches] == [16, 16, 5]
    for x, y in batches:
        assert x.shape == (len(y), 3, SIZE, SIZE)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.device.type == "cpu" and y.device.type == "cpu"
        assert x.min() >= 0.0
        assert x.max() <= (1.5 if augment else 1.0) + 1e-6


def test_eval_delivers_images_and_labels_in_sampler_order_with_duplicates(images):
    order = [5, 3, 3, 36, 0, 5, 5, 12, 20, 1, 36, 7, 7, 30, 2, 9, 9, 9, 4]
    loader = index_loader(images["index"], order, batch_size=8, augment=False)
    x, y, sizes = collect(loader)
    assert sizes == [8, 8, 3]
    assert y.tolist() == order
    grey = (x.mean(dim=(1, 2, 3)) * 255).round()
    assert grey.tolist() == [index_value(i) for i in order]


def test_random_sampler_each_epoch_delivered_in_its_order(images):
    sampler = RecordingSampler(list(range(N_INDEX_FILES)), seed=1)
    loader = index_loader(images["index"], sampler, batch_size=16, augment=True)
    delivered = [collect(loader)[1].tolist() for _ in range(2)]
    assert delivered == sampler.epochs
    assert delivered[0] != delivered[1]
    assert sorted(delivered[0]) == list(range(N_INDEX_FILES))


def test_break_mid_epoch_then_full_epoch(images):
    loader = index_loader(images["index"], range(N_INDEX_FILES), batch_size=16, augment=True)
    for _ in loader:
        break
    _, y, sizes = collect(loader)
    assert sizes == [16, 16, 5]
    assert y.tolist() == list(range(N_INDEX_FILES))


@pytest.mark.parametrize("augment", [False, True])
def test_eval_gain_scales_evaluation_images_only(images, augment):
    def epoch(gain: float) -> torch.Tensor:
        loader = index_loader(images["index"][:5], range(5), augment=augment, seed=1,
                              eval_gain=gain)
        return collect(loader)[0]

    plain, gained = epoch(1.0), epoch(1.35)
    if augment:
        assert torch.equal(gained, plain)
    else:
        assert torch.allclose(gained, plain * 1.35, rtol=1e-6, atol=0)
        assert not torch.equal(gained, plain)
    with pytest.raises(ValueError, match="eval_gain"):
        epoch(0.0)


def test_mismatched_labels_rejected(images):
    with pytest.raises(ValueError, match="labels"):
        DaliLoader(images["index"], [0], range(1), augment=False)


# ----- seeds -----------------------------------------------------------------------------


def test_seed_gives_same_batches_and_each_epoch_new_draws(images):
    def two_epochs(seed: int) -> list[torch.Tensor]:
        loader = index_loader(
            images["index"], range(N_INDEX_FILES), batch_size=16, augment=True, seed=seed
        )
        return [collect(loader)[0] for _ in range(2)]

    first, again, other = two_epochs(3), two_epochs(3), two_epochs(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])


def feed_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("dali-feed")]


def test_files_are_read_ahead_by_a_thread_of_their_own_and_the_batches_do_not_change(images, monkeypatch):
    """The feeding thread reads (and on the CPU draws the noise) for the training loop: same batches,
    noise included, as feeding in the calling thread; it ends with the epoch, also after a break."""
    readers = set()
    real = dali.read_encoded

    def recording(path):
        readers.add(threading.current_thread().name.split("_")[0])
        return real(path)

    monkeypatch.setattr(dali, "read_encoded", recording)

    def epochs(read_ahead: int) -> list[torch.Tensor]:
        loader = index_loader(images["index"], range(N_INDEX_FILES), batch_size=16, augment=True, seed=5,
                              read_ahead=read_ahead)
        return [collect(loader)[0] for _ in range(2)]

    inline = epochs(0)
    assert readers == {threading.current_thread().name.split("_")[0]}
    readers.clear()
    ahead = epochs(2)
    assert readers == {"dali-feed"}
    assert all(torch.equal(a, b) for a, b in zip(inline, ahead))
    assert feed_threads() == []
    loader = index_loader(images["index"], range(N_INDEX_FILES), batch_size=4, augment=False)
    for _ in loader:
        assert feed_threads() == ["dali-feed_0"]
        break
    assert feed_threads() == []
    assert collect(loader)[1].tolist() == list(range(N_INDEX_FILES))  # the next epoch is whole


def test_the_epoch_after_a_break_does_not_depend_on_the_threads_timing(images, monkeypatch):
    """An epoch ended early: the next one (its CPU noise drawn after the feeds made ahead) is the same
    whether the caller broke at once, with feeds still waiting for the thread (each file read takes 10 ms
    here), or after the feeding thread had long caught up."""
    real = dali.read_encoded

    def slow(path):
        time.sleep(0.01)
        return real(path)

    monkeypatch.setattr(dali, "read_encoded", slow)

    def after_break(pause: float) -> torch.Tensor:
        loader = index_loader(images["index"], range(N_INDEX_FILES), batch_size=4, augment=True, seed=2)
        for _ in loader:
            time.sleep(pause)
            break
        return collect(loader)[0]

    assert torch.equal(after_break(0.0), after_break(0.5))


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_a_read_error_reaches_the_caller_at_the_same_batch_fed_ahead_or_not(images, tmp_path, read_ahead):
    files = list(images["index"])
    files[20] = str(tmp_path / "gone.jpeg")
    loader = index_loader(files, range(N_INDEX_FILES), batch_size=4, augment=False, read_ahead=read_ahead)
    delivered = []
    with pytest.raises(FileNotFoundError, match="gone.jpeg"):
        for _, y in loader:
            delivered += y.tolist()
    # DALI asks for batch 5 (files 20-23) while batch 3 is with the caller, either way
    assert delivered == list(range(12))
    assert feed_threads() == []


# ----- augmentation ----------------------------------------------------------------------


def test_rotate_positive_angle_is_counter_clockwise_like_torchvision():
    """DALI's rotation, as the loader calls it, against torchvision's bilinear F.rotate."""
    pixels = np.zeros((SIZE, SIZE, 3), np.float32)
    pixels[20:60, 150:200] = 1.0  # top-right block
    pixels[100:120, 10:40, 0] = 0.5  # red block on the left

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def rotation(angle: float):
        source = fn.external_source(
            source=lambda: [pixels], batch=True, dtype=types.FLOAT, ndim=3, layout="HWC"
        )
        return rotate_ccw(source, angle)

    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    for angle in (15.0, -7.0):
        pipe = rotation(angle)
        (out,) = pipe.run()
        dali = torch.from_numpy(np.array(out[0])).permute(2, 0, 1)
        same = TF.rotate(chw, angle, interpolation=InterpolationMode.BILINEAR)
        opposite = TF.rotate(chw, -angle, interpolation=InterpolationMode.BILINEAR)
        assert dali.shape == chw.shape
        assert (dali - same).abs().max() < 1e-2
        assert (dali - opposite).abs().max() > 0.5


@pytest.mark.parametrize("cached", [False, True])
def test_flip_rate_and_angle_spread(images, cached):
    """256 draws of the bar image: flips per sample with rate 1/2 (Binomial sd 8, tolerance
    +-26), angles uniform in [-20, 20] (four 10-degree bins expecting 64, sd 6.9, each
    within [40, 88]; the extremes reached within 2 degrees); also from a decoded cache."""
    n = 256
    cache = DecodedCache([images["bar"]]) if cached else None
    loader = DaliLoader(
        [images["bar"]], [1], [0] * n, batch_size=32, augment=True, seed=7, cache=cache
    )
    x, y, _ = collect(loader)
    assert y.tolist() == [1] * n
    geometry = [bar_geometry(image) for image in x]
    flips = torch.tensor([flipped for flipped, _ in geometry])
    angles = np.array([angle for _, angle in geometry])
    assert abs(int(flips.sum()) - n / 2) <= 26
    for batch in flips.view(-1, 32):
        assert 0 < int(batch.sum()) < 32  # per sample, not per batch
    assert np.abs(angles).max() <= 20.5
    assert angles.min() < -18 and angles.max() > 18
    counts, _ = np.histogram(angles, bins=[-21, -10, 0, 10, 21])
    assert counts.min() >= 40 and counts.max() <= 88, counts
    assert abs(angles.mean()) < 2.5


@pytest.fixture
def one_torch_thread():
    """torch on one thread for a test of many small per-image steps (on busy cores its pool makes
    torchvision's chain twenty times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_both_back_ends_take_the_augmentation_parameters_from_pipelines_transforms(images, monkeypatch,
                                                                                   one_torch_thread):
    """One definition of the training transform's parameters, in pipelines.transforms: changed there
    (always flip, angles within 5 degrees, the noise a constant 1.25), the DALI graph and both
    torchvision chains follow, so neither keeps a copy of its own."""
    monkeypatch.setattr(transforms, "FLIP_P", 1.0)
    monkeypatch.setattr(transforms, "MAX_ANGLE", 5.0)
    monkeypatch.setattr(transforms, "NOISE_LOW", 1.25)
    monkeypatch.setattr(transforms, "NOISE_HIGH", 1.25)
    n = 32
    dali_batch = collect(DaliLoader([images["bar"]], [0], [0] * n, batch_size=16, augment=True, seed=3))[0]
    torch.manual_seed(3)
    chains = {name: transforms.get_toolchain(name) for name in ("cv2", "plain")}
    batches = {"DALI": dali_batch} | {
        name: torch.stack([chain.train(chain.loader(images["bar"])) for _ in range(n)]) for name, chain in chains.items()}
    for name, x in batches.items():
        geometry = [bar_geometry(image / 1.25) for image in x]
        assert all(flipped for flipped, _ in geometry), name
        angles = np.array([angle for _, angle in geometry])
        assert np.abs(angles).max() <= 5.5 and angles.std() > 1.0, (name, angles)
        assert abs(float(x.max()) - 1.25) < 0.01, name  # the bar's 255, times the one noise value
        bar = x[:, 0] > 0.9
        assert torch.allclose(x[:, 0][bar], x[:, 1][bar]) and torch.allclose(x[:, 1][bar], x[:, 2][bar]), name


@pytest.mark.parametrize(
    "kind, cached", [("white", False), ("white_gray", False), ("white_gray", True)]
)
def test_noise_per_value_in_range_and_rotation_fills_corners_with_zero(images, kind, cached):
    """Constant image v: inside the circle that every rotation keeps, out / v is the noise
    (uniform in [1.2, 1.5]: mean 1.35, sd 0.087, over ~1.5M values), independent across
    channels also for a grayscale file (processed as one plane until the noise), and from
    a decoded cache; the corners, outside the picture after any rotation of more than
    about 1 degree, are 0."""
    white = images[kind]
    (v,) = collect(DaliLoader([white], [0], [0], augment=False))[0].unique().tolist()
    cache = DecodedCache([white]) if cached else None
    x, _, _ = collect(
        DaliLoader([white], [0], [0] * 32, batch_size=16, augment=True, seed=2, cache=cache)
    )
    assert x.shape == (32, 3, SIZE, SIZE)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    inside = (yy - (SIZE - 1) / 2) ** 2 + (xx - (SIZE - 1) / 2) ** 2 < 100**2
    ratio = x[:, :, inside] / v
    assert ratio.min() >= 1.2 - 1e-4 and ratio.max() <= 1.5 + 1e-4
    assert abs(ratio.mean().item() - 1.35) < 0.005
    assert abs(ratio.std().item() - 0.3 / math.sqrt(12)) < 0.005
    assert (ratio[:, 0] != ratio[:, 1]).float().mean() > 0.99
    assert (ratio[:, 1] != ratio[:, 2]).float().mean() > 0.99
    corners = x[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 0).all(dim=(1, 2)).float().mean() >= 0.75


# ----- real files ------------------------------------------------------------------------


def real_files() -> list[str]:
    """Fullres grayscale baseline and progressive files, RGB files, and 224 files."""
    fullres = [
        FULLRES / "NORMAL" / "IM-0117-0001.jpeg",
        FULLRES / "PNEUMONIA" / "person1216_virus_2062.jpeg",  # progressive
        FULLRES / "PNEUMONIA" / "person441_virus_897.jpeg",  # RGB
        FULLRES / "PNEUMONIA" / "person1668_bacteria_4421.jpeg",  # RGB
    ]
    small = sorted((SMALL / "train" / "NORMAL").glob("*.jpeg"))[:2]
    small += sorted((SMALL / "test" / "PNEUMONIA").glob("*.jpeg"))[:2]
    return [str(p) for p in fullres + small]


@pytest.mark.data
def test_real_files_eval_close_to_pil_and_grayscale_gives_equal_channels():
    """Decoding matches PIL exactly on these files; the difference is the resize (DALI's
    antialiased linear vs PIL's BILINEAR): identity on 224 files, mean < 0.002 on fullres."""
    files = real_files()
    x, _, sizes = collect(DaliLoader(files, [0] * len(files), range(len(files)), augment=False))
    assert sizes == [len(files)] and x.shape == (len(files), 3, SIZE, SIZE)
    assert x.min() >= 0 and x.max() <= 1
    for image, path in zip(x, files):
        difference = (image - pil_reference(path)).abs()
        if "chest_xray_224" in path:
            assert difference.max() < 1.5 / 255, path
        else:
            assert difference.mean() < 0.002, path
        if Image.open(path).mode == "L":
            assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]), path


@pytest.mark.data
def test_real_files_train_range():
    files = real_files()
    x, _, _ = collect(DaliLoader(files, [0] * len(files), range(len(files)), augment=True))
    assert x.shape == (len(files), 3, SIZE, SIZE)
    assert x.min() >= 0 and x.max() <= 1.5 + 1e-6
    assert x.max() > 1.0  # the noise multiplies by at least 1.2


@pytest.mark.data
@pytest.mark.parametrize("augment", [False, True])
def test_grayscale_files_as_one_plane_give_the_rgb_decodes_output_exactly(monkeypatch, augment):
    """Grayscale files go through decode, resize, flip and rotation as one plane; decoding
    them to RGB instead (every file's gray flag cleared) must give the same batches bit for
    bit, with the same seed (the random draws do not depend on the flags)."""
    files = real_files()
    order = list(range(len(files))) * 2

    def epoch() -> torch.Tensor:
        loader = DaliLoader(files, [0] * len(files), order, batch_size=5, augment=augment, seed=4)
        return collect(loader)[0]

    one_plane = epoch()
    monkeypatch.setattr(dali, "is_gray_jpeg", lambda encoded: np.array(False))
    assert torch.equal(epoch(), one_plane)


def test_gray_flag_set_only_for_one_component_jpegs(images):
    """White RGB and grayscale files, plus files whose header cannot be read (text, empty)
    or is RGB (truncated): only the grayscale JPEG is decoded as one plane."""
    def flag(path: str) -> bool:
        return bool(dali.is_gray_jpeg(dali.read_encoded(path)))

    assert flag(images["white_gray"])
    assert not any(flag(p) for p in [images["white"], *images["corrupt"].values()])


# ----- bad input -------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["truncated", "text", "empty"])
@pytest.mark.parametrize("position", [0, 20, 36])
def test_corrupt_file_raises_error_naming_it(images, kind, position):
    files = list(images["index"])
    bad = images["corrupt"][kind]
    files[position] = bad
    loader = index_loader(files, range(N_INDEX_FILES), batch_size=16, augment=True)
    for _ in range(2):  # the failed pipeline is replaced, and fails again the same way
        with pytest.raises(ImageDecodeError) as caught:
            collect(loader)
        assert caught.value.path == bad
        assert bad in str(caught.value)
        assert isinstance(caught.value, ValueError)


@pytest.mark.timeout(60)
def test_missing_file_raises_file_not_found_naming_it(images, tmp_path):
    files = list(images["index"])
    files[30] = str(tmp_path / "missing.jpeg")
    loader = index_loader(files, range(N_INDEX_FILES), batch_size=16, augment=False)
    with pytest.raises(FileNotFoundError, match="missing.jpeg"):
        collect(loader)


# ----- hand-off to torch ------------------------------------------------------------------


def span(address: int, nbytes: int) -> range:
    return range(address, address + nbytes)


def overlap(a: range, b: range) -> bool:
    return a.start < b.stop and b.start < a.stop


def test_a_batch_held_while_the_loader_delivers_more_is_unchanged_and_owned_by_torch(images, monkeypatch):
    """The loader hands torch a copy, not DALI's buffer (whose release DALI does not order after torch's
    reads): a batch kept while the loader delivers 9 more stays as it was, and no batch overlaps the DALI
    output it came from (its address read while that output is alive)."""
    loader = index_loader(images["index"], range(N_INDEX_FILES), batch_size=4, augment=True, seed=1)
    dali_outputs = []
    epoch = loader._fed.epoch

    def recording(batches):
        for outputs in epoch(batches):
            dali_outputs.append(span(outputs[0].data_ptr(), 4 * math.prod(outputs[0].as_tensor().shape())))
            yield outputs

    monkeypatch.setattr(loader._fed, "epoch", recording)
    delivered = iter(loader)
    held, _ = next(delivered)
    kept = held.clone()
    owned = [span(held.untyped_storage().data_ptr(), held.untyped_storage().nbytes())]
    owned += [span(x.untyped_storage().data_ptr(), x.untyped_storage().nbytes()) for x, _ in delivered]
    assert len(owned) == len(dali_outputs) == 10
    assert torch.equal(held, kept)
    assert not any(overlap(mine, theirs) for mine, theirs in zip(owned, dali_outputs))


# ----- GPU -------------------------------------------------------------------------------


def traced_gpu_graph(cached: bool, augment: bool) -> tuple[list, object]:
    """The loader's GPU graph, traced in Python without a GPU: the ops (name, device, inputs'
    devices, arguments given) and the output node. Building it would need CUDA; tracing it does not.
    ``Pipeline._build_graph`` is DALI 2.4's private step between the definition and the
    backend (pinned version; if DALI renames it this test fails, it does not skip)."""
    feeds = [dali.DECODED] if cached else [dali.ENCODED, dali.GRAY_FLAG]
    pipe = dali.fed_pipeline(
        dali._EpochSource(lambda indices: ()), feeds,
        lambda fed: dali.loader_graph(fed, cached=cached, augment=augment, device="gpu", size=SIZE),
        batch_size=4, num_threads=1, device_id=0, seed=0,
    )
    pipe._build_graph()
    ops = [(getattr(op._op, "schema_name", type(op._op).__name__), op._op.device, [i.device for i in op.inputs],
            op._op._init_args) for op in pipe._ops]
    return ops, pipe._graph_out[0]


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("augment", [False, True])
def test_gpu_graph_traces_here_and_puts_the_pixel_work_on_the_gpu(cached, augment):
    """The GPU graph cannot run in CI, but its Python side (conditional split/merge around the
    mixed decoders, GPU noise, cache fed through .gpu()) is traced here, and each op must exist
    in DALI's registry for the device it was placed on."""
    from nvidia.dali.ops import _registry

    registered = {"cpu": set(_registry.cpu_ops()), "gpu": set(_registry.gpu_ops()),
                  "mixed": set(_registry.mixed_ops())}
    ops, output = traced_gpu_graph(cached, augment)
    assert output.device == "gpu"
    for name, device, *_ in ops:
        assert name in registered[device] or f"_{name}" in registered[device], (name, device)
    devices = {name: device for name, device, *_ in ops}
    if cached:
        assert "decoders__Image" not in devices
    else:
        decoders = [(d, args.get("jpeg_fancy_upsampling")) for n, d, _, args in ops if n == "decoders__Image"]
        assert decoders == [("mixed", True), ("mixed", True)]  # gray, RGB; chroma upsampled as on the CPU
        assert devices["_conditional__Merge"] == "gpu" and devices["Resize"] == "gpu"
    expected_gpu = {"Transpose"} | ({"Flip", "Rotate", "random__Uniform"} if augment else set())
    assert all(devices[name] == "gpu" for name in expected_gpu), devices
    arithmetic = [(d, inputs) for n, d, inputs, _ in ops if n == "_ArithmeticGenericOp"]
    assert arithmetic and all(d == "gpu" and set(inputs) == {"gpu"} for d, inputs in arithmetic), arithmetic
    if not augment:
        assert "random__Uniform" not in devices
    if augment:  # the random arguments of flip and rotate stay on the CPU, as DALI requires
        assert devices["random__CoinFlip"] == "cpu"
        assert sorted(d for n, d, *_ in ops if n == "random__Uniform") == ["cpu", "gpu"]  # angle, noise


@requires_cuda
@pytest.mark.parametrize("augment", [False, True])
def test_gpu_outputs_on_device_with_partial_batch(images, augment):
    loader = index_loader(
        images["index"], range(N_INDEX_FILES), batch_size=16, augment=augment, device_id=0
    )
    batches = list(loader)
    assert [len(y) for _, y in batches] == [16, 16, 5]
    cpu = list(index_loader(images["index"], range(N_INDEX_FILES), batch_size=16, augment=augment))
    for (x, y), (_, y_cpu) in zip(batches, cpu):
        assert x.device == torch.device("cuda", 0) and y.device == torch.device("cuda", 0)
        assert torch.equal(y.cpu(), y_cpu)  # labels copied without waiting still arrive right
        assert x.shape == (len(y), 3, SIZE, SIZE) and x.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= (1.5 if augment else 1.0) + 1e-6


@pytest.mark.data
@requires_cuda
def test_gpu_eval_close_to_cpu_eval():
    files = real_files()
    cpu = collect(DaliLoader(files, [0] * len(files), range(len(files)), augment=False))[0]
    gpu = collect(
        DaliLoader(files, [0] * len(files), range(len(files)), augment=False, device_id=0)
    )[0]
    assert (gpu.cpu() - cpu).abs().mean() < 0.005


@requires_cuda
def test_gpu_batches_dropped_before_the_gpu_reads_them_keep_their_images(images):
    """As in training between two loss reads: each batch is read by a kernel queued behind a GPU spin and
    dropped by the host at once, which runs ahead. The GPU still reads each batch's own images (one grey
    level of decoder difference allowed; files are 5 apart): DALI writes no later batch into memory that
    a queued kernel has yet to read."""
    loader = index_loader(images["index"], range(N_INDEX_FILES), batch_size=4, augment=False, device_id=0)
    means = []
    for x, _ in loader:
        torch.cuda._sleep(GPU_SPIN_CYCLES)
        means.append(x.mean(dim=(1, 2, 3)))
    grey = (torch.cat(means) * 255).round().cpu()
    assert grey.shape == (N_INDEX_FILES,)
    assert (grey - torch.tensor([index_value(i) for i in range(N_INDEX_FILES)])).abs().max() <= 1
