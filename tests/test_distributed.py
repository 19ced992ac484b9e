"""DistributedDataParallel: the sampler order sharded across ranks, two gloo processes on the CPU."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.samplers import ShardedSampler, unshard
from pipelines.synthetic import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n, world", [(10, 2), (11, 2), (7, 3), (3, 4)])
def test_shards_cover_the_order_and_unshard_restores_it(n, world):
    order = list(np.random.default_rng(n).permutation(n))
    shards = [list(ShardedSampler(order, r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(ShardedSampler(order, 0, world))
    assert set().union(*map(set, shards)) == set(order)
    assert unshard([np.array(s) for s in shards], n).tolist() == order
    probs = [np.stack([np.array(s), -np.array(s)], axis=1) for s in shards]  # 2-D payloads too
    assert unshard(probs, n)[:, 0].tolist() == order


def test_bad_rank():
    with pytest.raises(ValueError):
        ShardedSampler([1, 2], 2, 2)


@pytest.mark.slow
def test_torchrun_two_gloo_processes(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun not found beside the interpreter"
    data = make_synthetic_dataset(tmp_path / "data", n_train=(6, 10), n_test=(3, 4), seed=5,
                                  min_size=96, max_size=128)
    out = tmp_path / "out"
    run = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29517", "train.py",
                          "--data-dir", str(data), "--out", str(out), "--weights-out", str(out / "modelo.h5"),
                          "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--no-pretrained",
                          "--tta", "2", "--device", "cpu", "--image-size", "32"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0 of 2" in run.stderr
    assert run.stdout.count("| no TTA |") == 1  # only rank 0 reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["test"]["no_tta"]["n"] == 7 and metrics["test"]["tta2"]["mean_probability"]["n"] == 7
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
