"""scripts/dali_gpu_smoke.py, the device check's first step: on the CPU (its --cpu mode, both sides on
the CPU) every check passes on the real files, and a loader that drops the partial batch, mixes up the
labels or drifts in the cached path makes it fail (exit 1), so a broken GPU loader is caught on the
GPU before any figure is taken from it."""
from __future__ import annotations

import json

import pytest

from .helpers import SHARED_DATA, load_script


@pytest.fixture(scope="module")
def smoke():
    return load_script("dali_gpu_smoke")


@pytest.mark.data
def test_every_check_passes_on_the_cpu(smoke, tmp_path, capsys):
    out = tmp_path / "smoke.json"
    assert smoke.main(["--cpu", "--data", str(SHARED_DATA), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 10 and all(r["ok"] == "yes" for r in rows), rows
    assert any(r["check"].startswith("all-RGB batch (12 files)") for r in rows), rows
    files = smoke.pick_files(SHARED_DATA)
    assert len(files) == 28 and sum("chest_xray_224" in f for f in files) == 8
    assert "person1668_bacteria_4421.jpeg" in " ".join(files)  # a colour file among the gray ones
    assert "| order and batches" in capsys.readouterr().out


def broken_loader(smoke, how: str):
    base = smoke.DaliLoader

    class Broken(base):
        def __iter__(self):
            batches = list(super().__iter__())
            if how == "drop partial" and len(batches[-1][1]) < self.batch_size:
                batches = batches[:-1]
            if how == "labels":
                batches = [(x, y.flip(0)) for x, y in batches]
            if how == "duplicates" and len(set(self.sampler)) < len(self.sampler):
                batches = [(x, y.roll(1)) for x, y in batches]
            if how == "cache" and self.cache is not None:
                batches = [(x + 0.01, y) for x, y in batches]
            return iter(batches)

    return Broken


@pytest.mark.data
@pytest.mark.parametrize(("how", "failing"), [("drop partial", "every file once"),
                                              ("labels", "every file once"),
                                              ("duplicates", "order and batches"),
                                              ("cache", "cached GPU vs GPU")])
def test_a_broken_loader_fails(smoke, monkeypatch, capsys, how, failing):
    monkeypatch.setattr(smoke, "DaliLoader", broken_loader(smoke, how))
    assert smoke.main(["--cpu", "--data", str(SHARED_DATA)]) == 1
    assert failing in capsys.readouterr().err


def test_without_cuda_it_asks_for_cpu(smoke, monkeypatch, capsys):
    monkeypatch.setattr(smoke.torch.cuda, "is_available", lambda: False)
    assert smoke.main(["--data", str(SHARED_DATA)]) == 2
    assert "--cpu" in capsys.readouterr().err


def test_batches_consumed_without_waiting_are_compared_image_by_image(smoke):
    """The GPU-only check's comparison, fed plain CPU batches: equal batches pass (one gray level of
    decoder difference allowed), a batch whose memory held another image fails."""
    import torch

    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(4, 3, 8, 8, generator=g), torch.zeros(4)) for _ in range(3)]
    spins = []
    nudged = [(x + 1 / 255, y) for x, y in batches]
    assert smoke.consumed_without_waiting(batches, nudged, lambda: spins.append(1))["ok"] == "yes"
    assert len(spins) == 3  # one wait queued before each batch is read
    reused = batches[:2] + [(batches[0][0], batches[2][1])]  # the last batch's memory holds the first's
    row = smoke.consumed_without_waiting(batches, reused, lambda: None)
    assert row["ok"] == "NO" and float(row["value"]) > 0.1
    assert smoke.consumed_without_waiting(batches, batches[:2], lambda: None)["ok"] == "NO"  # one missing
