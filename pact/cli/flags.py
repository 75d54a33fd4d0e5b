"""Command lines generated from dataclasses: `add_dataclass_flags` turns any settings dataclasses into a command's flags
(the Hugging Face names, both spellings, plus the project's older short names as aliases), with `--config
FILE.yaml|json` underneath the flags, and `dataclasses_from_flags` turns them back. Only the command line maps fields
to flags (`flag_for`); the library names fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from transformers import HfArgumentParser

from pact.errors import InvalidSetting, PactError

RESERVED_FIELDS = ("debug",)  # TrainingArguments' `debug`: `--debug` is every command's show-the-traceback flag


def add_dataclass_flags(parser: argparse.ArgumentParser, dataclass_types: tuple, only: dict | None = None) -> dict:
    """Add a flag per field of `dataclass_types` (HfArgumentParser's names, both spellings, and aliases) and `--config`;
    returns the defaults. `only` maps a dataclass to the fields of it that get a flag (all of them when it is not there).

    The flags' own defaults are suppressed so `dataclasses_from_flags` can
    tell a flag given on the command line from a value of the config file;
    each help text states the default instead.
    """
    generated = HfArgumentParser(dataclass_types, add_help=False)
    allowed = {f.name for kind in dataclass_types for f in dataclasses.fields(kind) if f.name in (only or {}).get(kind, (f.name,))}
    flagged = [a for a in generated._actions if a.option_strings and a.dest not in RESERVED_FIELDS and a.dest in allowed]
    defaults = {}
    for action in flagged:
        defaults.setdefault(action.dest, action.default)
    for action in flagged:
        if defaults[action.dest] is not None and action.help != argparse.SUPPRESS:
            action.help = f"{action.help or ''} (default: {defaults[action.dest]})".strip()
        action.default = argparse.SUPPRESS
        action.__class__ = _recording(type(action))
        parser._add_action(action)
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (field names or flag names as keys); "
                                                        "flags on the command line override it")
    return defaults


TYPED = "typed_flags"  # the namespace attribute mapping each field given on the command line to the flag typed for it


def _recording(kind: type) -> type:
    """A subclass of argparse action class `kind` that also notes which of its option strings was typed (so an error
    names `--lr` when the user wrote `--lr`, `--learning_rate` when they wrote that)."""
    def __call__(self, parser, namespace, values, option_string=None):
        """Store the value as `kind` does, and note `option_string` under the field in `namespace.typed_flags`."""
        kind.__call__(self, parser, namespace, values, option_string)
        typed = getattr(namespace, TYPED, None) or {}
        setattr(namespace, TYPED, {**typed, self.dest: option_string})

    return type(f"Recording{kind.__name__}", (kind,), {"__call__": __call__})


def _read_config(path: str) -> dict:
    """The settings in a YAML or JSON file, as a dict (`PactError` naming the file otherwise)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as err:
        raise PactError(f"--config {path}: cannot read it ({err.strerror or err})") from err
    try:
        if Path(path).suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - yaml's and json's parse errors have no common base
        raise PactError(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({err})") from err
    if not isinstance(data, dict):
        raise PactError(f"--config {path}: expected a mapping of setting names to values, got {type(data).__name__}")
    return data


def _config_values(parser: argparse.ArgumentParser, path: str) -> dict:
    """The config file's values keyed by field, each converted as its flag converts text; unknown keys are refused by name."""
    actions = {}
    for action in parser._actions:
        for option in action.option_strings:
            actions[option.lstrip("-").replace("-", "_")] = action
    values = {}
    for key, value in _read_config(path).items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None or action.dest in ("config", "help", "debug"):
            raise PactError(f"--config {path}: unknown setting {key!r}; see `--help` for the settings (flag names without --)")
        values[action.dest] = _convert(action, value, path, key)
    return values


def _convert(action: argparse.Action, value, path: str, key) -> object:
    """A config file's `value` for `action`: text converted by the flag's type, each item of a list for list flags."""
    convert = action.type if callable(action.type) else None
    if isinstance(action, argparse._StoreFalseAction):
        return not value
    if action.nargs == "+" and not isinstance(value, list):
        value = [value]
    try:
        if isinstance(value, list):
            return [convert(v) if convert and isinstance(v, str) else v for v in value]
        return convert(value) if convert and isinstance(value, str) else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise PactError(f"--config {path}: {key}: {value!r} is not a valid value ({err})") from err


def dataclasses_from_flags(args: argparse.Namespace, dataclass_types: tuple, defaults: dict) -> tuple:
    """Instances of `dataclass_types` from the defaults, the `--config` file and the flags given (in that order of priority).

    An `InvalidSetting` gains the name of the flag (or of the config file) that holds the bad value.
    """
    given = vars(args)
    from_file = _config_values(_parser_of(args), given["config"]) if given.get("config") else {}
    values = {**defaults, **from_file, **{k: v for k, v in given.items() if k in defaults}}
    try:
        return tuple(kind(**{f.name: values[f.name] for f in dataclasses.fields(kind) if f.init and f.name in values})
                     for kind in dataclass_types)
    except InvalidSetting as err:
        raise with_flag(err, args, from_file) from err


def with_flag(err: InvalidSetting, args: argparse.Namespace, from_file: dict | None = None) -> InvalidSetting:
    """`err` with its message prefixed by where the value came from: the flag, or `FILE (field)` for a config file's value."""
    typed = vars(args).get(TYPED) or {}
    if from_file and err.field in from_file and err.field not in typed:
        where = f"{vars(args)['config']} ({err.field})"
    else:
        where = typed.get(err.field) or flag_for(_parser_of(args), err.field) or err.field
    return InvalidSetting(err.field, f"{where}: {err}")


def flag_for(parser: argparse.ArgumentParser | None, name: str) -> str | None:
    """The Hugging Face flag of field `name` (its first option string), or None when the parser has none."""
    for action in (parser._actions if parser else []):
        if action.dest == name and action.option_strings:
            return action.option_strings[0]
    return None


def _parser_of(args: argparse.Namespace) -> argparse.ArgumentParser | None:
    """The parser a command registered itself with (`set_defaults(parser=...)`), to look flags up."""
    return vars(args).get("parser")
