"""Train VGG16DWSep to tell NORMAL from PNEUMONIA chest X-rays, keep the best weights, test them.

    python train.py --data-dir DIR                  # train (CUDA when present), then test
    python train.py --data-dir DIR --recipe brief   # the brief's method with nothing added
    python train.py --data-dir DIR --resume         # continue OUT/checkpoint.pt after a crash
    python train.py --data-dir DIR --eval-only --weights modelo.h5
    python train.py --data-dir DIR --check-data     # index, count, list skipped files, exit
    python train.py --demo                          # a small synthetic set (says so loudly)
    torchrun --nproc_per_node=N train.py --data-dir DIR   # one process per GPU

DIR holds train/ and test/ with one folder per class (the Kermany chest_xray layout). The best
weights (by validation) go to modelo.h5 with their decision rule; OUT gets checkpoint.pt,
log.jsonl (one JSON line per epoch), learning_curves.png, confusion_matrix.png, metrics.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from models.config import DECISIONS, EVAL_TRANSFORMS, LOADERS, RECIPES, RunConfig

logger = logging.getLogger("train")

BANNER = "*" * 80
SYNTHETIC_BANNER = (f"{BANNER}\n*  SYNTHETIC DATA: generated images, not chest X-rays. The numbers say nothing\n"
                    f"*  about pneumonia; they only show that the pipeline runs end to end.\n{BANNER}")


class _TtaCopies(argparse.Action):
    """--tta D [D ...]; a bare --tta means no TTA, as --no-tta, and says so."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not values:
            print("note: --tta with no number turns test-time augmentation off (the same as --no-tta)",
                  file=sys.stderr)
        setattr(namespace, self.dest, values)


