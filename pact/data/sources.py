"""Where rows come from: a local file (JSON, JSONL, CSV, TSV, Parquet, or anything else `datasets` reads: `.arrow`,
compressed files), a `save_to_disk` folder, a folder of data files, a hub dataset (`owner/name`, or any id as
`hub:ID`), or a `datasets.Dataset` (`open_data`), and the project's bundled demo sets. Text files must be UTF-8 (a
leading byte-order mark, as Excel writes, is ignored); a bad file is a `DataError` naming the file and line, a bad row
becomes that row's error.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from importlib import resources
from os import PathLike
from glob import escape as glob_escape
from pathlib import Path
from typing import Callable, Iterator

from pact.errors import PactError

DEMO_BENIGN = "benign"
DEMO_REFUSALS = "refusals"
DEFAULT_SPLIT = "train"
HUB_PREFIX = "hub:"  # `hub:ID` names the hub dataset ID explicitly
# file suffixes and the `datasets` packaged builder reading them; compressed files keep the inner suffix
DATASETS_BUILDERS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
                     ".parquet": "parquet", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
UNREAD_SUFFIXES = (".txt", ".md", ".py", ".gguf", ".safetensors", ".bin", ".pt")  # files `datasets` reads but not as rows
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")


class DataError(PactError):
    """A data file or one of its rows is unusable; the message names the file and row."""


def demo_data_path(name: str) -> Path:
    """Path of the project's bundled demo data (`benign` or `refusals`)."""
    if name not in (DEMO_BENIGN, DEMO_REFUSALS):
        raise DataError(f"unknown demo data set {name!r}; choose {DEMO_BENIGN!r} or {DEMO_REFUSALS!r}")
    return Path(str(resources.files("pact.data") / "demo_data" / f"demo_{name}.jsonl"))


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


def parse_json(text: str) -> object:
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
                    yield location, parse_json(line)
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
        data = parse_json(text)
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
    """One row per record under the header row; a record with more cells than the header has is that row's error, a
    header naming a column twice the file's."""
    _allow_long_csv_fields()
    reader = csv.DictReader(_csv_lines(path), delimiter=delimiter)
    repeated = sorted({name for name in reader.fieldnames or () if reader.fieldnames.count(name) > 1})
    if repeated:
        raise DataError(f"{path}, line 1: the header names column(s) {', '.join(map(repr, repeated))} more than once, and a "
                        "row would keep only the last such cell; give each column its own name")
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
    """Rows of a folder: a `save_to_disk` dataset, else a folder of data files (of one format) as `datasets.load_dataset`
    reads it."""
    if any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        return _Opened(str(path), _arrow_rows(path, lambda: _saved_dataset_dicts(path, split), "a dataset saved with save_to_disk"))
    builders = sorted({_datasets_builder(p) for p in path.rglob("*") if p.is_file() and _datasets_builder(p)})
    if len(builders) > 1:
        raise DataError(f"{path}: a folder of data files of several formats ({', '.join(builders)}); datasets.load_dataset "
                        "reads one format of a folder and would leave the other files out; give one file, or a folder of "
                        "files of one format")
    if builders:
        dataset = _load_dataset(f"{path}: datasets.load_dataset cannot load this folder of data files", str(path),
                                name=config, split=split)
        return _dataset_rows(str(path), dataset)
    raise DataError(f"{path}: not a dataset saved with save_to_disk, nor a folder of data files "
                    f"({', '.join(sorted(set(DATASETS_BUILDERS)))})")


