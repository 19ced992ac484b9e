"""Shared fixtures: tiny synthetic image folders; the ``data`` marker's skip."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.synthetic import make_synthetic_dataset

from .helpers import DATA_ENV, missing_data


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``data`` where the real images (../shared/data, or $NEUMONIA_DATA) are missing,
    saying which folder."""
    missing = missing_data()
    if missing is None:
        return
    skip = pytest.mark.skip(reason=f"needs the real data: {missing} is missing (set {DATA_ENV} to its folder)")
    for item in items:
        if item.get_closest_marker("data"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic chest_xray folder: train 12/20, test 6/10 (NORMAL/PNEUMONIA), no bad files."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("tiny") / "chest_xray",
                                  n_train=(12, 20), n_test=(6, 10), seed=1, min_size=96, max_size=320)


@pytest.fixture(scope="session")
def bad_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``tiny_folder`` plus the generator's bad files in both train class folders."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("bad") / "chest_xray",
                                  n_train=(4, 6), n_test=(3, 3), seed=2, bad_files=True,
                                  min_size=96, max_size=200)
