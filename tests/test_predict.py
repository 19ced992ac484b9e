"""predict.py: a CSV of P(PNEUMONIA) and the decision under the rule stored in modelo.h5."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import pytest
import torch

from models.config import RunConfig
from models.training import train
from pipelines.synthetic import make_synthetic_dataset
from predict import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("predict")
    data = make_synthetic_dataset(root / "data", n_train=(6, 10), n_test=(3, 3), seed=4, min_size=64, max_size=96)
    config = RunConfig(data_dir=str(data), out=str(root / "out"), weights_out=str(root / "modelo.h5"), epochs=1,
                       batch_size=8, num_workers=0, pretrained=False, tta=(), image_size=32, skip_test=True)
    train(config, torch.device("cpu"))
    return data, root / "modelo.h5"


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def with_threshold(weights: Path, threshold: float, out: Path) -> Path:
    copy = out / "modelo_t.h5"
    copy.write_bytes(weights.read_bytes())
    with h5py.File(copy, "r+") as f:
        meta = json.loads(f.attrs["metadata"])
        meta["decision"]["threshold"] = threshold
        f.attrs["metadata"] = json.dumps(meta)
    return copy


def test_a_folder_gives_one_row_per_image_and_skips_what_is_not_one(trained, tmp_path, capsys):
    data, weights = trained
    folder = data / "test"
    (tmp_path / "notes.jpeg").write_text("not an image")
    out = tmp_path / "p.csv"
    assert main([str(folder), str(tmp_path / "notes.jpeg"), "--weights", str(weights), "--out", str(out),
                 "--num-workers", "0"]) == 0
    rows = rows_of(out)
    assert len(rows) == len(list(folder.rglob("*.jp*g"))) == 6
    assert all(0 <= float(r["p_PNEUMONIA"]) <= 1 and r["decision"] in ("NORMAL", "PNEUMONIA") for r in rows)
    err = capsys.readouterr().err
    assert "skipped" in err and "notes.jpeg" in err


@pytest.mark.parametrize("threshold, expected", [(0.0, {"PNEUMONIA"}), (1.0, {"NORMAL"})])
def test_the_decision_follows_the_stored_threshold(trained, tmp_path, threshold, expected):
    data, weights = trained
    out = tmp_path / "p.csv"
    assert main([str(data / "test"), "--weights", str(with_threshold(weights, threshold, tmp_path)),
                 "--out", str(out), "--num-workers", "0"]) == 0
    rows = rows_of(out)
    assert {r["decision"] for r in rows} == expected


def test_the_same_seed_gives_the_same_probabilities(trained, tmp_path):
    data, weights = trained
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for out in (a, b):
        assert main([str(data / "test"), "--weights", str(weights), "--out", str(out), "--num-workers", "0",
                     "--tta", "2"]) == 0
    assert rows_of(a) == rows_of(b)


@pytest.mark.parametrize("argv, fragment", [
    (["/no/such/folder"], "/no/such/folder: no such file"),
    (["."], "--weights /no/model.h5: no such file"),
])
def test_mistakes_are_one_line(argv, fragment, capsys):
    weights = ["--weights", "/no/model.h5"] if "." in argv else ["--weights", __file__]
    assert main([*argv, *weights]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_the_explainer_reads_the_rule_training_stores(trained):
    """What train.py writes into modelo.h5 is what explain.py decides with and scales its inputs by."""
    from explainer.models import load_vgg16dwsep
    from models.h5io import read_modelo_metadata

    _, weights = trained
    stored = read_modelo_metadata(weights)["metadata"]["decision"]
    loaded = load_vgg16dwsep(weights, torch.device("cpu"), amp=False)
    assert loaded.decision.threshold == pytest.approx(stored["threshold"])
    assert stored["eval_transform"] == "gain" and "x1.35" in loaded.weights_note


def test_a_folder_keeps_only_its_images_and_bad_requests_are_refused(trained, tmp_path):
    from models.inference import classify_files, image_files

    data, weights = trained
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    first = next((data / "test" / "NORMAL").iterdir())
    (folder / first.name).symlink_to(first)
    found, skipped = image_files([folder])
    assert found == [folder / first.name] and skipped == []  # a folder's other files are not images to classify
    with pytest.raises(ValueError, match="no image files"):
        classify_files(weights, [], torch.device("cpu"))
    with pytest.raises(ValueError, match="--tta must be >= 1"):
        classify_files(weights, found, torch.device("cpu"), copies=0)