def get_args_parser() -> argparse.ArgumentParser:
    defaults = RunConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    core = p.add_argument_group("data and training")
    core.add_argument("--data-dir", help="folder holding train/ and test/ (Kermany chest_xray layout)")
    core.add_argument("--out", default=defaults.out, help="folder for checkpoint, log and figures (default: %(default)s)")
    core.add_argument("--weights-out", default=defaults.weights_out,
                      help="where the best weights go (default: %(default)s)")
    core.add_argument("--epochs", type=int, default=defaults.epochs,
                      help="maximum epochs; early stopping usually ends sooner (default: %(default)s)")
    core.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per batch (default: %(default)s)")
    core.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate (default: %(default)g)")
    core.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                      help="Adam weight decay (default: %(default)g)")
    core.add_argument("--paciencia", type=int, default=defaults.paciencia,
                      help="early-stopping patience in epochs (default: %(default)s)")
    core.add_argument("--seed", type=int, default=defaults.seed,
                      help="seed of the split, samplers, augmentation and initialisation (default: %(default)s)")
    core.add_argument("--recipe", choices=sorted(RECIPES), default=defaults.recipe,
                      help="default: the levers chosen on validation (RESULTS.md); brief: the brief's method "
                           "with nothing added (default: %(default)s)")
    core.add_argument("--no-pretrained", action="store_true",
                      help="do not look for ImageNet VGG16 weights for the first two convolutions")
    core.add_argument("--vgg16-weights", metavar="PATH",
                      help="torchvision VGG16 state dict for the first two convolutions (default: torch hub's "
                           "cache, as torchvision.models.vgg16 does)")
    core.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    system = p.add_argument_group("input pipeline and device")
    system.add_argument("--loader", choices=LOADERS, default=defaults.loader,
                        help="auto: DALI on CUDA when installed, else torchvision DataLoader workers "
                             "(default: %(default)s)")
    system.add_argument("--num-workers", type=int, default=defaults.num_workers,
                        help="DataLoader worker processes / DALI threads (default: %(default)s)")
    system.add_argument("--device", default=defaults.device,
                        help="auto (CUDA when present), cpu, cuda or cuda:N (default: %(default)s)")
    system.add_argument("--no-amp", action="store_true", help="fp32 instead of bf16 autocast where bf16 is native")
    modes = p.add_argument_group("other modes")
    modes.add_argument("--eval-only", action="store_true",
                       help="only test --weights as its run did (its seed, transform, rule, batches, workers)")
    modes.add_argument("--check-data", action="store_true",
                       help="index the data set, print class counts and skipped files, exit (0 when usable)")
    modes.add_argument("--demo", action="store_true", help="make a small synthetic set under OUT/data and train on it")
    modes.add_argument("--count-params", action="store_true",
                       help="print parameter counts and step times of VGG16DWSep and of the same net with Conv2d")
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--weights", help="modelo.h5 to test with --eval-only")
    tta = ev.add_mutually_exclusive_group()
    tta.add_argument("--tta", type=int, nargs="*", default=list(defaults.tta), metavar="D", action=_TtaCopies,
                     help="test-time augmentation with D augmented copies per image, scored beside the "
                          f"prediction without TTA (default: {' '.join(map(str, defaults.tta))})")
    tta.add_argument("--no-tta", dest="tta", action="store_const", const=[], help="test without TTA only")
    ev.add_argument("--json", action="store_true", help="with --eval-only: print one line of JSON")
    lever = p.add_argument_group("levers (each overrides the recipe; see RESULTS.md for what validation chose)")
    lever.add_argument("--eval-transform", choices=EVAL_TRANSFORMS,
                       help="validation/test images: brief = the training Compose, seeded; gain = /255 then x1.35")
    lever.add_argument("--decision", choices=DECISIONS,
                       help="argmax, or a threshold on P(PNEUMONIA) chosen on the replicated validation set")
    exp = p.add_argument_group("experimental")
    exp.add_argument("--train-subset", type=int, metavar="N", help="train on a stratified N images (validation N/4)")
    exp.add_argument("--image-size", type=int, default=defaults.image_size,
                     help="side of the network's input (default: %(default)s; smaller only for quick tests)")
    exp.add_argument("--compare-eval", action="store_true",
                     help="score validation under every evaluation transform and decision each epoch (log.jsonl)")
    exp.add_argument("--skip-test", action="store_true",
                     help="train and validate only, leaving the test split unscored (for choosing on validation)")
    exp.add_argument("--decoded-cache", action="store_true",
                     help="decode and resize every file once, before training, and augment from the cache")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    if args.data_dir is None and not args.demo:
        raise ValueError("give --data-dir DIR (a folder with train/ and test/) or --demo")
    if args.eval_only:
        given = [flag for flag, on in (("--resume", args.resume), ("--compare-eval", args.compare_eval),
                                       ("--skip-test", args.skip_test), ("--train-subset", args.train_subset))
                 if on]
        if given:
            raise ValueError(f"{', '.join(given)}: not for --eval-only, which tests a finished modelo.h5")
    else:
        if args.weights:
            raise ValueError("--weights is read only with --eval-only; training starts from the initialisation, "
                             "or continues OUT/checkpoint.pt with --resume")
        if args.json:
            raise ValueError("--json is for --eval-only; a training run writes its metrics to OUT/metrics.json")
    return RunConfig(
        data_dir=args.data_dir, out=args.out, weights_out=args.weights_out, recipe=args.recipe, loader=args.loader,
        device=args.device, epochs=args.epochs, batch_size=args.batch_size, num_workers=args.num_workers,
        seed=args.seed, lr=args.lr, weight_decay=args.weight_decay, paciencia=args.paciencia,
        pretrained=not args.no_pretrained, vgg16_weights=args.vgg16_weights, train_subset=args.train_subset,
        image_size=args.image_size, tta=tuple(args.tta), amp=not args.no_amp, demo=args.demo,
        decoded_cache=args.decoded_cache, compare_eval=args.compare_eval, skip_test=args.skip_test, eval_transform=args.eval_transform,
        decision=args.decision)


