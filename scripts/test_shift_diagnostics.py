"""Why a modelo.h5 errs on the test split: its test metrics under several evaluation intensities, with
two diagnostics that no project command reports because they look at test labels; and, for comparison,
the validation split (epoch 0's ``ReplicarMuestreoDePrueba`` order of the run's seed) under the same
intensities, the only data on which a choice between them may be made.

Rows (one pass each over the test images, decoded and resized by the project's evaluation transform):
  x1.35, no noise                 what ``train.py --eval-only --eval-gain 1.35`` measures
  noise, one copy                 what ``--eval-noise`` measures (another seed: its own draw)
  noise, mean of D copies         the noise alone averaged (no flips, no rotations: not the TTA of train.py)
  noise, each image at mean M     every test image rescaled to the training split's mean gray level first
  x1.35, prior-adjusted           label shift: the x1.35 probabilities reweighted from the training split's
                                  class balance to the test set's (the balance ReplicarMuestreoDePrueba gives
                                  validation), p_c * pi_test_c / pi_train_c renormalised
  x1.35, BatchNorm of these       covariate shift in the BatchNorm layers (AdaBN): their statistics
  images (AdaBN)                  re-estimated over the images scored (no labels), batches of 32 in a seeded
                                  random order
Columns: the metrics at the 0.5 threshold, then ``oracle acc`` (the accuracy of the best threshold chosen ON
THE TEST LABELS: a ceiling for any recalibration, never a result) and ``r(p, mean) NORMAL`` (the correlation
between P(PNEUMONIA) and the image's mean gray level over the test NORMAL images: does brightness drive the
errors?).

    .venv/bin/python scripts/test_shift_diagnostics.py --weights out/full_cpu/modelo.h5
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_curve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import SHARED_DATA, run_cli, script_parser  # noqa: E402

from models.engine import classification_metrics, precision_options, predict, recalibrate_batchnorm  # noqa: E402
from models.h5io import load_modelo_h5  # noqa: E402
from pipelines.data import index_dataset  # noqa: E402
from pipelines.loaders import make_samplers  # noqa: E402
from pipelines.transforms import NOISE_MEAN, get_toolchain, noise_field  # noqa: E402
from report import markdown_table  # noqa: E402

BATCH = 32


def oracle_accuracy(labels: np.ndarray, p: np.ndarray) -> float:
    """Accuracy at the best threshold on these labels (diagnostic ceiling, not a result)."""
    fpr, tpr, _ = roc_curve(labels, p)
    positives = int((labels == 1).sum())
    return float(((tpr * positives + (1 - fpr) * (len(labels) - positives)) / len(labels)).max())


def reweighted(probs: np.ndarray, prior_from: np.ndarray, prior_to: np.ndarray) -> np.ndarray:
    """N x C probabilities of a model fitted where the classes had ``prior_from``, moved to ``prior_to``
    (Bayes' rule, the class-conditional densities unchanged): p_c * to_c / from_c, renormalised."""
    weighted = np.asarray(probs, np.float64) * (np.asarray(prior_to) / np.asarray(prior_from))
    return weighted / weighted.sum(axis=1, keepdims=True)


def main() -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--weights", required=True, help="a modelo.h5 of train.py")
    parser.add_argument("--data-dir", default=str(SHARED_DATA / "chest_xray_224"),
                        help="dataset folder with train/ and test/")
    parser.add_argument("--copies", type=int, default=8, metavar="D",
                        help="noise copies averaged in the 'mean of D copies' row")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split (as the run's), the noise draws and AdaBN's batch order")
    args = parser.parse_args()
    device = torch.device("cpu")
    model, meta = load_modelo_h5(args.weights, device)
    opts = precision_options(device, use_amp=True)
    index = index_dataset(args.data_dir)
    chain = get_toolchain()

    def load(paths: list[str]) -> torch.Tensor:
        return torch.stack([chain.eval(chain.loader(path)) for path in paths])

    images = load([path for path, _ in index.test.samples])
    labels = torch.as_tensor(index.test.targets)
    means = images.mean(dim=(1, 2, 3))
    train_files = index.train.samples[:: max(1, len(index.train) // 600)]
    train_mean = float(load([path for path, _ in train_files]).mean())
    generator = torch.Generator().manual_seed(args.seed)

    def noise(shape: torch.Size) -> torch.Tensor:
        return noise_field(shape, generator)

    def batches(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]

    def probabilities(x: torch.Tensor, y: torch.Tensor, net: torch.nn.Module = model) -> np.ndarray:
        probs, _y, _loss = predict(net, batches(x, y), device, **opts)
        return probs

    def adabn(x: torch.Tensor, y: torch.Tensor, distinct: torch.Tensor | None = None) -> np.ndarray:
        """Probabilities of x with BatchNorm statistics re-estimated over ``distinct`` (default x)."""
        net = copy.deepcopy(model)
        fit = x if distinct is None else distinct
        order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(args.seed))
        recalibrate_batchnorm(net, batches(fit[order], torch.zeros(len(fit), dtype=torch.int64)), device, **opts)
        return probabilities(x, y, net)

    train_targets = np.asarray(index.train.targets)
    pi_train = np.bincount(train_targets, minlength=2) / len(train_targets)
    pi_test = np.bincount(np.asarray(index.test.targets), minlength=2) / len(index.test)

    def prior_adjusted(probs: np.ndarray) -> np.ndarray:
        return reweighted(probs, pi_train, pi_test)

    rows: dict[str, np.ndarray] = {f"x{NOISE_MEAN:g}, no noise": probabilities(images * NOISE_MEAN, labels)}
    copies = [probabilities(images * noise(images.shape), labels) for _ in range(args.copies)]
    rows["noise, one copy"] = copies[0]
    rows[f"noise, mean of {args.copies} copies"] = np.mean(copies, axis=0)
    rescaled = images * (train_mean / means).view(-1, 1, 1, 1)
    rows[f"noise, each image at mean {train_mean:.3f}"] = probabilities(rescaled * noise(images.shape), labels)
    rows[f"x{NOISE_MEAN:g}, prior-adjusted"] = prior_adjusted(rows[f"x{NOISE_MEAN:g}, no noise"])
    rows[f"x{NOISE_MEAN:g}, BatchNorm of these images (AdaBN)"] = adabn(images * NOISE_MEAN, labels)
    y = labels.numpy()
    normal = y == 0
    table = []
    for name, probs in rows.items():
        m = classification_metrics(y, probs)
        r = float(np.corrcoef(probs[normal, 1], means.numpy()[normal])[0, 1])
        table.append({"test images": name, "accuracy": f"{m['accuracy']:.3f}", "F1": f"{m['f1']:.3f}",
                      "specificity": f"{m['specificity']:.3f}", "ROC AUC": f"{m['roc_auc']:.3f}",
                      "oracle acc": f"{oracle_accuracy(y, probs[:, 1]):.3f}", "r(p, mean) NORMAL": f"{r:.2f}"})
    print(f"{args.weights} on {len(y)} test images of {args.data_dir}; training split mean gray level "
          f"{train_mean:.3f} ({len(train_files)} files), test NORMAL {float(means[normal].mean()):.3f}, "
          f"test PNEUMONIA {float(means[~normal].mean()):.3f}; NORMAL share: train folder {pi_train[0]:.3f}, "
          f"test {pi_test[0]:.3f}")
    print(markdown_table(table))

    trained = meta.get("metadata", {}).get("settings", {})
    seed = int(trained.get("seed", 0))
    samplers = make_samplers(index, seed, float(trained.get("val_fraction", 0.2)), trained.get("train_subset"))
    order = np.fromiter(samplers.val, dtype=np.int64)
    unique, position = np.unique(order, return_inverse=True)
    distinct = load([index.train.samples[i][0] for i in unique])
    val_images = distinct[torch.from_numpy(position)]
    val_labels = torch.as_tensor(np.asarray(index.train.targets)[order])
    val_table = []
    plain = probabilities(val_images * NOISE_MEAN, val_labels)
    for name, probs in ((f"x{NOISE_MEAN:g}, no noise", plain),
                        ("noise, one copy", probabilities(val_images * noise(val_images.shape), val_labels)),
                        (f"x{NOISE_MEAN:g}, prior-adjusted", prior_adjusted(plain)),
                        (f"x{NOISE_MEAN:g}, BatchNorm of these images (AdaBN)",
                         adabn(val_images * NOISE_MEAN, val_labels, distinct * NOISE_MEAN))):
        m = classification_metrics(val_labels.numpy(), probs)
        val_table.append({"validation images": name, "accuracy": f"{m['accuracy']:.3f}", "F1": f"{m['f1']:.3f}",
                          "specificity": f"{m['specificity']:.3f}", "ROC AUC": f"{m['roc_auc']:.3f}"})
    print(f"\nvalidation: {len(order)} draws ({len(unique)} images) in the epoch-0 ReplicarMuestreoDePrueba order, seed {seed}")
    print(markdown_table(val_table))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
