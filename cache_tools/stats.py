"""`cache_stats`: size and content statistics of a cache (`pact-cache stats`).

Size: bytes per response token overall and per column (each column
re-compressed alone, so the split is an estimate that sums close to the
file size), and the ratio to raw float32. Content: per response step, the
entropy of the safety-token target distribution q = normalize(softmax(l / T) * w)
over the stored columns for the full and post-only logits, the post-only
top-p count (none of these in a distillation-only cache), the reference's
log-prob of the data's tokens, and a distillation cache's teacher mass outside
its top-K.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pact.cache_tools.reader import CacheReader, decode_shard, read_shard_table
from pact.cache_tools.schema import LOGIT_COLUMNS, ShardRows
from pact.cache_tools.writer import serialize_table
from pact.kernels.reference import target_log_probs

PERCENTILES = (5, 50, 95)


def column_bytes(table: pa.Table, zstd_level: int | None) -> dict[str, int]:
    """Bytes each column of a shard table takes compressed on its own (file overhead subtracted).

    The `steps` column is split into its offsets (`steps.offsets`) and each
    struct field, so the sizes show where the bytes of a cache go.
    """
    empty = len(serialize_table(pa.table({"x": pa.array([], pa.int8())}), zstd_level))
    size = lambda array: len(serialize_table(pa.table({"x": array}), zstd_level)) - empty  # noqa: E731
    sizes = {name: size(table.column(name)) for name in table.column_names if name != "steps"}
    steps = table.column("steps").combine_chunks()
    sizes["steps.offsets"] = size(steps.offsets)
    for field, values in zip(steps.type.value_type, steps.flatten().flatten()):
        sizes[f"steps.{field.name}"] = size(values)
    return sizes


def target_entropy(logits: np.ndarray, weights: np.ndarray, temperature: float) -> np.ndarray:
    """Entropy (nats) of q = normalize(softmax(logits / T) * w) per row; `weights` is [k] or per row [n, k]."""
    log_q = target_log_probs(torch.from_numpy(logits), torch.from_numpy(weights), temperature)
    return -torch.where(log_q > -torch.inf, log_q.exp() * log_q, 0.0).sum(dim=1).numpy()


def _summary(values: np.ndarray) -> dict:
    if not len(values):
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    return {"mean": float(values.mean()), **{f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}}


def _stored_weights(shard: ShardRows, plus_weights: np.ndarray) -> np.ndarray:
    """Weights of the stored columns: [k] for S+ layouts, [n, K] per step for top-k."""
    if shard.layout.top_k is None:
        return plus_weights
    return plus_weights[shard.columns["safety_index"].astype(np.int64)]


def cache_stats(directory: str | Path) -> dict:
    """Sizes and per-step statistics of a complete cache, reading it shard by shard (bounded memory)."""
    reader = CacheReader(directory, buffer_bytes=0)
    manifest = reader.manifest
    layout = reader.layout
    weights = reader.safety_weights.numpy()
    plus_weights = weights[weights > 0]
    temperature = manifest["objective_temperature"]
    level = manifest["params"]["zstd_level"]
    columns: dict[str, int] = {}
    values: dict[str, list[np.ndarray]] = {"full": [], "post": [], "post_count": [], "target_logprob": [], "kd_tail_mass": []}
    for entry in reader.shards:
        table = read_shard_table(reader.directory, entry)
        for name, size in column_bytes(table, level).items():
            columns[name] = columns.get(name, 0) + size
        shard = decode_shard(table, layout, entry)
        if layout.stores_safety:
            stored_weights = _stored_weights(shard, plus_weights)
            for context, column in zip(("full", "post"), LOGIT_COLUMNS):
                values[context].append(target_entropy(shard.logits(column, slice(None)), stored_weights, temperature))
            values["post_count"].append(shard.columns["post_count"].astype(np.float64))
        if shard.kd is not None:
            values["kd_tail_mass"].append(np.exp(shard.kd[2].astype(np.float64)))
        values["target_logprob"].append(shard.columns["target_logprob"].astype(np.float64))
    merged = {key: np.concatenate(parts) if parts else np.zeros(0) for key, parts in values.items()}
    totals = manifest["totals"]
    tokens = max(totals["response_tokens"], 1)
    return {
        "directory": str(reader.directory),
        "rows": totals["rows"],
        "response_tokens": totals["response_tokens"],
        "shards": totals["shards"],
        "bytes": totals["bytes"],
        "bytes_per_response_token": totals["bytes_per_response_token"],
        "raw_float32_bytes_per_response_token": totals["raw_float32_bytes"] / tokens,
        "compression_ratio": totals["compression_ratio"],
        "column_bytes_per_response_token": {name: size / tokens for name, size in columns.items()},
        "dtype": manifest["dtype"],
        "top_k": manifest["top_k"],
        "stored_columns": layout.width,
        "safety_tokens": len(weights),
        "max_entropy": float(np.log(layout.width)) if layout.stores_safety else None,
        "entropy_full": _summary(merged["full"]),
        "entropy_post": _summary(merged["post"]),
        "post_count": _summary(merged["post_count"]),
        "target_logprob": _summary(merged["target_logprob"]),
        "kd_top_k": layout.kd_top_k,
        "kd_tail_mass": _summary(merged["kd_tail_mass"]),
    }


def format_stats(stats: dict) -> str:
    """Human-readable form of `cache_stats`."""
    ratio = stats["compression_ratio"]
    lines = [
        f"cache {stats['directory']}: {stats['rows']} rows, {stats['response_tokens']} response tokens, {stats['shards']} shard(s)",
        f"size: {stats['bytes']} bytes = {stats['bytes_per_response_token']:.1f} bytes per response token "
        f"(raw float32: {stats['raw_float32_bytes_per_response_token']:.0f}; ratio {ratio:.1f}x)",
        (f"layout: dtype {stats['dtype']}, {stats['stored_columns']} stored column(s) of {stats['safety_tokens']} safety tokens"
         + (f", top-k {stats['top_k']}" if stats["top_k"] else "") if stats["safety_tokens"] else
         "layout: no safety targets (a distillation-only cache)")
        + (f"; the teacher's top-{stats['kd_top_k']}" if stats["kd_top_k"] else ""),
        "bytes per response token by column (each compressed alone):",
    ]
    lines += [f"  {name:28s} {size:8.2f}" for name, size in stats["column_bytes_per_response_token"].items()]
    show = lambda s: "  ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in s.items())  # noqa: E731
    if stats["safety_tokens"]:
        lines += [
            f"entropy of the safety target, full context (nats, max {stats['max_entropy']:.3f}): {show(stats['entropy_full'])}",
            f"entropy of the safety target, post-only context: {show(stats['entropy_post'])}",
            f"post-only top-p count: {show(stats['post_count'])}",
        ]
    lines.append(f"reference log-prob of the response tokens: {show(stats['target_logprob'])}")
    if stats["kd_top_k"]:
        lines.append(f"teacher's probability outside its top-{stats['kd_top_k']}: {show(stats['kd_tail_mass'])}")
    return "\n".join(lines)
