"""Benchmark of `pact-cache build` on the embedded model.

Prints, for the same examples:

* build time / bare reference time: `build_cache` (default layout, to disk)
  against `reference_targets` over the same length-bucketed batches with no
  storage (both passes: full and post-only contexts). Target <= 1.10.
* the same build with `--kd_top_k K` (the reference as its own teacher: its
  top-K from the logits it computes anyway, encoded per shard) against the
  build without, and against the bare pass. Target <= 1.05.
* a distillation-only build (`--kd_top_k K --safety_targets false`: the
  model's full-context pass, its top-K, no safety targets) against a bare
  teacher forward (the same batches' full-vocabulary logits at the response
  positions, nothing kept). Target <= 1.05.
* per layout (dtype x all of S+ / top-k): bytes per response token for the
  whole shard and for the per-step values alone, against raw float32
  (4 * (2|S| + 2) bytes per response token) and uncompressed Arrow, and the
  objective's error against exact reference values (`cache_tools.quality`).
* Arrow's zstd against the `zstandard` package (whole file, and byte-shuffled
  buffers) on the same tables.
* decode speed: rows/s of a full pass of `CacheReader` over the built cache.

    python benchmarks/bench_cache_build.py --data ../shared/data/sst2_5k.jsonl --limit 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import zstandard

from pact.cache_tools import DEFAULT_DTYPE, DTYPES, CacheReader, Layout, build_cache
from pact.cache_tools.builder import encode_reference, length_batches, pad_token_id
from pact.cache_tools.quality import objective_error
from pact.cache_tools.schema import ShardRows, build_table
from pact.cache_tools.writer import DEFAULT_ZSTD_LEVEL, serialize_table
from pact.data.sources import DEMO_BENIGN, DEMO_REFUSALS, demo_data_path
from pact.data.batch import collate_examples
from pact.data.chat import assistant_header_ids, load_examples
from pact.data.rows import load_conversations
from pact.models.loading import load_model
from pact.objective.settings import ObjectiveArguments
from pact.objective.distillation import teacher_logits
from pact.objective.reference import reference_targets
from pact.objective.safety_tokens import SafetyTokens, compute_safety_tokens

TRAINING_ROWS_PER_SECOND = 2.0  # CPU training consumption (one 8-row step in about 4 s on 2 CPU cores)


def _reference_pass(loaded, examples, safety, batch_size):
    """The bare reference pass over the builder's batches; returns per-example targets in example order."""
    cfg = ObjectiveArguments()
    ids, header, pad = safety.id_tensor(), assistant_header_ids(loaded.tokenizer), pad_token_id(loaded.tokenizer)
    refs = [None] * len(examples)
    for chosen in length_batches([len(ex.input_ids) for ex in examples], batch_size):
        batch_refs = reference_targets(loaded.model, [examples[i] for i in chosen], ids, header, cfg.p0, cfg.gate_temperature, pad)
        for i, ref in zip(chosen, batch_refs):
            refs[i] = ref
    return refs


def _teacher_pass(loaded, examples, batch_size) -> None:
    """The bare teacher forward over the builder's batches: full-vocabulary logits at the response positions, dropped."""
    pad = pad_token_id(loaded.tokenizer)
    for chosen in length_batches([len(ex.input_ids) for ex in examples], batch_size):
        teacher_logits(loaded.model, collate_examples([examples[i] for i in chosen], pad))


