"""Training and prompt data: reading files, validating rows, rendering them
with a chat template and finding the assistant's response tokens.

Rows come as Alpaca (`instruction`, optional `input`, `output`) or chat
(`messages` with `role`/`content`) from JSON, JSONL, CSV, Parquet or a
`datasets` folder saved with `save_to_disk`. Every row becomes a list of chat
messages whose last message is the assistant's response.

Truncation policy (`max_length`): the prompt is always kept whole and the
response is cut from the right so the sequence fits; a row whose prompt alone
leaves no room for one response token is invalid.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

from transformers import PreTrainedTokenizerBase

from pact.errors import PactError

DEMO_BENIGN = "benign"
DEMO_REFUSALS = "refusals"
ROLES = ("system", "user", "assistant")
PLAIN_HEADER_FALLBACK = "Assistant:"


class DataError(PactError):
    """A data file or one of its rows is unusable; the message names the file and row."""


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
class EncodedExample:
    """A tokenized row: `input_ids[response_start:]` are the response tokens (incl. end of turn)."""

    example_id: int
    input_ids: list[int]
    response_start: int

    @property
    def response_ids(self) -> list[int]:
        """The assistant's tokens, the positions the objective is computed on."""
        return self.input_ids[self.response_start:]


@dataclass
class LoadReport:
    """What loading a data file kept and skipped."""

    path: str
    rows: int
    skipped: int
    errors: list[str]


def demo_data_path(name: str) -> Path:
    """Path of the project's bundled demo data (`benign` or `refusals`)."""
    if name not in (DEMO_BENIGN, DEMO_REFUSALS):
        raise DataError(f"unknown demo data set {name!r}; choose {DEMO_BENIGN!r} or {DEMO_REFUSALS!r}")
    return Path(str(resources.files("pact") / "demo_data" / f"demo_{name}.jsonl"))


def _rows_from_file(path: Path) -> Iterator[tuple[str, object]]:
    """Yield `(location, raw_row)` pairs, where location reads like `line 7` or `row 3`."""
    if path.is_dir():
        from datasets import load_from_disk

        try:
            dataset = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{path}: not a dataset saved with save_to_disk ({err})") from err
        if hasattr(dataset, "keys"):
            if "train" not in dataset:
                raise DataError(f"{path}: DatasetDict without a 'train' split (splits: {list(dataset.keys())})")
            dataset = dataset["train"]
        for index, row in enumerate(dataset):
            yield f"row {index}", row
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {number}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"line {number}", DataError(f"invalid JSON ({err.msg} at column {err.colno})")
    elif suffix == ".json":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of rows (or an object with a 'data' array)")
        for index, row in enumerate(data):
            yield f"row {index}", row
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            first_line = 2  # line 1 is the header; a quoted field may span several lines
            for index, row in enumerate(reader):
                yield f"row {index} (line {first_line})", {k: v for k, v in row.items() if v not in (None, "")}
                first_line = reader.line_num + 1
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for index, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"row {index}", row
    else:
        raise DataError(f"{path}: unsupported data format {suffix!r}; use .jsonl, .json, .csv, .parquet or a save_to_disk folder")


