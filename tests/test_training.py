"""The whole run on a tiny synthetic set at 32 x 32: outputs, modelo.h5 and its decision rule, resume
after kill -9, safe checkpoints, CLI errors."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.config import RECIPES, RunConfig
from models.engine import bf16_native, precision_label, precision_options
from models.h5io import load_modelo_h5, read_modelo_metadata
from models.training import train
from pipelines.synthetic import make_synthetic_dataset
from train import main

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["--image-size", "32"]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("train") / "data", n_train=(6, 10), n_test=(3, 3),
                                  seed=3, min_size=64, max_size=96)


def config_for(data: Path, out: Path, **kw) -> RunConfig:
    base = dict(data_dir=str(data), out=str(out), weights_out=str(out / "modelo.h5"), epochs=2, batch_size=8,
                num_workers=0, pretrained=False, tta=(2,), image_size=32)
    return RunConfig(**(base | kw))


def test_train_writes_every_output(small_set, tmp_path):
    summary = train(config_for(small_set, tmp_path), torch.device("cpu"))
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert {"train_loss", "val_loss", "val_accuracy", "val_f1", "val_balanced_accuracy", "val_threshold",
            "seconds", "val_seconds", "train_images_per_s"} <= set(rows[0])
    assert all(r["seconds"] > 0 and r["val_seconds"] > 0 for r in rows)
    for name in ("learning_curves.png", "confusion_matrix.png", "metrics.json", "checkpoint.pt", "modelo.h5"):
        assert (tmp_path / name).stat().st_size > 0, name
    meta = read_modelo_metadata(tmp_path / "modelo.h5")
    assert meta["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert "NONE" in meta["metadata"]["pretrained"]  # never pretends to be pretrained
    assert meta["metadata"]["best"]["epoch"] == summary["best"]["epoch"]
    best = min(rows, key=lambda r: r["val_loss"])
    assert summary["best"]["val_loss"] == pytest.approx(best["val_loss"])
    model, _ = load_modelo_h5(tmp_path / "modelo.h5")
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 2)
    assert set(summary["test"]) == {"no_tta", "tta2"} and summary["test"]["no_tta"]["n"] == 6
    assert set(summary["test"]["tta2"]) == {"mean_probability", "max_confidence"}
    lo, hi = summary["test"]["no_tta"]["ci95"]["accuracy"]
    assert 0 <= lo <= summary["test"]["no_tta"]["accuracy"] <= hi <= 1


def test_the_decision_rule_is_stored_and_used_by_eval_only(small_set, tmp_path, capsys):
    summary = train(config_for(small_set, tmp_path, epochs=1, tta=(2,), num_workers=2, batch_size=4),
                    torch.device("cpu"))
    decision = read_modelo_metadata(tmp_path / "modelo.h5")["metadata"]["decision"]
    assert decision["rule"] == RECIPES["default"]["decision"] == "threshold"
    assert decision["threshold"] == pytest.approx(summary["best"]["threshold"])
    assert summary["test"]["no_tta"]["threshold"] == pytest.approx(decision["threshold"])
    assert decision["eval_transform"] == RECIPES["default"]["eval_transform"]
    rc = main(["--data-dir", str(small_set), "--eval-only", "--weights", str(tmp_path / "modelo.h5"),
               "--tta", "2", "--json", "--num-workers", "0"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["test"]) == {"no_tta", "tta2"}
    assert result["decision"] == decision
    # the same seeded evaluation as the training run's own test pass, TTA copies included, though the
    # command line left --num-workers and --batch-size at their defaults: they come from the run
    assert result["test"]["no_tta"]["loss"] == pytest.approx(summary["test"]["no_tta"]["loss"], rel=1e-5)
    for rule in ("mean_probability", "max_confidence"):
        assert result["test"]["tta2"][rule]["roc_auc"] == pytest.approx(summary["test"]["tta2"][rule]["roc_auc"])
        assert result["test"]["tta2"][rule]["accuracy"] == summary["test"]["tta2"][rule]["accuracy"]


def test_the_brief_recipe_decides_by_argmax_on_the_augmented_test(small_set, tmp_path):
    summary = train(config_for(small_set, tmp_path, epochs=1, tta=(), recipe="brief"), torch.device("cpu"))
    assert summary["decision"] == {"positive_class": 1, "threshold": 0.5, "rule": "argmax", "eval_transform": "brief"}
    assert summary["levers"] == RECIPES["brief"]
    assert read_modelo_metadata(tmp_path / "modelo.h5")["metadata"]["departures_from_brief"] == {}


def test_best_weights_are_replaced_only_on_strict_improvement(small_set, tmp_path, monkeypatch):
    """A value equal to the best resets the patience (the brief's tol) but keeps the earlier weights."""
    from models import training

    losses = iter([0.5, 0.5, 0.4])

    def scripted(self, model, epoch):
        loss = next(losses)
        metrics = {"loss": loss, "accuracy": 0.5, "f1": 0.5, "balanced_accuracy": 0.5, "chosen_threshold": 0.5}
        return metrics, {}

    monkeypatch.setattr(training.Validation, "score", scripted)
    saves = []
    real_save = training.save_modelo_h5
    monkeypatch.setattr(training, "save_modelo_h5", lambda *a, **k: (saves.append(1), real_save(*a, **k)))
    summary = train(config_for(small_set, tmp_path, epochs=3, tta=(), paciencia=1), torch.device("cpu"))
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["improved"] for r in rows] == [True, False, True]  # the tie did not stop the run (patience 1)
    assert len(saves) == 2 and summary["best"]["epoch"] == 2


