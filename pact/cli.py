"""The `pact` command: a thin layer over the Python API.

Each subcommand lives in `pact.commands.<name>` and exposes
`register(subparsers)`, which adds its parser and sets `func`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pact.errors import PactError

SUBCOMMANDS = ("safety_tokens", "train", "evaluate", "report")


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse `argv`, run the chosen subcommand, and print user errors without a traceback (exit 2)."""
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except PactError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The `pact` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="pact",
        description="Fine-tune aligned LLMs while keeping their safety alignment (PACT).",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"pact.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pact` console script."""
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
