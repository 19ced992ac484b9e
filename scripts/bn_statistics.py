"""Validation and test metrics of a model's weights with the BatchNorm statistics training left them,
and with statistics re-estimated over training images (``models.engine.recalibrate_batchnorm``, what
``train.py --bn-recalibrate N`` does) under the evaluation transform and under the training augmentation.

Rows: one per (statistics, split). Validation is epoch 0's ``ReplicarMuestreoDePrueba`` order of the
run's seed, the test split in order; both under the model's evaluation intensity (its ``--eval-gain``;
``--gain`` overrides), no TTA. The recalibration images are ``models.training.recalibration_indices``:
the same seeded subset of the training split as ``--bn-recalibrate``.

    .venv/bin/python scripts/bn_statistics.py --weights out/full_cpu/modelo.h5
    .venv/bin/python scripts/bn_statistics.py --weights out/full_cpu/checkpoint.pt   # the last epoch's weights
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import SHARED_DATA, run_cli, script_parser  # noqa: E402

from models.engine import classification_metrics, precision_options, predict, recalibrate_batchnorm  # noqa: E402
from models.h5io import load_modelo_h5  # noqa: E402
from models.training import recalibration_indices  # noqa: E402
from models.vgg16dwsep import VGG16DWSep  # noqa: E402
from pipelines.data import index_dataset  # noqa: E402
from pipelines.loaders import make_samplers  # noqa: E402
from pipelines.transforms import get_toolchain  # noqa: E402
from report import markdown_table  # noqa: E402

BATCH = 16


def load_weights(path: str) -> tuple[torch.nn.Module, dict, str]:
    """(model, its training settings, a label) from a modelo.h5 or a training checkpoint.pt."""
    if path.endswith(".pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        model = VGG16DWSep(num_classes=2)
        model.load_state_dict(state["model"])
        return model, dict(state.get("settings", {})), f"checkpoint, epoch {state.get('epoch')}"
    model, meta = load_modelo_h5(path)
    settings = meta.get("metadata", {}).get("settings", {})
    return model, settings, f"modelo.h5, best epoch {meta.get('metadata', {}).get('best', {}).get('epoch')}"


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--weights", required=True, help="modelo.h5 or a checkpoint.pt of train.py")
    parser.add_argument("--data-dir", default=str(SHARED_DATA / "chest_xray_224"),
                        help="dataset folder with train/ and test/")
    parser.add_argument("--images", type=int, default=1600, help="training images to estimate with")
    parser.add_argument("--gain", type=float, help="evaluation gain (default: the model's --eval-gain)")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    model, trained, label = load_weights(args.weights)
    seed = int(trained.get("seed", 0))
    gain = args.gain if args.gain is not None else float(trained.get("eval_gain", 1.0))
    opts = precision_options(device, use_amp=True)
    index = index_dataset(args.data_dir)
    evaluation, augmentation = get_toolchain(eval_gain=gain), get_toolchain()
    samplers = make_samplers(index, seed, float(trained.get("val_fraction", 0.2)), trained.get("train_subset"))

    def stack(paths: list[str], chain) -> torch.Tensor:
        return torch.stack([chain(evaluation.loader(p)) for p in paths])

    order = np.fromiter(samplers.val, dtype=np.int64)
    unique, position = np.unique(order, return_inverse=True)
    splits = {
        "validation": (stack([index.train.samples[i][0] for i in unique], evaluation.eval)[torch.from_numpy(position)],
                       torch.as_tensor(np.asarray(index.train.targets)[order])),
        "test": (stack([p for p, _ in index.test.samples], evaluation.eval), torch.as_tensor(index.test.targets)),
    }
    chosen = [index.train.samples[i][0] for i in recalibration_indices(samplers.train_indices, args.images, seed)]

    def batches(x: torch.Tensor, y: torch.Tensor) -> list:
        return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]

    variants = {"as training left them": model}
    for name, chain in (("evaluation transform", evaluation.eval), ("training augmentation", augmentation.train)):
        torch.manual_seed(seed)
        recalibrated = copy.deepcopy(model)
        images = stack(chosen, chain)
        recalibrate_batchnorm(recalibrated, batches(images, torch.zeros(len(images), dtype=torch.long)), device,
                              **opts)
        variants[f"re-estimated, {name}"] = recalibrated
    rows = []
    for stats, net in variants.items():
        for split, (x, y) in splits.items():
            probs, labels, loss = predict(net, batches(x, y), device, **opts)
            m = classification_metrics(labels, probs)
            rows.append({"BatchNorm statistics": stats, "split": split, "loss": f"{loss:.3f}",
                         "accuracy": f"{m['accuracy']:.3f}", "F1": f"{m['f1']:.3f}",
                         "specificity": f"{m['specificity']:.3f}", "ROC AUC": f"{m['roc_auc']:.3f}"})
    print(f"{args.weights} ({label}); evaluation gain {gain:g}; statistics re-estimated over {len(chosen)} "
          f"training images; validation {len(order)} draws, test {len(splits['test'][1])} images; no TTA")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