def _looks_like_hub_id(text: str) -> bool:
    """Whether `text`, naming no local path, is spelled like a hub dataset id with its owner (`owner/name`, no data-file
    suffix): a bare `name` is far more often a local file given without its suffix than a hub dataset."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.count("/") != 1 or text.startswith((".", "~", "/")) or _datasets_builder(Path(text)) \
            or Path(text).suffix.lower() in UNREAD_SUFFIXES:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def hub_dataset_id(source) -> str | None:
    """The hub dataset id the data source `source` names, or None when it names local data (or is a `datasets.Dataset`).

    `hub:ID` always names the hub dataset ID (`hub:name` or `hub:owner/name`);
    a path that exists is local; a missing path spelled `owner/name` is a hub
    id. `open_data` refuses every other missing path.
    """
    if not isinstance(source, (str, PathLike)):
        return None
    text = str(source)
    if text.startswith(HUB_PREFIX):
        return text[len(HUB_PREFIX):]
    return text if not Path(text).expanduser().exists() and _looks_like_hub_id(text) else None


def source_kind(source) -> str:
    """What kind of data source `source` is, as the cache manifest records it: `local file`, `local folder`, `hub dataset`
    or `datasets.Dataset`."""
    if not isinstance(source, (str, PathLike)):
        return "datasets.Dataset"
    if hub_dataset_id(source) is not None:
        return "hub dataset"
    return "local folder" if Path(source).expanduser().is_dir() else "local file"


def _similar_files(path: Path) -> list[str]:
    """The paths beside `path` named like it plus a suffix (`mydata.jsonl` for `mydata`): what a missing path most likely
    meant (at most 3)."""
    if not path.parent.is_dir():
        return []
    return sorted(str(p) for p in path.parent.glob(f"{glob_escape(path.name)}.*"))[:3]


def _missing(path: Path, similar: list[str]) -> DataError:
    """The error for a data path that names nothing local and is not taken as a hub id; names a similar local file."""
    hint = f"; did you mean {' or '.join(similar)}?" if similar else ""
    return DataError(f"data file not found: {path}{hint} (a hub dataset is named owner/name, or {HUB_PREFIX}NAME to load it "
                     "from the hub explicitly)")


def _hub_name(dataset_id: str, split: str, config: str | None) -> str:
    """How errors name a hub dataset: its id, split and config."""
    return f"{dataset_id} (split {split}" + (f", config {config})" if config else ")")


def _open_hub_dataset(source: str, dataset_id: str, split: str, config: str | None) -> _Opened:
    """Rows of the hub dataset `dataset_id` (`source` as the user wrote it), from the hub or the local `datasets` cache."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(dataset_id)
    except HFValidationError as err:
        raise DataError(f"{source}: not a hub dataset id ({err})") from None
    name = _hub_name(dataset_id, split, config)
    failure = f"{name}: no hub dataset that can be loaded" if str(source).startswith(HUB_PREFIX) else \
        f"{name}: no such local file or folder, and no hub dataset that can be loaded"
    return _dataset_rows(name, _load_dataset(failure, dataset_id, name=config, split=split))


def open_data(source, dataset_split: str = DEFAULT_SPLIT, dataset_config: str | None = None) -> _Opened:
    """The rows of a data source: a local file, a `save_to_disk` folder or a folder of data files, a hub dataset id
    (loaded with `datasets.load_dataset(id, name=dataset_config, split=dataset_split)`), or a `datasets.Dataset`.

    A path that exists is always read as local data. A hub dataset is
    `hub:ID`, or a missing path spelled `owner/name` (set `HF_HUB_OFFLINE=1`
    to use only the local `datasets` cache). Any other missing path is refused,
    and so is `owner/name` when a local file is named like it
    (`owner/name.jsonl`): which one was meant is the user's to say.
    """
    if not isinstance(source, (str, PathLike)):
        return _given_dataset(source, dataset_split)
    path = Path(source).expanduser()
    dataset_id = hub_dataset_id(source)
    if dataset_id is None and path.is_dir():
        return _open_folder(path, dataset_split, dataset_config)
    if dataset_id is None and path.exists():
        return _Opened(str(path), _rows_from_file(path))
    if dataset_id is None:
        raise _missing(path, _similar_files(path))
    similar = [] if str(source).startswith(HUB_PREFIX) else _similar_files(path)
    if similar:
        raise DataError(f"{source}: no such local file or folder, but {' and '.join(similar)} is; give that path to read it, "
                        f"or {HUB_PREFIX}{source} to load the hub dataset {source}")
    return _open_hub_dataset(str(source), dataset_id, dataset_split, dataset_config)


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
