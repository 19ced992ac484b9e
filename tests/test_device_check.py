"""scripts/device_check.sh: its CPU part runs every step the GPU run takes (same programs and options,
smaller sizes, the CPU), and its GPU part is read for step names and time limits and run with a stand-in
python, so that a GPU run is not lost to a renamed option, a broken step or limits that add up to more than
its 4 minutes (10 with FULL=1)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from .helpers import DATA_ENV, ROOT, SHARED_DATA as DATA

DEFAULT_STEPS = ["gpu_tests", "smoke", "bench", "feed"]  # what a GPU run does unless FULL=1
STEPS = DEFAULT_STEPS + ["count_params", "train", "eval_only", "lime"]
#: what a run leaves in $OUT (the step logs packed into logs.tgz)
RESULTS = {"summary.txt", "bench.json", "feed.json", "metrics.json", "log.jsonl", "learning_curves.png",
            "confusion_matrix.png", "logs.tgz"}
GPU_RUN_S = 240  # the GPU part must finish within 4 minutes by default
FULL_RUN_S = 600  # and within 10 with FULL=1
START_AND_PACK_S = 15  # the script's start-up (nvidia-smi, two python imports) and the logs' archive, outside BUDGET


def branch_steps(cpu: bool) -> list[tuple[str, int]]:
    """(name, limit) of each ``step`` line in the script's CPU or GPU branch."""
    text = (ROOT / "scripts" / "device_check.sh").read_text()
    body = text.split('if [ "$CPU" = 1 ]; then\n', 1)[1].split("\nfi\n", 1)[0]
    cpu_part, gpu_part = body.split("\nelse\n", 1)
    return [(name, int(limit)) for name, limit in re.findall(r"^\s*step[ _](\w+) (\d+) ", cpu_part if cpu else gpu_part, re.M)]


def script_budget(name: str) -> int:
    """The script's ``NAME=seconds`` default budget."""
    return int(re.search(rf"^{name}=(\d+)", (ROOT / "scripts" / "device_check.sh").read_text(), re.M)[1])


def test_gpu_part_has_the_same_steps_within_four_minutes_or_ten_with_full() -> None:
    """The default steps fit GPU_BUDGET whole and every step fits FULL_BUDGET whole; with start-up and
    packing a default run takes at most 4 minutes, a FULL=1 run 10.  The smoke check keeps its 90 s."""
    gpu = branch_steps(cpu=False)
    assert [name for name, _ in gpu] == STEPS == [name for name, _ in branch_steps(cpu=True)]
    default = sum(limit for name, limit in gpu if name in DEFAULT_STEPS)
    assert default <= script_budget("GPU_BUDGET") <= GPU_RUN_S - START_AND_PACK_S, gpu
    assert sum(limit for _, limit in gpu) <= script_budget("FULL_BUDGET") <= FULL_RUN_S - START_AND_PACK_S, gpu
    assert dict(gpu)["smoke"] >= 90


def gpu_step_options(name: str) -> dict[str, str]:
    """The ``--option value`` pairs of a step's command in the GPU part."""
    text = (ROOT / "scripts" / "device_check.sh").read_text()
    command = re.search(rf"step {name} \d+ (.*?)--json", text.split("\nelse\n", 1)[1], re.S).group(1)
    return {k: v.strip() for k, v in re.findall(r"--([\w-]+) ((?:[\w.]+ ?)+)", command.replace("\\\n", " "))}


