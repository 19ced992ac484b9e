"""Tests of models.h5io: modelo.h5 round trip (tensors, outputs, attributes), its plain-h5py
layout, the atomic write, and the errors for missing, foreign and damaged files."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from models import VGG16DWSep
from models.h5io import FORMAT, load_modelo_h5, read_modelo_metadata, save_modelo_h5

SMALL = 32
CLASS_NAMES = ["NORMAL", "PNEUMONIA"]
METADATA = {
    "settings": {"batch_size": 16, "lr": 1e-4, "data": Path("/data/chest_xray")},
    "best": {"epoch": 7, "val_loss": 0.21, "val_f1": 0.93},
    "pretrained": True,
    "transform": ["Resize(224)", "RandomRotation(10)"],
}
METADATA_AS_JSON = {**METADATA, "settings": {**METADATA["settings"], "data": "/data/chest_xray"}}


@pytest.fixture(scope="module")
def trained_model() -> VGG16DWSep:
    """A small VGG16DWSep whose BatchNorm running statistics moved off their defaults."""
    torch.manual_seed(0)
    model = VGG16DWSep(input_size=SMALL)
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, SMALL, SMALL))
    return model.eval()


@pytest.fixture(scope="module")
def saved(trained_model: VGG16DWSep, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_modelo_h5(tmp_path_factory.mktemp("h5") / "modelo.h5", trained_model,
                          class_names=CLASS_NAMES, metadata=METADATA)


def test_batch_norm_statistics_moved(trained_model: VGG16DWSep) -> None:
    state = trained_model.state_dict()
    assert any(key.endswith("running_mean") and state[key].abs().sum() > 0 for key in state)
    assert any(key.endswith("num_batches_tracked") and state[key].item() == 1 for key in state)


def test_round_trip_keeps_every_tensor_and_the_outputs(trained_model: VGG16DWSep, saved: Path) -> None:
    loaded, attributes = load_modelo_h5(saved)
    assert not loaded.training
    expected, got = trained_model.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key
    images = torch.rand(3, 3, SMALL, SMALL)
    with torch.no_grad():
        assert torch.equal(loaded(images), trained_model(images))
    assert attributes["class_names"] == CLASS_NAMES
    assert attributes["metadata"] == METADATA_AS_JSON
    assert (attributes["num_classes"], attributes["input_size"], attributes["separable"]) == (2, SMALL, True)


def test_a_channels_last_model_round_trips_exactly(trained_model: VGG16DWSep, tmp_path: Path) -> None:
    """Training keeps the model channels-last: its 4-D weights are NHWC-strided views, and the
    file must hold them in the logical (out, in, kh, kw) order, not in memory order."""
    nhwc = VGG16DWSep(input_size=SMALL)
    nhwc.load_state_dict(trained_model.state_dict())
    nhwc = nhwc.to(memory_format=torch.channels_last).eval()
    assert not nhwc.features[0].weight.is_contiguous()
    loaded, _ = load_modelo_h5(save_modelo_h5(tmp_path / "m.h5", nhwc, class_names=CLASS_NAMES, metadata={}))
    for key, value in trained_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_metadata_reads_the_attributes_only(saved: Path) -> None:
    attributes = read_modelo_metadata(saved)
    assert attributes == load_modelo_h5(saved)[1]
    assert attributes["format"] == FORMAT and attributes["format_version"] == 1
    assert attributes["architecture"] == "VGG16DWSep"
    assert set(attributes["versions"]) == {"torch", "torchvision", "numpy", "h5py", "python"}
    assert attributes["versions"]["torch"] == torch.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", attributes["created"])


def test_plain_h5py_sees_one_dataset_per_state_dict_key(trained_model: VGG16DWSep, saved: Path) -> None:
    state = trained_model.state_dict()
    with h5py.File(saved, "r") as file:
        group = file["state_dict"]
        assert set(group) == set(state)
        assert all(isinstance(group[key], h5py.Dataset) for key in group)
        np.testing.assert_array_equal(group["features.0.weight"][()], state["features.0.weight"].numpy())
        assert group["features.0.weight"].dtype == np.float32
        counter = next(key for key in state if key.endswith("num_batches_tracked"))
        assert group[counter].dtype == np.int64 and group[counter][()] == 1
        assert file.attrs["format"] == FORMAT


def test_bfloat16_tensors_are_stored_as_float32(trained_model: VGG16DWSep, tmp_path: Path) -> None:
    bf16 = VGG16DWSep(input_size=SMALL)
    bf16.load_state_dict(trained_model.state_dict())
    bf16.to(torch.bfloat16)
    path = save_modelo_h5(tmp_path / "modelo.h5", bf16, class_names=CLASS_NAMES, metadata={})
    with h5py.File(path, "r") as file:
        assert {file["state_dict"][key].dtype for key in file["state_dict"]} == {np.dtype("float32"), np.dtype("int64")}
    loaded, _ = load_modelo_h5(path)
    weight = loaded.state_dict()["classifier.1.weight"]
    assert weight.dtype == torch.float32
    assert torch.equal(weight, bf16.state_dict()["classifier.1.weight"].float())


def test_class_names_must_match_the_model(trained_model: VGG16DWSep, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class names"):
        save_modelo_h5(tmp_path / "modelo.h5", trained_model, class_names=["NORMAL"], metadata={})
    with pytest.raises(ValueError, match="metadata"):
        save_modelo_h5(tmp_path / "modelo.h5", trained_model, class_names=CLASS_NAMES, metadata={"x": object()})
    assert not list(tmp_path.iterdir())


def _fail_on_close(monkeypatch: pytest.MonkeyPatch) -> None:
    def close(self: h5py.File) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(h5py.File, "close", close)


def _fail_on_tenth_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    original, calls = h5py.Group.create_dataset, []

    def create_dataset(self: h5py.Group, name: str, *args, **kwargs):
        calls.append(name)
        if len(calls) == 10:
            raise OSError("disk full (simulated)")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)


@pytest.mark.parametrize("inject_failure", [_fail_on_close, _fail_on_tenth_dataset])
def test_a_failed_write_leaves_the_previous_file_and_no_temporary(
    trained_model: VGG16DWSep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inject_failure
) -> None:
    target = tmp_path / "modelo.h5"
    with monkeypatch.context() as patch:
        inject_failure(patch)
        with pytest.raises(OSError, match="simulated"):
            save_modelo_h5(target, trained_model, class_names=CLASS_NAMES, metadata={})
    assert not list(tmp_path.iterdir())
    save_modelo_h5(target, trained_model, class_names=CLASS_NAMES, metadata={"run": 1})
    with monkeypatch.context() as patch:
        inject_failure(patch)
        with pytest.raises(OSError, match="simulated"):
            save_modelo_h5(target, trained_model, class_names=CLASS_NAMES, metadata={"run": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["modelo.h5"]
    assert read_modelo_metadata(target)["metadata"] == {"run": 1}


def test_missing_path_is_a_file_not_found_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.h5"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_modelo_h5(path)


def test_a_text_file_is_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "modelo.h5"
    path.write_text("not an HDF5 file\n")
    for read in (load_modelo_h5, read_modelo_metadata):
        with pytest.raises(ValueError, match=re.escape(f"{path} is not an HDF5 file")):
            read(path)


@pytest.mark.parametrize("format_attribute", [None, "keras-model"])
def test_hdf5_without_our_format_is_refused(tmp_path: Path, format_attribute: str | None) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("weights", data=np.zeros(3))
        if format_attribute:
            file.attrs["format"] = format_attribute
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a modelo.h5"):
        load_modelo_h5(path)


def _copy_and_edit(saved: Path, tmp_path: Path, edit) -> Path:
    path = tmp_path / "edited.h5"
    path.write_bytes(saved.read_bytes())
    with h5py.File(path, "r+") as file:
        edit(file["state_dict"])
    return path


def test_a_missing_tensor_is_named(saved: Path, tmp_path: Path) -> None:
    path = _copy_and_edit(saved, tmp_path, lambda group: group.__delitem__("features.12.running_var"))
    with pytest.raises(ValueError, match=r"missing \['features.12.running_var'\]"):
        load_modelo_h5(path)


def test_a_tensor_of_the_wrong_shape_is_named(saved: Path, tmp_path: Path) -> None:
    def reshape(group: h5py.Group) -> None:
        del group["classifier.7.bias"]
        group.create_dataset("classifier.7.bias", data=np.zeros(3, dtype=np.float32))

    path = _copy_and_edit(saved, tmp_path, reshape)
    with pytest.raises(ValueError, match=r"'classifier.7.bias' has shape \(3,\)"):
        load_modelo_h5(path)
