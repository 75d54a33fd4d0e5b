"""Row formats: Alpaca (`instruction`, optional `input`, `output`), chat (`messages` with `role`/`content`), TRL
prompt/completion (`prompt`/`completion`, strings or message lists) or ShareGPT (`conversations` with `from`/`value`),
detected per source from the first row's fields or given (`data_format`). Every training row becomes a
`Conversation` (chat messages whose last is the assistant's response, earlier turns kept), every evaluation row a
`Prompt`; a bad row is a `DataError` naming the source, the line or row, and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pact.data.sources import DEFAULT_SPLIT, DataError, parse_json, open_data
from pact.errors import InvalidSetting

ROLES = ("system", "user", "assistant")
CHAT_ROLES = {role: role for role in ROLES}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS = ("alpaca", "messages", "prompt_completion", "sharegpt")
# the fields that name a row's format, in the order they are looked for
FORMAT_FIELDS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
                 "prompt_completion": ("prompt", "completion")}
EXPECTED_FIELDS = ("'instruction'/'output' (alpaca), 'messages' (chat), 'prompt'/'completion' (prompt_completion) "
                   "or 'conversations' (sharegpt)")


@dataclass
class Conversation:
    """One validated row: chat messages ending with the assistant's response."""

    example_id: int
    messages: list[dict[str, str]]

    @property
    def prompt(self) -> str:
        """The last user message: the request the response answers."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def response(self) -> str:
        """The assistant's final message."""
        return self.messages[-1]["content"]


@dataclass
class LoadReport:
    """What loading data kept and skipped; `path` names the source as errors do, `fingerprint` is the `datasets`
    fingerprint when the rows were a loaded or given `datasets.Dataset` (None for local files)."""

    path: str
    rows: int
    skipped: int
    errors: list[str]
    fingerprint: str | None = None


def _require_text(row: dict, field: str) -> str:
    """`row[field]` as a non-blank string; else a `DataError` naming the field and what it holds."""
    value = row.get(field)
    if value is None:
        raise DataError(f"missing field '{field}'")
    if not isinstance(value, str):
        raise DataError(f"field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"field '{field}' is empty")
    return value


def row_format(row: dict) -> str | None:
    """The row format a row's fields name (one of `FORMATS`), or None when they name none.

    `messages` makes a chat row, `conversations` a ShareGPT row, `instruction`
    or `output` an Alpaca row, `prompt` or `completion` a TRL prompt/completion
    row. Fields holding None do not count: a table (Parquet, a `datasets`
    dataset) gives every row all of its columns, None where a row has no value.
    """
    for data_format, fields in FORMAT_FIELDS.items():
        if any(row.get(field) is not None for field in fields):
            return data_format
    return None


def check_format(data_format: str | None) -> None:
    """Refuse a `data_format` that is not None (detect) or one of `FORMATS`, naming the field."""
    if data_format is not None and data_format not in FORMATS:
        raise InvalidSetting("data_format", f"data_format {data_format!r} is not a row format; choose one of {', '.join(FORMATS)} "
                                            "(or none, to detect it from the rows' fields)")


@dataclass
class DataSourceArguments:
    """How a command reads the data a flag of it names (a file, a save_to_disk folder or a hub dataset: owner/name or
    hub:ID): the split and configuration of a hub dataset, and the row format (detected from the first row's fields when
    not given)."""

    dataset_split: str = field(default=DEFAULT_SPLIT, metadata={
        "help": "split of a hub dataset or a saved DatasetDict given as the data"})
    dataset_config: str | None = field(default=None, metadata={"help": "configuration (subset) of a hub dataset given as the data"})
    data_format: str | None = field(default=None, metadata={
        "aliases": ["--format"], "help": f"row format: {', '.join(FORMATS)} (docs/commands.md#data; default: detected from "
                                         "the first row's fields)"})

    def __post_init__(self) -> None:
        """Refuse a row format that is not one of `FORMATS`."""
        check_format(self.data_format)

    def data_options(self) -> dict:
        """The settings as keyword arguments of `load_conversations`, `load_examples` and `load_prompts`."""
        return {"data_format": self.data_format, "dataset_split": self.dataset_split, "dataset_config": self.dataset_config}


def _field_names(row: dict) -> str:
    """The fields of a row that hold a value, for messages: `'a', 'b'` (at most 8)."""
    names = [repr(str(key)) for key, value in row.items() if value is not None]
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "none"


def _parsed_list(value: object, field: str) -> object:
    """A field that should hold a list, with JSON text (how a CSV cell holds a list) parsed."""
    if not isinstance(value, str):
        return value
    try:
        return parse_json(value)
    except (json.JSONDecodeError, DataError) as err:
        raise DataError(f"field '{field}' is a string but not JSON ({getattr(err, 'msg', err)})") from None


def _chat_messages(items: object, field: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    """Validate the message list in `field` (`role_key`/`content_key` objects, roles mapped through `roles`) into
    `{"role", "content"}` messages; errors name `field[i].key`."""
    if items is None:
        raise DataError(f"missing field '{field}'")
    items = _parsed_list(items, field)
    if not isinstance(items, list) or not items:
        raise DataError(f"field '{field}' must be a non-empty list")
    clean = []
    for index, message in enumerate(items):
        if not isinstance(message, dict):
            raise DataError(f"{field}[{index}] must be an object with '{role_key}' and '{content_key}'")
        role = message.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise DataError(f"{field}[{index}].{role_key} must be one of {tuple(roles)}, got {role!r}")
        content = message.get(content_key)
        if not isinstance(content, str):
            raise DataError(f"{field}[{index}].{content_key} must be a string")
        clean.append({"role": roles[role], "content": content})
    return clean


def _request(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages up to where an answer starts: a final assistant message dropped; they must end with the user's turn."""
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise DataError("the conversation must end with a 'user' message (the request)")
    return messages


def _answered(messages: list[dict[str, str]], field: str) -> list[dict[str, str]]:
    """`messages` checked as a training conversation: a user turn somewhere, a non-empty assistant message last."""
    last = messages[-1]
    if last["role"] != "assistant" or not last["content"].strip():
        raise DataError(f"field '{field}': the last message must be a non-empty 'assistant' message (the response), "
                        f"got {'an empty' if last['role'] == 'assistant' else 'a'} {last['role']!r} message "
                        f"({field}[{len(messages) - 1}])")
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"'{field}' has no 'user' message")
    return messages


def _conversation_messages(field: str, role_key: str, content_key: str, roles: dict[str, str]):
    """The converter of a format holding one conversation in `field` (chat `messages`, ShareGPT `conversations`)."""
    def convert(row: dict, answered: bool) -> list[dict[str, str]]:
        messages = _chat_messages(row.get(field), field, role_key, content_key, roles)
        return _answered(messages, field) if answered else _request(messages)
    return convert


def _alpaca_messages(row: dict, answered: bool) -> list[dict[str, str]]:
    """An Alpaca row as messages: `instruction` (then `input`, after a blank line) as the user's turn, then `output`
    (only when `answered`: prompt files need no answer)."""
    instruction = _require_text(row, "instruction")
    answer = [{"role": "assistant", "content": _require_text(row, "output")}] if answered else []
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"field 'input' must be a string, got {type(extra).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": prompt}, *answer]


