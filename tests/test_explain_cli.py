"""Tests of ``explain.py``: figures and JSON of a VGG16DWSep modelo.h5 carrying its own decision
threshold on a real chest X-ray, inception_v3 only with real weights (skipped in one line without
them), vgg16dwsep's ./modelo.h5 default and its refusal of synthetic-data models without --demo,
the help text, and one clear line with exit status 2 for each expected error."""
from __future__ import annotations

import contextlib
import io
import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import explain
from explainer import models
from explainer.core import ARGMAX, ThresholdDecision
from models.h5io import save_modelo_h5
from models.vgg16dwsep import VGG16DWSep
from tests.helpers import SMALL_224, real_files

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["NORMAL", "PNEUMONIA"]
DECISION = {"positive_class": 1, "threshold": 0.3}


@pytest.fixture(scope="module")
def xray_path() -> str:
    return real_files(SMALL_224 / "test" / "PNEUMONIA", n=1)[0]


def tiny_modelo(path: Path, metadata: dict | None = None, seed: int = 0) -> Path:
    """A VGG16DWSep with 32 x 32 inputs and seeded random weights, saved as a modelo.h5 (explained in a second)."""
    torch.manual_seed(seed)
    return save_modelo_h5(path, VGG16DWSep(input_size=32).eval(), class_names=CLASSES, metadata=metadata or {})


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = explain.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def vgg_report(xray_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """One run shared by the tests: a tiny modelo.h5 with a decision threshold, SLIC and colour
    segmentations, both families, 40 samples, --json (stdout redirected by hand: capsys is function-scoped)."""
    folder = tmp_path_factory.mktemp("explain")
    weights = tiny_modelo(folder / "modelo.h5", {"decision": DECISION})
    out = folder / "out"
    argv = ["--image", xray_path, "--model", "vgg16dwsep", "--weights", str(weights), "--segmentation", "slic",
            "colour", "--family", "logistic", "tree", "--samples", "40", "--seed", "3", "--out", str(out), "--json"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = explain.main(argv)
    assert status == 0
    return json.loads(stdout.getvalue()), out, stdout.getvalue()


@pytest.mark.data
@pytest.mark.slow
def test_cli_writes_every_figure_as_png(vgg_report: tuple[dict, Path, str]) -> None:
    report, out, _ = vgg_report
    expected = {"segments_slic.png", "segments_colour.png", "perturbed_slic.png", "perturbed_colour.png",
                "importance_slic_logistic.png", "importance_slic_tree.png", "importance_colour_logistic.png",
                "importance_colour_tree.png", "comparison.png", "explanation.json"}
    assert {path.name for path in out.iterdir()} == expected  # no temporary files left behind
    for name in expected - {"explanation.json"}:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert sorted(Path(path).name for path in report["figures"]) == sorted(expected - {"explanation.json"})


@pytest.mark.data
@pytest.mark.slow
def test_cli_json_says_what_each_explanation_may_claim(vgg_report: tuple[dict, Path, str]) -> None:
    report, out, stdout = vgg_report
    assert json.loads((out / "explanation.json").read_text()) == report
    assert report["model"] == "vgg16dwsep" and report["synthetic_data"] is False
    assert report["prediction"]["decision"] == "class 1 when P(class 1) >= 0.3"
    assert report["prediction"]["name"] == CLASSES[report["prediction"]["class"]]
    assert [(e["segmentation"], e["family"]) for e in report["explanations"]] == [
        ("slic", "logistic"), ("slic", "tree"), ("colour", "logistic"), ("colour", "tree")]
    for entry in report["explanations"]:
        ranked = entry["ranked"]
        assert sorted(row["superpixel"] for row in ranked) == list(range(entry["num_superpixels"]))
        coefficients = [row["coefficient"] for row in ranked]
        assert coefficients == sorted(coefficients, reverse=True)
        assert entry["num_samples"] == 40 and entry["sigma"] == 0.25 and entry["seed"] == 3
        assert entry["label"] == report["prediction"]["class"] and entry["decision"] == report["prediction"]["decision"]
        assert sum(row["pixels"] for row in ranked) == 299 * 299
        assert "score" not in entry
        assert entry["fidelity_metric"] == {"class": "weighted ROC AUC", "probability": "weighted R2"}[entry["target"]]
        assert entry["minority_needed"] == 10  # max(10, 1 % of 40)
        assert (entry["fallback_reason"] is not None) == (entry["minority_count"] < 10) == (entry["target"] == "probability")
        assert entry["insensitive"] == (entry["probability_range"] < 0.05) == (entry["insensitive_reason"] is not None)
    assert [(c["family"], c["segmentations"]) for c in report["comparisons"]] == [
        ("logistic", ["slic", "colour"]), ("tree", ["slic", "colour"])]
    assert stdout.lstrip().startswith("{")


def test_modelo_decision_is_read_from_its_metadata(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    with_rule = models.load_vgg16dwsep(tiny_modelo(tmp_path / "a.h5", {"decision": DECISION}), cpu, amp=False)
    assert with_rule.decision == ThresholdDecision(1, 0.3)
    assert models.load_vgg16dwsep(tiny_modelo(tmp_path / "b.h5"), cpu, amp=False).decision is ARGMAX
    for bad in ({"threshold": 0.3}, {"positive_class": 1, "threshold": "0.3"}, {"positive_class": 1, "threshold": 2},
                {"positive_class": 3, "threshold": 0.5}, 0.3):
        with pytest.raises(ValueError, match="c.h5: metadata 'decision'"):
            models.load_vgg16dwsep(tiny_modelo(tmp_path / "c.h5", {"decision": bad}), cpu, amp=False)


@pytest.mark.data
def test_vgg16dwsep_without_weights_uses_modelo_h5_here(xray_path: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--image", xray_path, "--model", "vgg16dwsep", "--samples", "4", "--out", "out"]
    line = one_error_line(*run_main(argv, capsys))
    assert "no --weights and no modelo.h5" in line and "--demo" in line and not (tmp_path / "out").exists()
    tiny_modelo(tmp_path / "modelo.h5")
    status, stdout, stderr = run_main(argv, capsys)
    assert status == 0, stderr
    assert "vgg16dwsep (modelo.h5 at modelo.h5)" in stdout and "(argmax)" in stdout
    assert "slic/logistic: ridge-probability, weighted R2" in stdout  # 4 samples: too few for a classifier


@pytest.mark.data
def test_a_model_trained_on_synthetic_data_needs_demo(xray_path: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    weights = tiny_modelo(tmp_path / "demo.h5", {"settings": {"demo": True}})
    argv = ["--image", xray_path, "--model", "vgg16dwsep", "--weights", str(weights), "--samples", "4",
            "--out", str(tmp_path / "out"), "--json"]
    line = one_error_line(*run_main(argv, capsys))
    assert "demo.h5 was trained on synthetic data; pass --demo" in line
    status, stdout, stderr = run_main([*argv, "--demo"], capsys)
    assert status == 0, stderr
    report = json.loads(stdout)
    assert report["synthetic_data"] is True and "SYNTHETIC" in report["weights"]


@pytest.mark.data
def test_demo_without_weights_trains_briefly_on_synthetic_data(xray_path: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's wiring (the training itself: test_explainer.py); a tiny network stands in for it."""
    steps = []

    def brief_training(settings, device, progress):
        steps.append(settings.steps)
        torch.manual_seed(0)
        return VGG16DWSep(input_size=32).eval(), {"loss": 0.7}

    monkeypatch.setattr(models, "train_briefly_on_synthetic", brief_training)
    status, stdout, stderr = run_main(["--image", xray_path, "--model", "vgg16dwsep", "--demo", "--train-steps", "1",
                                       "--samples", "4", "--out", str(tmp_path), "--json"], capsys)
    assert status == 0, stderr
    report = json.loads(stdout)
    assert report["synthetic_data"] is True and "NOT a real model" in report["weights"] and steps == [1]
    saved = models.load_vgg16dwsep(tmp_path / explain.SYNTHETIC_MODEL, torch.device("cpu"), demo=True)
    assert saved.synthetic
    with pytest.raises(ValueError, match="synthetic"):
        models.load_vgg16dwsep(tmp_path / explain.SYNTHETIC_MODEL, torch.device("cpu"))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """inception_v3's state dict (seeded, not ImageNet: the CLI cannot tell) as a weights file."""
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    net = models.seeded_init(lambda: torchvision.models.inception_v3(weights=None, aux_logits=True,
                                                                          init_weights=False), 0)
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.data
def test_inception_with_weights_given_by_path(xray_path: str, inception_file: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    status, stdout, stderr = run_main(["--image", xray_path, "--weights", str(inception_file), "--samples", "4",
                                       "--batch-size", "4", "--out", str(tmp_path), "--json"], capsys)
    assert status == 0, stderr
    report = json.loads(stdout)
    assert report["model"] == "inception_v3" and report["weights"] == "ImageNet (inception.pth)"
    assert report["prediction"]["name"] == models.INCEPTION_WEIGHTS.meta["categories"][report["prediction"]["class"]]
    assert report["prediction"]["decision"] == "argmax"
    assert (tmp_path / "importance_slic_logistic.png").read_bytes()[:8] == PNG_MAGIC


def offline_hub(monkeypatch: pytest.MonkeyPatch, hub: Path) -> None:
    monkeypatch.setattr(models.torch.hub, "get_dir", lambda: str(hub))

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(type(models.INCEPTION_WEIGHTS), "get_state_dict", offline)


@pytest.mark.data
def test_inception_without_imagenet_weights_is_skipped_in_one_line(xray_path: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    offline_hub(monkeypatch, tmp_path / "hub")
    status, stdout, stderr = run_main(["--image", xray_path, "--out", str(tmp_path / "out"), "--json"], capsys)
    assert status == 0
    lines = stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("explain.py:")] == [lines[-1]]
    assert lines[-1].startswith("explain.py: inception_v3 skipped: no ImageNet inception_v3 weights")
    assert str(tmp_path / "hub" / "checkpoints" / "inception_v3_google-0cc3c7bd.pth") in lines[-1]
    assert models.INCEPTION_WEIGHTS.url in lines[-1] and "--weights PATH" in lines[-1]
    report = json.loads(stdout)
    assert report["model"] == "inception_v3" and "not in torch hub's cache" in report["skipped"]
    assert not (tmp_path / "out").exists()  # no figures of a random network


def test_inception_weights_saved_without_num_batches_tracked_still_load(inception_file: Path, tmp_path: Path) -> None:
    """Files saved before BatchNorm counted its batches lack those entries; torch fills them in."""
    state = torch.load(inception_file, weights_only=True)
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(state)
    torch.save(old, tmp_path / "old.pth")
    loaded = models.load_inception_v3(tmp_path / "old.pth", torch.device("cpu"))
    assert loaded.weights_note == "ImageNet (old.pth)"


def one_error_line(status: int, stdout: str, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("explain.py: error:")]
    assert status == 2 and stdout == "" and len(lines) == 1, stderr
    return lines[0]


def test_missing_image_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(*run_main(["--image", str(tmp_path / "nope.jpeg"), "--out", str(tmp_path / "out")], capsys))
    assert "image not found" in line and "nope.jpeg" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.data
@pytest.mark.parametrize("model", ["inception_v3", "vgg16dwsep"])
def test_missing_weights_file_is_one_line(model: str, xray_path: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(*run_main(["--image", xray_path, "--model", model, "--weights", str(tmp_path / "w.bin"),
                                     "--out", str(tmp_path)], capsys))
    assert "not found" in line and "w.bin" in line


@pytest.mark.data
def test_wrong_kind_of_weights_file_is_one_line(xray_path: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import h5py

    h5 = tmp_path / "modelo.h5"
    with h5py.File(h5, "w") as f:
        f["x"] = 0
    line = one_error_line(*run_main(["--image", xray_path, "--weights", str(h5), "--out", str(tmp_path)], capsys))
    assert "HDF5" in line and "--model vgg16dwsep" in line
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    line = one_error_line(*run_main(["--image", xray_path, "--weights", str(text), "--out", str(tmp_path)], capsys))
    assert "notes.pth is not a torch state dict file of inception_v3" in line
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    line = one_error_line(*run_main(["--image", xray_path, "--weights", str(other), "--out", str(tmp_path)], capsys))
    assert "does not hold torchvision's inception_v3 weights" in line and "unexpected" in line
    shaped = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    shaped["fc.weight"] = torch.zeros(2, 2048)  # the right names, a two-class head
    torch.save(shaped, other)
    line = one_error_line(*run_main(["--image", xray_path, "--weights", str(other), "--out", str(tmp_path)], capsys))
    assert "size mismatch for fc.weight" in line


@pytest.mark.data
def test_out_that_is_a_file_is_one_line(xray_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "figures.png"
    afile.write_text("x")
    weights = tiny_modelo(tmp_path / "m.h5")
    line = one_error_line(*run_main(["--image", xray_path, "--model", "vgg16dwsep", "--weights", str(weights),
                                     "--samples", "4", "--out", str(afile)], capsys))
    assert "figures.png" in line


@pytest.mark.parametrize("bad", [["--samples", "1"], ["--sigma", "0"], ["--batch-size", "0"], ["--top-k", "0"],
                                 ["--tree-depth", "0"], ["--demo"]])
@pytest.mark.data
def test_bad_values_are_one_line(bad: list[str], xray_path: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(*run_main(["--image", xray_path, "--out", str(tmp_path), *bad], capsys))
    assert bad[0] in line


@pytest.mark.parametrize("bad", [["--no-such-option"], ["--segmentation", "watershed"], ["--model", "resnet"],
                                 ["--samples", "many"]])
@pytest.mark.data
def test_bad_arguments_exit_with_usage(bad: list[str], xray_path: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        explain.main(["--image", xray_path, "--out", str(tmp_path), *bad])
    assert exit_info.value.code == 2


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    parser = explain.get_args_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 15, action.option_strings
    with pytest.raises(SystemExit) as exit_info:
        explain.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "max(10, 1 %)" in text and "insensitive" in text and "./modelo.h5" in text and "--demo" in text


@pytest.mark.parametrize("gain", [1.0, 1.35])
def test_vgg16dwsep_weights_are_explained_with_their_eval_gain(gain: float, tmp_path: Path) -> None:
    """A modelo.h5 validated with its images x1.35 (the default recipe) saw validation and test images
    x1.35: LIME's model calls must see the same, or the explanation is of a model on inputs it was
    never evaluated on. Without a stored transform, /255 alone."""
    decision = DECISION | {"eval_transform": "gain"} if gain != 1.0 else DECISION
    path = tiny_modelo(tmp_path / "m.h5", {"decision": decision})
    loaded = models.load_vgg16dwsep(path, device=torch.device("cpu"), amp=False)
    image = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    expected = torch.from_numpy(image).permute(0, 3, 1, 2) * gain
    assert torch.allclose(loaded.predictor.model_input(image), expected, atol=1e-6)
    assert ("x1.35" in loaded.weights_note) == (gain != 1.0)


def test_vgg16dwsep_weights_evaluated_with_the_brief_transform_get_one_fixed_noise_draw(tmp_path: Path) -> None:
    """Models evaluated with the brief's Compose see its noise as one seeded U[1.2, 1.5] field, the same
    for every image and every call (no flip or rotation, which would move the superpixels)."""
    path = tiny_modelo(tmp_path / "m.h5", {"decision": DECISION | {"eval_transform": "brief"}})
    cpu = torch.device("cpu")
    loaded = models.load_vgg16dwsep(path, cpu, amp=False, seed=3)
    image = np.ones((2, 32, 32, 3), dtype=np.float32)
    x = loaded.predictor.model_input(image)
    assert x.min() >= 1.2 and x.max() <= 1.5 and abs(float(x.mean()) - 1.35) < 0.02
    assert torch.equal(x[0], x[1]) and torch.equal(loaded.predictor.model_input(image), x)
    assert float((x[0, 0] - x[0, 1]).abs().mean()) > 0.05  # per value, not per channel
    again = models.load_vgg16dwsep(path, cpu, amp=False, seed=3)
    other = models.load_vgg16dwsep(path, cpu, amp=False, seed=4)
    assert torch.equal(again.predictor.model_input(image), x)
    assert not torch.equal(other.predictor.model_input(image), x)
    assert "evaluation noise" in loaded.weights_note


def test_lime_predictor_rejects_a_multiplier_of_the_wrong_shape() -> None:
    net = VGG16DWSep(input_size=32)
    for shape in ((3, 1, 1), (3, 16, 16), (32, 32)):
        with pytest.raises(ValueError, match="3 x 32 x 32"):
            models.TorchPredictor(net, "cpu", 32, multiplier=torch.ones(shape))
    models.TorchPredictor(net, "cpu", 32, multiplier=1.35)
    models.TorchPredictor(net, "cpu", 32, multiplier=torch.ones(3, 32, 32))
