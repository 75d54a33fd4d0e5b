"""The cache manifest (`manifest.json`): what was built, from what, and how
to check it.

It records every build parameter, the safety tokens, the fingerprints of the
model, tokenizer and data, which part of the data it holds (`part`: index and
count for `--num-shards` builds, else null), and per shard its file, rows,
response tokens, bytes and sha256. A build rewrites it (atomically) after
every shard with `complete: false`, and a last time with `complete: true`; a
multi-process build keeps one such progress manifest per rank
(`manifest.rank-*.json`) and rank 0 writes `manifest.json` at the end.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pact.cache_tools.errors import CacheError
from pact.cache_tools.layout import Layout
from pact.cache_tools.schema import FORMAT_VERSION
from pact.cache_tools.writer import MANIFEST_NAME, atomic_write
from pact.data import EncodedExample

FORMAT_NAME = "pact-cache"

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
    ("gate", ("gate",)),
    ("objective temperature", ("objective_temperature",)),
    ("data fingerprint (file contents + preprocessing)", ("fingerprints", "data")),
    ("examples fingerprint", ("fingerprints", "examples")),
    ("rows per shard", ("params", "rows_per_shard")),
    ("zstd level", ("params", "zstd_level")),
    ("part of the data", ("part",)),
)
PART = "part of the data"
DATA_DEPENDENT = {PART, "data fingerprint (file contents + preprocessing)", "examples fingerprint", "rows per shard", "zstd level"}


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


def describe_data(path: str | Path, chat_template: str | None, max_length: int | None, skip_invalid: bool, limit: int | None) -> dict:
    """The manifest's `data` entry: source, content hash and preprocessing parameters, plus their joint fingerprint.

    The fingerprint changes when the file contents, `max_length`,
    `skip_invalid`, `limit` or the chat template change, i.e. whenever the
    tokenized examples could.
    """
    path = Path(path).expanduser()
    description = {
        "path": str(path),
        "sha256": _hash_path(path),
        "max_length": max_length,
        "skip_invalid": skip_invalid,
        "limit": limit,
        "chat_template_sha256": hashlib.sha256((chat_template or "").encode()).hexdigest(),
    }
    description["fingerprint"] = "sha256:" + hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return description


def examples_fingerprint(examples: list[EncodedExample]) -> str:
    """Identify the exact tokenized examples (ids, tokens, response starts, order)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(np.array([ex.example_id, ex.response_start, len(ex.input_ids)], dtype=np.int64).tobytes())
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
) -> dict:
    """An empty (`complete: false`, no shards) manifest for a build (of `part` = {index, count} of the data, or all of it)."""
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
        "shards": [],
    }
    return set_totals(manifest)


def save_manifest(directory: Path, manifest: dict, name: str = MANIFEST_NAME) -> None:
    """Write `manifest.json` (or the manifest file `name`) atomically."""
    atomic_write(Path(directory) / name, (json.dumps(manifest, indent=1) + "\n").encode())


def load_manifest(directory: str | Path, allow_incomplete: bool = False, name: str = MANIFEST_NAME) -> dict:
    """Read and sanity-check `DIR/manifest.json` (or the manifest file `name`); raises `CacheError` when missing,
    unreadable, of another format or incomplete."""
    directory = Path(directory).expanduser()
    path = directory / name
    if not path.is_file():
        hint = "" if directory.is_dir() else " (no such directory)"
        raise CacheError(f"{directory} is not a pact cache: {name} not found{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{path}: not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path}: format version {manifest.get('format_version')!r}, this pact reads version {FORMAT_VERSION}")
    missing = [key for key in ("dtype", "top_k", "stored_ids", "vocab_size", "safety_tokens", "shards", "gate") if key not in manifest]
    if missing:
        raise CacheError(f"{path}: missing field(s) {', '.join(missing)}")
    if not manifest.get("complete") and not allow_incomplete:
        raise CacheError(f"{directory}: the build is incomplete ({len(manifest['shards'])} shard(s) done); "
                         "finish it with `pact-cache build ... --resume`")
    return manifest