def _completion_messages(completion: object) -> list[dict[str, str]]:
    """A conversational `completion`: assistant messages, the last one non-empty."""
    messages = _chat_messages(completion, "completion", "role", "content", CHAT_ROLES)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            raise DataError(f"completion[{index}].role must be 'assistant' (the completion is the response), got {message['role']!r}")
    if not messages[-1]["content"].strip():
        raise DataError(f"completion[{len(messages) - 1}].content is empty")
    return messages


def _prompt_completion_messages(row: dict, answered: bool) -> list[dict[str, str]]:
    """A TRL prompt/completion row as messages: `prompt` and `completion` both strings (a user turn and the answer), or
    both lists of messages (the prompt's conversation, then the completion's assistant messages)."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if answered and prompt is not None and completion is not None and isinstance(prompt, str) != isinstance(completion, str):
        raise DataError(f"fields 'prompt' and 'completion' must both be strings or both be lists of messages, "
                        f"got {type(prompt).__name__} and {type(completion).__name__}")
    if prompt is None or isinstance(prompt, str):
        messages = [{"role": "user", "content": _require_text(row, "prompt")}]
        return messages + ([{"role": "assistant", "content": _require_text(row, "completion")}] if answered else [])
    messages = _chat_messages(prompt, "prompt", "role", "content", CHAT_ROLES)
    if not any(m["role"] == "user" for m in messages):
        raise DataError("'prompt' has no 'user' message")
    return messages + _completion_messages(completion) if answered else _request(messages)


CONVERTERS = {
    "alpaca": _alpaca_messages,
    "messages": _conversation_messages("messages", "role", "content", CHAT_ROLES),
    "prompt_completion": _prompt_completion_messages,
    "sharegpt": _conversation_messages("conversations", "from", "value", SHAREGPT_ROLES),
}


def _row_messages(row: object, data_format: str | None, answered: bool) -> list[dict[str, str]]:
    """Validate one raw row in `data_format` (None: the format its fields name) and convert it to chat messages."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"expected an object (a row with {EXPECTED_FIELDS}), got {type(row).__name__}")
    check_format(data_format)
    found = row_format(row)
    if (data_format or found) is None:
        raise DataError(f"no known row format: the row has field(s) {_field_names(row)}; expected {EXPECTED_FIELDS}")
    try:
        return CONVERTERS[data_format or found](row, answered)
    except DataError as err:
        if data_format is None or found in (None, data_format):
            raise
        raise DataError(f"{err} (the row's field(s) {_field_names(row)} are those of the {found} format, "
                        f"but the format given is {data_format})") from None


