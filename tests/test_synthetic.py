"""Tests of the synthetic chest-X-ray set: layout, determinism, image variety, bad files,
class separability (also after the training augmentation) and the CLI."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.synthetic import BAD_FILE_NAMES, CLASSES, SPLITS, main, make_synthetic_dataset

SIDE = 224
SMALL = {"n_train": (3, 4), "n_test": (2, 2)}


@pytest.fixture(scope="module")
def default_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default set (24/48 train, 12/20 test), generated once for the module."""
    root = tmp_path_factory.mktemp("synthetic") / "chest_xray"
    assert make_synthetic_dataset(root) == root
    return root


@pytest.fixture(scope="module")
def resized(default_root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split: (float32 N x 224 x 224 grayscale, int labels), as the loaders resize."""
    return {split: _load_resized(default_root / split) for split in SPLITS}


def _load_resized(split_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for label, class_name in enumerate(CLASSES):
        for path in sorted((split_dir / class_name).glob("*.jpeg")):
            gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            images.append(cv2.resize(gray, (SIDE, SIDE), interpolation=cv2.INTER_AREA))
            labels.append(label)
    return np.stack(images).astype(np.float32), np.array(labels)


def _jpegs(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/*.jpeg"))


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts(default_root: Path) -> None:
    expected = {("train", "NORMAL"): 24, ("train", "PNEUMONIA"): 48, ("test", "NORMAL"): 12, ("test", "PNEUMONIA"): 20}
    found = {
        (split, name): len(list((default_root / split / name).iterdir())) for split in SPLITS for name in CLASSES
    }
    assert found == expected
    assert sorted(p.name for p in default_root.iterdir()) == ["test", "train"]
    assert all(p.suffix == ".jpeg" for p in default_root.rglob("*") if p.is_file())


def test_every_image_decodes_fully(default_root: Path) -> None:
    for path in _jpegs(default_root):
        with Image.open(path) as image:
            image.load()
            assert image.format == "JPEG", path


def test_same_seed_gives_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    first = _file_bytes(make_synthetic_dataset(tmp_path / "a", seed=7, **SMALL))
    again = _file_bytes(make_synthetic_dataset(tmp_path / "b", seed=7, **SMALL))
    other = _file_bytes(make_synthetic_dataset(tmp_path / "c", seed=8, **SMALL))
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def test_an_image_does_not_depend_on_the_other_counts(tmp_path: Path) -> None:
    small = _file_bytes(make_synthetic_dataset(tmp_path / "small", seed=3, n_train=(2, 2), n_test=(1, 1)))
    large = _file_bytes(make_synthetic_dataset(tmp_path / "large", seed=3, n_train=(4, 5), n_test=(3, 2)))
    assert small.keys() < large.keys()
    assert all(large[name] == data for name, data in small.items())


def test_sizes_vary_within_bounds_and_are_not_square(default_root: Path) -> None:
    sizes = [Image.open(path).size for path in _jpegs(default_root)]
    assert all(256 <= side <= 640 for size in sizes for side in size)
    assert all(width != height for width, height in sizes)
    assert len(set(sizes)) > 0.9 * len(sizes)
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


def test_custom_size_bounds_are_respected(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "tiny", min_size=64, max_size=80, **SMALL)
    sizes = [Image.open(path).size for path in _jpegs(root)]
    assert all(64 <= side <= 80 for size in sizes for side in size)


def test_grayscale_rgb_and_progressive_jpegs_are_mixed(default_root: Path) -> None:
    infos = [(image.mode, bool(image.info.get("progressive"))) for image in map(Image.open, _jpegs(default_root))]
    modes = [mode for mode, _ in infos]
    assert set(modes) == {"L", "RGB"}
    assert 0.1 <= modes.count("RGB") / len(modes) <= 0.3
    assert 0 < sum(progressive for _, progressive in infos) < len(infos) // 4
    for class_name in CLASSES:
        class_modes = {Image.open(p).mode for p in (default_root / "train" / class_name).glob("*.jpeg")}
        assert class_modes == {"L", "RGB"}, class_name


def test_bad_files_only_when_asked(tmp_path: Path) -> None:
    clean = make_synthetic_dataset(tmp_path / "clean", **SMALL)
    dirty = make_synthetic_dataset(tmp_path / "dirty", bad_files=True, **SMALL)
    for class_name in CLASSES:
        train_names = {p.name for p in (dirty / "train" / class_name).iterdir()}
        assert set(BAD_FILE_NAMES) <= train_names
        assert len(train_names) == SMALL["n_train"][CLASSES.index(class_name)] + len(BAD_FILE_NAMES)
    all_clean = {p.name for p in clean.rglob("*")}
    dirty_test = {p.name for p in (dirty / "test").rglob("*")}
    assert not set(BAD_FILE_NAMES) & (all_clean | dirty_test)
    assert (dirty / "train" / "NORMAL" / "empty.jpeg").stat().st_size == 0


@pytest.mark.parametrize("name", [n for n in BAD_FILE_NAMES if n != "notes.txt"])
def test_bad_files_do_not_decode(tmp_path: Path, name: str) -> None:
    root = make_synthetic_dataset(tmp_path / "dirty", bad_files=True, **SMALL)
    for class_name in CLASSES:
        with pytest.raises(OSError):  # UnidentifiedImageError and truncation are OSErrors
            with Image.open(root / "train" / class_name / name) as image:
                image.load()


def _lung_to_body_brightness(images: np.ndarray) -> np.ndarray:
    """Mean of two boxes over the lung fields divided by the mean over the chest."""
    lungs = np.concatenate([images[:, 80:135, 62:90], images[:, 80:135, 134:162]], axis=2)
    return lungs.mean(axis=(1, 2)) / images[:, 40:200, 50:174].mean(axis=(1, 2))


def _augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flip, rotation by +-20 degrees, per-pixel factor in [1.2, 1.5]."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        if rng.random() < 0.5:
            image = image[:, ::-1]
        rotation = cv2.getRotationMatrix2D((SIDE / 2, SIDE / 2), rng.uniform(-20, 20), 1.0)
        image = cv2.warpAffine(np.ascontiguousarray(image), rotation, (SIDE, SIDE))
        out[i] = np.clip(image * rng.uniform(1.2, 1.5, image.shape), 0, 255)
    return out


@pytest.mark.parametrize("augmented", [False, True], ids=["plain", "augmented"])
def test_lung_brightness_separates_classes_on_held_out_split(resized, augmented: bool) -> None:
    rng = np.random.default_rng(0)
    prepare = (lambda x: _augment(x, rng)) if augmented else (lambda x: x)
    (train_x, train_y), (test_x, test_y) = resized["train"], resized["test"]
    train_stat, test_stat = _lung_to_body_brightness(prepare(train_x)), _lung_to_body_brightness(prepare(test_x))
    threshold = (train_stat[train_y == 0].mean() + train_stat[train_y == 1].mean()) / 2
    accuracy = ((test_stat > threshold) == test_y).mean()
    assert accuracy >= 0.9


def test_logistic_regression_on_16px_separates_classes(resized) -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")

    def features(images: np.ndarray) -> np.ndarray:
        small = [cv2.resize(image, (16, 16), interpolation=cv2.INTER_AREA) for image in images]
        return np.stack(small).reshape(len(images), -1) / 255.0

    (train_x, train_y), (test_x, test_y) = resized["train"], resized["test"]
    model = linear_model.LogisticRegression(max_iter=2000).fit(features(train_x), train_y)
    assert model.score(features(test_x), test_y) >= 0.9


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_train": (-1, 2)},
        {"n_test": (1, 2, 3)},
        {"n_train": (1.5, 2)},
        {"seed": -1},
        {"min_size": 300, "max_size": 300},
        {"min_size": 16, "max_size": 64},
    ],
    ids=["negative-count", "three-counts", "float-count", "negative-seed", "equal-sizes", "tiny-min"],
)
def test_invalid_arguments_raise_value_error_naming_them(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="|".join(kwargs)):
        make_synthetic_dataset(tmp_path / "bad", **kwargs)


def test_refuses_to_write_into_a_non_empty_split(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "set", n_train=(1, 1), n_test=(1, 1))
    with pytest.raises(FileExistsError, match="train"):
        make_synthetic_dataset(root, n_train=(1, 1), n_test=(1, 1))


def test_cli_writes_the_set_and_logs_a_summary(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--seed", "5", "--n-train", "2", "3", "--n-test", "1", "2", "--bad-files"]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert len(_jpegs(out)) == 8 + 2 * sum(name.endswith(".jpeg") for name in BAD_FILE_NAMES)
    assert (out / "train" / "PNEUMONIA" / "notes.txt").is_file()
    summary = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(summary) == 1 and "8 images" in summary[0] and str(out) in summary[0]
    assert _file_bytes(out) == _file_bytes(
        make_synthetic_dataset(tmp_path / "api", seed=5, n_train=(2, 3), n_test=(1, 2), bad_files=True)
    )


def test_cli_reports_an_expected_error_with_non_zero_status(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        assert main(["--out", str(tmp_path), "--n-train", "-1", "2"]) == 1
    assert any("n_train" in r.getMessage() for r in caplog.records)
