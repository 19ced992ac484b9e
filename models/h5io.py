"""``modelo.h5``: a VGG16DWSep in HDF5, readable with plain h5py.

Layout: a group ``state_dict`` with one dataset per state-dict entry (named by its key;
floating tensors stored as float32, integer buffers such as ``num_batches_tracked`` as int64),
and root attributes describing how to rebuild the model and how it was trained
(``ATTRIBUTES``; ``class_names``, ``metadata`` and ``versions`` are JSON strings).
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torchvision
from torch import nn

from models.vgg16dwsep import VGG16DWSep
from pipelines.files import atomic_path

FORMAT = "vgg16dwsep-modelo-h5"
FORMAT_VERSION = 1
ARCHITECTURE = "VGG16DWSep"
STATE_GROUP = "state_dict"
JSON_ATTRIBUTES = ("class_names", "metadata", "versions")
ATTRIBUTES = (
    "format", "format_version", "architecture", "num_classes", "input_size", "separable",
    *JSON_ATTRIBUTES, "created",
)

PathLike = str | os.PathLike[str]


def _json_default(value: Any) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")


def _to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, default=_json_default)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} cannot be stored as JSON: {error}") from error


def _versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "python": platform.python_version(),
    }


def _unwrap(model: nn.Module) -> VGG16DWSep:
    """The VGG16DWSep itself, also when wrapped by ``torch.compile``."""
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, VGG16DWSep):
        raise ValueError(f"modelo.h5 stores a VGG16DWSep, got {type(model).__name__}")
    return model


def _num_classes(model: VGG16DWSep) -> int:
    return model.classifier[-1].out_features


def _stored_array(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        return tensor.to(torch.float32).numpy()
    return tensor.to(torch.int64).numpy()


def _root_attributes(model: VGG16DWSep, class_names: list[str], metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "num_classes": _num_classes(model),
        "input_size": model.input_size,
        "separable": bool(model.separable),
        "class_names": _to_json(list(class_names), "class_names"),
        "metadata": _to_json(metadata, "metadata"),
        "versions": _to_json(_versions(), "versions"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_modelo_h5(path: PathLike, model: nn.Module, *, class_names: list[str], metadata: dict[str, Any]) -> Path:
    """Write ``model`` with its class names and ``metadata`` (settings, transforms, best epoch
    and metrics, ...; JSON-serialisable, paths allowed) to ``path``, atomically: a failure
    leaves any previous file there untouched and no temporary file behind."""
    model = _unwrap(model)
    if len(class_names) != _num_classes(model):
        raise ValueError(f"{len(class_names)} class names {list(class_names)} for a model with {_num_classes(model)} classes")
    attributes = _root_attributes(model, class_names, metadata)
    state = model.state_dict()
    slashed = [key for key in state if "/" in key]
    if slashed:
        raise ValueError(f"state-dict keys with '/' cannot be HDF5 dataset names: {slashed}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as file:
        file.attrs.update(attributes)
        group = file.create_group(STATE_GROUP)
        for key, tensor in state.items():
            group.create_dataset(key, data=_stored_array(tensor))
    return Path(path)


def _decoded(attrs: h5py.AttributeManager, path: Path) -> dict[str, Any]:
    """The root attributes as Python values; ValueError naming ``path`` when they are not ours."""
    if attrs.get("format") != FORMAT:
        raise ValueError(f"{path} is HDF5 but not a modelo.h5 (format attribute {attrs.get('format')!r}, expected {FORMAT!r})")
    missing = [name for name in ATTRIBUTES if name not in attrs]
    if missing:
        raise ValueError(f"{path} lacks the modelo.h5 attributes {missing}")
    if int(attrs["format_version"]) > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {attrs['format_version']}; this code reads up to {FORMAT_VERSION}")
    if attrs["architecture"] != ARCHITECTURE:
        raise ValueError(f"{path} holds architecture {attrs['architecture']!r}, not {ARCHITECTURE!r}")
    decoded: dict[str, Any] = {
        "format": str(attrs["format"]),
        "format_version": int(attrs["format_version"]),
        "architecture": str(attrs["architecture"]),
        "num_classes": int(attrs["num_classes"]),
        "input_size": int(attrs["input_size"]),
        "separable": bool(attrs["separable"]),
        "created": str(attrs["created"]),
    }
    for name in JSON_ATTRIBUTES:
        try:
            decoded[name] = json.loads(attrs[name])
        except (TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: attribute {name!r} is not valid JSON: {error}") from error
    return decoded


def _open(path: PathLike) -> tuple[h5py.File, Path]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"modelo.h5 not found: {path}")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path} is not an HDF5 file")
    try:
        return h5py.File(path, "r"), path
    except OSError as error:
        raise ValueError(f"{path} cannot be read as HDF5: {error}") from error


def read_modelo_metadata(path: PathLike) -> dict[str, Any]:
    """The decoded root attributes of a modelo.h5 (``ATTRIBUTES``), without reading tensors."""
    file, path = _open(path)
    with file:
        return _decoded(file.attrs, path)


def _read_state(file: h5py.File, expected: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The stored tensors in the model's dtypes; ValueError naming the key on any mismatch."""
    group = file.get(STATE_GROUP)
    if not isinstance(group, h5py.Group):
        raise ValueError(f"{path} has no {STATE_GROUP!r} group")
    missing = [key for key in expected if key not in group]
    unexpected = [key for key in group if key not in expected]
    if missing or unexpected:
        raise ValueError(f"{path}: state dict does not match the model: missing {missing}, unexpected {unexpected}")
    state = {}
    for key, reference in expected.items():
        dataset = group[key]
        if not isinstance(dataset, h5py.Dataset) or dataset.shape != tuple(reference.shape):
            shape = dataset.shape if isinstance(dataset, h5py.Dataset) else "a group"
            raise ValueError(f"{path}: {key!r} has shape {shape}, the model expects {tuple(reference.shape)}")
        state[key] = torch.as_tensor(np.asarray(dataset[()])).to(reference.dtype)
    return state


def load_modelo_h5(path: PathLike, device: torch.device | str = "cpu") -> tuple[VGG16DWSep, dict[str, Any]]:
    """Rebuild the VGG16DWSep stored at ``path`` (strict load), in eval mode on ``device``,
    and return it with the decoded attributes (as ``read_modelo_metadata``)."""
    file, path = _open(path)
    with file:
        attributes = _decoded(file.attrs, path)
        try:
            model = VGG16DWSep(attributes["num_classes"], attributes["input_size"], attributes["separable"])
        except ValueError as error:
            raise ValueError(f"{path}: cannot rebuild the model: {error}") from error
        model.load_state_dict(_read_state(file, model.state_dict(), path), strict=True)
    return model.to(device).eval(), attributes
