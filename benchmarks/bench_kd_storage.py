"""Storage of knowledge-distillation top-K targets (`pact.cache_tools.topk_codec`) on real teacher outputs.

Runs the teacher (default: the embedded SmolLM2-135M-Instruct) over the response tokens of the data (default: both
demo sets), takes the exact top-K log-probs and tail with `teacher_topk`, and prints per K:

* bytes per response token of the KD fields alone, zstd level 3 per buffer as Arrow IPC writes them (the per-shard
  dictionary included, amortised over the shard's tokens; shards of `--rows-per-shard` rows as the cache builds
  them), with the same size measured as the body of a real Arrow IPC file as a cross-check; beside it the naive
  layout (uint32 ids + float16 log-probs + float16 tail, zstd level 3);
* the error: KL(p_exact || p_decoded renormalised) over the K + 1 categories (mean, max), the largest `kl_bound`,
  and the mean absolute change of a forward-KL loss sum_c p_c (log p_c - log q_c) against a fixed student q (the
  teacher's logits plus Gaussian noise of `--student-noise`), decoded values used as decoded (not renormalised);
* encode / decode time per 1000 steps, `teacher_topk` time and the bare teacher forward per 1000 response steps.

`--designs` adds the layouts tried on the way (at K = `--design-k`) and the quantisation grids.

    python benchmarks/bench_kd_storage.py
    python benchmarks/bench_kd_storage.py --data ../shared/data/refusals.jsonl --limit 400 --designs
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import torch
import zstandard
from pact.cache_tools import topk_codec as tc
from pact.objective.distillation import teacher_topk
from pyarrow import ipc

from pact.data.chat import load_examples
from pact.data.sources import DEMO_BENIGN, DEMO_REFUSALS, demo_data_path
from pact.models.loading import load_model

ZSTD_LEVEL = 3
_ZSTD = zstandard.ZstdCompressor(level=ZSTD_LEVEL)


def zbytes(*arrays: np.ndarray) -> int:
    """zstd level-3 size of each array's buffer, summed (what Arrow IPC's zstd writes per buffer, less its 8-byte headers)."""
    return sum(len(_ZSTD.compress(np.ascontiguousarray(a).tobytes())) for a in arrays)


def ipc_body_bytes(arrays: dict[str, np.ndarray], extra: np.ndarray, k: int, vocab: int) -> int:
    """Bytes the KD fields and the dictionary add to an Arrow IPC file written with zstd level 3."""
    fields = tc.arrow_fields(k, vocab)
    columns = [pa.array(arrays[f.name]) if f.name in tc.SCALAR_FIELDS else
               pa.FixedSizeListArray.from_arrays(pa.array(arrays[f.name].reshape(-1)), k) for f in fields]
    steps = pa.StructArray.from_arrays(columns, fields=fields)
    options = ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=ZSTD_LEVEL))

    def size(table: pa.Table) -> int:
        sink = pa.BufferOutputStream()
        with ipc.new_file(sink, table.schema, options=options) as writer:
            writer.write_table(table)
        return sink.getvalue().size

    table = pa.table({"steps": steps})
    extra_table = pa.table({"kd_dictionary": pa.array(extra)})
    return size(table) - size(table.slice(0, 0)) + size(extra_table) - size(extra_table.slice(0, 0))


# --- collecting teacher targets ----------------------------------------------------------------------


def collect(loaded, examples, ks, noise: float, seed: int):
    """Per K: exact ids/log-probs/tail and the student's log q on the K + 1 categories; with timings."""
    gen = torch.Generator().manual_seed(seed)
    out = {k: {"ids": [], "lp": [], "tail": [], "q": [], "q_tail": []} for k in ks}
    lengths, forward_s, topk_s = [], 0.0, {k: 0.0 for k in ks}
    with torch.no_grad():
        for ex in examples:
            tokens = torch.tensor([ex.input_ids])
            start = time.perf_counter()
            logits = loaded.model(tokens).logits[0].float()
            forward_s += time.perf_counter() - start
            positions = torch.tensor([p - 1 for a, b in ex.spans for p in range(a, b)])
            teacher = logits[positions]
            student = teacher + noise * torch.randn(teacher.shape, generator=gen)
            student_lse = torch.logsumexp(student.double(), dim=1)
            lengths.append(len(positions))
            for k in ks:
                start = time.perf_counter()
                ids, lp, tail = teacher_topk(teacher, k)
                topk_s[k] += time.perf_counter() - start
                q = student.double().gather(1, ids) - student_lse[:, None]
                outside = student.double().scatter(1, ids, -torch.inf)
                q_tail = torch.logsumexp(outside, dim=1) - student_lse
                for name, value in (("ids", ids), ("lp", lp), ("tail", tail), ("q", q), ("q_tail", q_tail)):
                    out[k][name].append(value.numpy())
    data = {k: {name: np.concatenate(parts) for name, parts in v.items()} for k, v in out.items()}
    return data, np.asarray(lengths), forward_s, topk_s