def check_data(data_dir: str | Path, seed: int) -> int:
    """Print what the indexer sees; 0 when the data set is usable (errors raise)."""
    from pipelines.balance import class_balance
    from pipelines.data import index_dataset

    index = index_dataset(data_dir)
    print(index.summary())
    for group, counts in class_balance(index, seed).items():
        print(f"  {group}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("usable: yes")
    return 0


def count_params(device_name: str, batch_size: int) -> int:
    from models.cost import parameter_summary, step_times, timed_precisions
    from models.engine import resolve_device
    from pipelines.tables import markdown_table

    device = resolve_device(device_name)
    print(markdown_table([{"variant": r["variant"], "parameters": f"{r['parameters']:,}",
                           "features": f"{r['features']:,}", "classifier": f"{r['classifier']:,}",
                           "largest layer": r["largest layer"], "GMACs/image": r["GMACs per image"],
                           "MACs in first 2 convs": f"{100 * r['share of MACs in the two frozen convs']:.0f}%"}
                          for r in parameter_summary()], digits=2))
    print(f"\nstep times on {device}, batch {batch_size}, 224 x 224 (median of 3 after 1 warm-up)")
    print(markdown_table([{"variant": "separable" if separable else "Conv2d", "precision": label,
                           "train step s": t["train_step_s"], "train img/s": t["train_images_per_s"],
                           "inference s": t["inference_s"], "inference img/s": t["inference_images_per_s"]}
                          for separable in (True, False) for label, kw in timed_precisions(device)
                          for t in [step_times(separable, device, batch_size, **kw)]]))
    return 0


def format_summary(summary: dict) -> str:
    """A short table of the test metrics of the best weights, without and with TTA, with their
    95 % bootstrap intervals."""
    from models.training import named_predictions
    from pipelines.tables import markdown_table, with_interval

    best, decision = summary["best"], summary["decision"]
    head = (f"best epoch {best['epoch']} (validation loss {best['val_loss']:.4f}) of {summary['epochs_run']} run; "
            f"recipe {summary['recipe']}; decision: PNEUMONIA when P >= {decision['threshold']:.3f} "
            f"({decision['rule']}); first convolutions: {summary['pretrained']}")

    rows = [{"test prediction": name, "accuracy": with_interval(m, "accuracy"), "F1": with_interval(m, "f1"),
             "recall": with_interval(m, "recall"), "specificity": with_interval(m, "specificity"),
             "ROC AUC": m["roc_auc"]}
            for name, m in named_predictions(summary["test"])]
    return f"{head}\n{markdown_table(rows)}\n(95 % bootstrap intervals in brackets)"


def run(args: argparse.Namespace) -> int:
    if args.count_params:
        return count_params(args.device, args.batch_size)
    config = config_from_args(args)
    if config.demo:
        import dataclasses

        from pipelines.synthetic import make_synthetic_dataset

        print(SYNTHETIC_BANNER, file=sys.stderr)
        root = Path(config.out) / "data"
        if not (root / "train").is_dir():
            make_synthetic_dataset(root, seed=config.seed)
        config = dataclasses.replace(config, data_dir=str(root))
    if args.check_data:
        return check_data(config.data_dir, config.seed)
    from models import training

    if args.eval_only:
        if not args.weights:
            raise ValueError("--eval-only needs --weights modelo.h5")
        from models.engine import resolve_device

        metrics = training.evaluate_weights(config, args.weights, resolve_device(config.device))
        print(json.dumps(metrics) if args.json else json.dumps(metrics, indent=2))
        return 0
    start = time.perf_counter()
    summary = training.run(config, resume=args.resume)
    if summary is None:  # not rank 0
        return 0
    if summary["test"] is None:
        print(f"best epoch {summary['best']['epoch']}: {json.dumps(summary['best'])}; test not scored (--skip-test)")
        return 0
    print(format_summary(summary))
    print(f"details: {Path(config.out) / 'metrics.json'}; best weights: {summary['weights']}")
    if config.demo:
        print(SYNTHETIC_BANNER, file=sys.stderr)
    logger.info("done in %.0f s", time.perf_counter() - start)
    return 0


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_cli

    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(lambda: run(args), prog="train.py")


if __name__ == "__main__":
    raise SystemExit(main())