def test_gpu_bench_gives_every_loader_enough_timed_batches() -> None:
    """The loader benchmark leaves out one batch per worker (benchmarks.common.warmup_batches); on a
    machine of up to 32 cores the full-resolution files, repeated up to --min-images, must still leave
    most batches timed.  The training feed's figure may be high by up to 2 batches per worker over its
    timed steps (benchmarks.training): at most 15 % on a 16-core machine."""
    bench = gpu_step_options("bench")
    largest_batch = max(int(b) for b in bench["batch-sizes"].split())
    images = int(bench["min-images"])  # at least this many, however few the files
    assert images // largest_batch >= 32 + 5, (images, largest_batch)
    feed = gpu_step_options("feed")
    assert feed["sections"] == "training" and feed["train-batch-size"] == "16"  # train.py's batch size
    assert 2 * 16 / int(feed["train-steps"]) <= 0.15, feed


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.data
def test_cpu_part_runs_every_step_and_leaves_its_results_in_out(tmp_path: Path) -> None:
    out = tmp_path / "dc"
    env = os.environ | {"DEVICE_CHECK_CPU": "1", "OUT": str(out), "DATA": str(DATA)}
    done = subprocess.run(["bash", "scripts/device_check.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=sum(limit for _, limit in branch_steps(cpu=True)) + 120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    codes = dict(re.findall(r"^\((\w+): rc=(\d+),", summary, flags=re.M))
    assert list(codes) == STEPS, summary
    assert all(rc == "0" for rc in codes.values()), summary
    assert re.search(r"^\d+ skipped", summary, re.M), summary  # the gpu tests, found and skipped without CUDA
    assert "ms/image" in summary and re.search(r"^\| 8 \| ", summary, re.M), summary  # LIME's table in the summary
    assert {p.name for p in out.iterdir()} == RESULTS
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"] == "default"  # what the GPU run trains with
    with tarfile.open(out / "logs.tgz") as logs:
        evaluated = json.loads(logs.extractfile("./eval_only.log").read().decode().strip().splitlines()[-1])
    assert evaluated["decision"] == metrics["decision"]  # --eval-only applies the stored rule
    bench = json.loads((out / "bench.json").read_text())
    assert any("DALI CPU" in json.dumps(row) for row in bench.get("loaders", bench))
    feed = json.loads((out / "feed.json").read_text())["training"]
    assert [r["feed"] for r in feed][1:] == ["torchvision ours (cv2)", "DALI CPU"]
    assert all(r["images_per_s"] > 0 and "error" not in r for r in feed), feed


def fake_python(tmp_path: Path, smoke_rc: int = 0, count_params_s: int = 0, dali_train_s: int = 0) -> Path:
    """A stand-in for python that logs its arguments (and $NEUMONIA_DATA for pytest), says DALI imports,
    exits ``smoke_rc`` from the smoke check, takes ``count_params_s`` seconds to count parameters and fails
    a DALI training (after logging an epoch and ``dali_train_s`` seconds); everything else succeeds at once."""
    fake = tmp_path / "fake_python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> "{tmp_path}/calls.txt"
case "$*" in
  -c*) exit 0 ;;
  -m\\ pytest*) echo "{DATA_ENV}=${{{DATA_ENV}:-}}" >> "{tmp_path}/calls.txt"; exit 0 ;;
  *dali_gpu_smoke.py*) [ {smoke_rc} = 0 ] || echo "FAILED: order and batches" >&2; exit {smoke_rc} ;;
  *--count-params*) sleep {count_params_s}; exit 0 ;;
  *train.py*--loader\\ dali*) case "$*" in *--eval-only*) exit 0 ;; esac
       mkdir -p "$OUT/run" && echo '{{"epoch": 0}}' > "$OUT/run/log.jsonl"; sleep {dali_train_s}
       echo "Error: DALI exploded" >&2; exit 1 ;;
