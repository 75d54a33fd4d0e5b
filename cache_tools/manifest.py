"""The cache manifest (`manifest.json`): what was built, from what, and how
to check it.

It records every build parameter, the safety tokens, the fingerprints of the
model, tokenizer and data, which part of the data it holds (`part`: index and
count for `--num-shards` builds, else null), and per shard its file, rows,
response tokens, bytes and sha256. A build writes it (atomically) before its
first shard and after every shard with `complete: false`, and a last time with
`complete: true`; a multi-process build keeps one such progress manifest per
rank (`manifest.rank-*.json`) and rank 0 writes `manifest.json` at the end.

Every field is covered by `checksums` (a sha256 per field, written by
`save_manifest`), so `load_manifest` refuses a manifest edited by hand, naming
the field. This module also decides which files of a directory are provably
a cache's own (`cache_files`): the only ones `--overwrite` and `--resume`
ever delete.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pact.cache_tools.codec import DTYPES
from pact.cache_tools.errors import CacheError, CacheWriteError
from pact.cache_tools.layout import FORMAT_VERSION, READABLE_VERSIONS, Layout
from pact.cache_tools.writer import (
    LOCK_NAME, MANIFEST_NAME, RANK_MANIFEST_PATTERN, SAFETY_TOKENS_NAME, TEMP_PATTERN, is_pact_shard_file, is_shard_name,
)
from pact.data.chat import EncodedExample
from pact.data.sources import DEFAULT_SPLIT, hub_dataset_id, source_kind
from pact.files import CHECKSUMS, atomic_write, edited_fields, field_checksums

FORMAT_NAME = "pact-cache"
REQUIRED = ("complete", "dtype", "top_k", "stored_ids", "vocab_size", "safety_tokens", "shards", "gate", "header_ids")
SHA256_HEX = re.compile("[0-9a-f]{64}")
SHOWN = 5  # file names or fields listed in one message

# What must agree for two builds to produce the same shards (resume), as
# (label, path in the manifest). `merge` drops the data-dependent ones.
IDENTITY = (
    ("format version", ("format_version",)),
    ("model fingerprint", ("fingerprints", "model")),
    ("tokenizer fingerprint (chat template included)", ("fingerprints", "tokenizer")),
    ("model dtype", ("params", "model_dtype")),
    ("vocabulary size", ("vocab_size",)),
    ("assistant header ids", ("header_ids",)),
    ("safety-token ids", ("safety_tokens", "ids")),
    ("safety-token weights", ("safety_tokens", "weights")),
    ("dtype", ("dtype",)),
    ("top_k", ("top_k",)),
    ("kd_top_k", ("kd_top_k",)),
    ("distillation teacher fingerprint", ("kd_teacher", "fingerprint")),
    ("gate", ("gate",)),
    ("objective temperature", ("objective_temperature",)),
    ("train_on (which assistant turns are responses)", ("data", "train_on")),
    ("max_length", ("data", "max_length")),
    ("limit", ("data", "limit")),
    ("skip_invalid", ("data", "skip_invalid")),
    ("row format", ("data", "format")),
    ("data fingerprint (file contents + preprocessing)", ("fingerprints", "data")),
    ("examples fingerprint", ("fingerprints", "examples")),
    ("rows per shard", ("params", "rows_per_shard")),
    ("zstd level", ("params", "zstd_level")),
    ("part of the data", ("part",)),
)
PART = "part of the data"
DATA_DEPENDENT = {PART, "train_on (which assistant turns are responses)", "max_length", "limit", "skip_invalid", "row format",
                  "data fingerprint (file contents + preprocessing)", "examples fingerprint", "rows per shard", "zstd level"}


def _hash_path(path: Path) -> str:
    """sha256 of a file's bytes, or of a directory's files (relative names and bytes, sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _data_source(data, dataset_split: str, dataset_config: str | None, dataset_fingerprint: str | None) -> dict:
    """What identifies the rows: the kind of source (`source_kind`: local file, local folder, hub dataset,
    datasets.Dataset); for local data its path and the sha256 of its bytes, else the dataset's name, config, split and
    `datasets` fingerprint (`LoadReport.fingerprint`)."""
    kind = source_kind(data)
    if kind in ("local file", "local folder"):
        path = Path(data).expanduser()
        split = {"dataset_split": dataset_split} if path.is_dir() and dataset_split != DEFAULT_SPLIT else {}
        return {"source": kind, "path": str(path), "sha256": _hash_path(path), **split}
    fingerprint = dataset_fingerprint or getattr(data, "_fingerprint", None)
    if fingerprint is None:
        raise ValueError(f"data {data!r} is not a local path: pass dataset_fingerprint (the LoadReport's fingerprint)")
    name = hub_dataset_id(data) if kind == "hub dataset" else getattr(getattr(data, "info", None), "dataset_name", None)
    return {"source": kind, "dataset": name, "dataset_config": dataset_config, "dataset_split": dataset_split,
            "dataset_fingerprint": fingerprint}


def describe_data(data, chat_template: str | None, max_length: int | None, skip_invalid: bool, limit: int | None, *,
                  data_format: str | None = None, dataset_split: str = DEFAULT_SPLIT, dataset_config: str | None = None,
                  dataset_fingerprint: str | None = None, train_on: str = "all") -> dict:
    """The manifest's `data` entry: source, content hash and preprocessing parameters, plus their joint fingerprint.

    `data` is what the rows were read from (see `pact.data.sources.open_data`),
    its kind recorded as `source`: a local file or folder is hashed; a hub
    dataset or a `datasets.Dataset` is identified by its name, config, split
    and `datasets` fingerprint. The
    fingerprint changes when the data, `max_length`, `train_on` (which
    assistant turns are responses), `skip_invalid`, `limit`, a given
    `data_format` or the chat template change, i.e. whenever the tokenized
    examples could; each of these settings is also compared by name on resume
    (`IDENTITY`).
    """
    description = {
        **_data_source(data, dataset_split, dataset_config, dataset_fingerprint),
        **({"format": data_format} if data_format else {}),
        "max_length": max_length,
        "train_on": train_on,
        "skip_invalid": skip_invalid,
        "limit": limit,
        "chat_template_sha256": hashlib.sha256((chat_template or "").encode()).hexdigest(),
    }
    description["fingerprint"] = "sha256:" + hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return description


def examples_fingerprint(examples: list[EncodedExample]) -> str:
    """Identify the exact tokenized examples (ids, tokens, response spans, order)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(np.array([ex.example_id, ex.response_start, len(ex.input_ids)], dtype=np.int64).tobytes())
        digest.update(np.asarray(ex.spans, dtype=np.int64).tobytes())
        digest.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
    return "sha256:" + digest.hexdigest()


def _lookup(manifest: dict, keys: tuple[str, ...]):
    value = manifest
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def differences(old: dict, new: dict, skip: set[str] = frozenset()) -> list[str]:
    """Human-readable list of the identity fields (see `IDENTITY`) on which two manifests disagree."""
    found = []
    for label, keys in IDENTITY:
        if label in skip:
            continue
        a, b = _lookup(old, keys), _lookup(new, keys)
        if a != b:
            show = lambda v: repr(v) if len(repr(v)) <= 80 else repr(v)[:77] + "..."  # noqa: E731
            found.append(f"{label}: {show(a)} vs {show(b)}")
    return found


def set_totals(manifest: dict) -> dict:
    """Recompute `manifest["totals"]` from its shards (sizes per response token and the ratio to raw float32)."""
    shards = manifest["shards"]
    tokens = sum(s["response_tokens"] for s in shards)
    size = sum(s["bytes"] for s in shards)
    raw = tokens * Layout.from_manifest(manifest).raw_float32_bytes_per_token
    manifest["totals"] = {
        "shards": len(shards),
        "rows": sum(s["rows"] for s in shards),
        "response_tokens": tokens,
        "bytes": size,
        "bytes_per_response_token": size / tokens if tokens else None,
        "raw_float32_bytes": raw,
        "compression_ratio": raw / size if size else None,
    }
    return manifest


def new_manifest(
    *,
    layout: Layout,
    safety_tokens: dict,
    model_source: str,
    fingerprints: dict,
    header_ids: list[int],
    gate: dict,
    objective_temperature: float,
    params: dict,
    data: dict | None,
    software: dict,
    part: dict | None = None,
    kd_teacher: dict | None = None,
) -> dict:
    """An empty (`complete: false`, no shards) manifest for a build (of `part` = {index, count} of the data, or all of it;
    with a distillation layout, `kd_teacher` {source, fingerprint} names the teacher)."""
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": software,
        "model_source": model_source,
        "vocab_size": layout.vocab_size,
        "dtype": layout.dtype,
        "top_k": layout.top_k,
        "stored_ids": list(layout.stored_ids),
        "gate": gate,
        "objective_temperature": objective_temperature,
        "header_ids": list(header_ids),
        "params": params,
        "safety_tokens": safety_tokens,
        "fingerprints": fingerprints,
        "data": data,
        "part": part,
        "kd_top_k": layout.kd_top_k,
        "kd_teacher": kd_teacher,
        "shards": [],
    }
    return set_totals(manifest)


def save_manifest(directory: Path, manifest: dict, name: str = MANIFEST_NAME) -> None:
    """Record `manifest`'s checksums in it and write it as `manifest.json` (or the manifest file `name`) atomically."""
    manifest[CHECKSUMS] = field_checksums(manifest)
    atomic_write(Path(directory) / name, (json.dumps(manifest, indent=1) + "\n").encode(), CacheWriteError)


def is_integer(value, low: int) -> bool:
    """An integer (not a bool) >= `low`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_positive(value) -> bool:
    """A finite number > 0 (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _int_list(value, low: int = 0, high: float = math.inf) -> bool:
    """A list of integers in low..high-1."""
    return isinstance(value, list) and all(is_integer(v, low) and v < high for v in value)


def _shard_entry_problems(index: int, entry) -> list[str]:
    """What is wrong with `shards[index]` of a manifest (file name, counts, sha256)."""
    where = f"shards[{index}]"
    if not isinstance(entry, dict):
        return [f"{where} is not an object"]
    problems = []
    if not is_shard_name(entry.get("file")):
        problems.append(f"{where}.file {entry.get('file')!r} is not a shard file name of the cache directory (shard-NNNNN.arrow)")
    problems += [f"{where}.{key} {entry.get(key)!r} is not a count (an integer >= 0)"
                 for key in ("rows", "response_tokens", "bytes") if not is_integer(entry.get(key), 0)]
    if not (isinstance(entry.get("sha256"), str) and SHA256_HEX.fullmatch(entry["sha256"])):
        problems.append(f"{where}.sha256 {entry.get('sha256')!r} is not a sha256 (64 lowercase hex digits)")
    return problems


def _safety_token_problems(tokens) -> list[str]:
    """What is wrong with a manifest's `safety_tokens` (ids and weights)."""
    if not isinstance(tokens, dict):
        return ["safety_tokens is not an object"]
    ids, weights = tokens.get("ids"), tokens.get("weights")
    if not (_int_list(ids) and ids):
        return ["safety_tokens.ids is not a non-empty list of token ids"]
    if not (isinstance(weights, list) and len(weights) == len(ids)
            and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)):
        return [f"safety_tokens.weights is not a list of {len(ids)} finite numbers (one per id)"]
    return []


def _value_problems(m: dict) -> list[str]:
    """The fields of a manifest (all REQUIRED present) whose values no pact-cache build writes."""
    vocab = m["vocab_size"] if is_integer(m["vocab_size"], 1) else math.inf
    checks = [
        (isinstance(m["complete"], bool), "complete", "is not true or false"),
        (m["dtype"] in DTYPES, "dtype", f"is not one of {', '.join(DTYPES)}"),
        (vocab != math.inf, "vocab_size", "is not an integer >= 1"),
        (_int_list(m["header_ids"], 0, vocab), "header_ids", "is not a list of token ids"),
        (isinstance(m["shards"], list), "shards", "is not a list"),
    ]
    if m["safety_tokens"] is None:
        return _failed(m, checks + _distillation_only_checks(m, vocab)) + _shard_problems(m)
    return _failed(m, checks + _safety_checks(m, vocab)) + _safety_token_problems(m["safety_tokens"]) + _shard_problems(m)


def _safety_checks(m: dict, vocab: float) -> list[tuple[bool, str, str]]:
    """The (ok, field, what) checks of the fields of a manifest with safety tokens: its layout and the gate it bakes in."""
    gate = m["gate"] if isinstance(m["gate"], dict) else {}
    p0 = gate.get("p0")
    return [
        (m["top_k"] is None or is_integer(m["top_k"], 1), "top_k", "is neither null nor an integer >= 1"),
        (m.get("kd_top_k") is None or (is_integer(m["kd_top_k"], 1) and m["kd_top_k"] < vocab), "kd_top_k",
         "is neither null nor an integer in 1..vocab_size - 1"),
        (_int_list(m["stored_ids"], 0, vocab), "stored_ids", f"is not a list of token ids below vocab_size {m['vocab_size']}"),
        (_is_positive(p0) and p0 <= 1, "gate.p0", "is not in (0, 1]"),
        (_is_positive(gate.get("gate_temperature")), "gate.gate_temperature", "is not a finite number > 0"),
        ("objective_temperature" not in m or _is_positive(m["objective_temperature"]), "objective_temperature", "is not a finite number > 0"),
    ]


def _distillation_only_checks(m: dict, vocab: float) -> list[tuple[bool, str, str]]:
    """The (ok, field, what) checks of a distillation-only manifest (`safety_tokens` null): it stores a teacher's top-K
    and nothing of safety tokens or a gate."""
    return [
        (is_integer(m.get("kd_top_k"), 1) and m["kd_top_k"] < vocab, "kd_top_k",
         "is not an integer in 1..vocab_size - 1, which a cache without safety tokens needs"),
        (m["top_k"] is None, "top_k", "is not null in a cache without safety tokens"),
        (m["stored_ids"] == [], "stored_ids", "is not empty in a cache without safety tokens"),
        (m["gate"] is None, "gate", "is not null in a cache without safety tokens"),
        (m.get("objective_temperature") is None, "objective_temperature", "is not null in a cache without safety tokens"),
    ]


def _failed(m: dict, checks: list[tuple[bool, str, str]]) -> list[str]:
    """The messages of the failed (ok, field, what) checks of manifest `m`, each naming the field and its value."""
    return [f"{field} {_lookup(m, tuple(field.split('.')))!r} {what}" for ok, field, what in checks if not ok]


def _shard_problems(m: dict) -> list[str]:
    """What is wrong with a manifest's shard entries: each entry's fields, and files listed twice."""
    problems = []
    entries = m["shards"] if isinstance(m["shards"], list) else []
    for index, entry in enumerate(entries):
        problems += _shard_entry_problems(index, entry)
    files = [e.get("file") for e in entries if isinstance(e, dict)]
    problems += [f"shard file {name} is listed twice" for name in sorted({f for f in files if files.count(f) > 1}, key=str)]
    return problems


def manifest_problems(manifest: dict) -> list[str]:
    """Everything wrong with a pact-cache manifest read by `read_manifest`: hand edits (checksums), missing fields, values.

    An edit is reported alone: the other fields of an edited manifest prove nothing.
    """
    edited = edited_fields(manifest)
    if edited:
        shown = ", ".join(edited[:SHOWN]) + (f" and {len(edited) - SHOWN} more" if len(edited) > SHOWN else "")
        return [f"the manifest was edited after pact-cache wrote it: field(s) {shown} do not match its checksums; "
                "restore the original manifest or rebuild the cache"]
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        return [f"missing field(s) {', '.join(missing)}"]
    return _value_problems(manifest)


def _describe_missing(directory: Path, name: str) -> str:
    """Why `directory` has no manifest `name`, as the end of a 'not a pact cache' message."""
    if not directory.exists():
        return "no such directory"
    if not directory.is_dir():
        return "it is a file, not a cache directory"
    if name == MANIFEST_NAME and any(is_shard_name(p.name) for p in directory.iterdir()):
        return (f"it holds shard files but no {name} (a build interrupted before its first manifest): build it again "
                "with `pact-cache build ... --resume` or --overwrite")
    return f"{name} not found"


def read_manifest(directory: str | Path, name: str = MANIFEST_NAME) -> tuple[Path, dict]:
    """(path, content) of `DIR/manifest.json` (or the manifest file `name`), unchecked beyond being a pact-cache manifest
    of a format version this pact reads (`READABLE_VERSIONS`); raises `CacheError` naming the directory or file when it is not one."""
    directory = Path(directory).expanduser()
    path = directory / name
    if not path.is_file():
        raise CacheError(f"{directory} is not a pact cache: {_describe_missing(directory, name)}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path}: not valid JSON ({err}); this is not a pact cache, or its manifest was damaged") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{path}: not a {FORMAT_NAME} manifest (no \"format\": \"{FORMAT_NAME}\")")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS and "format_version" not in (edited_fields(manifest) or []):
        raise CacheError(f"{path}: format version {version!r}, this pact reads versions {', '.join(map(str, READABLE_VERSIONS))}; "
                         "use the pact that wrote the cache, or rebuild it")
    return path, manifest


def load_manifest(directory: str | Path, allow_incomplete: bool = False, name: str = MANIFEST_NAME) -> dict:
    """Read and check `DIR/manifest.json` (or the manifest file `name`); raises `CacheError` naming the file when it is
    missing, unreadable, of another format or version, edited by hand (checksums), malformed (a field, a shard entry,
    e.g. a shard file outside the directory) or incomplete."""
    path, manifest = read_manifest(directory, name)
    problems = manifest_problems(manifest)
    if problems:
        raise CacheError(f"{path}: {'; '.join(problems[:SHOWN])}" + (f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""))
    if not manifest["complete"] and not allow_incomplete:
        raise CacheError(f"{path.parent}: the build is incomplete ({len(manifest['shards'])} shard(s) done); "
                         "finish it with `pact-cache build ... --resume`")
    return manifest


def _read_json(path: Path):
    """The JSON content of `path`, or None when it is unreadable or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_lock_file(path: Path) -> bool:
    """Whether `path` is a lock file as `DirectoryLock` leaves it (empty or a pid)."""
    try:
        return path.stat().st_size <= 32 and re.fullmatch(rb"(\d+\n)?", path.read_bytes()) is not None
    except OSError:
        return False


def _pact_manifests(directory: Path, names: list[str]) -> dict[str, dict]:
    """The files among `names` that are named like a manifest and parse as a pact-cache manifest, by name."""
    found = {}
    for name in names:
        if name == MANIFEST_NAME or RANK_MANIFEST_PATTERN.fullmatch(name):
            content = _read_json(directory / name)
            if isinstance(content, dict) and content.get("format") == FORMAT_NAME:
                found[name] = content
    return found


def cache_files(directory: Path) -> tuple[list[str], list[str]]:
    """(ours, foreign): the entries of `directory` pact-cache provably wrote, and every other one.

    Ours: `manifest.json` and rank manifests that parse as pact-cache
    manifests; the shards they list, and shard files whose Arrow schema
    carries the pact-cache key (written before a manifest listed them);
    `safety_tokens.json` when equal to a manifest's `safety_tokens`; the
    writer's temporary files (`.tmp-<our name>.<pid>`); the lock file.
    """
    directory = Path(directory)
    names = sorted(p.name for p in directory.iterdir())
    manifests = _pact_manifests(directory, names)
    listed = {e.get("file") for m in manifests.values() if isinstance(m.get("shards"), list) for e in m["shards"] if isinstance(e, dict)}
    safety = [m["safety_tokens"] for m in manifests.values() if m.get("safety_tokens") is not None]

    def ours(name: str) -> bool:
        path = directory / name
        if not path.is_file():
            return False
        if name in manifests or TEMP_PATTERN.fullmatch(name):
            return True
        if name == LOCK_NAME:
            return _is_lock_file(path)
        if name == SAFETY_TOKENS_NAME:
            return _read_json(path) in safety
        return is_shard_name(name) and (name in listed or is_pact_shard_file(path))

    mine = [name for name in names if ours(name)]
    return mine, [name for name in names if name not in mine]


def directory_entries(directory: Path) -> list[str]:
    """The names in `directory` other than the lock file (what makes it non-empty for a build or merge)."""
    return sorted(p.name for p in Path(directory).iterdir() if p.name != LOCK_NAME)


def own_files(directory: Path, flag: str) -> list[str]:
    """pact-cache's own files in `directory` (the lock file excepted); refuses, naming the others, when there are any.

    `flag` (`--overwrite`, `--resume`) is what the user asked for, named in
    the message. Nothing is deleted here.
    """
    ours, foreign = cache_files(directory)
    if foreign:
        shown = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else "")
        raise CacheError(f"{flag} touches only pact-cache's own files, but {directory} also holds {shown}, which pact-cache "
                         "did not write (or no manifest there lists); move them away or choose another directory. "
                         "Nothing was deleted")
    return [name for name in ours if name != LOCK_NAME]


def delete_files(directory: Path, names: list[str]) -> None:
    """Delete the files `names` of `directory` (found by `own_files`)."""
    for name in names:
        (Path(directory) / name).unlink(missing_ok=True)
