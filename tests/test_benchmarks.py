"""The loader benchmark's timing and rows (benchmarks.common, benchmarks.loaders) and the decoder that only
the transform benchmark uses (benchmarks.toolchains.load_skimage)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import benchmarks.common as common
import benchmarks.loaders as bl
from benchmarks.common import folder_dataset, format_rows, loader_images_per_s, warmup_batches
from benchmarks.toolchains import load_skimage
from pipelines import imageio
from pipelines.loaders import TorchvisionLoader

from .test_data import write_modes


def test_loader_benchmark_times_from_the_warmup_batch_and_refuses_too_few(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    def loader(sizes):
        for n in sizes:
            clock[0] += 1.0  # each batch takes one second to arrive
            yield torch.zeros(n, 3, 4, 4), torch.zeros(n)

    sizes = (16, 16, 16, 5)
    assert loader_images_per_s(loader(sizes)) == pytest.approx((16 + 16 + 5) / 3)
    assert loader_images_per_s(loader(sizes), warmup=2) == pytest.approx((16 + 5) / 2)
    with pytest.raises(ValueError, match="more than 1 batches"):
        loader_images_per_s(loader(sizes[:1]))
    with pytest.raises(ValueError, match="more than 4 batches"):
        loader_images_per_s(loader(sizes), warmup=4)
    with pytest.raises(ValueError, match="at least 1"):
        loader_images_per_s(loader(sizes), warmup=0)


def test_loader_benchmark_leaves_out_one_batch_per_worker():
    dataset = folder_dataset(["a", "b"], lambda f: f, lambda x: 0)
    for workers, expected in ((0, 1), (1, 1), (2, 2)):
        assert warmup_batches(TorchvisionLoader(dataset, [0, 1], num_workers=workers)) == expected
    assert warmup_batches([]) == 1


def test_loader_benchmark_reports_a_failing_back_end_and_measures_the_others(monkeypatch):
    def working(files, order, batch_size):
        return [(torch.zeros(batch_size, 3, 4, 4), torch.zeros(batch_size)) for _ in range(4)]

    def broken(files, order, batch_size):
        raise RuntimeError("[/opt/dali/pipeline.cc:42] CUDA error:\n  no kernel image")

    monkeypatch.setattr(bl, "loader_factories", lambda workers: {"plain": working, "DALI GPU": broken, "ours": working})
    monkeypatch.setattr(bl, "cached_rows", lambda *a: (_ for _ in ()).throw(OSError("no cache")))
    rows = bl.bench_loaders({"set": ["f"] * 8}, [2], repeats=1, workers=1)
    assert [r["loader"] for r in rows] == ["plain", "DALI GPU", "ours", "decoded-cache loaders"]
    assert rows[0]["images_per_s"] > 0 and rows[2]["x_plain"] > 0
    assert rows[1]["images_per_s"] is None and rows[1]["error"] == (
        "RuntimeError: [/opt/dali/pipeline.cc:42] CUDA error: no kernel image")
    assert rows[3]["error"] == "OSError: no cache"
    table = format_rows("loaders", rows)
    assert "| error |" in table and "no kernel image" in table and "None" not in table


def test_loader_benchmark_repeats_a_small_file_set_up_to_min_images(monkeypatch):
    seen = []

    def counting(files, order, batch_size):
        seen.append(len(order))
        return [(torch.zeros(batch_size, 3, 4, 4), torch.zeros(batch_size))] * (len(order) // batch_size)

    monkeypatch.setattr(bl, "loader_factories", lambda workers: {"ours": counting})
    monkeypatch.setattr(bl, "cached_rows", lambda *a: [])
    rows = bl.bench_loaders({"few": ["f"] * 6, "many": ["f"] * 40}, [2], repeats=2, workers=1, min_images=32)
    assert seen == [36, 80] and [r["images"] for r in rows] == [36, 80]  # ceil(32 / 6) = 6 passes of 6; 2 passes of 40


def test_every_mode_comes_out_of_the_skimage_decoder_as_rgb8(tmp_path):
    """As tests/test_data.py checks for the library's decoders."""
    for mode, path in write_modes(tmp_path).items():
        arr = load_skimage(str(path))
        assert arr.shape == (48, 64, 3) and arr.dtype == np.uint8, (mode, arr.shape, arr.dtype)
        assert arr[:, :4].mean() < 30 and arr[:, -4:].mean() > 200, mode
        assert np.abs(arr.astype(int) - np.asarray(imageio.load_pil(path), int)).max() <= 12, mode


def test_seed_spread_gives_each_run_then_mean_and_spread_and_refuses_other_methods(tmp_path, capsys):
    import json

    from benchmarks import seed_spread

    def metrics(accuracy: float, seed: int, **settings) -> dict:
        test = {"accuracy": accuracy, "f1": 0.8, "recall": 1.0, "specificity": accuracy - 0.3,
                "balanced_accuracy": 0.7, "roc_auc": 0.9, "threshold": 0.6,
                "ci95": {"accuracy": [accuracy - 0.04, accuracy + 0.04]}}
        return {"best": {"epoch": seed + 4, "val_loss": 0.1}, "epochs_run": 10, "recipe": "default",
                "levers": {"decision": "threshold"}, "pretrained": "NONE", "synthetic_data": False,
                "settings": {"seed": seed, "epochs": 30, "out": f"out/s{seed}", **settings},
                "test": {"no_tta": test, "tta4": {"mean_probability": test | {"accuracy": 0.5}}}}

    paths = []
    for seed, accuracy in ((0, 0.78), (1, 0.84)):
        paths.append(tmp_path / f"full_seed{seed}_metrics.json")
        paths[-1].write_text(json.dumps(metrics(accuracy, seed)))
    assert seed_spread.main([str(p) for p in paths]) == 0
    out = capsys.readouterr().out
    assert "| full_seed0 | 4 | 10 | 0.100 | 0.600 | 0.780 [0.740, 0.820] |" in out
    assert "| accuracy | 2 | 0.810 | 0.780 | 0.840 | 0.060 |" in out
    assert "| specificity | 2 | 0.510 | 0.480 | 0.540 | 0.060 |" in out
    assert seed_spread.main([str(p) for p in paths] + ["--prediction", "tta4.mean_probability"]) == 0
    assert "| accuracy | 2 | 0.500 | 0.500 | 0.500 | 0.000 |" in capsys.readouterr().out

    assert seed_spread.main([str(paths[0]), "--prediction", "tta4"]) == 2
    assert "tta4.mean_probability" in capsys.readouterr().err
    other = tmp_path / "longer_metrics.json"
    other.write_text(json.dumps(metrics(0.9, 2, epochs=60)))
    assert seed_spread.main([str(paths[0]), str(other)]) == 2
    assert "differ in epochs" in capsys.readouterr().err
    brief = tmp_path / "brief_metrics.json"  # no settings recorded (older files): the method is still compared
    brief.write_text(json.dumps({k: v for k, v in metrics(0.8, 3).items() if k != "settings"} | {"recipe": "brief"}))
    assert seed_spread.main([str(paths[0]), str(brief)]) == 2
    assert "differ in recipe" in capsys.readouterr().err
    (tmp_path / "log.jsonl").write_text('{"epoch": 0}')
    assert seed_spread.main([str(tmp_path / "log.jsonl")]) == 2
    assert "not the metrics.json" in capsys.readouterr().err
    (tmp_path / "half.json").write_text("{\"best\": ")
    assert seed_spread.main([str(tmp_path / "half.json")]) == 2
    assert "not JSON" in capsys.readouterr().err
