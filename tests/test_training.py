"""The whole run on a tiny synthetic set: outputs, modelo.h5, resume after kill -9, CLI errors."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.h5io import load_modelo_h5, read_modelo_metadata
from models.engine import bf16_native, precision_label, precision_options
from models.training import train
from pipelines.synthetic import make_synthetic_dataset
from train import Settings, main

from .helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("train") / "data", n_train=(6, 10), n_test=(3, 3),
                                  seed=3, min_size=96, max_size=160)


def settings_for(data: Path, out: Path, **kw) -> Settings:
    base = dict(data_dir=str(data), out=str(out), weights_out=str(out / "modelo.h5"), epochs=2, batch_size=8,
                num_workers=0, pretrained=False, tta=(2,))
    return Settings(**(base | kw))


def test_train_writes_every_output(small_set, tmp_path):
    torch.manual_seed(0)
    summary = train(settings_for(small_set, tmp_path), torch.device("cpu"))
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert {"train_loss", "val_loss", "val_accuracy", "val_f1", "seconds", "val_seconds",
            "train_images_per_s"} <= set(rows[0])
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
    assert model(torch.rand(1, 3, 224, 224)).shape == (1, 2)
    assert set(summary["test"]) == {"no_tta", "tta2"} and summary["test"]["no_tta"]["n"] == 6


def test_frozen_first_convolutions_do_not_move(small_set, tmp_path):
    torch.manual_seed(0)
    train(settings_for(small_set, tmp_path, epochs=1, tta=()), torch.device("cpu"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    torch.manual_seed(0)
    from models.vgg16dwsep import VGG16DWSep

    init = VGG16DWSep().state_dict()
    assert torch.equal(ckpt["model"]["features.0.weight"], init["features.0.weight"])
    assert torch.equal(ckpt["model"]["features.2.bias"], init["features.2.bias"])
    assert not torch.equal(ckpt["model"]["classifier.1.weight"], init["classifier.1.weight"])


def test_precision_is_channels_last_and_bf16_only_where_native():
    cpu = torch.device("cpu")
    assert precision_options(cpu, use_amp=False) == {"amp_dtype": None, "channels_last": True}
    expected = torch.bfloat16 if bf16_native(cpu) else None
    assert precision_options(cpu, use_amp=True)["amp_dtype"] == expected
    assert precision_label(precision_options(cpu, use_amp=False)) == "fp32 + channels-last"
    assert bf16_native(torch.device("cuda")) and not bf16_native(torch.device("meta"))


def test_summary_records_the_precision_used(small_set, tmp_path):
    summary = train(settings_for(small_set, tmp_path, epochs=1, tta=(), amp=False), torch.device("cpu"))
    assert summary["precision"] == "fp32 + channels-last"
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["precision"] == "fp32 + channels-last" and written["eval_gain"] == 1.0


def test_eval_noise_is_recorded_reused_by_eval_only_and_seeded(small_set, tmp_path):
    from models.training import evaluate_weights

    settings = settings_for(small_set, tmp_path, epochs=1, tta=(), eval_noise=True)
    torch.manual_seed(0)  # a fixed model: some unseeded ones are nearly constant on this tiny set
    summary = train(settings, torch.device("cpu"))
    assert summary["eval_noise"] is True and summary["eval_gain"] == 1.0
    meta = read_modelo_metadata(tmp_path / "modelo.h5")["metadata"]
    assert meta["settings"]["eval_noise"] is True and "MultiplicativeNoise" in meta["eval_transform"]
    plain, cpu, weights = settings_for(small_set, tmp_path, tta=()), torch.device("cpu"), tmp_path / "modelo.h5"

    def evaluated(**kw) -> tuple[bool, float, float]:
        result = evaluate_weights(plain, weights, cpu, **kw)
        return result["eval_noise"], result["eval_gain"], result["test"]["no_tta"]["loss"]

    noisy = evaluated()  # as trained
    assert noisy[:2] == (True, 1.0)
    assert evaluated() == noisy  # the same draws again
    clean = evaluated(eval_noise=False)
    assert clean[:2] == (False, 1.0) and clean[2] != pytest.approx(noisy[2], rel=1e-4)  # the noise reached the images
    assert evaluated(eval_gain=1.35)[:2] == (False, 1.35)


def test_bn_recalibrate_saves_statistics_of_the_evaluation_transform_and_eval_only_reuses_it(small_set, tmp_path):
    from models.training import evaluate_weights, recalibrate, recalibration_indices
    from pipelines.data import index_dataset
    from pipelines.loaders import make_samplers

    settings = settings_for(small_set, tmp_path, epochs=1, tta=(2,), bn_recalibrate=8)
    torch.manual_seed(0)
    summary = train(settings, torch.device("cpu"))
    assert summary["bn_recalibrate"] == 8
    assert read_modelo_metadata(tmp_path / "modelo.h5")["metadata"]["settings"]["bn_recalibrate"] == 8
    saved, _ = load_modelo_h5(tmp_path / "modelo.h5")
    bns = [m for m in saved.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # the saved statistics are those of the 8 chosen training images under the evaluation transform
    index = index_dataset(small_set)
    chosen = recalibration_indices(make_samplers(index, 0, 0.2, None).train_indices, 8, 0)
    assert len(chosen) == 8 and len(set(chosen.tolist())) == 8
    again = copy_of(saved)
    for m in again.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(7.0)
    assert recalibrate(again, index, settings, torch.device("cpu"), augment=False) == 8
    for a, b in zip(bns, [m for m in again.modules() if isinstance(m, torch.nn.BatchNorm2d)]):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
    # under the training augmentation (TTA copies) they differ
    augmented = copy_of(saved)
    recalibrate(augmented, index, settings, torch.device("cpu"), augment=True)
    assert not torch.allclose(bns[0].running_var, [m for m in augmented.modules()
                                                   if isinstance(m, torch.nn.BatchNorm2d)][0].running_var)
    plain, cpu = settings_for(small_set, tmp_path, tta=()), torch.device("cpu")
    as_trained = evaluate_weights(plain, tmp_path / "modelo.h5", cpu)
    assert as_trained["bn_recalibrate"] == 8
    # train's own test pass skipped re-estimating (the saved statistics already fit) and got the same result
    assert as_trained["test"]["no_tta"]["loss"] == pytest.approx(summary["test"]["no_tta"]["loss"], rel=1e-6)
    assert evaluate_weights(plain, tmp_path / "modelo.h5", cpu, bn_recalibrate=0)["bn_recalibrate"] == 0
    with pytest.raises(ValueError, match="--bn-recalibrate must be >= 0"):
        settings_for(small_set, tmp_path, bn_recalibrate=-1)


def test_bn_statistics_script_prints_stored_and_both_recalibrations(small_set, tmp_path, capsys):
    train(settings_for(small_set, tmp_path, epochs=1, tta=()), torch.device("cpu"))
    script = load_script("bn_statistics")
    for weights in ("modelo.h5", "checkpoint.pt"):
        assert script.main(["--weights", str(tmp_path / weights), "--data-dir", str(small_set), "--images", "8"]) == 0
        rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
        assert [(r[0][2:], r[1]) for r in rows] == [
            (stats, split) for stats in ("as training left them", "re-estimated, evaluation transform",
                                         "re-estimated, training augmentation") for split in ("validation", "test")]
        assert rows[0][2] != rows[2][2]  # re-estimating changed the validation loss


def copy_of(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def test_no_eval_noise_keeps_the_gain_a_model_was_trained_with(small_set, tmp_path):
    from models.training import evaluate_weights

    train(settings_for(small_set, tmp_path, epochs=1, tta=(), eval_gain=1.35), torch.device("cpu"))
    plain, cpu, weights = settings_for(small_set, tmp_path, tta=()), torch.device("cpu"), tmp_path / "modelo.h5"
    kept = evaluate_weights(plain, weights, cpu, eval_noise=False)
    assert (kept["eval_noise"], kept["eval_gain"]) == (False, 1.35)
    noisy = evaluate_weights(plain, weights, cpu, eval_noise=True)
    assert (noisy["eval_noise"], noisy["eval_gain"]) == (True, 1.0)


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_kill_9_loses_at_most_the_epoch_in_progress(small_set, tmp_path):
    args = ["--data-dir", str(small_set), "--out", str(tmp_path), "--weights-out", str(tmp_path / "modelo.h5"),
            "--epochs", "3", "--batch-size", "8", "--num-workers", "0", "--no-pretrained", "--no-tta"]
    proc = run_cli(args)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 1
                                          and (tmp_path / "checkpoint.pt").exists()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    time.sleep(0.5)  # now inside epoch 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"]
    resumed = run_cli(args + ["--resume"])
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resumed from {tmp_path / 'checkpoint.pt'} at epoch {done + 1}" in err
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs == list(range(3)) or epochs[: done + 1] == list(range(done + 1))
    assert epochs[-1] == 2 and sorted(set(epochs)) == [0, 1, 2]
    assert "| no TTA |" in out


@pytest.mark.parametrize("argv, fragment", [
    (["--check-data"], "--data-dir"),
    (["--data-dir", "/nonexistent/xray"], "/nonexistent/xray"),
    (["--data-dir", ".", "--epochs", "0"], "--epochs"),
    (["--data-dir", ".", "--eval-only"], "--weights"),
    (["--data-dir", ".", "--eval-noise", "--eval-gain", "1.35"], "not both"),
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


def test_eval_only_prints_one_json_object(small_set, tmp_path, capsys):
    torch.manual_seed(0)
    train(settings_for(small_set, tmp_path, epochs=1, tta=()), torch.device("cpu"))
    capsys.readouterr()
    rc = main(["--data-dir", str(small_set), "--eval-only", "--weights", str(tmp_path / "modelo.h5"),
               "--tta", "2", "--json", "--num-workers", "0"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["test"]) == {"no_tta", "tta2"}
    assert 0 <= result["test"]["no_tta"]["accuracy"] <= 1


def test_train_first_convs_moves_them_and_is_recorded(small_set, tmp_path):
    torch.manual_seed(0)
    summary = train(settings_for(small_set, tmp_path, epochs=1, tta=(), train_first_convs=True), torch.device("cpu"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    torch.manual_seed(0)
    from models.vgg16dwsep import VGG16DWSep

    init = VGG16DWSep().state_dict()
    for key in ("features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias"):
        assert not torch.equal(ckpt["model"][key], init[key]), key
    assert len(ckpt["optimizer"]["state"]) == sum(1 for _ in VGG16DWSep().parameters())  # all in Adam
    assert summary["pretrained"] == "NONE: first two convolutions random (--no-pretrained), trained"
    assert read_modelo_metadata(tmp_path / "modelo.h5")["metadata"]["settings"]["train_first_convs"] is True


def test_resume_refuses_settings_that_change_the_run(small_set, tmp_path, capsys, caplog, monkeypatch):
    base = ["--data-dir", str(small_set), "--out", str(tmp_path), "--weights-out", str(tmp_path / "modelo.h5"),
            "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--no-pretrained", "--no-tta"]
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
                              (["--eval-gain", "1.35"], "eval_gain=1.0; this run asks for eval_gain=1.35"),
                              (["--weights-out", str(tmp_path / "other.h5")], "weights_out=")):
        assert main(base + ["--epochs", "2", "--resume", *changed]) == 2, changed
        err = capsys.readouterr().err
        assert fragment in err and "another --out" in err and "Traceback" not in err, err
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["world_size"] == 1
    ckpt["world_size"] = 2  # as if written under torchrun --nproc_per_node=2
    torch.save(ckpt, ckpt_path)
    assert main(base + ["--epochs", "2", "--resume"]) == 2
    assert "world_size=2; this run asks for world_size=1" in capsys.readouterr().err
    ckpt_path.write_bytes(ckpt_before)
    monkeypatch.undo()
    assert ckpt_path.read_bytes() == ckpt_before  # nothing trained, nothing written
    # the same folder spelled another way, and a setting that only warns: accepted, one more epoch
    same_dir = ["--data-dir", str(small_set / "train" / "..")]
    with caplog.at_level("WARNING"):
        assert main(base[2:] + same_dir + ["--epochs", "2", "--resume", "--no-amp"]) == 0
    assert "--resume: amp was True, now False" in caplog.text
    assert [json.loads(line)["epoch"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [0, 1]


def test_bare_tta_says_it_turns_tta_off(capsys):
    from train import get_args_parser

    assert get_args_parser().parse_args(["--tta"]).tta == [] == get_args_parser().parse_args(["--no-tta"]).tta
    assert "turns test-time augmentation off" in capsys.readouterr().err
    assert get_args_parser().parse_args([]).tta == [4, 8]
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--tta", "4", "--no-tta"])


@pytest.mark.parametrize("argv, fragment", [
    (["--weights", "modelo.h5"], "--weights is read only with --eval-only"),
    (["--json"], "--json is for --eval-only"),
    (["--device", "foo"], "--device foo: expected"),
])
def test_options_that_would_be_ignored_are_refused(small_set, tmp_path, argv, fragment, capsys):
    assert main(["--data-dir", str(small_set), "--out", str(tmp_path), "--no-pretrained", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_out_that_is_a_file_is_one_line(small_set, tmp_path, capsys):
    afile = tmp_path / "notafolder.h5"
    afile.write_text("x")
    assert main(["--data-dir", str(small_set), "--out", str(afile), "--no-pretrained", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "notafolder.h5" in err and "Traceback" not in err


def test_resume_refuses_other_first_convolutions(small_set, tmp_path, capsys):
    base = ["--data-dir", str(small_set), "--out", str(tmp_path), "--weights-out", str(tmp_path / "modelo.h5"),
            "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--no-pretrained", "--no-tta"]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base + ["--epochs", "2", "--resume", "--train-first-convs"]) == 2
    err = capsys.readouterr().err
    assert "'train_first_convs': False}, this run asks for" in err and "Traceback" not in err
    ckpt_path = tmp_path / "checkpoint.pt"  # a checkpoint from before the option: accepted without it
    ckpt = torch.load(ckpt_path, weights_only=False)
    del ckpt["settings"]["train_first_convs"]
    torch.save(ckpt, ckpt_path)
    assert main(base + ["--epochs", "2", "--resume"]) == 0


def test_train_subset_larger_than_the_split_warns(small_set, caplog):
    from pipelines.data import index_dataset
    from pipelines.loaders import make_samplers

    index = index_dataset(small_set)
    whole = make_samplers(index, 0, 0.2, None)
    with caplog.at_level("WARNING"):
        asked = make_samplers(index, 0, 0.2, 100_000)
    assert f"--train-subset 100000: the training split has {len(whole.train_indices)} images" in caplog.text
    assert list(asked.train_indices) == list(whole.train_indices)
    caplog.clear()
    with caplog.at_level("WARNING"):
        make_samplers(index, 0, 0.2, 8)
    assert "--train-subset" not in caplog.text


def test_a_new_run_says_whose_weights_it_replaces(tmp_path, monkeypatch, caplog):
    from models import training

    target = tmp_path / "modelo.h5"
    settings = settings_for(tmp_path, tmp_path / "run2", weights_out=str(target))
    with caplog.at_level("WARNING"):
        training.warn_if_overwriting(settings)
    assert caplog.text == ""  # nothing there yet
    target.write_text("not hdf5")
    with caplog.at_level("WARNING"):
        training.warn_if_overwriting(settings)
    assert f"{target} exists (not a modelo.h5 this version reads)" in caplog.text
    caplog.clear()
    monkeypatch.setattr(training, "read_modelo_metadata", lambda path: {
        "metadata": {"settings": {"out": "out/run1"}, "best": {"epoch": 7, "val_loss": 0.0812}}})
    with caplog.at_level("WARNING"):
        training.warn_if_overwriting(settings)
    assert "run in 'out/run1', best epoch 7, validation loss 0.0812" in caplog.text
    assert "give --weights-out to keep it" in caplog.text


def test_resume_warns_for_settings_that_change_the_augmentation_stream(caplog):
    from models.training import check_resumed_settings

    ours = Settings(data_dir="d", num_workers=2, loader="dali")
    saved = dataclasses.asdict(Settings(data_dir="d", num_workers=1, loader="torchvision"))
    with caplog.at_level("WARNING"):
        check_resumed_settings(saved, ours, Path("c.pt"))
    assert "num_workers was 1, now 2" in caplog.text and "loader was 'torchvision', now 'dali'" in caplog.text
    saved_old = {k: v for k, v in saved.items() if k not in ("seed", "num_workers")}  # an older checkpoint
    check_resumed_settings(saved_old, dataclasses.replace(ours, seed=5), Path("c.pt"))  # keys it lacks: not checked
