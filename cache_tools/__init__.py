"""The reference cache (`pact-cache`): one offline pass of the reference model
stores, per response step, what the PACT objective needs from it, so training
runs without a reference model.

* `build_cache` -- run the reference over a training set into a cache directory.
* `CacheReader` -- read rows back (by index, streamed, or as torch / Hugging Face datasets).
* `verify_cache`, `inspect_cache`, `cache_stats`, `merge_caches` -- the checks and tools behind
  `pact-cache verify|inspect|stats|merge`.

The format is documented in docs/cache_format.md.
"""

from pact.cache_tools.builder import BuildResult, build_cache
from pact.cache_tools.codec import DEFAULT_DTYPE, DTYPES
from pact.cache_tools.errors import CacheError, CacheWriteError
from pact.cache_tools.layout import Layout
from pact.cache_tools.manifest import describe_data, load_manifest
from pact.cache_tools.reader import CacheDataset, CacheIterableDataset, CacheReader, ShardShuffleSampler

__all__ = [
    "BuildResult",
    "CacheDataset",
    "CacheError",
    "CacheIterableDataset",
    "CacheReader",
    "CacheWriteError",
    "DEFAULT_DTYPE",
    "DTYPES",
    "Layout",
    "ShardShuffleSampler",
    "build_cache",
    "describe_data",
    "load_manifest",
]