# --- measures ---------------------------------------------------------------------------------------


def by_id(ids: np.ndarray, *values: np.ndarray) -> list[np.ndarray]:
    """Entries of each step sorted by id (so two orderings of the same set line up)."""
    order = np.argsort(ids, axis=1)
    return [np.take_along_axis(a, order, axis=1) for a in (ids, *values)]


def errors(lp, tail, lp_hat, tail_hat, q, q_tail) -> dict[str, np.ndarray]:
    """Per step: KL(p || p_hat renormalised) over K + 1 categories and the forward-KL loss change against q."""
    p = np.concatenate([lp, tail[:, None]], axis=1).astype(np.float64)
    h = np.concatenate([lp_hat, tail_hat[:, None]], axis=1).astype(np.float64)
    s = np.concatenate([q, q_tail[:, None]], axis=1)
    with np.errstate(invalid="ignore", divide="ignore", under="ignore"):
        h_norm = h - np.log(np.exp(h).sum(axis=1, keepdims=True))
        kl = np.where(np.isneginf(p), 0.0, np.exp(p) * (p - h_norm)).sum(axis=1)
        loss = np.where(np.isneginf(p), 0.0, np.exp(p) * (p - s)).sum(axis=1)
        loss_hat = np.where(np.isneginf(h), 0.0, np.exp(h) * (h - s)).sum(axis=1)
    return {"kl": kl, "loss": loss, "dloss": np.abs(loss_hat - loss), "bias": loss_hat - loss}


def shards(lengths: np.ndarray, rows_per_shard: int):
    """(step slice, row offsets from 0) of each shard."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for first in range(0, len(lengths), rows_per_shard):
        rows = offsets[first:first + rows_per_shard + 1]
        yield slice(int(rows[0]), int(rows[-1])), rows - rows[0]


def measure(d: dict, lengths: np.ndarray, k: int, vocab: int, rows_per_shard: int) -> dict:
    n = len(d["ids"])
    encode_s = decode_s = 0.0
    size = ipc_size = naive = 0
    decoded = []
    for steps, offsets in shards(lengths, rows_per_shard):
        ids, lp, tail = d["ids"][steps], d["lp"][steps], d["tail"][steps]
        start = time.perf_counter()
        arrays, extra = tc.encode_topk(ids, lp, tail, offsets, vocab)
        encode_s += time.perf_counter() - start
        start = time.perf_counter()
        decoded.append(tc.decode_topk(arrays, extra, offsets, k, vocab))
        decode_s += time.perf_counter() - start
        size += zbytes(*arrays.values(), extra)
        ipc_size += ipc_body_bytes(arrays, extra, k, vocab)
        naive += zbytes(ids.astype(np.uint32), lp.astype(np.float16), tail.astype(np.float16))
    d_ids, d_lp, d_tail = (np.concatenate(parts) for parts in zip(*decoded))
    ids, lp, q = by_id(d["ids"], d["lp"], d["q"])
    got_ids, got_lp = by_id(d_ids, d_lp)
    assert np.array_equal(ids, got_ids), "ids did not round-trip"
    assert (np.abs(lp.astype(np.float64) - got_lp) <= tc.tolerance(got_lp)).all(), "a log-prob beyond its tolerance"
    assert (np.abs(d["tail"].astype(np.float64) - d_tail) <= tc.tolerance(d_tail)).all(), "a tail beyond its tolerance"
    err = errors(lp, d["tail"], got_lp, d_tail, q, d["q_tail"])
    naive_err = errors(lp, d["tail"], lp.astype(np.float16).astype(np.float32),
                       d["tail"].astype(np.float16).astype(np.float32), q, d["q_tail"])
    return {"k": k, "n": n, "bytes": size / n, "ipc": ipc_size / n, "naive": naive / n, "kl_mean": err["kl"].mean(),
            "kl_max": err["kl"].max(), "bound_max": tc.kl_bound(d_lp, d_tail).max(), "dloss": err["dloss"].mean(),
            "bias": err["bias"].mean(), "loss": err["loss"].mean(), "naive_kl": naive_err["kl"].mean(),
            "naive_dloss": naive_err["dloss"].mean(), "encode_ms": encode_s / n * 1e6,
            "decode_ms": decode_s / n * 1e6}


# --- designs tried ----------------------------------------------------------------------------------


def dictionary_ranks(ids: np.ndarray, vocab: int, exact_frequency: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ranks [n, K], dictionary) with ranks by frequency (exact, or classes floor(log2 count) as the codec does)."""
    counts = np.bincount(ids.reshape(-1), minlength=vocab)
    present = np.flatnonzero(counts)
    key = -counts[present] if exact_frequency else -np.log2(counts[present]).astype(np.int64)
    dictionary = present[np.lexsort((present, key))]
    rank_of = np.zeros(vocab, np.int64)
    rank_of[dictionary] = np.arange(len(dictionary))
    return rank_of[ids], dictionary


