"""Paths to the real data (../shared/data, or $NEUMONIA_DATA) and a picker of real files."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: set to the folder holding chest_xray_224/ and chest_xray_fullres/ where ../shared/data is not beside the
#: project (scripts/device_check.sh sets it to its $DATA for the ``gpu`` tests)
DATA_ENV = "NEUMONIA_DATA"
SHARED_DATA = Path(os.environ[DATA_ENV]).resolve() if os.environ.get(DATA_ENV) else ROOT.parent / "shared" / "data"
FULLRES = SHARED_DATA / "chest_xray_fullres"
SMALL_224 = SHARED_DATA / "chest_xray_224"


def missing_data() -> Path | None:
    """The first folder of ``SHARED_DATA`` that the ``data`` tests read and that is missing, or None."""
    return next((folder for folder in (FULLRES, SMALL_224) if not folder.is_dir()), None)


def real_files(folder: Path, n: int | None = None, step: int = 1) -> list[str]:
    """Sorted JPEGs under ``folder`` (every ``step``-th, at most ``n``).  A test calling it is marked
    ``data`` (tests/conftest.py skips those without the data); an unmarked one fails here instead."""
    if not folder.is_dir():
        pytest.fail(f"real data missing: {folder} (mark the test @pytest.mark.data)")
    files = sorted(str(p) for p in folder.rglob("*.jpeg"))[::step]
    return files[:n] if n else files


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