esac
exit 0
""")
    fake.chmod(0o755)
    return fake


def run_with_fake_python(tmp_path: Path, env: dict | None = None, **fake: int) -> tuple[str, list[str], list[str]]:
    """Run the CPU part with ``fake_python`` (options ``fake``) and ``env`` added; (summary, logs, calls)."""
    out = tmp_path / "dc"
    env = os.environ | {"DEVICE_CHECK_CPU": "1", "OUT": str(out), "DATA": str(DATA), "DEVICE_CHECK_GPU_PY": "1",
                        "PY": str(fake_python(tmp_path, **fake))} | (env or {})
    done = subprocess.run(["bash", "scripts/device_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    with tarfile.open(out / "logs.tgz") as logs:
        names = logs.getnames()
    return (out / "summary.txt").read_text(), names, (tmp_path / "calls.txt").read_text().splitlines()


def test_a_failed_dali_training_leaves_its_time_to_torchvision(tmp_path: Path) -> None:
    summary, logs, calls = run_with_fake_python(tmp_path)
    trains = [c for c in calls if "train.py" in c and "--eval-only" not in c and "--count-params" not in c]
    assert len(trains) == 2 and "--loader dali" in trains[0] and "--loader torchvision" in trains[1], trains
    assert trains[0].replace("--loader dali", "--loader torchvision") == trains[1]  # same run otherwise
    assert "(train: rc=1," in summary and "(train_torchvision: rc=0," in summary, summary
    assert "./train_dali_epochs.log" in logs and "./train.log" in logs  # the failure is kept
    evaluation = next(c for c in calls if "--eval-only" in c)
    assert "--loader torchvision" in evaluation  # the weights it evaluates came from torchvision



def test_a_failed_smoke_check_trains_with_torchvision_from_the_start(tmp_path: Path) -> None:
    summary, logs, calls = run_with_fake_python(tmp_path, smoke_rc=1)
    trains = [c for c in calls if "train.py" in c and "--eval-only" not in c and "--count-params" not in c]
    assert len(trains) == 1 and "--loader torchvision" in trains[0], trains
    assert "(smoke: rc=1," in summary and "DALI smoke check failed" in summary, summary
    assert "FAILED: order and batches" in summary  # why, in the summary
    assert "--loader torchvision" in next(c for c in calls if "--eval-only" in c)
    assert any("dali_gpu_smoke.py" in c and "--cpu" in c for c in calls)


@pytest.mark.slow
def test_a_short_budget_skips_the_last_steps_and_still_packs_the_results(tmp_path: Path) -> None:
    """BUDGET 18 s: the steps before it run, counting parameters (5 s here) gets at most what is left, and
    every later step is skipped once under 15 s remain; the summary and logs are still written."""
    summary, logs, calls = run_with_fake_python(tmp_path, count_params_s=5, env={"BUDGET": "18"})
    assert all(f"({name}: rc=0," in summary for name in DEFAULT_STEPS + ["count_params"]), summary
    assert re.search(r"== count_params \(limit 1\d s\)", summary), summary  # capped to the budget left
    for name in STEPS[STEPS.index("count_params") + 1:]:
        assert f"== {name}: skipped" in summary, summary
    assert not any("train.py" in c and "--count-params" not in c for c in calls)  # no training started
    assert "./count_params.log" in logs


@pytest.mark.slow
def test_a_dali_training_stopped_by_the_budget_is_not_a_failure(tmp_path: Path) -> None:
    """DALI training capped by BUDGET and stopped at its limit was training, not failing: no torchvision
    run in time that is not there, and its epochs are kept (as log.jsonl in $OUT)."""
    summary, logs, calls = run_with_fake_python(tmp_path, dali_train_s=60, env={"BUDGET": "30"})
    assert re.search(r"\(train: rc=124,", summary), summary
    assert "DALI training failed" not in summary and "train_torchvision" not in summary, summary
    assert (tmp_path / "dc" / "log.jsonl").read_text().strip() == '{"epoch": 0}'


@pytest.mark.parametrize("full", ["", "1"])
def test_gpu_part_trains_only_with_full_and_gives_the_gpu_tests_its_data(tmp_path: Path, full: str) -> None:
    """The GPU part (a stand-in python, so no CUDA needed): by default the four default steps within
    GPU_BUDGET, with FULL=1 every step within FULL_BUDGET; the gpu tests read $DATA as NEUMONIA_DATA."""
    summary, logs, calls = run_with_fake_python(tmp_path, env={"DEVICE_CHECK_CPU": "0", "FULL": full})
    steps = STEPS if full else DEFAULT_STEPS
    codes = dict(re.findall(r"^\((\w+): rc=(\d+),", summary, flags=re.M))
    assert [name for name in codes if name != "train_torchvision"] == steps, summary  # the fake fails DALI training
    assert all(rc == "0" for name, rc in codes.items() if name != "train"), summary
    assert f"{DATA_ENV}={DATA}" in calls, calls
    assert any(c.startswith("-m pytest") and "-m gpu tests/" in c for c in calls), calls
    assert any("train.py" in c for c in calls) == bool(full), calls
    budget = script_budget("FULL_BUDGET" if full else "GPU_BUDGET")
    assert sum(dict(branch_steps(cpu=False))[name] for name in steps) <= budget
    assert {f"./{name}.log" for name in codes} <= set(logs)


def test_the_data_env_moves_the_real_data_and_its_skip(tmp_path: Path) -> None:
    """NEUMONIA_DATA pointing at a folder without the data: the ``data`` tests are skipped, naming it."""
    missing = tmp_path / "nowhere"
    env = os.environ | {DATA_ENV: str(missing)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "data", "-rs",
                           "tests/test_data.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert re.search(r"^\d+ skipped, \d+ deselected", done.stdout, re.M) and "passed" not in done.stdout, done.stdout
    assert str(missing / "chest_xray_fullres") in " ".join(done.stdout.split()), done.stdout