def design_bytes(d: dict, vocab: int) -> list[tuple[str, float]]:
    """Bytes per token of alternative layouts (same quantised codes unless float16; zstd level 3 per buffer)."""
    ids, lp, tail = d["ids"].astype(np.int64), d["lp"], d["tail"]
    n, planes = len(ids), tc._planes
    codes, tail_code = tc._codes(lp), tc._codes(tail).astype(np.uint16)
    nb = tc._id_bytes(vocab)
    rows = []
    rows.append(("log-prob order: uint32 ids + float16 log-probs + float16 tail (naive)",
                 zbytes(ids.astype(np.uint32), lp.astype(np.float16), tail.astype(np.float16))))
    rows.append(("log-prob order: id byte planes + float16 log-probs + float16 tail",
                 zbytes(*planes(ids, nb), lp.astype(np.float16), tail.astype(np.float16))))
    deltas = np.diff(codes, axis=1, prepend=0)
    rows.append(("log-prob order: id byte planes + code deltas",
                 zbytes(*planes(ids, nb), *planes(deltas, 2), tail_code)))
    ranks, dictionary = dictionary_ranks(ids, vocab, exact_frequency=True)
    rows.append(("log-prob order: dictionary ranks + code deltas (+ dictionary)",
                 zbytes(*planes(ranks, nb), *planes(deltas, 2), tail_code, *planes(dictionary, nb))))

    def as_set(keys: np.ndarray):
        packed = np.sort((keys << 16) | codes, axis=1)
        gaps = np.diff(packed >> 16, axis=1, prepend=-1) - 1
        set_codes = packed & 0xFFFF
        floor = set_codes.max(axis=1)
        return gaps, set_codes, floor[:, None] - set_codes, floor.astype(np.uint16)

    gaps, set_codes, heights, floor = as_set(ids)
    rows.append(("id-sorted set: id gaps + heights above the floor (no dictionary)",
                 zbytes(*planes(gaps, nb), *planes(heights, 2), floor, tail_code)))
    gaps, set_codes, heights, floor = as_set(ranks)
    exact_dictionary = zbytes(*planes(dictionary, nb))
    rows.append(("rank-sorted set (exact frequency): rank gaps + codes", zbytes(*planes(gaps, nb), *planes(set_codes, 2),
                                                                              tail_code) + exact_dictionary))
    rows.append(("rank-sorted set (exact frequency): rank gaps + heights", zbytes(*planes(gaps, nb), *planes(heights, 2),
                                                                                floor, tail_code) + exact_dictionary))
    arrays, extra = tc.encode_topk(ids, lp, tail, [0, n], vocab)
    rows.append(("rank-sorted set (frequency classes): rank gaps + heights = topk_codec", zbytes(*arrays.values(), extra)))
    return [(name, size / n) for name, size in rows]


