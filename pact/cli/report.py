"""`pact report RUN_DIR... [--out PREFIX]`: compare runs in one table and one figure."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    """Add `pact report`."""
    parser = subparsers.add_parser(
        "report",
        help="compare runs: markdown table + PNG of refusal rate, over-refusal, task accuracy and drift",
        description="Read RUN_DIR/eval.json of each run (written by `pact eval refusal|task|drift --save-to RUN_DIR`) "
        "and write PREFIX.md (a table: run, refusal rate, over-refusal, task accuracy, drift KL) and PREFIX.png "
        "(refusal rate vs task accuracy, plus one bar chart per measure). Runs are labelled by directory name; runs "
        "whose names differ only by a trailing -seedN (or _seedN) are one row of mean ± standard deviation over the "
        "seeds, drawn with the spread as error bars. The table is also printed.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding an eval.json")
    parser.add_argument("--out", metavar="PREFIX", default="report", help="output path prefix (default: report -> report.md, report.png)")
    parser.set_defaults(func=run)


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that are directories or name one of the runs' eval.json files, before reading anything."""
    from pact.cli.common import check_output_file, refuse_overwriting_inputs
    from pact.evaluation.report import EVAL_FILE, report_paths

    outputs = [("--out", check_output_file("--out", path, creates_folder=True)) for path in report_paths(args.out)]
    refuse_overwriting_inputs(outputs, {f"the {EVAL_FILE} of RUN_DIR {run_dir}": [Path(run_dir).expanduser() / EVAL_FILE]
                                        for run_dir in args.run_dirs})


def run(args: argparse.Namespace) -> int:
    """Write the report and print the table."""
    from pact.evaluation.report import write_report

    check_outputs(args)
    table, markdown, figure = write_report(args.run_dirs, args.out)
    print(table)
    print(f"\ntable: {markdown}\nfigure: {figure}")
    return 0
