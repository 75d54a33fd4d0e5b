"""Crash-safe file writing for caches: every file (shard, manifest, safety
tokens) is written under a temporary name in the cache directory, flushed,
fsynced and renamed into place, then the directory is fsynced. A crash, even
`kill -9`, leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from pact.cache_tools.errors import CacheError, CacheWriteError

TEMP_PREFIX = ".tmp-"
MANIFEST_NAME = "manifest.json"
RANK_MANIFEST_PREFIX = "manifest.rank-"
SAFETY_TOKENS_NAME = "safety_tokens.json"
CACHE_FILES = (MANIFEST_NAME, SAFETY_TOKENS_NAME)
SHARD_SUFFIX = ".arrow"
DEFAULT_ZSTD_LEVEL = 3


def shard_name(index: int) -> str:
    """File name of shard `index` (`shard-00000.arrow`, ...)."""
    return f"shard-{index:05d}{SHARD_SUFFIX}"


def shard_index(name: str) -> int:
    """The index in a shard's file name (inverse of `shard_name`)."""
    return int(name.removeprefix("shard-").removesuffix(SHARD_SUFFIX))


def rank_manifest_name(rank: int, world_size: int) -> str:
    """File name of the progress manifest rank `rank` of a `world_size`-process build keeps while it runs."""
    return f"{RANK_MANIFEST_PREFIX}{rank:05d}-of-{world_size:05d}.json"


def _fsync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably (temp file, fsync, rename, fsync directory).

    An `OSError` (disk full, permission denied, ...) removes the temporary
    file, leaves any previous `path` untouched and raises `CacheWriteError`.
    """
    path = Path(path)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
        _fsync_directory(path.parent)
    except OSError as err:
        temp.unlink(missing_ok=True)
        reason = err.strerror or str(err)
        name = errno.errorcode.get(err.errno, "") if err.errno else ""
        raise CacheWriteError(f"cannot write {path}: {reason}{f' ({name})' if name else ''}; nothing was replaced") from err
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def serialize_table(table: pa.Table, zstd_level: int | None = DEFAULT_ZSTD_LEVEL) -> bytes:
    """An Arrow IPC file (one record batch) with every buffer zstd-compressed at `zstd_level` (None: uncompressed)."""
    codec = pa.Codec("zstd", compression_level=zstd_level) if zstd_level is not None else None
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema, options=ipc.IpcWriteOptions(compression=codec)) as writer:
        writer.write_table(table, max_chunksize=max(table.num_rows, 1))
    return sink.getvalue().to_pybytes()


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of `data`, as recorded per shard in the manifest."""
    return hashlib.sha256(data).hexdigest()


def write_shard(directory: Path, index: int, table: pa.Table, response_tokens: int, zstd_level: int | None) -> dict:
    """Write `table` as shard `index` of `directory`; returns its manifest entry (file, rows, response_tokens, bytes, sha256)."""
    data = serialize_table(table, zstd_level)
    name = shard_name(index)
    atomic_write(Path(directory) / name, data)
    return {"file": name, "rows": table.num_rows, "response_tokens": int(response_tokens), "bytes": len(data), "sha256": sha256_hex(data)}


def is_cache_file(name: str) -> bool:
    """Whether a file name is one a cache directory holds (manifests, safety tokens, shards, unfinished writes)."""
    return (name in CACHE_FILES or name.startswith(TEMP_PREFIX) or (name.startswith("shard-") and name.endswith(SHARD_SUFFIX))
            or (name.startswith(RANK_MANIFEST_PREFIX) and name.endswith(".json")))


def prepare_output_directory(directory: Path, overwrite: bool) -> bool:
    """Create `directory`; returns True when it was already non-empty (then refused unless `overwrite`).

    With `overwrite` an existing cache's files are deleted; a directory holding
    anything else is refused, so a mistyped path never loses unrelated files.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in directory.iterdir())
    except OSError as err:
        raise CacheWriteError(f"cannot create the cache directory {directory}: {err.strerror or err}") from err
    if not names or not overwrite:
        return bool(names)
    foreign = [name for name in names if not is_cache_file(name)]
    if foreign:
        raise CacheError(f"--overwrite only replaces a pact cache, but {directory} also holds {', '.join(foreign[:5])}; choose another directory")
    for name in names:
        (directory / name).unlink()
    return False


def remove_temporary_files(directory: Path) -> list[str]:
    """Delete leftovers of interrupted writes in `directory`; returns their names."""
    removed = []
    for path in Path(directory).glob(f"{TEMP_PREFIX}*"):
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed
