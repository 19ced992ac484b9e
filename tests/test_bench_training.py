"""Training fed by each loader against resident batches (benchmarks.training), on the CPU; the benchmark CLI."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks import bench
from benchmarks import training as bt
from benchmarks.common import format_rows
from models.cost import training_setup
from models.engine import precision_options

from .helpers import FULLRES, real_files

CPU = torch.device("cpu")


def batches(n: int, size: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(size, 3, 224, 224, generator=g), torch.randint(0, 2, (size,), generator=g)) for _ in range(n)]


@pytest.mark.slow
def test_timed_training_trains_every_batch_and_times_those_after_warmup():
    model, optimizer = training_setup(CPU)
    opts = precision_options(CPU, use_amp=False)
    before = model.classifier[-1].weight.detach().clone()
    consumed = []

    def feed():
        for b in batches(3):
            consumed.append(b)
            yield b

    images, seconds = bt.timed_training(model, optimizer, feed(), CPU, warmup=1, steps=1, opts=opts)
    assert len(consumed) == 3 and images == 2 and seconds > 0  # 1 untimed step, 1 timed, the rest drained
    assert not torch.equal(model.classifier[-1].weight, before)
    assert torch.equal(model.features[0].weight, training_setup(CPU)[0].features[0].weight)  # frozen, as in train.py
    with pytest.raises(ValueError, match="no batches"):
        bt.timed_training(model, optimizer, batches(1), CPU, warmup=1, steps=1, opts=opts)
    with pytest.raises(ValueError, match="warmup"):
        bt.timed_training(model, optimizer, batches(2), CPU, warmup=0, steps=1, opts=opts)


@pytest.mark.slow
@pytest.mark.data
def test_training_fed_by_each_loader_on_real_files():
    files = real_files(FULLRES, 3)
    rows = bt.bench_training_feed(files, batch_size=2, steps=2, workers=1, device=CPU, warmup=1)
    dali = ["DALI CPU"] if importlib.util.find_spec("nvidia.dali") else []
    assert [r["feed"] for r in rows] == [bt.RESIDENT, "torchvision ours (cv2)", *dali]
    for r in rows:
        assert "error" not in r, r
        assert r["images"] == 4 and r["images_per_s"] > 0 and r["batch"] == 2 and r["device"] == "cpu"
        assert r["warmup"] == 2  # the 2 batches one worker holds ready are not timed
    assert rows[0]["x_resident"] == 1.0
    assert rows[1]["x_resident"] == pytest.approx(rows[1]["images_per_s"] / rows[0]["images_per_s"])


@pytest.mark.slow
def test_a_failing_feed_is_reported_and_the_others_measured(monkeypatch):
    def working(files, order, batch_size):
        assert len(order) == 3 * batch_size  # 1 timed step + 2 untimed (what one worker holds ready), no more
        return batches(len(order) // batch_size, batch_size)

    def broken(files, order, batch_size):
        raise RuntimeError("[/opt/dali/pipeline.cc:42] CUDA error:\n  no kernel image")

    monkeypatch.setattr(bt, "feeding_loaders", lambda workers, device: {"ours": working, "DALI GPU": broken})
    rows = bt.bench_training_feed(["a.jpeg"] * 5, batch_size=1, steps=1, workers=1, device=CPU, warmup=1)
    assert [r["feed"] for r in rows] == [bt.RESIDENT, "ours", "DALI GPU"]
    assert rows[1]["images"] == 1 and rows[1]["x_resident"] > 0
    assert rows[2]["images_per_s"] is None and rows[2]["error"] == (
        "RuntimeError: [/opt/dali/pipeline.cc:42] CUDA error: no kernel image")
    table = format_rows("training", rows)
    assert "| x_resident |" in table and "1.00" in table and "no kernel image" in table


def test_bench_refuses_a_missing_cuda_before_measuring_anything(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for folder in ("chest_xray_fullres", "chest_xray_224"):  # data folders to find, with nothing to measure
        (tmp_path / folder).mkdir()
    out = tmp_path / "b.json"
    assert bench.main(["--data", str(tmp_path), "--sections", "transforms", "training", "--device", "cuda",
                       "--json", str(out)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("argv, fragment", [(["--n224", "0"], "--n224 must be >= 1"),
                                            (["--repeats", "0"], "--repeats must be >= 1"),
                                            (["--workers", "2", "-1"], "--workers: [-1] out of range"),
                                            (["--batch-sizes", "0"], "--batch-sizes: [0] out of range"),
                                            (["--train-steps", "0"], "--train-steps must be >= 1")])
def test_bench_refuses_counts_out_of_range_before_measuring(argv, fragment, capsys, tmp_path):
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit) as stop:
        bench.main(["--sections", "transforms", *argv, "--json", str(out)])
    assert stop.value.code == 2 and fragment in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_a_deferred_loss_check_gets_a_per_step_row_beside_it(monkeypatch):
    """Where the loop reads its loss every k > 1 batches (a GPU's default), the resident batches are also
    trained reading it every batch, so the device check measures what the per-step wait costs."""
    seen = []
    real = bt.train_one_epoch

    def spy(*args, **kw):
        seen.append(kw["check_every"])
        return real(*args, **kw)

    monkeypatch.setattr(bt, "train_one_epoch", spy)
    monkeypatch.setattr(bt, "feeding_loaders", lambda workers, device: {
        "ours": lambda files, order, batch_size: batches(len(order) // batch_size, batch_size)})
    rows = bt.bench_training_feed(["a.jpeg"] * 5, batch_size=1, steps=2, workers=1, device=CPU, warmup=1,
                                  check_every=4)
    assert [(r["feed"], r["check_every"]) for r in rows] == [
        (bt.RESIDENT, 4), (bt.RESIDENT_EVERY_STEP, 1), ("ours", 4)]
    assert seen == [4, 4, 1, 1, 4, 4]  # warm-up and timed steps of each row
    assert rows[1]["x_resident"] == pytest.approx(rows[1]["images_per_s"] / rows[0]["images_per_s"])
    default = bt.bench_training_feed(["a.jpeg"] * 5, batch_size=1, steps=1, workers=1, device=CPU, warmup=1)
    assert [r["check_every"] for r in default] == [1, 1]  # the CPU reads every batch: no extra row