def _require_text(row: dict, field: str) -> str:
    value = row.get(field)
    if value is None:
        raise DataError(f"missing field '{field}'")
    if not isinstance(value, str):
        raise DataError(f"field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"field '{field}' is empty")
    return value


def row_to_messages(row: object) -> list[dict[str, str]]:
    """Validate one raw row and convert it to chat messages ending with the assistant's answer."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"expected an object with 'instruction'/'output' or 'messages', got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as err:
                raise DataError(f"field 'messages' is a string but not JSON ({err.msg})") from err
        if not isinstance(messages, list) or not messages:
            raise DataError("field 'messages' must be a non-empty list")
        clean = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise DataError(f"messages[{index}] must be an object with 'role' and 'content'")
            role = message.get("role")
            if role not in ROLES:
                raise DataError(f"messages[{index}].role must be one of {ROLES}, got {role!r}")
            content = message.get("content")
            if not isinstance(content, str):
                raise DataError(f"messages[{index}].content must be a string")
            clean.append({"role": role, "content": content})
        if clean[-1]["role"] != "assistant" or not clean[-1]["content"].strip():
            raise DataError("the last message must be a non-empty 'assistant' message (the response)")
        if not any(m["role"] == "user" for m in clean):
            raise DataError("'messages' has no 'user' message")
        return clean
    instruction = _require_text(row, "instruction")
    output = _require_text(row, "output")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"field 'input' must be a string, got {type(extra).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def load_conversations(path: str | Path, skip_invalid: bool = False, limit: int | None = None) -> tuple[list[Conversation], LoadReport]:
    """Read and validate a data file; `example_id` is each row's index in the file.

    A bad row raises `DataError` naming the file, the row or line and the
    field, unless `skip_invalid`, which skips it and counts it in the report.
    """
    return _load_rows(path, lambda index, raw: Conversation(index, row_to_messages(raw)), skip_invalid, limit)


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not tokenizer.chat_template:
        raise DataError("the tokenizer has no chat template, so rows cannot be rendered as chat; use an instruction-tuned model")


def assistant_header(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the chat template adds for `add_generation_prompt=True` (the post-only context's prefix).

    Falls back to "Assistant:" when the template adds nothing.
    """
    _require_chat_template(tokenizer)
    probe = [{"role": "user", "content": "x"}]
    without = tokenizer.apply_chat_template(probe, tokenize=False)
    with_prompt = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    if with_prompt.startswith(without) and len(with_prompt) > len(without):
        return with_prompt[len(without):]
    return PLAIN_HEADER_FALLBACK


def assistant_header_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of `assistant_header`."""
    return _tokens(tokenizer, assistant_header(tokenizer))


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The chat-template text up to where the assistant's answer starts (generation prompt on)."""
    _require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, max_length: int | None = None
) -> EncodedExample:
    """Tokenize a conversation and locate its response tokens.

    The response is the final assistant message up to and including the first
    special token the template adds after it (the end-of-turn token); anything
    the template appends after that (e.g. a newline) is not part of it.
    """
    prompt_text = render_prompt(tokenizer, conversation.messages[:-1])
    full_text = tokenizer.apply_chat_template(conversation.messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError("the chat template renders the prompt differently when the answer follows; cannot locate the response")
    prompt_ids = _tokens(tokenizer, prompt_text)
    full_ids = _tokens(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        full_ids = prompt_ids + _tokens(tokenizer, full_text[len(prompt_text):])
    response = full_ids[len(prompt_ids):]
    special = _special_ids(tokenizer)
    end = next((i + 1 for i, token in enumerate(response) if token in special), None)
    if end is None:
        end = len(response)
        while end > 0 and not tokenizer.decode(response[end - 1:end]).strip():
            end -= 1
    response = response[:end]
    if not response or all(token in special for token in response):
        raise DataError("the response renders to zero tokens")
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room < 1:
            raise DataError(f"the prompt has {len(prompt_ids)} tokens, leaving no room for the response within --max-length {max_length}")
        response = response[:room]
    return EncodedExample(conversation.example_id, prompt_ids + response, len(prompt_ids))


def encode_conversations(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    max_length: int | None = None,
    skip_invalid: bool = False,
    source: str = "data",
) -> tuple[list[EncodedExample], list[str]]:
    """Encode many conversations; errors name `source` and the row, or are collected with `skip_invalid`."""
    encoded, errors = [], []
    for conversation in conversations:
        try:
            encoded.append(encode_conversation(tokenizer, conversation, max_length))
        except DataError as err:
            message = f"{source}, row {conversation.example_id}: {err}"
            if not skip_invalid:
                raise DataError(message) from None
            errors.append(message)
    if not encoded:
        raise DataError(f"{source}: no row could be encoded ({errors[0] if errors else 'no rows'})")
    return encoded, errors


def load_examples(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> tuple[list[EncodedExample], LoadReport]:
    """Read, validate and tokenize a data file in one call (the usual entry point)."""
    conversations, report = load_conversations(path, skip_invalid=skip_invalid, limit=limit)
    encoded, errors = encode_conversations(tokenizer, conversations, max_length, skip_invalid, source=str(path))
    report.errors.extend(errors)
    return encoded, LoadReport(report.path, len(encoded), report.skipped + len(errors), report.errors)


# --- Prompt-only rows (evaluation) ---------------------------------------------------------------

_PLACEHOLDER_ANSWER = "(answer)"


@dataclass
class Prompt:
    """One validated request: chat messages ending with the user's turn (no answer)."""

    example_id: int
    messages: list[dict[str, str]]

    @property
    def text(self) -> str:
        """The last user message: the request itself."""
        return self.messages[-1]["content"]


def _with_placeholder_answer(row: dict) -> dict:
    """`row` with its answer (if any) replaced by a placeholder, so `row_to_messages` can validate the rest."""
    if "messages" in row:
        messages = row["messages"]
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                return row  # row_to_messages reports it
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            return row
        if messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        return {**row, "messages": [*messages, {"role": "assistant", "content": _PLACEHOLDER_ANSWER}]}
    if "instruction" not in row and "prompt" in row:
        row = {**row, "instruction": row["prompt"]}
    return {**row, "output": _PLACEHOLDER_ANSWER}


def row_to_prompt_messages(row: object) -> list[dict[str, str]]:
    """Validate one raw row as a request; returns its chat messages up to where the answer would start.

    Accepts the formats of `row_to_messages` without requiring an answer:
    Alpaca rows with `instruction` (or `prompt`) and optional `input`, and chat
    rows with `messages` (a final assistant message, if present, is dropped).
    The validation is `row_to_messages`'s own, run on the row completed with a
    placeholder answer, so training and evaluation files follow one set of rules.
    """
    if isinstance(row, dict):
        row = _with_placeholder_answer(row)
    messages = row_to_messages(row)[:-1]
    if messages[-1]["role"] != "user":
        raise DataError("the conversation must end with a 'user' message (the request)")
    return messages


def _load_rows(path: str | Path, convert, skip_invalid: bool, limit: int | None) -> tuple[list, LoadReport]:
    """Read a data file and apply `convert(index, raw_row)` to each row, with the error policy of `load_conversations`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    items: list = []
    errors: list[str] = []
    for index, (location, raw) in enumerate(_rows_from_file(path)):
        if limit is not None and index >= limit:
            break
        try:
            items.append(convert(index, raw))
        except DataError as err:
            message = f"{path}, {location}: {err}"
            if not skip_invalid:
                raise DataError(message) from None
            errors.append(message)
    if not items:
        raise DataError(f"{path}: no usable rows" + (f" ({len(errors)} invalid, first: {errors[0]})" if errors else " (the file is empty)"))
    return items, LoadReport(str(path), len(items), len(errors), errors)


def load_prompts(path: str | Path, skip_invalid: bool = False, limit: int | None = None) -> tuple[list[Prompt], LoadReport]:
    """Read requests (answers optional and ignored) from any format `load_conversations` reads.

    For evaluation files of prompts alone, e.g. harmful requests for refusal
    rates; `example_id` is each row's index in the file, errors as in
    `load_conversations`.
    """
    return _load_rows(path, lambda index, raw: Prompt(index, row_to_prompt_messages(raw)), skip_invalid, limit)
