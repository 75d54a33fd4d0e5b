"""Crash-safe file writing for caches: every file (shard, manifest, safety
tokens) is written under a temporary name in the cache directory, flushed,
fsynced and renamed into place, then the directory is fsynced. A crash, even
`kill -9`, leaves either the old file or the new one, never a torn one.

Also the names a cache directory holds (and the patterns that prove a file is
one of ours) and `DirectoryLock`, which keeps two writers out of one directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from pact.cache_tools.errors import CacheError, CacheWriteError
from pact.errors import os_error_reason
from pact.files import TEMP_PREFIX, atomic_write

MANIFEST_NAME = "manifest.json"
RANK_MANIFEST_PREFIX = "manifest.rank-"
SAFETY_TOKENS_NAME = "safety_tokens.json"
LOCK_NAME = "pact-cache.lock"
SHARD_SUFFIX = ".arrow"
DEFAULT_ZSTD_LEVEL = 3
SHARD_PATTERN = re.compile(r"shard-\d{5,}\.arrow")
RANK_MANIFEST_PATTERN = re.compile(r"manifest\.rank-\d{5,}-of-\d{5,}\.json")
# `atomic_write`'s temporary files: `.tmp-<one of the names above>.<pid of the writer>`.
TEMP_PATTERN = re.compile(re.escape(TEMP_PREFIX) + "(?:" + "|".join(
    [re.escape(MANIFEST_NAME), re.escape(SAFETY_TOKENS_NAME), SHARD_PATTERN.pattern, RANK_MANIFEST_PATTERN.pattern]) + r")\.\d+")
SCHEMA_VERSION_KEY = b"pact_cache_format_version"  # in every shard's Arrow schema metadata


def shard_name(index: int) -> str:
    """File name of shard `index` (`shard-00000.arrow`, ...)."""
    return f"shard-{index:05d}{SHARD_SUFFIX}"


def is_shard_name(name: object) -> bool:
    """Whether `name` is a shard file name as the writer makes them (`shard-NNNNN.arrow`: no folder, no `..`)."""
    return isinstance(name, str) and SHARD_PATTERN.fullmatch(name) is not None


def shard_index(name: str) -> int:
    """The index in a shard's file name (inverse of `shard_name`)."""
    return int(name.removeprefix("shard-").removesuffix(SHARD_SUFFIX))


def rank_manifest_name(rank: int, world_size: int) -> str:
    """File name of the progress manifest rank `rank` of a `world_size`-process build keeps while it runs."""
    return f"{RANK_MANIFEST_PREFIX}{rank:05d}-of-{world_size:05d}.json"


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
    atomic_write(Path(directory) / name, data, CacheWriteError)
    return {"file": name, "rows": table.num_rows, "response_tokens": int(response_tokens), "bytes": len(data), "sha256": sha256_hex(data)}


def is_pact_shard_file(path: Path) -> bool:
    """Whether `path` is an Arrow IPC file whose schema carries the pact-cache format key (read from the footer only)."""
    try:
        with pa.OSFile(str(path)) as handle:
            metadata = ipc.open_file(handle).schema.metadata or {}
    except (pa.ArrowException, OSError, ValueError):
        return False
    return SCHEMA_VERSION_KEY in metadata


def _first_file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` that is not a directory (why `path` cannot be created), if any."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def refuse_file_in_the_way(directory: Path) -> None:
    """Raise `CacheWriteError` when `directory` is a file, or lies under one, so it can never be a cache directory."""
    directory = Path(directory)
    blocker = directory if directory.exists() and not directory.is_dir() else _first_file_above(directory)
    if blocker is not None:
        raise CacheWriteError(f"cannot use {directory} as the cache directory: {blocker} is a file, not a directory; "
                              "choose another output path")


def make_directory(directory: Path) -> None:
    """Create the output directory `directory` (and its parents); a clear `CacheWriteError` naming the path when impossible."""
    directory = Path(directory)
    refuse_file_in_the_way(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CacheWriteError(f"cannot create the cache directory {directory}: {os_error_reason(err)}") from err


class DirectoryLock:
    """Exclusive use of a cache directory by one writer (a build or a merge): `fcntl.flock` on `DIR/pact-cache.lock`.

    The kernel drops the lock when its process dies, even by `kill -9`, so a
    crashed build never leaves the directory stuck; the file holds the pid of
    the holder for the message another writer gets. The holder removes the
    file when it is done (while still holding the lock; a writer that opened
    the removed file notices and locks the new one).
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_NAME
        self.fd: int | None = None

    def _holder(self, fd: int) -> str:
        """The pid written in the lock file, as text (or `unknown`)."""
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return text if text.isdigit() else "unknown"

    def _open_locked(self) -> int | None:
        """Open and lock the lock file; None when the file was replaced before the lock was taken (try again)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise CacheWriteError(f"cannot create the lock file {self.path}: {os_error_reason(err)}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise CacheError(f"{self.path.parent} is in use by another pact-cache build or merge: pid {holder} holds the lock "
                             f"{self.path}; wait for it to finish or stop it (a killed one releases the lock by itself)") from None
        except OSError as err:
            os.close(fd)
            raise CacheWriteError(f"cannot lock {self.path}: {os_error_reason(err)}") from err
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def __enter__(self) -> "DirectoryLock":
        """Take the lock (or raise `CacheError` naming the holder's pid) and write this process's pid into the file."""
        fd = None
        while fd is None:
            fd = self._open_locked()
        left = os.pread(fd, 64, 0).strip()
        if left and not left.isdigit():  # not a pid a crashed writer left: a file of the user's, keep it
            os.close(fd)
            raise CacheError(f"{self.path} exists and is not a pact-cache lock file (it holds other data); "
                             "move it away or choose another directory")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            self._release(fd)
            raise CacheWriteError(f"cannot write the lock file {self.path}: {os_error_reason(err)}") from err
        self.fd = fd
        return self

    def _release(self, fd: int) -> None:
        """Remove the lock file, then drop the lock."""
        self.path.unlink(missing_ok=True)
        os.close(fd)

    def __exit__(self, *exc) -> None:
        """Remove the lock file and drop the lock."""
        self._release(self.fd)
        self.fd = None