def row_to_messages(row: object, data_format: str | None = None) -> list[dict[str, str]]:
    """Validate one raw row (any of `FORMATS`; None: detected from its fields) and convert it to chat messages ending
    with the assistant's answer; every earlier turn of a multi-turn conversation is kept."""
    return _row_messages(row, data_format, answered=True)


@dataclass
class _FileFormat:
    """The row format of one data source: the one given, else the one the first row with known fields names."""

    given: str | None
    detected: str | None = None
    where: str = ""

    def of(self, row: object, location: str) -> str | None:
        """The format to read `row` (at `location`) in; a row naming another format than the detected one is an error."""
        if self.given is not None or not isinstance(row, dict):
            return self.given
        found = row_format(row)
        if found is not None and self.detected is None:
            self.detected, self.where = found, location
        elif found is not None and found != self.detected:
            raise DataError(f"a row in the {found} format (field(s) {_field_names(row)}) among rows in the {self.detected} "
                            f"format (detected from {self.where}); use one row format per file")
        return found


def load_conversations(source, skip_invalid: bool = False, limit: int | None = None, *, data_format: str | None = None,
                       dataset_split: str = DEFAULT_SPLIT, dataset_config: str | None = None
                       ) -> tuple[list[Conversation], LoadReport]:
    """Read and validate training rows; `example_id` is each row's index in the source.

    `source` is a local file, a `save_to_disk` folder or folder of data files,
    a hub dataset id (with `dataset_split` and `dataset_config`), or a
    `datasets.Dataset` (see `open_data`). Rows are in one of `FORMATS`, detected
    from the first row's fields unless `data_format` names one. A bad row raises
    `DataError` naming the source, the row or line and the field, unless
    `skip_invalid`, which skips it and counts it in the report.
    """
    return _load_rows(source, lambda index, raw, fmt: Conversation(index, row_to_messages(raw, fmt)), skip_invalid, limit,
                      data_format, dataset_split, dataset_config)


@dataclass
class Prompt:
    """One validated request: chat messages ending with the user's turn (no answer)."""

    example_id: int
    messages: list[dict[str, str]]

    @property
    def text(self) -> str:
        """The last user message: the request itself."""
        return self.messages[-1]["content"]


def row_to_prompt_messages(row: object, data_format: str | None = None) -> list[dict[str, str]]:
    """Validate one raw row as a request; returns its chat messages up to where the answer would start.

    Accepts every format of `row_to_messages` with the answer optional and
    ignored: Alpaca rows need only `instruction`, prompt/completion rows only
    `prompt`, and a final assistant message of a conversation is dropped.
    """
    return _row_messages(row, data_format, answered=False)


def _load_rows(source, convert, skip_invalid: bool, limit: int | None, data_format: str | None, dataset_split: str,
               dataset_config: str | None) -> tuple[list, LoadReport]:
    """Read a data source and apply `convert(index, raw_row, row_format)` to each row, with the error policy of
    `load_conversations`."""
    if limit is not None and limit < 1:
        raise DataError(f"the row limit must be at least 1, got {limit}")
    check_format(data_format)
    opened = open_data(source, dataset_split, dataset_config)
    formats = _FileFormat(data_format)
    items: list = []
    errors: list[str] = []
    for index, (location, raw) in enumerate(opened.rows):
        if limit is not None and index >= limit:
            break
        try:
            items.append(convert(index, raw, formats.of(raw, location)))
        except DataError as err:
            message = f"{opened.name}, {location}: {err}"
            if not skip_invalid:
                raise DataError(message) from None
            errors.append(message)
    if not items:
        raise DataError(f"{opened.name}: no usable rows" + (f" ({len(errors)} invalid, first: {errors[0]})" if errors else f" ({opened.empty})"))
    return items, LoadReport(opened.name, len(items), len(errors), errors, opened.fingerprint)


def load_prompts(source, skip_invalid: bool = False, limit: int | None = None, *, data_format: str | None = None,
                 dataset_split: str = DEFAULT_SPLIT, dataset_config: str | None = None) -> tuple[list[Prompt], LoadReport]:
    """Read requests (answers optional and ignored) from any source and row format `load_conversations` reads.

    For evaluation files of prompts alone, e.g. harmful requests for refusal
    rates; `example_id` is each row's index in the source, errors as in
    `load_conversations`.
    """
    return _load_rows(source, lambda index, raw, fmt: Prompt(index, row_to_prompt_messages(raw, fmt)), skip_invalid, limit,
                      data_format, dataset_split, dataset_config)
