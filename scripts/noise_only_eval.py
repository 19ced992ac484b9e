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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.engine import classification_metrics, precision_options  # noqa: E402
from models.h5io import load_modelo_h5  # noqa: E402
from pipelines.data import index_dataset  # noqa: E402
from pipelines.imageio import to_rgb8  # noqa: E402
from pipelines.transforms import NOISE_HIGH, NOISE_LOW, NOISE_MEAN  # noqa: E402


def probabilities(model: torch.nn.Module, images: torch.Tensor, batch: int = 32) -> np.ndarray:
    opts = precision_options(torch.device("cpu"), use_amp=True)
    out = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=opts["amp_dtype"] or torch.bfloat16,
                                                enabled=opts["amp_dtype"] is not None):
        for i in range(0, len(images), batch):
            x = images[i:i + batch].contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().softmax(1)[:, 1])
    return torch.cat(out).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--data-dir", default="../shared/data/chest_xray_224")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from PIL import Image

    model, _ = load_modelo_h5(args.weights)
    model = model.to(memory_format=torch.channels_last)
    index = index_dataset(args.data_dir)
    size = model.input_size
    images = torch.stack([
        torch.from_numpy(np.array(to_rgb8(Image.open(path)).resize((size, size), Image.BILINEAR))).permute(2, 0, 1)
        for path, _ in index.test.samples]).float() / 255
    labels = np.asarray(index.test.targets)
    noise = NOISE_LOW + (NOISE_HIGH - NOISE_LOW) * torch.rand(images.shape, generator=torch.Generator().manual_seed(args.seed))
    rows = {}
    for name, x in ((f"x{NOISE_MEAN:g}, no noise", images * NOISE_MEAN), ("noise only, one copy", images * noise)):
        p = probabilities(model, x)
        m = classification_metrics(labels, np.stack([1 - p, p], 1))
        rows[name] = {k: m[k] for k in ("accuracy", "f1", "precision", "recall", "specificity", "roc_auc")}
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
