"""`merge_caches`: join caches built separately into one (`pact-cache merge`).

Two kinds of input:

* the parts of one `pact-cache build --num-shards K` (manifests marked part I
  of K): all K parts, each once, of the same build (same model, data,
  parameters and safety tokens), taken in part order whatever the argument
  order. The result is the cache a single build would have written: same
  shards in the same order, same manifest fields (less the part mark).
* whole caches (e.g. built on different data sets): they must agree on
  everything that shapes the values (model, tokenizer, safety tokens, layout,
  gate, header, format); data, shard sizes and compression level may differ,
  and the merged manifest combines their fingerprints. Example ids are row
  indices in each cache's own data file, so caches of different files all
  start at 0: when a cache's ids collide with those of the caches before it,
  its ids are shifted by an offset (to follow the largest id so far), its
  shards rewritten with the new `example_id` column (values unchanged), and
  the offset recorded in `merged_from`. Two caches of the very same examples
  (equal examples fingerprint) are refused: every row would appear twice.

The parts of one build must hold disjoint example ids (else refused, naming
both shards); their shards are copied byte for byte (checked against their
sha256). Shards are renumbered in input order; the manifest records where
they came from. The output directory is locked while the merge writes it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from pact.cache_tools.errors import CacheError, CacheWriteError
from pact.cache_tools.layout import Layout
from pact.cache_tools.manifest import (
    DATA_DEPENDENT, PART, delete_files, differences, directory_entries, load_manifest, own_files, save_manifest, set_totals,
)
from pact.cache_tools.reader import decode_shard, read_shard_bytes, read_shard_table
from pact.cache_tools.writer import DEFAULT_ZSTD_LEVEL, SAFETY_TOKENS_NAME, DirectoryLock, make_directory, shard_name, write_shard
from pact.files import atomic_write


def _combined(values: list) -> str:
    """One fingerprint for a list of fingerprints."""
    return "sha256:" + hashlib.sha256(json.dumps(values).encode()).hexdigest()


def _part_order(inputs: list[Path], manifests: list[dict]) -> list[int]:
    """Positions of `inputs` in part order, after checking they are parts 0..K-1 of one build, each given once."""
    whole = [str(d) for d, m in zip(inputs, manifests) if not m.get("part")]
    if whole:
        raise CacheError(f"cannot merge parts of a --num-shards build with whole caches ({', '.join(whole)})")
    count = manifests[0]["part"]["count"]
    where: dict[int, int] = {}
    for position, (directory, manifest) in enumerate(zip(inputs, manifests)):
        part = manifest["part"]
        if part["count"] != count:
            raise CacheError(f"{directory} is part {part['index']} of {part['count']}, {inputs[0]} is part of a build "
                             f"split into {count}; merge the parts of one build")
        changed = differences(manifests[0], manifest, skip={PART})
        if changed:
            raise CacheError(f"{directory} is not a part of the same build as {inputs[0]}: {'; '.join(changed)}")
        if part["index"] in where:
            raise CacheError(f"part {part['index']} of {count} is given twice: {inputs[where[part['index']]]} and {directory}")
        where[part["index"]] = position
    missing = [str(index) for index in range(count) if index not in where]
    if missing:
        raise CacheError(f"part(s) {', '.join(missing)} of {count} missing: build them with "
                         f"`pact-cache build ... --num-shards {count} --shard-index I` and pass every part")
    return [where[index] for index in range(count)]


def _check_compatible(inputs: list[Path], manifests: list[dict]) -> None:
    """Refuse whole caches that differ in what shapes the stored values, or that hold the very same examples."""
    for directory, manifest in zip(inputs[1:], manifests[1:]):
        changed = differences(manifests[0], manifest, skip=DATA_DEPENDENT)
        if changed:
            raise CacheError(f"cannot merge {directory} with {inputs[0]}: {'; '.join(changed)}")
    first: dict[str, Path] = {}
    for directory, manifest in zip(inputs, manifests):
        examples = manifest["fingerprints"]["examples"]
        if examples in first:
            raise CacheError(f"{first[examples]} and {directory} hold the same examples (equal examples fingerprint): "
                             "merging them would repeat every row; give each cache once")
        first[examples] = directory


def _example_ids(directory: Path, manifest: dict, layout: Layout) -> dict[int, str]:
    """Every example id of a cache -> the shard holding it; reads, verifies and decodes every shard, refusing duplicates."""
    found: dict[int, str] = {}
    for entry in manifest["shards"]:
        where = str(directory / entry["file"])
        for example_id in decode_shard(read_shard_table(directory, entry), layout, entry).example_id.tolist():
            if example_id in found:
                raise CacheError(f"example_id {example_id} is in both {found[example_id]} and {where}; the cache {directory} "
                                 "is damaged (check it with `pact-cache verify`)")
            found[example_id] = where
    return found


def _id_offsets(inputs: list[Path], manifests: list[dict], renumber: bool) -> list[int]:
    """The offset added to each input's example ids so that all are unique (0: kept as they are).

    A clash with the inputs before is refused (naming both shards) unless
    `renumber` (whole caches): then the input's ids move to follow the largest
    id so far.
    """
    layout = Layout.from_manifest(manifests[0])
    seen: dict[int, str] = {}
    offsets = []
    for directory, manifest in zip(inputs, manifests):
        ids = _example_ids(directory, manifest, layout)
        clash = sorted(seen.keys() & ids.keys())
        if clash and not renumber:
            raise CacheError(f"example_id {clash[0]} is in both {seen[clash[0]]} and {ids[clash[0]]}; "
                             "merge only caches of disjoint examples")
        offset = max(seen) + 1 - min(ids) if clash else 0
        seen.update((example_id + offset, where) for example_id, where in ids.items())
        offsets.append(offset)
    return offsets


def _copy_shard(out: Path, index: int, directory: Path, entry: dict, offset: int, zstd_level: int) -> dict:
    """Write shard `entry` of `directory` as shard `index` of `out` (example ids shifted by `offset`); returns its entry.

    Without an offset the file is copied byte for byte (after checking its
    sha256); with one, its `example_id` column is rewritten and the shard
    re-encoded at `zstd_level` (every other value unchanged).
    """
    if not offset:
        name = shard_name(index)
        atomic_write(out / name, read_shard_bytes(directory, entry), CacheWriteError)
        return {**entry, "file": name}
    table = read_shard_table(directory, entry)
    column = table.schema.get_field_index("example_id")
    shifted = pa.array(table.column(column).to_numpy() + np.int64(offset), pa.int64())
    return write_shard(out, index, table.set_column(column, table.schema.field(column), shifted), entry["response_tokens"], zstd_level)


def _merged_manifest(inputs: list[Path], manifests: list[dict], offsets: list[int], parts: bool) -> dict:
    """The merged cache's manifest before any shard: the first input's, with `merged_from`, and data fields combined."""
    merged = copy.deepcopy(manifests[0])
    merged["complete"] = False
    merged["merged_from"] = [{"directory": str(d), "data": m.get("data"), "fingerprints": m["fingerprints"],
                              "params": m["params"], "part": m.get("part"), "shards": len(m["shards"]),
                              "example_id_offset": offset}
                             for d, m, offset in zip(inputs, manifests, offsets)]
    if parts:
        merged["part"] = None
    else:
        merged["data"] = None
        merged["fingerprints"]["data"] = _combined([m["fingerprints"]["data"] for m in manifests])
        merged["fingerprints"]["examples"] = _combined([m["fingerprints"]["examples"] for m in manifests])
        merged["params"]["rows_per_shard"] = None
    merged["shards"] = []
    return set_totals(merged)


def merge_caches(out_dir: str | Path, directories: list[str | Path], overwrite: bool = False) -> dict:
    """Merge complete caches `directories` (all the parts of one build, or whole caches in order) into `out_dir`;
    returns the new manifest.

    Refuses (CacheError) parts that are missing, given twice or of another
    build, whole caches that differ in what shapes the stored values or hold
    the same examples, duplicate example ids among parts (naming both places),
    corrupt shards, and a non-empty `out_dir` unless `overwrite` (which deletes
    only pact-cache's own files there). Whole caches whose example ids collide
    are renumbered (see the module notes).
    """
    if not directories:
        raise CacheError("merge needs at least one input cache")
    out = Path(out_dir).expanduser()
    inputs = [Path(d).expanduser() for d in directories]
    if out.resolve() in {d.resolve() for d in inputs}:
        raise CacheError(f"the output {out} is also an input")
    manifests = [load_manifest(d) for d in inputs]
    parts = any(m.get("part") for m in manifests)
    if parts:
        order = _part_order(inputs, manifests)
        inputs, manifests = [inputs[i] for i in order], [manifests[i] for i in order]
    else:
        _check_compatible(inputs, manifests)
    offsets = _id_offsets(inputs, manifests, renumber=not parts)
    make_directory(out)
    with DirectoryLock(out):
        if directory_entries(out):
            if not overwrite:
                raise CacheError(f"{out} is not empty; pass --overwrite to replace it")
            delete_files(out, own_files(out, "--overwrite"))
        merged = _merged_manifest(inputs, manifests, offsets, parts)
        save_manifest(out, merged)
        if merged["safety_tokens"] is not None:
            atomic_write(out / SAFETY_TOKENS_NAME, (json.dumps(merged["safety_tokens"], indent=1) + "\n").encode(), CacheWriteError)
        for directory, manifest, offset in zip(inputs, manifests, offsets):
            level = manifest["params"].get("zstd_level", DEFAULT_ZSTD_LEVEL)
            for entry in manifest["shards"]:
                merged["shards"].append(_copy_shard(out, len(merged["shards"]), directory, entry, offset, level))
        merged["complete"] = True
        save_manifest(out, set_totals(merged))
    return merged
