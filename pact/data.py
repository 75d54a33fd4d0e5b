"""Training and prompt data: reading files, validating rows, rendering them
with a chat template and finding the assistant's response tokens.

Data comes from a local file (JSON, JSONL, CSV, TSV, Parquet, or anything else
`datasets` reads: `.arrow`, compressed files), a `save_to_disk` folder, a
folder of data files, a hub dataset id, or a `datasets.Dataset` (`open_data`).
Rows are Alpaca (`instruction`, optional `input`, `output`), chat (`messages`
with `role`/`content`), TRL prompt/completion (`prompt`/`completion`, strings
or message lists) or ShareGPT (`conversations` with `from`/`value`): the
format is detected per source from the first row's fields, or given
(`data_format`). Every row becomes a list of chat messages whose last message
is the assistant's response; the earlier turns are kept. Text files must be
UTF-8 (a leading byte-order mark, as Excel writes, is ignored); a bad file or
row is a `DataError` naming the file, the line or row, and the field.

Message text is always tokenized as text: an answer that quotes a special
token (`<|im_end|>`) keeps those characters instead of ending the turn there
(see "Special-token text inside messages" below).

Truncation policy (`max_length`): the prompt (everything before the first
response) is always kept whole and later turns are cut from the right so the
sequence fits (response spans clipped, empty ones dropped); a row whose prompt
alone leaves no room for one response token is invalid.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass
from os import PathLike
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

from transformers import PreTrainedTokenizerBase

from pact.errors import InvalidSetting, PactError

DEMO_BENIGN = "benign"
DEMO_REFUSALS = "refusals"
ROLES = ("system", "user", "assistant")
CHAT_ROLES = {role: role for role in ROLES}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS = ("alpaca", "messages", "prompt_completion", "sharegpt")
# the fields that name a row's format, in the order they are looked for
FORMAT_FIELDS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
                 "prompt_completion": ("prompt", "completion")}
EXPECTED_FIELDS = ("'instruction'/'output' (alpaca), 'messages' (chat), 'prompt'/'completion' (prompt_completion) "
                   "or 'conversations' (sharegpt)")
DEFAULT_SPLIT = "train"
# file suffixes and the `datasets` packaged builder reading them; compressed files keep the inner suffix
DATASETS_BUILDERS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
                     ".parquet": "parquet", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
UNREAD_SUFFIXES = (".txt", ".md", ".py", ".gguf", ".safetensors", ".bin", ".pt")  # files `datasets` reads but not as rows
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
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
    """A tokenized row: `spans` are the (start, end) token ranges of its responses, one per assistant turn trained on.

    Each span runs up to and including its turn's end-of-turn token;
    `response_start` is the first span's start (everything before it is the
    prompt). Without `spans` the response is `input_ids[response_start:]`.
    """

    example_id: int
    input_ids: list[int]
    response_start: int
    spans: list[tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        """Default to one response running from `response_start` to the end (a single-turn row)."""
        if self.spans is None:
            self.spans = [(self.response_start, len(self.input_ids))]

    @property
    def response_ids(self) -> list[int]:
        """The assistant's tokens, the positions the objective is computed on (every span, in order)."""
        return [token for start, end in self.spans for token in self.input_ids[start:end]]