def test_compare_eval_logs_every_candidate_on_validation_only(small_set, tmp_path):
    summary = train(config_for(small_set, tmp_path, epochs=1, tta=(), compare_eval=True, skip_test=True),
                    torch.device("cpu"))
    assert summary["test"] is None
    row = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert set(row["candidates"]) == {"brief", "gain", "plain"}
    for candidate in row["candidates"].values():
        assert set(candidate) == {"loss", "argmax", "threshold_cross_fitted"}
        assert {"accuracy", "f1", "balanced_accuracy"} <= set(candidate["argmax"])
    # the plain and gain transforms see the same images at other brightness: other losses
    assert row["candidates"]["plain"]["loss"] != pytest.approx(row["candidates"]["gain"]["loss"])
    assert row["candidates"]["gain"]["loss"] == pytest.approx(row["val_loss"])  # the default's own


def test_frozen_first_convolutions_do_not_move(small_set, tmp_path):
    from models.training import build_model

    config = config_for(small_set, tmp_path, epochs=1, tta=(), skip_test=True)
    init = build_model(config, torch.device("cpu")).state_dict()
    train(config, torch.device("cpu"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for key in ("features.0.weight", "features.2.bias"):
        assert torch.equal(ckpt["model"][key], init[key]), key
    assert not torch.equal(ckpt["model"]["classifier.1.weight"], init["classifier.1.weight"])
    assert set(ckpt["optimizer"]["state"]) and len(ckpt["optimizer"]["param_groups"][0]["params"]) == len(
        [p for p in build_model(config, torch.device("cpu")).parameters() if p.requires_grad])


@pytest.mark.slow
def test_same_seed_same_run(small_set, tmp_path):
    a = train(config_for(small_set, tmp_path / "a", epochs=1, tta=(), num_workers=2), torch.device("cpu"))
    b = train(config_for(small_set, tmp_path / "b", epochs=1, tta=(), num_workers=2), torch.device("cpu"))
    c = train(config_for(small_set, tmp_path / "c", epochs=1, tta=(), num_workers=2, seed=1), torch.device("cpu"))
    assert a["best"] == b["best"] and a["test"]["no_tta"]["loss"] == b["test"]["no_tta"]["loss"]
    assert a["best"]["val_loss"] != c["best"]["val_loss"]


def test_precision_is_channels_last_and_bf16_only_where_native():
    cpu = torch.device("cpu")
    assert precision_options(cpu, use_amp=False) == {"amp_dtype": None, "channels_last": True}
    expected = torch.bfloat16 if bf16_native(cpu) else None
    assert precision_options(cpu, use_amp=True)["amp_dtype"] == expected
    assert precision_label(precision_options(cpu, use_amp=False)) == "fp32 + channels-last"
    assert bf16_native(torch.device("cuda")) and not bf16_native(torch.device("meta"))


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_resume_after_kill_9_loses_at_most_the_epoch_in_progress(small_set, tmp_path):
    args = ["--data-dir", str(small_set), "--out", str(tmp_path), "--weights-out", str(tmp_path / "modelo.h5"),
            "--epochs", "3", "--batch-size", "4", "--num-workers", "0", "--no-pretrained", "--no-tta", *SIZE]
    proc = run_cli(args)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 1
                                          and (tmp_path / "checkpoint.pt").exists()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"]
    resumed = run_cli(args + ["--resume"])
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resumed from {tmp_path / 'checkpoint.pt'} at epoch {done + 1}" in err or done == 2
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs[: done + 1] == list(range(done + 1)) and epochs[-1] == 2 and sorted(set(epochs)) == [0, 1, 2]
    assert "| no TTA |" in out


def test_a_run_killed_between_checkpoint_and_modelo_h5_resumes_with_the_right_best_weights(small_set, tmp_path,
                                                                                               monkeypatch):
    """The checkpoint is written first; if the run dies before modelo.h5, --resume writes modelo.h5 from
    the checkpoint (its best epoch was the last one) and rewrites the log from the checkpoint's history."""
    from models import training
    from models.h5io import load_modelo_h5

    config = config_for(small_set, tmp_path, epochs=1, tta=(), skip_test=True)
    monkeypatch.setattr(training.Run, "save_best", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train(config, torch.device("cpu"))
    monkeypatch.undo()
    assert not (tmp_path / "modelo.h5").exists() and not (tmp_path / "log.jsonl").exists()
    (tmp_path / "log.jsonl").write_text('{"epoch": 0, "stale": true}\n{"epoch": 0, "stale": true}\n')
    train(dataclasses.replace(config, epochs=1), torch.device("cpu"), resume=True)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    saved, meta = load_modelo_h5(tmp_path / "modelo.h5")
    assert meta["metadata"]["best"]["epoch"] == 0
    for key, value in saved.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0] and "stale" not in rows[0]


def test_each_loader_of_a_run_draws_its_own_augmentation():
    from pipelines.loaders import PURPOSE_TEST, PURPOSE_TRAIN, PURPOSE_TTA, PURPOSE_VAL, LoaderSettings, loader_seed

    settings = LoaderSettings(seed=0)
    seeds = [loader_seed(settings, p) for p in (PURPOSE_TRAIN, PURPOSE_VAL, PURPOSE_VAL + 1, PURPOSE_TEST,
                                                PURPOSE_TTA + 2, PURPOSE_TTA + 4)]
    assert len(set(seeds)) == len(seeds)
    assert loader_seed(LoaderSettings(seed=0, rank=1, world_size=2)) != loader_seed(settings)


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_checkpoint_is_refused_without_running_its_code(small_set, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    with open(tmp_path / "checkpoint.pt", "wb") as f:
        pickle.dump({"version": 2, "settings": {}, "payload": _Planted(marker)}, f)
    assert main(["--data-dir", str(small_set), "--out", str(tmp_path), "--no-pretrained", "--resume", *SIZE]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "not a checkpoint this version can load safely" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_resume_refuses_settings_that_change_the_run(small_set, tmp_path, capsys, caplog, monkeypatch):
    base = ["--data-dir", str(small_set), "--out", str(tmp_path), "--weights-out", str(tmp_path / "modelo.h5"),
            "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--no-pretrained", "--no-tta", *SIZE]
    assert main(base) == 0
    capsys.readouterr()
    ckpt_path = tmp_path / "checkpoint.pt"
    ckpt_before = ckpt_path.read_bytes()
    from models import training

    def no_indexing(*args, **kwargs):
        raise AssertionError("the checkpoint is checked before the data is indexed")

    monkeypatch.setattr(training, "index_dataset", no_indexing)
    for changed, fragment in ((["--seed", "7"], "seed=0; this run asks for seed=7"),
                              (["--batch-size", "4"], "batch_size=8; this run asks for batch_size=4"),
                              (["--lr", "0.001"], "lr=0.0001; this run asks for lr=0.001"),
                              (["--eval-transform", "brief"], "eval_transform='gain'; this run asks for "
                                                              "eval_transform='brief'"),
                              (["--recipe", "brief"], "this run asks for eval_transform='brief', decision='argmax'"),
                              (["--weights-out", str(tmp_path / "other.h5")], "weights_out=")):
        assert main(base + ["--epochs", "2", "--resume", *changed]) == 2, changed
        err = capsys.readouterr().err
        assert fragment in err and "another --out" in err and "Traceback" not in err, err
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["world_size"] == 1
    ckpt["world_size"] = 2  # as if written under torchrun --nproc_per_node=2
    torch.save(ckpt, ckpt_path)
    assert main(base + ["--epochs", "2", "--resume"]) == 2
    assert "world_size=2; this run asks for world_size=1" in capsys.readouterr().err
    ckpt_path.write_bytes(ckpt_before)
    monkeypatch.undo()
    # the same folder spelled another way, and a setting that only warns: accepted, one more epoch
    same_dir = ["--data-dir", str(small_set / "train" / "..")]
    with caplog.at_level("WARNING"):
        assert main(base[2:] + same_dir + ["--epochs", "2", "--resume", "--no-amp"]) == 0
    assert "--resume: amp was True, now False" in caplog.text
    assert [json.loads(line)["epoch"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [0, 1]


@pytest.mark.parametrize("argv, fragment", [
    (["--check-data"], "--data-dir"),
    (["--data-dir", "/nonexistent/xray"], "/nonexistent/xray"),
    (["--data-dir", ".", "--epochs", "0"], "--epochs"),
    (["--data-dir", ".", "--lr", "0"], "--lr must be > 0"),
    (["--data-dir", ".", "--image-size", "48"], "--image-size must be a multiple of 32"),
    (["--data-dir", ".", "--eval-only"], "--weights"),
    (["--data-dir", ".", "--weights", "modelo.h5"], "--weights is read only with --eval-only"),
    (["--data-dir", ".", "--json"], "--json is for --eval-only"),
    (["--data-dir", ".", "--device", "foo"], "--device foo: expected"),
    (["--data-dir", ".", "--eval-only", "--weights", "m.h5", "--resume"], "--resume: not for --eval-only"),
])
def test_cli_errors_are_one_clear_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_resume_without_checkpoint_is_a_clear_error(small_set, tmp_path, capsys):
    rc = main(["--data-dir", str(small_set), "--out", str(tmp_path), "--resume", "--no-pretrained"])
    assert rc == 2 and "no checkpoint" in capsys.readouterr().err


def test_missing_imagenet_weights_say_how_to_get_them(small_set, tmp_path, capsys):
    rc = main(["--data-dir", str(small_set), "--out", str(tmp_path), "--vgg16-weights", str(tmp_path / "nope.pth")])
    assert rc == 2 and "nope.pth" in capsys.readouterr().err


def test_out_that_is_a_file_is_one_line(small_set, tmp_path, capsys):
    afile = tmp_path / "notafolder.h5"
    afile.write_text("x")
    assert main(["--data-dir", str(small_set), "--out", str(afile), "--no-pretrained", "--epochs", "1", *SIZE]) == 2
    err = capsys.readouterr().err
    assert "notafolder.h5" in err and "Traceback" not in err


def test_dali_loader_without_dali_says_how_to_install(monkeypatch):
    from pipelines import loaders

    monkeypatch.setattr(loaders, "dali_available", lambda: False)
    with pytest.raises(ValueError, match="pip install nvidia-dali"):
        loaders.resolve_backend("dali", "cpu")
    assert loaders.resolve_backend("auto", "cpu") == "torchvision"


def test_bare_tta_says_it_turns_tta_off(capsys):
    from train import get_args_parser

    assert get_args_parser().parse_args(["--tta"]).tta == [] == get_args_parser().parse_args(["--no-tta"]).tta
    assert "turns test-time augmentation off" in capsys.readouterr().err
    assert get_args_parser().parse_args([]).tta == [4, 8]
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--tta", "4", "--no-tta"])


def test_a_lever_given_explicitly_overrides_its_recipe():
    config = RunConfig(recipe="brief", decision="threshold")
    assert config.decision == "threshold" and config.eval_transform == RECIPES["brief"]["eval_transform"]
    assert config.departures() == {"decision": "threshold"}
    assert RunConfig().departures() == {"eval_transform": "gain", "decision": "threshold"}
    with pytest.raises(ValueError, match="--recipe 'nope'"):
        RunConfig(recipe="nope")
    with pytest.raises(ValueError, match="--eval-transform 'plain'"):
        RunConfig(eval_transform="plain")


def test_train_subset_larger_than_the_split_warns(small_set, caplog):
    from pipelines.data import index_dataset
    from pipelines.loaders import make_samplers

    index = index_dataset(small_set)
    whole = make_samplers(index, 0, 0.2, None)
    with caplog.at_level("WARNING"):
        asked = make_samplers(index, 0, 0.2, 100_000)
    assert f"--train-subset 100000: the training split has {len(whole.train_indices)} images" in caplog.text
    assert list(asked.train_indices) == list(whole.train_indices)


def test_a_new_run_says_whose_weights_it_replaces(tmp_path, monkeypatch, caplog):
    from models import training

    target = tmp_path / "modelo.h5"
    config = config_for(tmp_path, tmp_path / "run2", weights_out=str(target))
    with caplog.at_level("WARNING"):
        training.warn_if_overwriting(config)
    assert caplog.text == ""  # nothing there yet
    target.write_text("not hdf5")
    with caplog.at_level("WARNING"):
        training.warn_if_overwriting(config)
    assert f"{target} exists (not a modelo.h5 this version reads)" in caplog.text
    caplog.clear()
    monkeypatch.setattr(training, "read_modelo_metadata", lambda path: {
        "metadata": {"settings": {"out": "out/run1"}, "best": {"epoch": 7, "val_loss": 0.0812}}})
    with caplog.at_level("WARNING"):
        training.warn_if_overwriting(config)
    assert "run in 'out/run1', best epoch 7, validation loss 0.0812" in caplog.text


def test_resume_warns_for_settings_that_change_the_augmentation_stream(caplog):
    from models.training import check_resumed_settings

    ours = RunConfig(data_dir="d", num_workers=2, loader="dali")
    saved = dataclasses.asdict(RunConfig(data_dir="d", num_workers=1, loader="torchvision"))
    with caplog.at_level("WARNING"):
        check_resumed_settings(saved, ours, Path("c.pt"))
    assert "num_workers was 1, now 2" in caplog.text and "loader was 'torchvision', now 'dali'" in caplog.text


@pytest.mark.parametrize("kw, fragment", [
    ({"num_workers": -1}, "--num-workers must be >= 0"), ({"seed": -1}, "--seed must be >= 0"),
    ({"weight_decay": -1e-5}, "--weight-decay must be >= 0"), ({"tta": (0,)}, "--tta values must be >= 1"),
    ({"train_subset": 4}, "--train-subset must be >= 8"), ({"batch_size": 0}, "--batch-size must be >= 1"),
])
def test_bad_settings_name_the_option(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        RunConfig(**kw)


@pytest.mark.parametrize("metadata, fragment", [
    ({}, "stores no decision rule"),
    ({"decision": {"positive_class": 1, "threshold": 0.5}}, "malformed decision rule"),
    ({"decision": {"positive_class": 1, "threshold": 1.5, "rule": "threshold", "eval_transform": "gain"}},
     "malformed decision rule"),
    ({"decision": {"positive_class": 1, "threshold": 0.5, "rule": "vote", "eval_transform": "gain"}},
     "malformed decision rule"),
])
def test_a_missing_or_malformed_stored_rule_is_one_clear_error(metadata, fragment):
    from models.config import stored_decision

    with pytest.raises(ValueError, match=fragment):
        stored_decision(metadata, "m.h5")


def scripted_validation(monkeypatch, losses):
    from models import training

    values = iter(losses)

    def score(self, model, epoch):
        loss = next(values)
        return {"loss": loss, "accuracy": 0.5, "f1": 0.5, "balanced_accuracy": 0.5, "chosen_threshold": 0.5}, {}

    monkeypatch.setattr(training.Validation, "score", score)


def test_early_stopping_ends_the_run_and_a_resumed_stopped_run_trains_no_more(small_set, tmp_path, monkeypatch,
                                                                                 caplog):
    scripted_validation(monkeypatch, [0.5, 0.6, 0.7, 0.8])
    config = config_for(small_set, tmp_path, epochs=4, tta=(), paciencia=2, skip_test=True)
    with caplog.at_level("INFO"):
        summary = train(config, torch.device("cpu"))
    assert summary["epochs_run"] == 3 and summary["best"]["epoch"] == 0
    assert "early stopping: validation metric (min) did not improve" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        again = train(dataclasses.replace(config, epochs=10), torch.device("cpu"), resume=True)
    assert again["epochs_run"] == 3 and "had already stopped early" in caplog.text


def test_no_finite_validation_loss_saves_nothing_and_says_so(small_set, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [float("nan")])
    with pytest.raises(ValueError, match="no epoch produced a finite validation loss"):
        train(config_for(small_set, tmp_path, epochs=1, tta=(), skip_test=True), torch.device("cpu"))
    assert not (tmp_path / "modelo.h5").exists()


def test_resume_refuses_a_modelo_h5_the_checkpoint_cannot_restore(small_set, tmp_path, monkeypatch):
    """modelo.h5 replaced by another run's weights while the checkpoint's best is an older epoch."""
    from models import training

    scripted_validation(monkeypatch, [0.5, 0.6])
    config = config_for(small_set, tmp_path, epochs=2, tta=(), skip_test=True)
    train(config, torch.device("cpu"))
    monkeypatch.setattr(training, "read_modelo_metadata", lambda path: {"metadata": {"best": {"epoch": 7}}})
    with pytest.raises(ValueError, match="holds epoch 7, the checkpoint's best is epoch 0"):
        train(dataclasses.replace(config, epochs=3), torch.device("cpu"), resume=True)


def test_a_checkpoint_of_another_version_is_refused(small_set, tmp_path, capsys):
    torch.save({"version": 1, "settings": {}}, tmp_path / "checkpoint.pt")
    assert main(["--data-dir", str(small_set), "--out", str(tmp_path), "--no-pretrained", "--resume", *SIZE]) == 2
    assert "checkpoint version 1, this code reads 2" in capsys.readouterr().err


def test_eval_only_refuses_a_model_of_other_classes(small_set, tmp_path):
    from models import training

    train(config_for(small_set, tmp_path, epochs=1, tta=(), skip_test=True), torch.device("cpu"))
    other = tmp_path / "other"
    for split in ("train", "test"):
        for name in ("CATS", "DOGS"):
            (other / split / name).mkdir(parents=True)
            for f in (small_set / split / ("NORMAL" if name == "CATS" else "PNEUMONIA")).iterdir():
                (other / split / name / f.name).symlink_to(f)
    with pytest.raises(ValueError, match="was trained on classes"):
        training.evaluate_weights(config_for(other, tmp_path), tmp_path / "modelo.h5", torch.device("cpu"))


def test_torchrun_with_an_explicit_gpu_is_refused(monkeypatch):
    from models import training

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="under torchrun each process takes its own GPU"):
        training.run(RunConfig(data_dir="d", device="cuda:0"))


def test_count_params_prints_both_variants(capsys, monkeypatch):
    from models import cost

    monkeypatch.setattr(cost, "step_times", lambda *a, **k: {"train_step_s": 1.0, "train_images_per_s": 16.0,
                                                             "inference_s": 0.5, "inference_images_per_s": 32.0})
    assert main(["--count-params", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| separable | fp32 |" in out and "| Conv2d | fp32 + channels-last |" in out and "104,196,546" in out


def test_a_run_resumed_after_an_epoch_is_the_uninterrupted_run(small_set, tmp_path):
    """The checkpoint carries torch's generator (dropout) with the weights, the optimiser and early
    stopping: resuming after epoch 0 gives the weights and selection of one uninterrupted run."""
    first = config_for(small_set, tmp_path / "parts", epochs=1, tta=(), skip_test=True)
    train(first, torch.device("cpu"))
    resumed = train(dataclasses.replace(first, epochs=2), torch.device("cpu"), resume=True)
    whole = train(config_for(small_set, tmp_path / "whole", epochs=2, tta=(), skip_test=True), torch.device("cpu"))
    assert resumed["best"] == whole["best"]
    a = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
