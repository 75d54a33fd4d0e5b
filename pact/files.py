"""Crash-safe file writing: a file is written under a temporary name beside it, flushed, fsynced and renamed into
place, then its directory is fsynced; a crash, even `kill -9`, leaves the old file or the new one, never a torn one.
And sealed JSON records (a cache's manifest, a run's settings): a sha256 per field recorded in the record itself, so a
field edited by hand is named (`edited_fields`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pact.errors import WriteError, os_error_reason

TEMP_PREFIX = ".tmp-"
CHECKSUMS = "checksums"  # the field of a sealed record holding its fields' sha256


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (where the platform can open a directory)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write(path: Path, data: bytes, error: type[WriteError] = WriteError) -> None:
    """Write `data` to `path` atomically and durably (temp file, fsync, rename, fsync directory).

    An `OSError` (disk full, permission denied, ...) removes the temporary
    file, leaves any previous `path` untouched and raises `error` (a
    `WriteError`; the cache's own writes raise `CacheWriteError`). A file
    already named like the temporary file is refused, never overwritten.
    """
    path = Path(path)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    descriptor = _create_new(temp, path, error)
    try:
        with open(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
        _fsync_directory(path.parent)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise error(f"cannot write {path}: {os_error_reason(err)}; nothing was replaced") from err
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _create_new(temp: Path, path: Path, error: type[WriteError]) -> int:
    """Create the temporary file `temp` for writing `path`, failing if anything already has that name: only a file
    this call created is ever written over, renamed or removed (a file of the user's named like it is left alone)."""
    try:
        return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError as err:
        raise error(f"cannot write {path}: its temporary file {temp} already exists and was not created by this "
                    "process; move it away (nothing was replaced)") from err
    except OSError as err:
        raise error(f"cannot write {path}: {os_error_reason(err)}; nothing was replaced") from err


def _canonical(value) -> bytes:
    """The JSON bytes a checksum is taken over (sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _checksum_fields(record: dict) -> dict[str, object]:
    """The record's fields as `checksums` covers them: top-level keys, objects split one level (`gate.p0`)."""
    fields: dict[str, object] = {}
    for key, value in record.items():
        if key == CHECKSUMS:
            continue
        if isinstance(value, dict) and value:
            fields.update((f"{key}.{sub}", item) for sub, item in value.items())
        else:
            fields[key] = value
    return fields


def field_checksums(record: dict) -> dict[str, str]:
    """sha256 of every field of `record` (except `checksums` itself), keyed by field (`gate.p0`, `shards`, ...): what a
    sealed record stores under `CHECKSUMS`."""
    return {name: hashlib.sha256(_canonical(value)).hexdigest() for name, value in sorted(_checksum_fields(record).items())}


def edited_fields(record: dict) -> list[str] | None:
    """The fields that no longer match the record's `checksums` (added or removed ones too); None without checksums.

    Records written before a tool sealed them have none: nothing can be
    checked then.
    """
    recorded = record.get(CHECKSUMS)
    if recorded is None:
        return None
    if not isinstance(recorded, dict):
        return [CHECKSUMS]
    actual = field_checksums(record)
    return sorted(name for name in recorded.keys() | actual.keys() if recorded.get(name) != actual.get(name))
