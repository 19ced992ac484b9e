"""scripts/device_check.sh, CPU part: every step the GPU run will take, with the same arguments, must
succeed here, so a lent GPU's 15 minutes are not lost to a renamed option or a broken step."""
from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
STEPS = ["count_params", "bench", "train", "eval_gain", "eval_brief_transform"]
#: what comes back from the device machine (at most 8 files)
RETURNED = {"summary.txt", "bench.json", "metrics.json", "log.jsonl", "learning_curves.png",
            "confusion_matrix.png", "logs.tgz"}


@pytest.mark.timeout(1500)
@pytest.mark.skipif(not (DATA / "chest_xray_224").is_dir(), reason="needs ../shared/data")
def test_cpu_part_runs_every_step_and_returns_at_most_8_files(tmp_path: Path) -> None:
    out = tmp_path / "dc"
    env = os.environ | {"DEVICE_CHECK_CPU": "1", "OUT": str(out), "DATA": str(DATA)}
    done = subprocess.run(["bash", "scripts/device_check.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    codes = dict(re.findall(r"^\((\w+): rc=(\d+),", summary, flags=re.M))
    assert list(codes) == STEPS, summary
    assert all(rc == "0" for rc in codes.values()), summary
    assert {p.name for p in out.iterdir()} == RETURNED and len(RETURNED) <= 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_noise"] is True and metrics["eval_gain"] == 1.0  # what the GPU run trains with
    with tarfile.open(out / "logs.tgz") as logs:
        evals = {name: logs.extractfile(f"./{name}.log").read().decode() for name in ("eval_gain", "eval_brief_transform")}
    gains = {name: json.loads(text.strip().splitlines()[-1])["eval_gain"] for name, text in evals.items()}
    assert gains == {"eval_gain": 1.35, "eval_brief_transform": 1.0}
    bench = json.loads((out / "bench.json").read_text())
    assert any("DALI CPU" in json.dumps(row) for row in bench.get("loaders", bench))
