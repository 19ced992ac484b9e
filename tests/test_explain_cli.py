"""Tests of ``explain.py``: figures and JSON from a random-weights run on a real chest X-ray, the
VGG16DWSep path, and one clear line with a non-zero exit for each expected error."""
from __future__ import annotations

import contextlib
import io
import json
import urllib.error
from pathlib import Path

import pytest
import torch

import explain
from explainer import models
from tests.helpers import SMALL_224, real_files

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def xray_path() -> str:
    return real_files(SMALL_224 / "test" / "PNEUMONIA", n=1)[0]


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = explain.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def inception_report(xray_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """One run shared by the tests: inception_v3 with random weights, two segmentations, two
    families, 6 samples in one model call each (calls cost seconds on the shared CPU), --json (stdout redirected by hand: capsys is function-scoped)."""
    out = tmp_path_factory.mktemp("explain") / "out"
    argv = ["--image", xray_path, "--model", "inception_v3", "--random-weights", "--segmentation", "slic", "birch",
            "--family", "logistic", "tree", "--samples", "6", "--batch-size", "6", "--seed", "3",
            "--out", str(out), "--json"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = explain.main(argv)
    assert status == 0
    return json.loads(stdout.getvalue()), out, stdout.getvalue()


def test_cli_writes_every_figure_as_png(inception_report: tuple[dict, Path, str]) -> None:
    report, out, _ = inception_report
    expected = {"segments_slic.png", "segments_birch.png", "perturbed_slic.png", "perturbed_birch.png",
                "importance_slic_logistic.png", "importance_slic_tree.png", "importance_birch_logistic.png",
                "importance_birch_tree.png", "comparison.png", "explanation.json"}
    assert {path.name for path in out.iterdir()} == expected  # no temporary files left behind
    for name in expected - {"explanation.json"}:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert sorted(Path(path).name for path in report["figures"]) == sorted(expected - {"explanation.json"})


def test_cli_json_ranks_every_superpixel_and_says_random_weights(inception_report: tuple[dict, Path, str]) -> None:
    report, out, stdout = inception_report
    assert json.loads((out / "explanation.json").read_text()) == report
    assert report["random_weights"] is True and "RANDOM WEIGHTS" in report["weights"]
    assert report["model"] == "inception_v3" and report["prediction"]["name"] == models.INCEPTION_WEIGHTS.meta[
        "categories"][report["prediction"]["class"]]
    assert [(e["segmentation"], e["family"]) for e in report["explanations"]] == [
        ("slic", "logistic"), ("slic", "tree"), ("birch", "logistic"), ("birch", "tree")]
    for entry in report["explanations"]:
        ranked = entry["ranked"]
        assert sorted(row["superpixel"] for row in ranked) == list(range(entry["num_superpixels"]))
        coefficients = [row["coefficient"] for row in ranked]
        assert coefficients == sorted(coefficients, reverse=True)
        assert entry["num_samples"] == 6 and entry["sigma"] == 0.25 and entry["seed"] == 3
        assert entry["label"] == report["prediction"]["class"]
        assert sum(row["pixels"] for row in ranked) == 299 * 299
    assert stdout.lstrip().startswith("{")


def test_cli_vgg16dwsep_with_random_weights(xray_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, stdout, stderr = run_main(["--image", xray_path, "--model", "vgg16dwsep", "--random-weights",
                                       "--samples", "6", "--out", str(tmp_path), "--json"], capsys)
    assert status == 0, stderr
    report = json.loads(stdout)
    assert report["prediction"]["name"] in ("NORMAL", "PNEUMONIA")
    assert report["random_weights"] and "RANDOM WEIGHTS" in report["weights"]
    assert (tmp_path / "importance_slic_logistic.png").read_bytes()[:8] == PNG_MAGIC


def one_error_line(status: int, stdout: str, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("explain.py: error:")]
    assert status == 1 and stdout == "" and len(lines) == 1, stderr
    return lines[0]


def test_missing_image_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(*run_main(["--image", str(tmp_path / "nope.jpeg"), "--random-weights",
                                     "--out", str(tmp_path / "out")], capsys))
    assert "image not found" in line and "nope.jpeg" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ["inception_v3", "vgg16dwsep"])
def test_missing_weights_file_is_one_line(model: str, xray_path: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(*run_main(["--image", xray_path, "--model", model, "--weights", str(tmp_path / "w.bin"),
                                     "--out", str(tmp_path)], capsys))
    assert "not found" in line and "w.bin" in line


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
    import torchvision

    shaped = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    shaped["fc.weight"] = torch.zeros(2, 2048)  # the right names, a two-class head
    torch.save(shaped, other)
    line = one_error_line(*run_main(["--image", xray_path, "--weights", str(other), "--out", str(tmp_path)], capsys))
    assert "size mismatch for fc.weight" in line


def test_inception_weights_saved_without_num_batches_tracked_still_load(tmp_path: Path) -> None:
    """Files saved before BatchNorm counted its batches lack those entries; torch fills them in."""
    import torchvision

    state = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(state)
    torch.save(old, tmp_path / "old.pth")
    loaded = models.load_inception_v3(tmp_path / "old.pth", False, torch.device("cpu"))
    assert loaded.weights_note == "ImageNet (old.pth)"


def test_out_that_is_a_file_is_one_line(xray_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "figures.png"
    afile.write_text("x")
    line = one_error_line(*run_main(["--image", xray_path, "--random-weights", "--out", str(afile)], capsys))
    assert "figures.png" in line


def test_missing_imagenet_weights_say_where_to_put_them(xray_path: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(models.torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(type(models.INCEPTION_WEIGHTS), "get_state_dict", offline)
    line = one_error_line(*run_main(["--image", xray_path, "--out", str(tmp_path)], capsys))
    assert str(tmp_path / "hub" / "checkpoints" / "inception_v3_google-0cc3c7bd.pth") in line
    assert models.INCEPTION_WEIGHTS.url in line and "--random-weights" in line


@pytest.mark.parametrize("bad", [["--samples", "1"], ["--sigma", "0"], ["--batch-size", "0"], ["--top-k", "0"]])
def test_bad_values_are_one_line(bad: list[str], xray_path: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error_line(*run_main(["--image", xray_path, "--random-weights", "--out", str(tmp_path), *bad], capsys))
    assert bad[0] in line


@pytest.mark.parametrize("bad", [["--weights", "w.pth", "--random-weights"], ["--segmentation", "watershed"],
                                 ["--model", "resnet"], ["--samples", "many"]])
def test_bad_arguments_exit_with_usage(bad: list[str], xray_path: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        explain.main(["--image", xray_path, "--out", str(tmp_path), *bad])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("gain", [1.0, 1.35])
def test_vgg16dwsep_weights_are_explained_with_their_eval_gain(gain: float, tmp_path: Path) -> None:
    """A modelo.h5 selected with --eval-gain g saw validation and test images x g: LIME's model calls
    must see the same, or the explanation is of a model on inputs it was never evaluated on."""
    import numpy as np
    import torch

    from models.h5io import save_modelo_h5
    from models.vgg16dwsep import VGG16DWSep

    torch.manual_seed(0)
    net = VGG16DWSep(input_size=32).eval()
    path = save_modelo_h5(tmp_path / "m.h5", net, class_names=["NORMAL", "PNEUMONIA"],
                          metadata={"settings": {"eval_gain": gain}})
    loaded = models.load_vgg16dwsep(path, random_weights=False, device=torch.device("cpu"), amp=False)
    image = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    expected = torch.from_numpy(image).permute(0, 3, 1, 2) * gain
    assert torch.allclose(loaded.predictor.model_input(image), expected, atol=1e-6)
    assert ("x1.35" in loaded.weights_note) == (gain != 1.0)


def test_vgg16dwsep_weights_selected_with_eval_noise_get_one_fixed_noise_draw(tmp_path: Path) -> None:
    """--eval-noise models see one seeded U[1.2, 1.5] field, the same for every image and every call."""
    import numpy as np
    import torch

    from models.h5io import save_modelo_h5
    from models.vgg16dwsep import VGG16DWSep

    torch.manual_seed(0)
    path = save_modelo_h5(tmp_path / "m.h5", VGG16DWSep(input_size=32).eval(), class_names=["NORMAL", "PNEUMONIA"],
                          metadata={"settings": {"eval_gain": 1.0, "eval_noise": True}})
    cpu = torch.device("cpu")
    loaded = models.load_vgg16dwsep(path, random_weights=False, device=cpu, amp=False, seed=3)
    image = np.ones((2, 32, 32, 3), dtype=np.float32)
    x = loaded.predictor.model_input(image)
    assert x.min() >= 1.2 and x.max() <= 1.5 and abs(float(x.mean()) - 1.35) < 0.02
    assert torch.equal(x[0], x[1]) and torch.equal(loaded.predictor.model_input(image), x)
    assert float((x[0, 0] - x[0, 1]).abs().mean()) > 0.05  # per value, not per channel
    again = models.load_vgg16dwsep(path, random_weights=False, device=cpu, amp=False, seed=3)
    other = models.load_vgg16dwsep(path, random_weights=False, device=cpu, amp=False, seed=4)
    assert torch.equal(again.predictor.model_input(image), x)
    assert not torch.equal(other.predictor.model_input(image), x)
    assert "--eval-noise" in loaded.weights_note


def test_lime_predictor_rejects_a_multiplier_of_the_wrong_shape() -> None:
    import torch

    from models.vgg16dwsep import VGG16DWSep

    net = VGG16DWSep(input_size=32)
    for shape in ((3, 1, 1), (3, 16, 16), (32, 32)):
        with pytest.raises(ValueError, match="3 x 32 x 32"):
            models.TorchPredictor(net, "cpu", 32, multiplier=torch.ones(shape))
    models.TorchPredictor(net, "cpu", 32, multiplier=1.35)
    models.TorchPredictor(net, "cpu", 32, multiplier=torch.ones(3, 32, 32))
