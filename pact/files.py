"""Crash-safe file writing: a file is written under a temporary name beside it, flushed, fsynced and renamed into
place, then its directory is fsynced; a crash, even `kill -9`, leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
from pathlib import Path

from pact.errors import WriteError, os_error_reason

TEMP_PREFIX = ".tmp-"


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
