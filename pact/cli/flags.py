"""Command lines generated from dataclasses: `add_dataclass_flags` turns any settings dataclasses into a command's flags
(the Hugging Face names, both spellings, plus the project's older short names as aliases), with `--config
FILE.yaml|json` underneath the flags, and `dataclasses_from_flags` turns them back. Only the command line maps fields
to flags (`flag_for`); the library names fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import types
import typing
from pathlib import Path

from transformers import HfArgumentParser

from pact.errors import InvalidSetting, PactError

RESERVED_FIELDS = ("debug",)  # TrainingArguments' `debug`: `--debug` is every command's show-the-traceback flag


def add_dataclass_flags(parser: argparse.ArgumentParser, dataclass_types: tuple, only: dict | None = None,
                        groups: tuple = (), required: tuple = ()) -> dict:
    """Add a flag per field of `dataclass_types` (HfArgumentParser's names, both spellings, and aliases) and `--config`;
    returns the defaults. `only` maps a dataclass to the fields of it that get a flag (all of them when it is not there).
    `groups` lists `(title, field names)` argument groups, shown in that order after the command's own options (a field
    in none stays among those); the help of each field in `required` ends with `(required)`.

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
    containers = [(parser.add_argument_group(title), set(names)) for title, names in groups]
    for action in flagged:
        if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's `--no_x`: kept, but `--x false` is shown
            action.help = argparse.SUPPRESS
        elif defaults[action.dest] is not None and action.help != argparse.SUPPRESS:
            action.help = f"{action.help or ''} (default: {defaults[action.dest]})".strip()
        if action.dest in required:
            action.help = f"{action.help or ''} (required)".strip()
        action.default = argparse.SUPPRESS
        action.__class__ = _recording(type(action))
        next((group for group, names in containers if action.dest in names), parser)._add_action(action)
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (field names or flag names as keys); "
                                                        "flags on the command line override it")
    return defaults


TYPED = "typed_flags"  # the namespace attribute mapping each field given on the command line to the flag typed for it
FROM_CONFIG = "config_fields"  # the namespace attribute holding the fields the --config file set


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
        raw = Path(path).expanduser().read_bytes()
    except OSError as err:
        raise PactError(f"--config {path}: cannot read it ({err.strerror or err})") from err
    kind = "JSON" if Path(path).suffix.lower() == ".json" else "YAML"
    try:
        text = raw.decode("utf-8-sig")
        if kind == "JSON":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - yaml's and json's parse errors have no common base
        raise PactError(f"--config {path}: not valid {kind} text ({type(err).__name__}: {err})") from err
    if data is None:
        raise PactError(f"--config {path}: the file holds no settings; write one setting per line, e.g. learning_rate: 1.0e-4")
    if not isinstance(data, dict):
        raise PactError(f"--config {path}: expected a mapping of setting names to values, got {type(data).__name__}")
    return data


def _field_types(dataclass_types: tuple) -> dict:
    """The annotated type of every field of `dataclass_types`, by field name (what a config file's value must be)."""
    types = {}
    for kind in dataclass_types:
        types.update(typing.get_type_hints(kind))
    return types


def _config_values(parser: argparse.ArgumentParser, path: str, dataclass_types: tuple) -> dict:
    """The config file's values keyed by field, each converted as its flag converts text and checked against the field's
    type; unknown keys, and flags that are no setting of the command's dataclasses, are refused by name."""
    actions = {}
    for action in parser._actions:
        for option in action.option_strings:
            actions[option.lstrip("-").replace("-", "_")] = action
    field_types = _field_types(dataclass_types)
    values = {}
    for key, value in _read_config(path).items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None or action.dest in ("help", "debug"):
            raise PactError(f"--config {path}: unknown setting {key!r}; see `--help` for the settings (flag names without --)")
        if action.dest not in field_types:
            raise PactError(f"--config {path}: {key!r} is a flag of the command line, not a setting a config file holds; "
                            f"give {action.option_strings[0]} on the command line")
        values[action.dest] = _convert(action, value, field_types[action.dest], path, key)
    return values


def _convert(action: argparse.Action, value, expected, path: str, key) -> object:
    """A config file's `value` for `action`'s field of type `expected`: text converted by the flag's type (as on the
    command line), a single value of a list flag made a one-item list; then refused, naming the file and the key, unless
    it is of the field's type (a string for text fields, an integer for integer fields, true/false for switches...)."""
    given = value
    if isinstance(action, argparse._StoreFalseAction):  # `no_x: true` in the file turns x off, as --no_x does
        expected = bool
    elif action.nargs == "+" and not isinstance(value, list):
        value = [value]
    convert = None if isinstance(action, argparse._StoreFalseAction) or not callable(action.type) else action.type
    try:
        if isinstance(value, list):
            value = [_from_text(convert, item, _item_type(expected)) for item in value]
        else:
            value = _from_text(convert, value, expected)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise PactError(f"--config {path}: {key}: {given!r} is not a valid value ({err})") from err
    if not _is_a(value, expected):
        quote = given is not None and not isinstance(given, (list, dict)) and set(_members(expected)) <= {str, type(None)}
        raise PactError(f"--config {path}: {key}: expected {_describe(expected)}, got {_shown(given)}"
                        + ("; quote it to make it text" if quote else ""))
    if action.choices and value not in action.choices:
        raise PactError(f"--config {path}: {key}: expected one of {', '.join(map(str, action.choices))}, got {_shown(given)}")
    return not value if isinstance(action, argparse._StoreFalseAction) else value


