"""Validation comparison of the recipe candidates, from the log.jsonl of runs made with --compare-eval.

    python -m benchmarks.recipe_comparison results/explore_base_log.jsonl [more logs ...]

For each run, the epoch it selected (``improved`` last set) and, at that epoch, every evaluation
transform under both decisions: argmax, and the threshold chosen on the replicated validation set,
scored cross-fitted (each half of the validation images decided by the threshold chosen on the
other half). Then the mean over the runs of each candidate's validation balanced accuracy, and a
row per run (a run is one lever against the others) under the candidate asked for.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines.cli import run_cli, script_parser
from pipelines.tables import markdown_table

RULES = {"argmax": "argmax", "threshold_cross_fitted": "threshold (cross-fitted)"}


def read_log(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows or "candidates" not in rows[0]:
        raise ValueError(f"{path}: not the log.jsonl of a run made with --compare-eval")
    return rows


def selected(rows: list[dict]) -> dict:
    """The row of the epoch whose weights the run kept (the last one marked improved)."""
    return [r for r in rows if r["improved"]][-1]


def candidate_rows(name: str, row: dict) -> list[dict]:
    return [{"run": name, "epoch": row["epoch"], "evaluation transform": transform, "decision": label,
             "val loss": scores["loss"], **{k: scores[rule][k] for k in ("accuracy", "f1", "balanced_accuracy",
                                                                         "recall", "specificity")}}
            for transform, scores in row["candidates"].items() for rule, label in RULES.items()]


def mean_by_candidate(rows: list[dict]) -> list[dict]:
    keys = sorted({(r["evaluation transform"], r["decision"]) for r in rows})
    out = []
    for transform, decision in keys:
        mine = [r for r in rows if (r["evaluation transform"], r["decision"]) == (transform, decision)]
        out.append({"evaluation transform": transform, "decision": decision, "runs": len(mine),
                    **{f"mean {k}": sum(r[k] for r in mine) / len(mine)
                       for k in ("val loss", "accuracy", "f1", "balanced_accuracy", "specificity")}})
    return sorted(out, key=lambda r: -r["mean balanced_accuracy"])


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__, prog="python -m benchmarks.recipe_comparison")
    p.add_argument("logs", nargs="+", type=Path, help="log.jsonl files of runs made with --compare-eval")
    p.add_argument("--transform", default="brief", help="evaluation transform of the per-run lever table")
    p.add_argument("--decision", default="threshold (cross-fitted)", help="decision of the per-run lever table")
    args = p.parse_args(argv)

    def report() -> int:
        rows = []
        for log in args.logs:
            rows += candidate_rows(log.name.removesuffix(".jsonl").removesuffix("_log"), selected(read_log(log)))
        print("## Every candidate at each run's selected epoch\n")
        print(markdown_table(rows))
        print("\n## Mean over the runs, best first\n")
        print(markdown_table(mean_by_candidate(rows)))
        print(f"\n## Each run under {args.transform} + {args.decision}\n")
        print(markdown_table([r for r in rows if r["evaluation transform"] == args.transform
                              and r["decision"] == args.decision]))
        return 0

    return run_cli(report, prog="python -m benchmarks.recipe_comparison")


if __name__ == "__main__":
    sys.exit(main())
