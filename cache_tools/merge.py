"""`merge_caches`: join caches built separately (e.g. on parts of a data set)
into one (`pact-cache merge`).

The inputs must agree on everything that shapes the values (model,
tokenizer, safety tokens, layout, gate, header, format); data, shard sizes
and compression level may differ. Example ids must be unique across inputs.
Shards are copied byte for byte (checked against their sha256) and
renumbered in input order; the manifest records where they came from.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from pact.cache_tools.errors import CacheError
from pact.cache_tools.layout import Layout
from pact.cache_tools.manifest import DATA_DEPENDENT, differences, load_manifest, save_manifest, set_totals
from pact.cache_tools.reader import decode_shard, read_shard_bytes, read_shard_table
from pact.cache_tools.writer import SAFETY_TOKENS_NAME, atomic_write, prepare_output_directory, shard_name


def _combined(values: list) -> str:
    """One fingerprint for a list of fingerprints."""
    return "sha256:" + hashlib.sha256(json.dumps(values).encode()).hexdigest()


def merge_caches(out_dir: str | Path, directories: list[str | Path], overwrite: bool = False) -> dict:
    """Merge complete caches `directories` into `out_dir`, in order; returns the new manifest.

    Refuses (CacheError) inputs that differ in what shapes the stored values,
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
    for directory, manifest in zip(inputs[1:], manifests[1:]):
        changed = differences(manifests[0], manifest, skip=DATA_DEPENDENT)
        if changed:
            raise CacheError(f"cannot merge {directory} with {inputs[0]}: {'; '.join(changed)}")
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
    if prepare_output_directory(out, overwrite):
        raise CacheError(f"{out} is not empty; pass --overwrite to replace it")
    merged = copy.deepcopy(manifests[0])
    merged["complete"] = False
    merged["merged_from"] = [{"directory": str(d), "data": m.get("data"), "fingerprints": m["fingerprints"],
                              "params": m["params"], "shards": len(m["shards"])} for d, m in zip(inputs, manifests)]
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