def _leaves(array: pa.Array) -> list[np.ndarray]:
    """Every fixed-width buffer of an Arrow array as numpy (offsets and values, recursively)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_list(array.type):
        return [array.offsets.to_numpy()] + _leaves(array.flatten())
    if pa.types.is_fixed_size_list(array.type):
        return _leaves(array.flatten())
    if pa.types.is_struct(array.type):
        return [leaf for child in array.flatten() for leaf in _leaves(child)]
    return [array.to_numpy(zero_copy_only=False)]


def _zstandard_sizes(table: pa.Table, level: int) -> dict:
    """Sizes with the `zstandard` package: the uncompressed IPC file as one frame, and byte-shuffled buffers."""
    whole = len(zstandard.ZstdCompressor(level=level).compress(serialize_table(table, None)))
    shuffled = 0
    for column in table.columns:
        for leaf in _leaves(column):
            planes = np.ascontiguousarray(leaf).view(np.uint8).reshape(-1, leaf.dtype.itemsize).T.tobytes()
            shuffled += len(zstandard.ZstdCompressor(level=level).compress(planes))
    return {"whole_file": whole, "byte_shuffled_buffers": shuffled}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(demo_data_path(DEMO_BENIGN)), help="training data file (default: demo benign)")
    parser.add_argument("--limit", type=int, default=64, help="examples to use (default 64)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--safety-tokens", default=None,
                        help="safety-token file; computed on --safety-data (and saved there, if given) when it does not exist")
    parser.add_argument("--safety-data", default=str(demo_data_path(DEMO_REFUSALS)), help="refusals for computing safety tokens")
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats (the minimum of each is used)")
    parser.add_argument("--kd-top-k", type=int, default=50, help="K of the timed distillation build (default 50)")
    parser.add_argument("--zstd-level", type=int, default=DEFAULT_ZSTD_LEVEL)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(None, device=args.device)
    examples, _ = load_examples(args.data, loaded.tokenizer, max_length=args.max_length, limit=args.limit)
    if args.safety_tokens and Path(args.safety_tokens).exists():
        safety = SafetyTokens.load(args.safety_tokens)
    else:
        conversations, _ = load_conversations(args.safety_data)
        safety = compute_safety_tokens(loaded, None, conversations, progress=False, data_path=args.safety_data)
        if args.safety_tokens:
            safety.save(args.safety_tokens)
    tokens = sum(len(ex.response_ids) for ex in examples)
    plus = sum(w > 0 for w in safety.weights)
    print(f"model {loaded.source} on {next(loaded.model.parameters()).device}, {torch.get_num_threads()} thread(s); "
          f"data {args.data}: {len(examples)} examples, {tokens} response tokens, "
          f"{sum(len(ex.input_ids) for ex in examples)} tokens; |S| = {len(safety)}, |S+| = {plus}")
    results = {"examples": len(examples), "response_tokens": tokens, "safety_tokens": len(safety), "positive_weight": plus}

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "cache"
        bare_times, build_times, kd_times, teacher_times, kd_only_times = [], [], [], [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            _teacher_pass(loaded, examples, args.batch_size)
            teacher_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            build_cache(loaded, examples, None, Path(scratch) / "kd-only", batch_size=args.batch_size,
                        zstd_level=args.zstd_level, overwrite=True, progress=False, kd_top_k=args.kd_top_k)
            kd_only_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            exact = _reference_pass(loaded, examples, safety, args.batch_size)
            bare_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            build_cache(loaded, examples, safety, Path(scratch) / "kd", batch_size=args.batch_size, zstd_level=args.zstd_level,
                        overwrite=True, progress=False, kd_top_k=args.kd_top_k)
            kd_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            build_cache(loaded, examples, safety, out, batch_size=args.batch_size, zstd_level=args.zstd_level, overwrite=True, progress=False)
            build_times.append(time.perf_counter() - started)
        ratio = min(build_times) / min(bare_times)
        print(f"\nbuild {min(build_times):.2f} s vs bare reference pass {min(bare_times):.2f} s: ratio {ratio:.3f} (target <= 1.10); "
              f"all runs: build {[round(t, 2) for t in build_times]}, bare {[round(t, 2) for t in bare_times]}")
        kd_bytes = CacheReader(Path(scratch) / "kd").manifest["totals"]["bytes_per_response_token"]
        plain_bytes = CacheReader(out).manifest["totals"]["bytes_per_response_token"]
        print(f"build with --kd_top_k {args.kd_top_k} {min(kd_times):.2f} s: {min(kd_times) / min(build_times):.3f}x the build "
              f"without (target <= 1.05), {min(kd_times) / min(bare_times):.3f}x the bare pass; all runs {[round(t, 2) for t in kd_times]}; "
              f"{kd_bytes:.1f} vs {plain_bytes:.1f} bytes per response token (+{kd_bytes - plain_bytes:.1f})")
        kd_only_bytes = CacheReader(Path(scratch) / "kd-only").manifest["totals"]["bytes_per_response_token"]
        kd_only_ratio = min(kd_only_times) / min(teacher_times)
        print(f"distillation-only build (--kd_top_k {args.kd_top_k} --safety_targets false) {min(kd_only_times):.2f} s vs bare "
              f"teacher forward {min(teacher_times):.2f} s: ratio {kd_only_ratio:.3f} (target <= 1.05); all runs: build "
              f"{[round(t, 2) for t in kd_only_times]}, bare {[round(t, 2) for t in teacher_times]}; "
              f"{kd_only_bytes:.1f} bytes per response token")
        results["timing"] = {"build_s": build_times, "bare_s": bare_times, "ratio": ratio, "kd_build_s": kd_times,
                             "kd_ratio_to_build": min(kd_times) / min(build_times), "kd_top_k": args.kd_top_k,
                             "kd_bytes_added_per_response_token": kd_bytes - plain_bytes, "kd_only_build_s": kd_only_times,
                             "teacher_forward_s": teacher_times, "kd_only_ratio_to_teacher_forward": kd_only_ratio,
                             "kd_only_bytes_per_response_token": kd_only_bytes}

        reader = CacheReader(out)
        started = time.perf_counter()
        rows = sum(1 for _ in reader)
        decode = rows / (time.perf_counter() - started)
        print(f"decode: {decode:.0f} rows/s over a full pass ({decode / TRAINING_ROWS_PER_SECOND:.0f}x CPU training's ~2 rows/s)")
        results["decode_rows_per_s"] = decode

    raw = 4 * (2 * len(safety) + 2)
    print(f"\nbytes per response token (raw float32 = {raw}: logits on all |S| = {len(safety)} in both contexts + 2 scalars); "
          f"objective error vs exact (mean-KL relative / per-token relative)")
    print(f"{'layout':16s} {'file':>7s} {'steps':>7s} {'arrow-raw':>9s} {'ratio':>6s} {'meanKL err':>10s} {'token err':>10s}")
    results["layouts"] = {}
    vocab = loaded.model.config.vocab_size
    cfg = ObjectiveArguments()
    for dtype, top_k in [(dtype, top_k) for dtype in DTYPES for top_k in (None, 8)]:
        layout = Layout.create(dtype, safety.ids, safety.weights, vocab, top_k)
        table = build_table(examples, encode_reference(exact, safety, layout, cfg.temperature), layout)
        shard = ShardRows(table, layout, "bench")
        error = objective_error([shard.row(i) for i in range(len(shard))], exact, safety.id_tensor(), safety.weight_tensor(), cfg)
        sizes = {
            "file": len(serialize_table(table, args.zstd_level)),
            "steps": len(serialize_table(table.select(["steps"]), args.zstd_level)),
            "uncompressed": len(serialize_table(table, None)),
        }
        name = f"{dtype}{f' top-{top_k}' if top_k else ''}{' (default)' if dtype == DEFAULT_DTYPE and top_k is None else ''}"
        print(f"{name:16s} {sizes['file'] / tokens:7.1f} {sizes['steps'] / tokens:7.1f} {sizes['uncompressed'] / tokens:9.1f} "
              f"{raw * tokens / sizes['file']:6.1f} {error['mean_kl_relative_error']:10.2e} {error['token_relative_error']:10.2e}")
        if top_k is None:
            zs = {f"zstandard level {level}": _zstandard_sizes(table, level) for level in (args.zstd_level, 19)}
            sizes.update({f"{k} {kind}": v for k, d in zs.items() for kind, v in d.items()})
        results["layouts"][name] = {"bytes": sizes, "bytes_per_response_token": {k: v / tokens for k, v in sizes.items()},
                                   "compression_ratio": raw * tokens / sizes["file"], "objective_error": error}
    print(f"\nArrow zstd (level {args.zstd_level}, per buffer) vs the zstandard package, bytes per response token (whole shard):")
    print(f"{'layout':16s} {'arrow':>7s} {'zstd-file':>9s} {'zstd-shuf':>9s} {'file-L19':>9s} {'shuf-L19':>9s}")
    for name, entry in results["layouts"].items():
        b = entry["bytes_per_response_token"]
        if "zstandard level 19 whole_file" in b:
            print(f"{name:16s} {b['file']:7.1f} {b[f'zstandard level {args.zstd_level} whole_file']:9.1f} "
                  f"{b[f'zstandard level {args.zstd_level} byte_shuffled_buffers']:9.1f} {b['zstandard level 19 whole_file']:9.1f} "
                  f"{b['zstandard level 19 byte_shuffled_buffers']:9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
