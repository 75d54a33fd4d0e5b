"""Training and prompt data: reading files, validating rows, rendering them
with a chat template and finding the assistant's response tokens.

Rows come as Alpaca (`instruction`, optional `input`, `output`) or chat
(`messages` with `role`/`content`) from JSON, JSONL, CSV, Parquet or a
`datasets` folder saved with `save_to_disk`. Every row becomes a list of chat
messages whose last message is the assistant's response. Text files must be
UTF-8 (a leading byte-order mark, as Excel writes, is ignored); a bad file or
row is a `DataError` naming the file, the line or row, and the field.

Message text is always tokenized as text: an answer that quotes a special
token (`<|im_end|>`) keeps those characters instead of ending the turn there
(see "Special-token text inside messages" below).

Truncation policy (`max_length`): the prompt is always kept whole and the
response is cut from the right so the sequence fits; a row whose prompt alone
leaves no room for one response token is invalid.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

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


def _utf8_problem(raw: bytes, err: UnicodeDecodeError) -> tuple[int, str]:
    """Where in `raw` (lines after its first) and what the first byte that is not UTF-8 is, for error messages."""
    column = err.start - raw.rfind(b"\n", 0, err.start)
    return raw.count(b"\n", 0, err.start), (f"not UTF-8 text (byte 0x{raw[err.start]:02x} at byte {column} of the line); "
                                             "save the file as UTF-8 (a binary file is not data)")


def _decode_utf8(raw: bytes, first_line: int) -> str:
    """`raw`, bytes starting at line `first_line` of a file, as text; a byte-order mark at the file's start is dropped."""
    return raw.decode("utf-8-sig" if first_line == 1 else "utf-8")


def _decode_or_fail(path: Path, raw: bytes, first_line: int) -> str:
    """`_decode_utf8`, with bytes that are not UTF-8 (Latin-1, a binary file) a `DataError` naming the file and line."""
    try:
        return _decode_utf8(raw, first_line)
    except UnicodeDecodeError as err:
        offset, problem = _utf8_problem(raw, err)
        raise DataError(f"{path}, line {first_line + offset}: {problem}") from None


