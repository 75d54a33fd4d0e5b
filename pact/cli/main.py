"""The `pact` command: a thin layer over the Python API.

Each subcommand lives in `pact.cli.<name>` and exposes
`register(subparsers)`, which adds its parser and sets `func`.

Exit codes of every command (`pact` and `pact-cache`): 0 success, 1 a check
that ran and failed (or an unexpected internal error), 2 bad input (a file, a
flag, a model), 130 interrupted. Errors are one message naming the culprit;
`--debug` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from pact.errors import EXIT_BAD_INPUT, EXIT_FAILED_CHECK, PactError, os_error_reason

SUBCOMMANDS = ("safety_tokens", "train", "plan", "evaluate", "report", "export")
DEBUG_HELP = "show the full traceback of an error instead of a one-line message"


class CommandParser(argparse.ArgumentParser):
    """The parser of `pact`, `pact-cache` and each of their subcommands (`add_subparsers` makes its children of the same
    class): flags are never abbreviated (`--data` is not taken for `--data_seed`, nor said to be ambiguous), a
    subcommand refuses the flags it does not know itself, and an error is the `prog: error:` line and a pointer to
    `--help` instead of a usage dump.

    `hints` maps a flag the command does not take to a sentence saying what to do instead (`pact train --data`).
    """

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self.hints: dict[str, str] = {}

    def parse_known_args(self, args=None, namespace=None):
        """Parse as argparse does, but refuse what this parser does not know (naming it under this parser's `prog`)."""
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}", unknown=extras)
        return namespace, extras

    def error(self, message: str, unknown: list[str] | None = None):
        """Print `prog: error: message`, a hint for a flag named in `hints`, a pointer to `--help`; exit 2."""
        hints = [self.hints[flag] for flag in dict.fromkeys(item.split("=", 1)[0] for item in unknown or ()) if flag in self.hints]
        lines = [f"{self.prog}: error: {message}", *hints, f"(`{self.prog} --help` lists the flags)"]
        self.exit(EXIT_BAD_INPUT, "\n".join(lines) + "\n")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Give `parser` and every subcommand below it a `--debug` flag (so it is accepted in any position)."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    for action in parser._actions:  # argparse exposes subcommands only through its actions
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                add_debug_flag(child)


def describe_os_error(err: OSError) -> str:
    """A one-line account of a failed file operation naming the file, e.g. `cannot write x: No space left on device (ENOSPC)`."""
    where = f" {err.filename}" if err.filename else ""
    return f"cannot access{where}: {os_error_reason(err)}"


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse `argv`, run the chosen subcommand, and turn errors into one message and an exit code (see the module notes)."""
    # peft still asks transformers 5 models the deprecated name; the user can do nothing about it.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    debug = getattr(args, "debug", False)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every error becomes a message and an exit code
        if debug:
            raise
        if isinstance(err, PactError):
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return err.exit_code
        if isinstance(err, OSError):
            print(f"{parser.prog}: error: {describe_os_error(err)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"{parser.prog}: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback, "
              "and please report it)", file=sys.stderr)
        return EXIT_FAILED_CHECK


def build_parser() -> argparse.ArgumentParser:
    """The `pact` parser with every registered subcommand."""
    parser = CommandParser(
        prog="pact",
        description="Fine-tune aligned LLMs while keeping their safety alignment (PACT).",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"pact.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pact` console script."""
    return dispatch(build_parser(), argv)