def grid_sweep(d: dict, vocab: int) -> list[tuple[float, float, float, float, float, float]]:
    """(s, h, bytes/token, mean KL, max KL, mean abs loss change) of the codec's layout with other quantisation grids."""
    saved, rows = tc._GRID, []
    n = len(d["ids"])
    try:
        for s, h in ((1 / 1024, 1 / 8), (1 / 512, 1 / 8), (1 / 512, 1 / 4), (1 / 256, 1 / 8), (1 / 256, 1 / 4),
                     (1 / 128, 1 / 8), (1 / 128, 1 / 4), (1 / 64, 1 / 4)):
            tc._GRID = tc._Grid(s, h, 64.0)
            arrays, extra = tc.encode_topk(d["ids"], d["lp"], d["tail"], [0, n], vocab)
            d_ids, d_lp, d_tail = tc.decode_topk(arrays, extra, [0, n], d["ids"].shape[1], vocab)
            _, lp, q = by_id(d["ids"], d["lp"], d["q"])
            _, got = by_id(d_ids, d_lp)
            err = errors(lp, d["tail"], got, d_tail, q, d["q_tail"])
            rows.append((s, h, zbytes(*arrays.values(), extra) / n, err["kl"].mean(), err["kl"].max(), err["dloss"].mean()))
    finally:
        tc._GRID = saved
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="teacher (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", action="append", help="JSONL (or any source pact reads); repeatable; default: both demo sets")
    parser.add_argument("--limit", type=int, default=None, help="rows per data source")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--top-k", type=int, nargs="+", default=[8, 20, 50, 128])
    parser.add_argument("--rows-per-shard", type=int, default=1024, help="rows per shard (the cache's default)")
    parser.add_argument("--student-noise", type=float, default=1.0, help="std of the noise added to the teacher's logits for the student")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--designs", action="store_true", help="also print the layouts and grids tried")
    parser.add_argument("--design-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device="cpu", dtype="float32")
    sources = args.data or [str(demo_data_path(DEMO_BENIGN)), str(demo_data_path(DEMO_REFUSALS))]
    examples = []
    for source in sources:
        examples += load_examples(source, loaded.tokenizer, max_length=args.max_length, limit=args.limit)[0]
    vocab = loaded.model.config.vocab_size
    ks = sorted(set(args.top_k) | ({args.design_k} if args.designs else set()))
    data, lengths, forward_s, topk_s = collect(loaded, examples, ks, args.student_noise, args.seed)
    n = int(lengths.sum())
    shard_count = -(-len(lengths) // args.rows_per_shard)
    print(f"{len(examples)} rows, {n} response tokens, vocabulary {vocab}, {shard_count} shard(s) of up to "
          f"{args.rows_per_shard} rows; student = teacher logits + N(0, {args.student_noise}^2) noise")
    print(f"bare teacher forward (CPU, {args.threads} thread(s), whole sequences): {forward_s / n * 1e6:.0f} ms per 1000 response steps\n")

    header = ("| K | B/token | (Arrow IPC body) | naive B/token | ratio | KL mean | KL max | kl_bound max | "
              "loss change: mean abs, mean (loss mean) | naive: KL mean, loss change | encode ms/1k | decode ms/1k | teacher_topk ms/1k |")
    print(header)
    print("|" + " ---: |" * (header.count("|") - 1))
    results = {}
    first = data[args.top_k[0]]  # one untimed encode/decode first, so no K pays the first call's setup
    tc.decode_topk(*tc.encode_topk(first["ids"], first["lp"], first["tail"], [0, n], vocab), [0, n], args.top_k[0], vocab)
    for k in args.top_k:
        r = measure(data[k], lengths, k, vocab, args.rows_per_shard)
        results[k] = r
        print(f"| {k} | {r['bytes']:.1f} | {r['ipc']:.1f} | {r['naive']:.1f} | {r['bytes'] / r['naive']:.2f} | "
              f"{r['kl_mean']:.1e} | {r['kl_max']:.1e} | {r['bound_max']:.1e} | {r['dloss']:.1e}, {r['bias']:+.0e} ({r['loss']:.2f}) | "
              f"{r['naive_kl']:.1e}, {r['naive_dloss']:.1e} | {r['encode_ms']:.2f} | {r['decode_ms']:.2f} | {topk_s[k] / n * 1e6:.0f} |")
    if 50 in results:
        print(f"\nK=50: encode {results[50]['encode_ms']:.2f} ms per 1000 steps = "
              f"{results[50]['encode_ms'] / (forward_s / n * 1e6) * 100:.3f}% of the bare forward here")

    if args.designs:
        d = data[args.design_k]
        print(f"\nLayouts tried at K = {args.design_k} (all {n} steps as one shard, dictionary included where used):\n")
        print("| layout | B/token |\n| --- | ---: |")
        for name, size in design_bytes(d, vocab):
            print(f"| {name} | {size:.1f} |")
        print(f"\nQuantisation grids (sqrt-p step s above sqrt(p) = 2s/h, log step h below) at K = {args.design_k}:\n")
        print("| s | h | B/token | KL mean | KL max | mean abs loss change |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
        for s, h, size, kl_mean, kl_max, dloss in grid_sweep(d, vocab):
            chosen = " (chosen)" if (s, h) == (tc._GRID.s, tc._GRID.h) else ""
            print(f"| 1/{round(1 / s)} | 1/{round(1 / h)}{chosen} | {size:.1f} | {kl_mean:.1e} | {kl_max:.1e} | {dloss:.1e} |")


if __name__ == "__main__":
    main()