def _parse_json(text: str) -> object:
    """`json.loads`, with nesting too deep for the parser reported as a `DataError`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError("invalid JSON (nested too deeply)") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    """One row per non-blank line; a line that is not UTF-8 or not JSON is yielded as that row's `DataError`."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            location = f"line {number}"
            try:
                line = _decode_utf8(raw, number)
                if line.strip():
                    yield location, _parse_json(line)
            except UnicodeDecodeError as err:
                yield location, DataError(_utf8_problem(raw, err)[1])
            except json.JSONDecodeError as err:
                yield location, DataError(f"invalid JSON ({err.msg} at column {err.colno})")
            except DataError as err:
                yield location, err


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    """The rows of a JSON array (or of an object's `data` array); the whole file must parse."""
    text = _decode_or_fail(path, path.read_bytes(), 1)
    if not text.strip():
        return
    try:
        data = _parse_json(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows (or an object with a 'data' array)")
    for index, row in enumerate(data):
        yield f"row {index}", row


def _allow_long_csv_fields() -> None:
    """Lift the csv module's 128 KiB cell limit (a long response is legitimate data), as far as a C long allows."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _csv_lines(path: Path) -> Iterator[str]:
    """The decoded lines of a CSV file (line endings kept, as the csv module needs); bad UTF-8 names the line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            yield _decode_or_fail(path, raw, number)


def _csv_rows(path: Path) -> Iterator[tuple[str, object]]:
    """One row per record under the header row; a record with more cells than the header has is that row's error."""
    _allow_long_csv_fields()
    reader = csv.DictReader(_csv_lines(path))
    first_line = 2  # line 1 is the header; a quoted field may span several lines
    try:
        for index, row in enumerate(reader):
            location = f"row {index} (line {first_line})"
            extra = row.pop(None, None)
            if extra is not None:
                yield location, DataError(f"{len(reader.fieldnames) + len(extra)} cells but the header has "
                                          f"{len(reader.fieldnames)} columns; quote cells that contain a comma")
            else:
                yield location, {k: v for k, v in row.items() if v not in (None, "")}
            first_line = reader.line_num + 1
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from err


def _arrow_rows(path: Path, read: Callable[[], Iterator[dict]], what: str) -> Iterator[tuple[str, object]]:
    """Rows from a columnar reader (`read()` yields dicts); a file the reader cannot decode is a `DataError`."""
    import pyarrow as pa

    try:
        for index, row in enumerate(read()):
            yield f"row {index}", row
    except (pa.ArrowException, OSError, ValueError, TypeError, KeyError) as err:
        raise DataError(f"{path}: not {what} ({type(err).__name__}: {err})") from err


def _parquet_dicts(path: Path) -> Iterator[dict]:
    """The rows of a Parquet file, read a batch at a time (a large file is never held whole)."""
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches():
        yield from batch.to_pylist()


def _dataset_dicts(path: Path) -> Iterator[dict]:
    """The rows of a `datasets` folder saved with `save_to_disk` (a `DatasetDict`'s `train` split)."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(path))
    if hasattr(dataset, "keys"):
        if "train" not in dataset:
            raise DataError(f"{path}: DatasetDict without a 'train' split (splits: {list(dataset.keys())})")
        dataset = dataset["train"]
    yield from dataset


def _rows_from_file(path: Path) -> Iterator[tuple[str, object]]:
    """Yield `(location, raw_row)` pairs, where location reads like `line 7` or `row 3`.

    A raw row may be a `DataError` (a line that is not JSON, a CSV record with
    extra cells): that row is invalid, the others are still read. Problems with
    the file as a whole raise `DataError` naming the file (and line).
    """
    if path.is_dir():
        return _arrow_rows(path, lambda: _dataset_dicts(path), "a dataset saved with save_to_disk")
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": _jsonl_rows,
        ".json": _json_rows,
        ".csv": _csv_rows,
        ".parquet": lambda p: _arrow_rows(p, lambda: _parquet_dicts(p), "a readable Parquet file"),
    }
    if suffix not in readers:
        raise DataError(f"{path}: unsupported data format {suffix!r}; use .jsonl, .json, .csv, .parquet or a save_to_disk folder")
    return readers[suffix](path)


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
                messages = _parse_json(messages)
            except (json.JSONDecodeError, DataError) as err:
                raise DataError(f"field 'messages' is a string but not JSON ({getattr(err, 'msg', err)})") from None
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
            raise DataError(f"field 'messages': the last message must be a non-empty 'assistant' message (the response), "
                            f"got {'an empty' if clean[-1]['role'] == 'assistant' else 'a'} {clean[-1]['role']!r} message "
                            f"(messages[{len(clean) - 1}])")
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
    """Ids of every special token (end of turn, BOS, pad, ...), registered or added."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def _special_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The texts the tokenizer reads as special tokens when it parses them (e.g. `<|im_end|>`), longest first."""
    texts = set(tokenizer.all_special_tokens)
    texts.update(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    return sorted((text for text in texts if text), key=len, reverse=True)


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str, plain: bool = False) -> list[int]:
    """Token ids of `text` without added BOS/EOS; `plain` reads special-token texts in it as ordinary text."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=plain)["input_ids"])


def _require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer without a chat template: rows are rendered with it."""
    if not tokenizer.chat_template:
        raise DataError("the tokenizer has no chat template, so rows cannot be rendered as chat; use an instruction-tuned model")


def _apply_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text for `messages`; a template that refuses them (`raise_exception`) is a `DataError`."""
    from jinja2 import TemplateError

    _require_chat_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        raise DataError(f"the chat template cannot render this row: {err}") from None


def assistant_header(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the chat template adds for `add_generation_prompt=True` (the post-only context's prefix).

    Falls back to "Assistant:" when the template adds nothing.
    """
    probe = [{"role": "user", "content": "x"}]
    without = _apply_template(tokenizer, probe, add_generation_prompt=False)
    with_prompt = _apply_template(tokenizer, probe, add_generation_prompt=True)
    if with_prompt.startswith(without) and len(with_prompt) > len(without):
        return with_prompt[len(without):]
    return PLAIN_HEADER_FALLBACK


def assistant_header_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of `assistant_header`."""
    return _tokens(tokenizer, assistant_header(tokenizer))


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The chat-template text up to where the assistant's answer starts (generation prompt on)."""
    return _apply_template(tokenizer, messages, add_generation_prompt=True)


# --- Special-token text inside messages ----------------------------------------------------------
#
# A rendered conversation is tokenized with special tokens parsed, so that the template's own
# `<|im_start|>`/`<|im_end|>` become their ids. A message whose text contains such a token's text
# (a tutorial answer quoting `<|im_end|>`) would then get the real id in the middle of the answer,
# and the response would be cut there. Instead, when a message contains special-token text, the
# rendering is cut at the template's special tokens; each stretch of text between them (template
# text and message text together) is tokenized with special-token texts read as ordinary text,
# exactly as the tokenizer treats text between special tokens. That this reproduces the tokenizer
# is checked on every such row (tokenizing the same stretches with special tokens parsed must give
# the ordinary tokenization); a tokenizer or template for which it does not (one that rewrites
# message text, or tokenizes across special tokens) makes such rows a `DataError` naming the
# message, never a silent cut.

Segments = list[tuple[str, bool]]
_CONTENT_MARK = "\ue000pact-message-{}\ue001"


def _has_special_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> bool:
    """Whether any message's text contains a special token's text."""
    texts = _special_texts(tokenizer)
    return any(text in message["content"] for message in messages for text in texts)


def _special_text_error(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], why: str) -> DataError:
    """The error for a row whose special-token text cannot be encoded as plain text, naming the message and the text."""
    texts = _special_texts(tokenizer)
    index, found = next((i, t) for i, m in enumerate(messages) for t in texts if t in m["content"])
    return DataError(f"the {messages[index]['role']} message (messages[{index}]) contains the special-token text {found!r}, "
                     f"which cannot be encoded as plain text with this tokenizer ({why}); remove it from the data")


