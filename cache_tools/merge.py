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
  and the merged manifest combines their fingerprints.

Example ids must be unique across inputs. Shards are copied byte for byte
(checked against their sha256) and renumbered in input order; the manifest
records where they came from.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from pact.cache_tools.errors import CacheError
from pact.cache_tools.layout import Layout
from pact.cache_tools.manifest import DATA_DEPENDENT, PART, differences, load_manifest, save_manifest, set_totals
from pact.cache_tools.reader import decode_shard, read_shard_bytes, read_shard_table
from pact.cache_tools.writer import SAFETY_TOKENS_NAME, atomic_write, prepare_output_directory, shard_name


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
    """Refuse whole caches that differ in what shapes the stored values."""
    for directory, manifest in zip(inputs[1:], manifests[1:]):
        changed = differences(manifests[0], manifest, skip=DATA_DEPENDENT)
        if changed:
            raise CacheError(f"cannot merge {directory} with {inputs[0]}: {'; '.join(changed)}")


def _check_disjoint(inputs: list[Path], manifests: list[dict]) -> None:
    """Refuse an example id found twice (naming both shards); reads, verifies and decodes every shard."""
    layout = Layout.from_manifest(manifests[0])
    seen: dict[int, str] = {}
    for directory, manifest in zip(inputs, manifests):
        for entry in manifest["shards"]:
            shard = decode_shard(read_shard_table(directory, entry), layout, entry)
            for example_id in shard.example_id.tolist():
                if example_id in seen:
                    raise CacheError(f"example_id {example_id} is in both {seen[example_id]} and {directory / entry['file']}; "
                                     "merge only caches of disjoint examples")
                seen[example_id] = str(directory / entry["file"])


def merge_caches(out_dir: str | Path, directories: list[str | Path], overwrite: bool = False) -> dict:
    """Merge complete caches `directories` (all the parts of one build, or whole caches in order) into `out_dir`;
    returns the new manifest.

    Refuses (CacheError) parts that are missing, given twice or of another
    build, whole caches that differ in what shapes the stored values,
    duplicate example ids (naming both places), corrupt shards, and a
    non-empty `out_dir` unless `overwrite`.
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
    _check_disjoint(inputs, manifests)
    if prepare_output_directory(out, overwrite):
        raise CacheError(f"{out} is not empty; pass --overwrite to replace it")
    merged = copy.deepcopy(manifests[0])
    merged["complete"] = False
    merged["merged_from"] = [{"directory": str(d), "data": m.get("data"), "fingerprints": m["fingerprints"],
                              "params": m["params"], "part": m.get("part"), "shards": len(m["shards"])}
                             for d, m in zip(inputs, manifests)]
    if parts:
        merged["part"] = None
    else:
        merged["data"] = None
        merged["fingerprints"]["data"] = _combined([m["fingerprints"]["data"] for m in manifests])
        merged["fingerprints"]["examples"] = _combined([m["fingerprints"]["examples"] for m in manifests])
        merged["params"]["rows_per_shard"] = None
    merged["shards"] = []
    atomic_write(out / SAFETY_TOKENS_NAME, (json.dumps(merged["safety_tokens"], indent=1) + "\n").encode())
    for directory, manifest in zip(inputs, manifests):
        for entry in manifest["shards"]:
            name = shard_name(len(merged["shards"]))
            atomic_write(out / name, read_shard_bytes(directory, entry))
            merged["shards"].append({**entry, "file": name})
    merged["complete"] = True
    save_manifest(out, set_totals(merged))
    return merged
