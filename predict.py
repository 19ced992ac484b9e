"""Classify new chest X-rays with a trained modelo.h5: P(PNEUMONIA) and the decision for each image.

    python predict.py IMAGE_OR_FOLDER [...] --weights modelo.h5 --out predictions.csv

The decision follows the rule stored in modelo.h5 at training time (the evaluation transform chosen
on validation and the threshold on P(PNEUMONIA)); folders are searched recursively; files that are
not readable images are listed and skipped. Not for clinical use.
"""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

from pipelines.cli import run_cli, script_parser


def get_args_parser():
    p = script_parser(__doc__, prog="predict.py")
    p.add_argument("paths", nargs="+", help="image files or folders of images")
    p.add_argument("--weights", default="modelo.h5", help="the trained model")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (path, probability, decision)")
    p.add_argument("--tta", type=int, default=1, metavar="D",
                   help="average D augmented copies per image (1: one pass under the stored transform)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the transform's random draws")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def classify() -> int:
        from models.engine import resolve_device
        from models.inference import classify_files, image_files
        from pipelines.files import atomic_path

        if not Path(args.weights).is_file():
            raise FileNotFoundError(f"--weights {args.weights}: no such file (train one with train.py)")
        files, skipped = image_files(args.paths)
        for path, reason in skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        rows, decision = classify_files(args.weights, files, resolve_device(args.device), copies=args.tta,
                                        batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed)
        with atomic_path(args.out) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        counts = {c: sum(r["decision"] == c for r in rows) for c in sorted({r["decision"] for r in rows})}
        print(f"{len(rows)} image(s) -> {args.out}; " + ", ".join(f"{c} {n}" for c, n in counts.items())
              + f" (PNEUMONIA when P >= {decision['threshold']:.3f}); {len(skipped)} skipped")
        return 0

    return run_cli(classify, prog="predict.py")


if __name__ == "__main__":
    raise SystemExit(main())
