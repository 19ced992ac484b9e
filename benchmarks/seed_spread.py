"""Test figures of training runs that differ only by their seed: each run's, then their mean and spread.

    python -m benchmarks.seed_spread results/full_seed0_metrics.json results/full_seed1_metrics.json

Reads the metrics.json each run writes. A row per run (its selected epoch, threshold and each test
figure with its 95 % bootstrap interval), then per figure the mean over the runs, the lowest, the
highest and their difference. The runs must share recipe, levers and pretraining, and every setting
but the seed where metrics.json records them: otherwise their spread is not the seed's.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pipelines.cli import run_cli, script_parser
from pipelines.tables import markdown_table, with_interval

FIGURES = ("accuracy", "f1", "recall", "specificity", "balanced_accuracy", "roc_auc")
SAME = ("recipe", "levers", "pretrained", "synthetic_data")
#: Settings that may differ between the runs: the seed, and where and how they ran.
FREE = ("seed", "out", "weights_out", "loader", "device", "num_workers", "amp", "decoded_cache", "tta")


def read_metrics(path: str | Path) -> dict:
    """A run's metrics.json with its test block; ValueError naming the file otherwise."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("test"), dict) or "no_tta" not in metrics["test"]:
        raise ValueError(f"{path}: not the metrics.json of a training run that scored the test split")
    return metrics


def check_same_method(named: Sequence[tuple[str, dict]]) -> None:
    """ValueError when the runs differ by anything ``SAME`` names, or (where both files record the
    run's settings) by a setting other than those ``FREE`` names."""
    first_name, first = named[0]
    for name, metrics in named[1:]:
        differ = [k for k in SAME if metrics.get(k) != first.get(k)]
        if "settings" in metrics and "settings" in first:
            keys = set(metrics["settings"]) | set(first["settings"])
            differ += sorted(k for k in keys - set(FREE) if metrics["settings"].get(k) != first["settings"].get(k))
        if differ:
            raise ValueError(f"{name} and {first_name} differ in {', '.join(differ)}: "
                             "their spread would not be the seed's")


def prediction_block(metrics: dict, prediction: str, name: str) -> dict:
    """The test figures of ``prediction``: ``no_tta``, or ``tta4.mean_probability`` and the like (a TTA
    block holds one set of figures per rule)."""
    block, _, rule = prediction.partition(".")
    found = metrics["test"].get(block)
    if isinstance(found, dict) and rule:
        found = found.get(rule)
    if not isinstance(found, dict) or "accuracy" not in found:
        rules = [f"{k}.{r}" if k != "no_tta" else k for k, v in metrics["test"].items()
                 for r in (v if k != "no_tta" else [None])]
        raise ValueError(f"{name}: no test figures for {prediction!r}; it has {', '.join(rules)}")
    return found


def run_rows(named: Sequence[tuple[str, dict]], prediction: str = "no_tta") -> list[dict]:
    """One row per run: selected epoch, epochs run, threshold and the test figures of ``prediction``."""
    rows = []
    for name, metrics in named:
        test = metrics["test"][prediction]
        rows.append({"run": name, "best epoch": metrics["best"]["epoch"], "epochs run": metrics["epochs_run"],
                     "val loss": metrics["best"]["val_loss"], "threshold": test["threshold"],
                     **{k: with_interval(test, k) for k in FIGURES}})
    return rows


def spread_rows(named: Sequence[tuple[str, dict]], prediction: str = "no_tta") -> list[dict]:
    """Per test figure: mean over the runs, lowest, highest and their difference."""
    rows = []
    for key in FIGURES:
        values = [metrics["test"][prediction][key] for _, metrics in named]
        rows.append({"figure": key, "runs": len(values), "mean": sum(values) / len(values), "lowest": min(values),
                     "highest": max(values), "highest - lowest": max(values) - min(values)})
    return rows


def main(argv: list[str] | None = None) -> int:
    prog = "python -m benchmarks.seed_spread"
    p = script_parser(__doc__, prog=prog)
    p.add_argument("metrics", nargs="+", type=Path, help="metrics.json of runs that differ only by --seed")
    p.add_argument("--prediction", default="no_tta", help="test block to read: no_tta, or tta4 / tta8 (a dict of "
                                                          "rules: give tta4.mean_probability)")
    args = p.parse_args(argv)

    def report() -> int:
        named = [(path.name.removesuffix(".json").removesuffix("_metrics"), read_metrics(path))
                 for path in args.metrics]
        check_same_method(named)
        named = [(name, m | {"test": {args.prediction: prediction_block(m, args.prediction, name)}})
                 for name, m in named]
        print(f"## Each run, test split, {args.prediction} (95 % bootstrap intervals)\n")
        print(markdown_table(run_rows(named, args.prediction)))
        print(f"\n## Over the {len(named)} runs\n")
        print(markdown_table(spread_rows(named, args.prediction)))
        return 0

    return run_cli(report, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
