"""Train VGG16DWSep on a chest X-ray folder (train/ and test/, one folder per class).

    python train.py --data-dir DIR --check-data          # index, count, list skipped files, exit
    python train.py --demo                               # synthetic data set (says so loudly)

The argument parsing lives here; everything else is importable from ``pipelines`` and ``models``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("train")

SYNTHETIC_BANNER = "*" * 78 + "\n*  SYNTHETIC DATA: generated images, not chest X-rays; numbers below mean nothing clinically  *\n" + "*" * 78


@dataclass(frozen=True)
class Settings:
    data_dir: Path | None
    out: Path
    loader: str = "torchvision"
    device: str = "auto"
    batch_size: int = 16
    num_workers: int = 2
    seed: int = 0
    demo: bool = False

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, help="dataset folder holding train/ and test/ (Kermany chest_xray layout)")
    p.add_argument("--demo", action="store_true",
                   help="generate a small synthetic data set under OUT/data and use it (no --data-dir needed)")
    p.add_argument("--check-data", action="store_true",
                   help="index the data set, print per-split class counts and skipped files, then exit "
                        "(0 when usable, non-zero with the reason when not)")
    p.add_argument("--loader", choices=["torchvision", "dali"], default="torchvision",
                   help="input pipeline back end (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=2,
                   help="DataLoader workers / DALI threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, samplers and augmentation")
    p.add_argument("--out", type=Path, default=Path("out"), help="folder for logs, figures, checkpoints")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.data_dir is None and not args.demo:
        raise ValueError("give --data-dir DIR (a folder with train/ and test/) or --demo")
    return Settings(data_dir=args.data_dir, out=args.out, loader=args.loader, device=args.device,
                    batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
                    demo=args.demo)


def prepare_demo_data(out: Path, seed: int) -> Path:
    from pipelines.synthetic import make_synthetic_dataset

    root = out / "data"
    if not (root / "train").is_dir():
        make_synthetic_dataset(root, seed=seed)
    return root


def check_data(data_dir: Path, seed: int) -> int:
    """Print what the indexer sees; 0 when the data set is usable."""
    from pipelines.balance import class_balance
    from pipelines.data import index_dataset

    index = index_dataset(data_dir)
    print(index.summary())
    for group, counts in class_balance(index, seed).items():
        print(f"  {group}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("usable: yes")
    return 0


def run(settings: Settings, check_only: bool) -> int:
    data_dir = settings.data_dir
    if settings.demo:
        print(SYNTHETIC_BANNER, file=sys.stderr)
        data_dir = prepare_demo_data(settings.out, settings.seed)
    rc = check_data(data_dir, settings.seed)
    if check_only or rc:
        return rc
    from pipelines.data import index_dataset
    from pipelines.loaders import LoaderSettings, make_loaders

    index = index_dataset(data_dir)
    loaders = make_loaders(index, LoaderSettings(backend=settings.loader, batch_size=settings.batch_size,
                                                 num_workers=settings.num_workers, seed=settings.seed))
    n = sum(images.shape[0] for images, _ in loaders.train)
    print(f"one pass over the train loader: {n} images")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(settings_from_args(args), check_only=args.check_data)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