@dataclass
class LoadReport:
    """What loading data kept and skipped; `path` names the source as errors do, `fingerprint` is the `datasets`
    fingerprint when the rows were a loaded or given `datasets.Dataset` (None for local files)."""

    path: str
    rows: int
    skipped: int
    errors: list[str]
    fingerprint: str | None = None


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
    """The rows of a JSON array (or of an object's `data` array, or JSON Lines as `datasets` writes `.json` files)."""
    text = _decode_or_fail(path, path.read_bytes(), 1)
    if not text.strip():
        return
    try:
        data = _parse_json(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and err.lineno > 1:  # JSON Lines in a .json file, as `datasets` writes them
            yield from _jsonl_rows(path)
            return
        raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    if isinstance(data, dict):  # the rows under `data`, else one row (a one-line JSON Lines file)
        data = data["data"] if isinstance(data.get("data"), list) else [data]
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


def _csv_rows(path: Path, delimiter: str = ",") -> Iterator[tuple[str, object]]:
    """One row per record under the header row; a record with more cells than the header has is that row's error."""
    _allow_long_csv_fields()
    reader = csv.DictReader(_csv_lines(path), delimiter=delimiter)
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


def _saved_dataset_dicts(path: Path, split: str) -> Iterator[dict]:
    """The rows of a `datasets` folder saved with `save_to_disk` (of a `DatasetDict`, its `split`)."""
    from datasets import load_from_disk

    yield from _split_of(load_from_disk(str(path)), split, str(path))


def _split_of(dataset, split: str, name: str):
    """`dataset` itself, or its `split` when it is a `DatasetDict`; a missing split names the splits there are."""
    if not hasattr(dataset, "keys"):
        return dataset
    if split not in dataset:
        raise DataError(f"{name}: the DatasetDict has no '{split}' split (splits: {list(dataset.keys())}); "
                        "choose one as dataset_split")
    return dataset[split]


def _compression_inner_suffix(path: Path) -> str | None:
    """For `rows.jsonl.gz` and the like, the suffix under the compression (`.jsonl`); None for other files."""
    suffixes = [s.lower() for s in path.suffixes]
    return suffixes[-2] if len(suffixes) >= 2 and suffixes[-1] in COMPRESSIONS else None


def _datasets_builder(path: Path) -> str | None:
    """The `datasets` packaged builder that reads the file `path` (e.g. `arrow`, `json`), None if it holds no row data."""
    return DATASETS_BUILDERS.get(_compression_inner_suffix(path) or path.suffix.lower())


def _load_dataset(failure: str, *args, **kwargs):
    """`datasets.load_dataset(*args, **kwargs)`; when it cannot load, a `DataError` starting with `failure` says why."""
    import datasets
    import pyarrow as pa
    from datasets.exceptions import DatasetsError

    try:
        return datasets.load_dataset(*args, **kwargs)
    except (OSError, ValueError, DatasetsError, pa.ArrowException) as err:
        causes = [err, *([err.__cause__] if err.__cause__ is not None else [])]  # DatasetGenerationError wraps the reason
        raise DataError(f"{failure} ({'; '.join(f'{type(e).__name__}: {e}' for e in causes)})") from None


def _dataset_label(dataset) -> str:
    """How errors name a `datasets.Dataset` given in Python: by its `info.dataset_name`, when it has one."""
    name = getattr(getattr(dataset, "info", None), "dataset_name", None)
    return f"datasets.Dataset {name!r}" if name else "the datasets.Dataset"


def _numbered(dataset) -> Iterator[tuple[str, object]]:
    """`(row N, row)` for every row of a `datasets` dataset, in order."""
    for index, row in enumerate(dataset):
        yield f"row {index}", row


@dataclass
class _Opened:
    """Rows ready to read: what errors call them (`name`), the `(location, raw_row)` pairs, and the `datasets`
    fingerprint when the rows are a loaded or given `datasets.Dataset`."""

    name: str
    rows: Iterator[tuple[str, object]]
    fingerprint: str | None = None
    empty: str = "the file is empty"


def _dataset_rows(name: str, dataset) -> _Opened:
    """`_Opened` rows of a `datasets` dataset (its fingerprint kept for the cache manifest)."""
    return _Opened(name, _numbered(dataset), getattr(dataset, "_fingerprint", None), "the dataset is empty")


def _given_dataset(dataset, split: str) -> _Opened:
    """Rows of a `datasets.Dataset` (or of a `DatasetDict`'s `split`) passed in Python instead of a path."""
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        dataset = _split_of(dataset, split, "the DatasetDict")
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise DataError(f"data must be a path, a hub dataset id or a datasets.Dataset, got {type(dataset).__name__}")
    return _dataset_rows(_dataset_label(dataset), dataset)


def _open_folder(path: Path, split: str, config: str | None) -> _Opened:
    """Rows of a folder: a `save_to_disk` dataset, else a folder of data files as `datasets.load_dataset` reads it."""
    if any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        return _Opened(str(path), _arrow_rows(path, lambda: _saved_dataset_dicts(path, split), "a dataset saved with save_to_disk"))
    if any(p.is_file() and _datasets_builder(p) for p in path.rglob("*")):
        dataset = _load_dataset(f"{path}: datasets.load_dataset cannot load this folder of data files", str(path),
                                name=config, split=split)
        return _dataset_rows(str(path), dataset)
    raise DataError(f"{path}: not a dataset saved with save_to_disk, nor a folder of data files "
                    f"({', '.join(sorted(set(DATASETS_BUILDERS)))})")


def _looks_like_hub_id(text: str) -> bool:
    """Whether `text`, naming no local file, is spelled like a hub dataset id (`name` or `owner/name`, no data-file suffix)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith((".", "~", "/")) or _datasets_builder(Path(text)) or Path(text).suffix.lower() in UNREAD_SUFFIXES:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _hub_name(dataset_id: str, split: str, config: str | None) -> str:
    """How errors name a hub dataset: its id, split and config."""
    return f"{dataset_id} (split {split}" + (f", config {config})" if config else ")")


def open_data(source, dataset_split: str = DEFAULT_SPLIT, dataset_config: str | None = None) -> _Opened:
    """The rows of a data source: a local file, a `save_to_disk` folder or a folder of data files, a hub dataset id
    (loaded with `datasets.load_dataset(id, name=dataset_config, split=dataset_split)`), or a `datasets.Dataset`.

    A path that exists is always read as local data; a missing path spelled
    like a hub id (`owner/name`) is looked up on the hub (set
    `HF_HUB_OFFLINE=1` to use only the local `datasets` cache).
    """
    if not isinstance(source, (str, PathLike)):
        return _given_dataset(source, dataset_split)
    path = Path(source).expanduser()
    if path.is_dir():
        return _open_folder(path, dataset_split, dataset_config)
    if path.exists():
        return _Opened(str(path), _rows_from_file(path))
    if not _looks_like_hub_id(str(source)):
        raise DataError(f"data file not found: {path}")
    name = _hub_name(str(source), dataset_split, dataset_config)
    dataset = _load_dataset(f"{name}: no such local file or folder, and no hub dataset that can be loaded", str(source),
                            name=dataset_config, split=dataset_split)
    return _dataset_rows(name, dataset)


def _datasets_file_rows(path: Path, builder: str) -> Iterator[tuple[str, object]]:
    """The rows of a file only `datasets` reads (`.arrow`, a compressed `.jsonl.gz` ...), through its `builder`."""
    yield from _numbered(_load_dataset(f"{path}: not a readable {builder} file", builder, data_files=str(path), split="train"))


def _rows_from_file(path: Path) -> Iterator[tuple[str, object]]:
    """Yield `(location, raw_row)` pairs of a local file, where location reads like `line 7` or `row 3`.

    JSON, JSONL, CSV, TSV and Parquet are read here (errors name the line);
    other files `datasets` reads (`.arrow`, compressed files) through it. A
    raw row may be a `DataError` (a line that is not JSON, a CSV record with
    extra cells): that row is invalid, the others are still read. Problems with
    the file as a whole raise `DataError` naming the file (and line).
    """
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": _jsonl_rows,
        ".ndjson": _jsonl_rows,
        ".json": _json_rows,
        ".csv": _csv_rows,
        ".tsv": lambda p: _csv_rows(p, delimiter="\t"),
        ".parquet": lambda p: _arrow_rows(p, lambda: _parquet_dicts(p), "a readable Parquet file"),
    }
    if suffix in readers and not _compression_inner_suffix(path):
        return readers[suffix](path)
    builder = _datasets_builder(path)
    if builder is None:
        raise DataError(f"{path}: unsupported data format {suffix!r}; use a file of rows "
                        f"({', '.join(sorted(set(DATASETS_BUILDERS)))}, optionally compressed), a save_to_disk folder "
                        "or a hub dataset id")
    return _datasets_file_rows(path, builder)


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


def _field_names(row: dict) -> str:
    """The fields of a row that hold a value, for messages: `'a', 'b'` (at most 8)."""
    names = [repr(str(key)) for key, value in row.items() if value is not None]
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "none"


def _parsed_list(value: object, field: str) -> object:
    """A field that should hold a list, with JSON text (how a CSV cell holds a list) parsed."""
    if not isinstance(value, str):
        return value
    try:
        return _parse_json(value)
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


def _slice_segments(segments: Segments, start: int, end: int) -> Segments:
    """The characters `start:end` of the joined `segments`, still cut into (piece, is_message_text) pieces."""
    kept: Segments = []
    position = 0
    for piece, is_message in segments:
        part = piece[max(start - position, 0):max(end - position, 0)]
        if part:
            kept.append((part, is_message))
        position += len(piece)
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


TRAIN_ON = ("all", "last")


def _check_train_on(train_on: str) -> None:
    """Refuse a `train_on` other than "all" (every assistant turn is a response) or "last" (only the final one)."""
    if train_on not in TRAIN_ON:
        raise InvalidSetting("train_on", f"train_on must be one of {TRAIN_ON}, got {train_on!r}")


def _turn_bounds(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], full_text: str, turns: list[int]
                 ) -> list[tuple[int, int]]:
    """For each assistant message index in `turns`, the characters of `full_text` where its answer starts and its turn ends.

    The answer starts where the template's rendering of the messages before it,
    with the generation prompt, ends; the turn ends where the rendering up to
    and including it ends. Both renderings must be prefixes of the whole one.
    """
    bounds = []
    for turn in turns:
        start = _apply_template(tokenizer, messages[:turn], add_generation_prompt=True)
        end = _apply_template(tokenizer, messages[:turn + 1], add_generation_prompt=False)
        if not (full_text.startswith(start) and full_text.startswith(end) and len(start) <= len(end)):
            raise DataError(f"the chat template renders the conversation before the assistant message messages[{turn}] "
                            "differently when more messages follow; cannot locate that response (use --train-on last)")
        bounds.append((len(start), len(end)))
    return bounds


def _piece_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], text: str, segments: Segments | None,
               start: int, end: int) -> list[int]:
    """Token ids of `text[start:end]` alone, message text read as text (see "Special-token text inside messages")."""
    if segments is None:
        return _tokens(tokenizer, text[start:end])
    return _plain_message_ids(tokenizer, messages, _slice_segments(segments, start, end))


def _ids_with_cuts(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], text: str, full_ids: list[int],
                   segments: Segments | None, cuts: list[int]) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the token index of each character cut in `cuts` (ascending).

    The whole rendering's tokenization is kept when every cut falls between
    two of its tokens (the tokenization of the text before the cut is a prefix
    of it); otherwise the text is tokenized piece by piece between the cuts, so
    no token straddles where a response starts or a turn ends.
    """
    prefixes = [_piece_ids(tokenizer, messages, text, segments, 0, cut) for cut in cuts]
    if all(full_ids[:len(prefix)] == prefix for prefix in prefixes):
        return full_ids, [len(prefix) for prefix in prefixes]
    ids: list[int] = []
    indices = []
    for begin, cut in zip([0, *cuts], [*cuts, len(text)]):
        indices.append(len(ids))
        ids += _piece_ids(tokenizer, messages, text, segments, begin, cut)
    return ids, indices[1:]


def _span_end(tokenizer: PreTrainedTokenizerBase, ids: list[int], start: int, turn_end: int, special: set[int]) -> int:
    """Where the response starting at `start` ends: after the first special token (end of turn) before `turn_end`,
    else after its last token that is not whitespace."""
    end = next((i + 1 for i in range(start, turn_end) if ids[i] in special), None)
    if end is None:
        end = turn_end
        while end > start and not tokenizer.decode(ids[end - 1:end]).strip():
            end -= 1
    return end


def _truncate(ids: list[int], spans: list[tuple[int, int]], max_length: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Cut `ids` to `max_length` from the right: the prompt before the first response stays whole, spans are clipped
    and those left empty dropped; a prompt that leaves no room for one response token is a `DataError`."""
    prompt = spans[0][0]
    if max_length - prompt < 1:
        raise DataError(f"the prompt has {prompt} tokens, leaving no room for the response within --max-length {max_length}")
    clipped = [(start, min(end, max_length)) for start, end in spans if start < max_length]
    return ids[:max_length], clipped


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, max_length: int | None = None, train_on: str = "all"
) -> EncodedExample:
    """Tokenize a conversation and locate its response spans, one per assistant turn trained on.

    `train_on="all"` (TRL's default) makes every assistant message a response,
    `"last"` only the final one (the others are context). A response is the
    assistant message up to and including the first special token the template
    adds after it (the end-of-turn token); anything the template appends after
    that (e.g. a newline) is not part of it. An earlier assistant message that
    renders to no token but special ones (an empty turn) is context, not a
    response; the final one must have text. Special-token text inside the
    messages is tokenized as ordinary text.
    """
    _check_train_on(train_on)
    messages = conversation.messages
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    turns = turns if train_on == "all" else turns[-1:]
    full_text, full_ids, segments = _render_ids(tokenizer, messages, add_generation_prompt=False)
    bounds = _turn_bounds(tokenizer, messages, full_text, turns)
    cuts = sorted({cut for bound in bounds for cut in bound})
    ids, indices = _ids_with_cuts(tokenizer, messages, full_text, full_ids, segments, cuts)
    token_at = dict(zip(cuts, indices))
    special = _special_ids(tokenizer)
    spans = []
    for turn, (start, turn_end) in zip(turns, bounds):
        begin = token_at[start]
        end = _span_end(tokenizer, ids, begin, token_at[turn_end], special)
        if all(token in special for token in ids[begin:end]):
            if turn == turns[-1]:
                raise DataError(f"the response (messages[{turn}]) renders to zero tokens")
            continue
        spans.append((begin, end))
    ids = ids[:spans[-1][1]]
    if max_length is not None:
        ids, spans = _truncate(ids, spans, max_length)
    return EncodedExample(conversation.example_id, ids, spans[0][0], spans)


def encode_conversations(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    max_length: int | None = None,
    skip_invalid: bool = False,
    source: str = "data",
    train_on: str = "all",
) -> tuple[list[EncodedExample], list[str]]:
    """Encode many conversations; errors name `source` and the row, or are collected with `skip_invalid`."""
    _check_train_on(train_on)
    encoded, errors = [], []
    for conversation in conversations:
        try:
            encoded.append(encode_conversation(tokenizer, conversation, max_length, train_on))
        except DataError as err:
            message = f"{source}, row {conversation.example_id}: {err}"
            if not skip_invalid:
                raise DataError(message) from None
            errors.append(message)
    if not encoded:
        raise DataError(f"{source}: no row could be encoded ({errors[0] if errors else 'no rows'})")
    return encoded, errors


def load_examples(
    source,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
    train_on: str = "all",
    *,
    data_format: str | None = None,
    dataset_split: str = DEFAULT_SPLIT,
    dataset_config: str | None = None,
) -> tuple[list[EncodedExample], LoadReport]:
    """Read, validate and tokenize data in one call (the usual entry point): `source` and the data settings as in
    `load_conversations`, `train_on` as in `encode_conversation`."""
    _check_train_on(train_on)
    conversations, report = load_conversations(source, skip_invalid=skip_invalid, limit=limit, data_format=data_format,
                                               dataset_split=dataset_split, dataset_config=dataset_config)
    encoded, errors = encode_conversations(tokenizer, conversations, max_length, skip_invalid, report.path, train_on)
    report.errors.extend(errors)
    return encoded, LoadReport(report.path, len(encoded), report.skipped + len(errors), report.errors, report.fingerprint)


# --- Prompt-only rows (evaluation) ---------------------------------------------------------------


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