def _content_segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool,
                      text: str) -> Segments | None:
    """`text`, the rendering of `messages`, cut into (piece, is_message_text) pieces; None if the template rewrites messages.

    The template is rendered once more with a unique mark in place of each
    message's text, so template text and message text are told apart without
    guessing; the pieces must join back into `text` exactly.
    """
    marks = [_CONTENT_MARK.format(i) for i in range(len(messages))]
    marked = _apply_template(tokenizer, [{**m, "content": mark} for m, mark in zip(messages, marks)], add_generation_prompt)
    segments: Segments = []
    last = 0
    for match in re.finditer("|".join(map(re.escape, marks)), marked):
        segments += [(marked[last:match.start()], False), (messages[marks.index(match.group())]["content"], True)]
        last = match.end()
    segments.append((marked[last:], False))
    return segments if "".join(piece for piece, _ in segments) == text else None


def _stretches(tokenizer: PreTrainedTokenizerBase, segments: Segments) -> list[str | int]:
    """The text between the template's special tokens (strings) and those tokens' ids (ints), in order."""
    pattern = re.compile("|".join(map(re.escape, _special_texts(tokenizer))))
    stretches: list[str | int] = [""]
    for piece, is_message in segments:
        last = 0
        for match in ([] if is_message else pattern.finditer(piece)):
            stretches[-1] += piece[last:match.start()]
            stretches += [tokenizer.convert_tokens_to_ids(match.group()), ""]
            last = match.end()
        stretches[-1] += piece[last:]
    return stretches


def _stretch_ids(tokenizer: PreTrainedTokenizerBase, stretches: list[str | int], plain: bool) -> list[int]:
    """Token ids of `stretches`, each text tokenized on its own (`plain`: special-token texts as ordinary text)."""
    ids: list[int] = []
    for stretch in stretches:
        ids += [stretch] if isinstance(stretch, int) else _tokens(tokenizer, stretch, plain)
    return ids


def _plain_message_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], segments: Segments | None) -> list[int]:
    """Token ids of the joined `segments` with the messages' special-token texts as ordinary text (see the notes above)."""
    if segments is None:
        raise _special_text_error(tokenizer, messages, "the chat template changes the message text")
    stretches = _stretches(tokenizer, segments)
    if _stretch_ids(tokenizer, stretches, plain=False) != _tokens(tokenizer, "".join(piece for piece, _ in segments)):
        raise _special_text_error(tokenizer, messages, "it tokenizes across special tokens")
    return _stretch_ids(tokenizer, stretches, plain=True)


def _drop_prefix(segments: Segments, count: int) -> Segments:
    """`segments` without their first `count` characters."""
    kept: Segments = []
    for piece, is_message in segments:
        cut = min(count, len(piece))
        count -= cut
        if piece[cut:]:
            kept.append((piece[cut:], is_message))
    return kept


def _render_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool
                ) -> tuple[str, list[int], Segments | None]:
    """The rendering of `messages`, its token ids (message text always as text), and its pieces when they were needed.

    The pieces are None when no message contains special-token text (then the
    ids are the ordinary tokenization of the rendering).
    """
    text = _apply_template(tokenizer, messages, add_generation_prompt)
    if not _has_special_text(tokenizer, messages):
        return text, _tokens(tokenizer, text), None
    segments = _content_segments(tokenizer, messages, add_generation_prompt, text)
    return text, _plain_message_ids(tokenizer, messages, segments), segments


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `render_prompt(messages)`, the messages' text tokenized as text (a quoted `<|im_end|>` stays text)."""
    return _render_ids(tokenizer, messages, add_generation_prompt=True)[1]


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, max_length: int | None = None
) -> EncodedExample:
    """Tokenize a conversation and locate its response tokens.

    The response is the final assistant message up to and including the first
    special token the template adds after it (the end-of-turn token); anything
    the template appends after that (e.g. a newline) is not part of it.
    Special-token text inside the messages is tokenized as ordinary text.
    """
    messages = conversation.messages
    prompt_text, prompt_ids, _ = _render_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full_text, full_ids, segments = _render_ids(tokenizer, messages, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise DataError("the chat template renders the prompt differently when the answer follows; cannot locate the response")
    if full_ids[: len(prompt_ids)] != prompt_ids:  # the tokenizer merged across the start of the answer: cut there
        if segments is None:
            full_ids = prompt_ids + _tokens(tokenizer, full_text[len(prompt_text):])
        else:
            full_ids = prompt_ids + _plain_message_ids(tokenizer, messages, _drop_prefix(segments, len(prompt_text)))
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
                messages = _parse_json(messages)
            except (json.JSONDecodeError, DataError):
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
    if limit is not None and limit < 1:
        raise DataError(f"the row limit must be at least 1, got {limit}")
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
