"""`pact report RUN_DIR... [--out PREFIX]`: compare runs in one table and one figure."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add `pact report`."""
    parser = subparsers.add_parser(
        "report",
        help="compare runs: markdown table + PNG of refusal rate, over-refusal, task accuracy and drift",
        description="Read RUN_DIR/eval.json of each run (written by `pact eval refusal|task|drift --save-to RUN_DIR`) "
        "and write PREFIX.md (a table: run, refusal rate, over-refusal, task accuracy, drift KL) and PREFIX.png "
        "(refusal rate vs task accuracy, plus one bar chart per measure). Runs are labelled by directory name. "
        "The table is also printed.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding an eval.json")
    parser.add_argument("--out", metavar="PREFIX", default="report", help="output path prefix (default: report -> report.md, report.png)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report and print the table."""
    from pact.report import write_report

    table, markdown, figure = write_report(args.run_dirs, args.out)
    print(table)
    print(f"\ntable: {markdown}\nfigure: {figure}")
    return 0
