"""Shared fixtures and helpers of the cache tests (imported by test_cache_*.py).

A tiny random model, a hand-made safety-token set for it, a few encoded demo
examples, and a small float32 cache built once per session. Torch runs on one
thread in these tests: the tiny forward passes are much faster that way on a
busy 2-core machine.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

TINY_MAX_LENGTH = 256
TINY_ROWS = 12


@contextlib.contextmanager
def single_thread():
    """Run torch single-threaded inside the block (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread():
    """Every cache test runs torch single-threaded."""
    with single_thread():
        yield


def subprocess_env() -> dict:
    """Environment for CLI subprocesses: single-threaded, unbuffered."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """The tiny random model, loaded on CPU in float32."""
    from pact.models.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


def make_safety_tokens(loaded, count: int = 12, seed: int = 0):
    """A safety-token set of `count` random ids with about half the weights positive, made for `loaded`."""
    from pact.objective.safety_tokens import SafetyTokens

    generator = torch.Generator().manual_seed(seed)
    ids = sorted(torch.randperm(loaded.model.config.vocab_size, generator=generator)[:count].tolist())
    weights = [max(0.0, float(v)) for v in torch.randn(count, generator=generator)]
    weights[0] = weights[0] or 0.5  # at least one positive weight
    return SafetyTokens(ids, weights, [loaded.tokenizer.decode([i]) for i in ids], {"made_by": "test"},
                        {"aligned_model": loaded.fingerprint, "base_model": loaded.fingerprint, "tokenizer": loaded.tokenizer_fingerprint})


@pytest.fixture(scope="session")
def tiny_safety(tiny):
    """Safety tokens for the tiny model."""
    return make_safety_tokens(tiny)


@pytest.fixture(scope="session")
def tiny_safety_file(tiny_safety, tmp_path_factory):
    """The tiny safety tokens saved as a file (for the CLI)."""
    return tiny_safety.save(tmp_path_factory.mktemp("safety") / "safety_tokens.json")


@pytest.fixture(scope="session")
def tiny_examples(tiny):
    """The first TINY_ROWS demo examples encoded with the tiny tokenizer."""
    from pact.data.sources import demo_data_path
    from pact.data.chat import load_examples

    examples, _ = load_examples(demo_data_path("benign"), tiny.tokenizer, max_length=TINY_MAX_LENGTH, limit=TINY_ROWS)
    return examples


@pytest.fixture(scope="session")
def float32_cache(tiny, tiny_examples, tiny_safety, tmp_path_factory):
    """An exact (float32) cache of the tiny examples, 4 rows per shard."""
    from pact.cache_tools import build_cache

    out = tmp_path_factory.mktemp("cache") / "f32"
    with single_thread():
        build_cache(tiny, tiny_examples, tiny_safety, out, dtype="float32", rows_per_shard=4, batch_size=3, progress=False)
    return out


def _version_3_fields(fields: list[tuple], manifest: dict) -> list[tuple]:
    """A version-4 step's (field, array) pairs as version 3 stored them: the int8 layout's `other_logits` decoded from
    their log-probability codes and encoded as logits with their `_max` and `_range` side parts, in version 3's order."""
    import numpy as np
    import pyarrow as pa

    from pact.cache_tools import codec
    from pact.cache_tools.layout import Layout
    from pact.cache_tools.schema import step_columns

    arrays = {field.name: child for field, child in fields}
    if manifest["dtype"] == "int8" and "other_logits" in arrays:
        width = arrays["other_logits"].type.list_size
        codes = arrays["other_logits"].flatten().to_numpy().reshape(-1, width)
        logits = codec.decode_logprob(codes, arrays["logsumexp"].to_numpy())
        encoded = codec.encode(logits, "int8")
        arrays["other_logits"] = pa.FixedSizeListArray.from_arrays(pa.array(encoded["values"].reshape(-1)), width)
        arrays |= {f"other_logits_{part}": pa.array(encoded[part]) for part in codec.side_parts("int8")}
    order = [name for name, _, _ in step_columns(Layout.from_manifest(manifest | {"format_version": 3}))]
    types = {field.name: field for field, _ in fields}
    return [(types.get(name, pa.field(name, arrays[name].type, nullable=False)), arrays[name]) for name in order]


def downgrade(cache, version: int) -> None:
    """Rewrite a format-version-4 cache as an older writer wrote it: version 3 stores the int8 layout's other logits as
    logits with side parts, version 2 has no reference columns (`other_logits*`, `rest_logprob`), version 1 neither
    `response_spans` (single-turn caches only); schema metadata, manifest version, shard bytes, sizes, sha256 and
    checksums redone as that writer did."""
    import json

    import pyarrow as pa

    from pact.cache_tools.manifest import save_manifest, set_totals
    from pact.cache_tools.reader import read_shard_table
    from pact.cache_tools.writer import SCHEMA_VERSION_KEY, shard_index, write_shard

    manifest = json.loads((cache / "manifest.json").read_text())
    for entry in manifest["shards"]:
        table = read_shard_table(cache, entry)
        steps = table.column("steps").combine_chunks()
        kept = list(zip(steps.type.value_type, steps.flatten().flatten()))
        if version == 3:
            kept = _version_3_fields(kept, manifest)
        else:
            kept = [(field, child) for field, child in kept if not field.name.startswith(("other_logits", "rest_logprob"))]
        struct = pa.StructArray.from_arrays([child for _, child in kept], fields=[field for field, _ in kept])
        index = table.schema.get_field_index("steps")
        table = table.set_column(index, pa.field("steps", pa.list_(struct.type), nullable=False),
                                 pa.ListArray.from_arrays(steps.offsets, struct))
        if version == 1:
            assert all(len(spans) == 1 for spans in table.column("response_spans").to_pylist()), "version 1 holds one span per row"
            table = table.drop_columns(["response_spans"])
        table = table.replace_schema_metadata({**table.schema.metadata, SCHEMA_VERSION_KEY: str(version).encode()})
        entry.update(write_shard(cache, shard_index(entry["file"]), table, entry["response_tokens"], manifest["params"]["zstd_level"]))
    manifest["format_version"] = version
    save_manifest(cache, set_totals(manifest))


def rewrite_response_spans(cache, shard: int, change) -> None:
    """Replace the `response_spans` of shard `shard` of `cache` by `change(spans)` (a list per row of [start, end]
    pairs) and reseal the manifest as pact-cache would, so only the row checks can catch the change."""
    import json

    import pyarrow as pa

    from pact.cache_tools.manifest import save_manifest
    from pact.cache_tools.reader import read_shard_table
    from pact.cache_tools.writer import write_shard

    manifest = json.loads((cache / "manifest.json").read_text())
    entry = manifest["shards"][shard]
    table = read_shard_table(cache, entry)
    index = table.schema.get_field_index("response_spans")
    spans = change(table.column(index).to_pylist())
    table = table.set_column(index, table.schema.field(index), pa.array(spans, table.schema.field(index).type))
    entry.update(write_shard(cache, shard, table, entry["response_tokens"], manifest["params"]["zstd_level"]))
    save_manifest(cache, manifest)