def _shown(value) -> str:
    """A value read from YAML/JSON as messages show it: as JSON (cut at 60 characters), with its kind (`5 (an integer)`)."""
    text = json.dumps(value, default=str)
    text = text if len(text) <= 60 else text[:57] + "..."
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "text", list: "a list", dict: "a mapping"}
    return text if value is None else f"{text} ({kinds.get(type(value), type(value).__name__)})"


def _from_text(convert, value, expected):
    """`value` converted by the flag's `convert` when it is text the field does not take as text (YAML reads `1e-4` as
    text; `3` and `true` written as strings mean what they mean on the command line); other values unchanged."""
    if convert is None or not isinstance(value, str) or _is_a(value, expected):
        return value
    return convert(value)


def _item_type(expected):
    """The item type of a list type among the members of `expected` (`list[str] | None` -> str); Any when there is none."""
    for member in typing.get_args(expected) or (expected,):
        if typing.get_origin(member) is list:
            return (typing.get_args(member) or (typing.Any,))[0]
    return typing.Any


def _members(expected) -> tuple:
    """The alternatives of a union type (`int | None` -> int, NoneType); the type itself otherwise."""
    return typing.get_args(expected) if typing.get_origin(expected) in (typing.Union, types.UnionType) else (expected,)


def _is_a(value, expected) -> bool:
    """Whether a value read from YAML/JSON is of the field type `expected` (a bool is no number, an int is a float)."""
    for member in _members(expected):
        origin = typing.get_origin(member)
        if member is typing.Any or (member is type(None) and value is None):
            return True
        if origin is typing.Literal and any(type(value) is type(choice) and value == choice for choice in typing.get_args(member)):
            return True
        if origin in (list, dict) and isinstance(value, origin):
            args = typing.get_args(member)
            items = value if origin is list else value.values()
            if not args or all(_is_a(item, args[-1]) for item in items):
                return True
        if member in (int, float) and isinstance(value, (int, float) if member is float else int) and not isinstance(value, bool):
            return True
        if member in (str, bool, dict, list) and isinstance(value, member):
            return True
        if isinstance(member, type) and issubclass(member, enum.Enum) and isinstance(value, (str, member)):
            return True
        if isinstance(member, type) and member not in (int, float, str, bool, dict, list) and isinstance(value, member):
            return True
    return False


def _describe(expected) -> str:
    """What a field of type `expected` takes, in words: `text or null`, `an integer`, `a list of text`..."""
    words = []
    for member in _members(expected):
        origin = typing.get_origin(member)
        if origin is list:
            word = f"a list of {_describe((typing.get_args(member) or (typing.Any,))[0])}"
        elif origin is dict:
            word = "a mapping"
        elif origin is typing.Literal:
            word = " or ".join(json.dumps(choice) for choice in typing.get_args(member))
        elif isinstance(member, type) and issubclass(member, enum.Enum):
            word = "text"
        else:
            word = {str: "text", int: "an integer", float: "a number", bool: "true or false", type(None): "null", dict: "a mapping",
                    list: "a list", typing.Any: "any value"}.get(member, getattr(member, "__name__", str(member)))
        if word not in words:
            words.append(word)
    return " or ".join(words)


def dataclasses_from_flags(args: argparse.Namespace, dataclass_types: tuple, defaults: dict) -> tuple:
    """Instances of `dataclass_types` from the defaults, the `--config` file and the flags given (in that order of priority).

    An `InvalidSetting` gains the name of the flag (or of the config file) that holds the bad value; the fields the
    config file set are kept in `args` (`FROM_CONFIG`), so a later refusal of the command names the file as well.
    """
    given = vars(args)
    from_file = _config_values(_parser_of(args), given["config"], dataclass_types) if given.get("config") else {}
    setattr(args, FROM_CONFIG, set(from_file))
    values = {**defaults, **from_file, **{k: v for k, v in given.items() if k in defaults}}
    try:
        return tuple(kind(**{f.name: values[f.name] for f in dataclasses.fields(kind) if f.init and f.name in values})
                     for kind in dataclass_types)
    except InvalidSetting as err:
        raise with_flag(err, args) from err


def with_flag(err: InvalidSetting, args: argparse.Namespace) -> InvalidSetting:
    """`err` with its message prefixed by where the value came from: the flag, or `FILE (field)` for a config file's value."""
    typed = vars(args).get(TYPED) or {}
    if err.field in (vars(args).get(FROM_CONFIG) or ()) and err.field not in typed:
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
