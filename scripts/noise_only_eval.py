"""Test metrics of a modelo.h5 on evaluation images x gain (no noise) and on the same images with the
brief's per-value noise U[1.2, 1.5] only (one copy, no flip, no rotation): separates the effect of the
noise texture from that of flips/rotations in test-time augmentation (RESULTS.md, Part 2).

    .venv/bin/python scripts/noise_only_eval.py --weights out/full_cpu/modelo.h5 \
        --data-dir ../shared/data/chest_xray_224
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.engine import classification_metrics, precision_options, predict  # noqa: E402
from models.h5io import load_modelo_h5  # noqa: E402
from pipelines.data import index_dataset  # noqa: E402
from pipelines.transforms import NOISE_HIGH, NOISE_LOW, NOISE_MEAN, get_toolchain  # noqa: E402

BATCH = 32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--data-dir", default="../shared/data/chest_xray_224")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device("cpu")
    model, _ = load_modelo_h5(args.weights, device)
    index = index_dataset(args.data_dir)
    chain = get_toolchain()  # the project's evaluation transform: decode, resize, /255
    images = torch.stack([chain.eval(chain.loader(path)) for path, _ in index.test.samples])
    labels = torch.as_tensor(index.test.targets)
    noise = NOISE_LOW + (NOISE_HIGH - NOISE_LOW) * torch.rand(images.shape, generator=torch.Generator().manual_seed(args.seed))
    rows = {}
    for name, x in ((f"x{NOISE_MEAN:g}, no noise", images * NOISE_MEAN), ("noise only, one copy", images * noise)):
        batches = [(x[i:i + BATCH], labels[i:i + BATCH]) for i in range(0, len(x), BATCH)]
        probs, y, _loss = predict(model, batches, device, **precision_options(device, use_amp=True))
        m = classification_metrics(y, probs)
        rows[name] = {k: m[k] for k in ("accuracy", "f1", "precision", "recall", "specificity", "roc_auc")}
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
