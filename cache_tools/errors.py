"""The cache's error type."""

from pact.errors import PactError, WriteError


class CacheError(PactError):
    """A cache directory is unusable (missing, incomplete, corrupt or built for something else).

    The message names the cache, and where it applies the shard file and row.
    """


class CacheWriteError(CacheError, WriteError):
    """Writing a cache file failed (disk full, permission denied, ...); nothing was half-written."""


class RowOutOfRange(CacheError, IndexError):
    """A row index past either end of a cache; an `IndexError` too, so sequence protocols still see the end."""
