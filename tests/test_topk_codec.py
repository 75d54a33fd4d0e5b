"""The knowledge-distillation top-K codec (`pact.cache_tools.topk_codec`): exact round trip of the ids, log-probs and
tail within the stated tolerance on synthetic and adversarial shards, the KL bound, `teacher_topk` against an
independent float64 computation, the Arrow fields, and corrupt input refused with a message."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import zstandard
from pact.cache_tools import topk_codec as tc
from pact.objective.distillation import teacher_topk
from pact.cache_tools.errors import CacheError
from pact.errors import PactError
from pyarrow import ipc

# --- independent references (float64 numpy) --------------------------------------------------------


def exact_targets(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k ids (descending, ties by id), log-probs and tail of float64 logits, computed directly."""
    x = np.asarray(logits, dtype=np.float64)
    order = np.lexsort((np.broadcast_to(np.arange(x.shape[1]), x.shape), -x), axis=1)[:, :k]
    with np.errstate(invalid="ignore", divide="ignore"):
        m = x.max(axis=1, keepdims=True)
        lse = m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))
        rest = x.copy()
        np.put_along_axis(rest, order, -np.inf, axis=1)
        rm = rest.max(axis=1, keepdims=True)
        rm_safe = np.where(np.isfinite(rm), rm, 0.0)
        tail = (rm_safe + np.log(np.exp(rest - rm_safe).sum(axis=1, keepdims=True)) - lse)[:, 0]
    return order, (np.take_along_axis(x, order, axis=1) - lse), tail


def kl_k1(lp: np.ndarray, tail: np.ndarray, lp_hat: np.ndarray, tail_hat: np.ndarray) -> np.ndarray:
    """KL(p || p_hat renormalised) over the K + 1 categories, per step (entries matched by position)."""
    p = np.concatenate([lp, tail[:, None]], axis=1).astype(np.float64)
    q = np.concatenate([lp_hat, tail_hat[:, None]], axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = q - np.log(np.exp(q).sum(axis=1, keepdims=True))
        terms = np.where(np.isneginf(p), 0.0, np.exp(p) * (p - q))
    return terms.sum(axis=1)


def lm_like_logits(n: int, vocab: int, seed: int) -> np.ndarray:
    """Logits shaped like a language model's: a frequency prior over the vocabulary plus a per-step context part, some
    steps confident, some flat."""
    rng = np.random.default_rng(seed)
    prior = -1.1 * np.log1p(np.arange(vocab))
    sharp = rng.choice([0.5, 2.0, 6.0], size=(n, 1))
    return prior + sharp * rng.standard_normal((n, vocab))


def offsets_of(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def roundtrip(ids, lp, tail, offsets, vocab):
    """Encode and decode, checking what every shard must satisfy; returns the decoded arrays (in canonical order)."""
    ids, lp, tail = np.asarray(ids), np.asarray(lp, np.float32), np.asarray(tail, np.float32)
    n, k = ids.shape
    arrays, extra = tc.encode_topk(ids, lp, tail, offsets, vocab)
    fields = tc.step_fields(k, vocab)
    assert sorted(arrays) == sorted(name for name, _, _ in fields)
    for name, kind, width in fields:
        assert name.startswith("kd_") and arrays[name].dtype == kind.to_pandas_dtype()
        assert arrays[name].shape == ((n,) if name in tc.SCALAR_FIELDS else (n, width))
    assert extra.dtype == np.uint8 and extra.ndim == 1
    d_ids, d_lp, d_tail = tc.decode_topk(arrays, extra, offsets, k, vocab)
    assert d_ids.dtype == np.int64 and d_lp.dtype == np.float32 and d_tail.dtype == np.float32
    assert d_ids.shape == d_lp.shape == (n, k) and d_tail.shape == (n,)
    # canonical order: descending log-prob, ties by ascending id
    assert (d_lp[:, 1:] <= d_lp[:, :-1]).all()
    assert ((d_lp[:, 1:] < d_lp[:, :-1]) | (d_ids[:, 1:] > d_ids[:, :-1])).all()
    # ids exact: the same set per step, each id with its own log-prob within the tolerance
    by_id, d_by_id = np.argsort(ids, axis=1), np.argsort(d_ids, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(ids, by_id, 1), np.take_along_axis(d_ids, d_by_id, 1))
    want, got = np.take_along_axis(lp, by_id, 1), np.take_along_axis(d_lp, d_by_id, 1)
    with np.errstate(invalid="ignore"):  # -inf - -inf: both zero probabilities, exact
        error = np.where(np.isneginf(want) & np.isneginf(got), 0.0, np.abs(want.astype(np.float64) - got))
        tail_error = np.where(np.isneginf(tail) & np.isneginf(d_tail), 0.0, np.abs(tail.astype(np.float64) - d_tail))
    assert (error <= tc.tolerance(got)).all(), float((error - tc.tolerance(got)).max())
    assert (tail_error <= tc.tolerance(d_tail)).all()
    # the KL over the K + 1 categories stays within the stated bound
    kl = kl_k1(want, tail, got, d_tail)
    assert (kl <= tc.kl_bound(d_lp, d_tail) + 1e-12).all()
    return {"ids": d_ids, "logprobs": d_lp, "tail": d_tail, "arrays": arrays, "extra": extra, "kl": kl}


# --- round trips ------------------------------------------------------------------------------------


def test_random_lm_like_shard_round_trips_with_small_kl():
    vocab, k = 2000, 20
    logits = lm_like_logits(600, vocab, seed=0)
    ids, lp, tail = exact_targets(logits, k)
    offsets = offsets_of([1, 7, 150, 42, 300, 100])
    kl = roundtrip(ids, lp, tail, offsets, vocab)["kl"]
    assert kl.mean() < 3e-4 and kl.max() < 1e-3, (kl.mean(), kl.max())


def test_input_order_does_not_matter_and_decoded_order_is_canonical():
    vocab, k = 500, 10
    ids, lp, tail = exact_targets(lm_like_logits(50, vocab, seed=1), k)
    shuffle = np.random.default_rng(0).permuted(np.tile(np.arange(k), (50, 1)), axis=1)
    a, _ = tc.encode_topk(ids, lp, tail, offsets_of([50]), vocab)
    b, _ = tc.encode_topk(np.take_along_axis(ids, shuffle, 1), np.take_along_axis(lp, shuffle, 1), tail, offsets_of([50]), vocab)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("case", ["all_equal", "same_set", "disjoint", "single_row", "one_step_rows", "k1", "k128",
                                  "vocab_edges", "very_negative", "big_vocab", "neg_inf", "empty"])
def test_adversarial_shards_round_trip(case):
    rng = np.random.default_rng(7)
    vocab, k, n = 1000, 16, 64
    offsets = offsets_of([16, 16, 32])
    if case == "all_equal":  # every log-prob the same: ties everywhere, decoded in id order
        ids, lp, tail = exact_targets(np.zeros((n, vocab)), k)
        np.testing.assert_array_equal(roundtrip(ids, lp, tail, offsets, vocab)["ids"], np.tile(np.arange(k), (n, 1)))
        return
    if case == "same_set":
        logits = np.full((n, vocab), -5.0)
        logits[:, 100:100 + k] = rng.standard_normal((n, k)) * 0.5
        ids, lp, tail = exact_targets(logits, k)
    elif case == "disjoint":  # no id repeats anywhere in the shard
        vocab = n * k + 5
        ids = rng.permutation(vocab)[:n * k].reshape(n, k)
        lp = np.sort(rng.uniform(-12, -3, (n, k)), axis=1)[:, ::-1]
        tail = np.log1p(-np.exp(lp).sum(axis=1))
    elif case == "single_row":
        offsets = offsets_of([n])
        ids, lp, tail = exact_targets(lm_like_logits(n, vocab, 3), k)
    elif case == "one_step_rows":
        offsets = np.arange(n + 1)
        ids, lp, tail = exact_targets(lm_like_logits(n, vocab, 4), k)
    elif case == "k1":
        ids, lp, tail = exact_targets(lm_like_logits(n, vocab, 5), 1)
    elif case == "k128":
        vocab = 5000
        ids, lp, tail = exact_targets(lm_like_logits(n, vocab, 6), 128)
    elif case == "vocab_edges":  # ids 0 and vocab - 1 in every step
        logits = lm_like_logits(n, vocab, 8)
        logits[:, [0, vocab - 1]] = 30.0
        ids, lp, tail = exact_targets(logits, k)
        assert (ids == 0).any(axis=1).all() and (ids == vocab - 1).any(axis=1).all()
    elif case == "very_negative":  # one certain token, the rest down to -1e4 and beyond float16's range
        lp = -np.sort(rng.uniform(50, 1e5, (n, k)), axis=1)
        lp[:, 0] = 0.0
        lp[:3, 1:] = [-1e4, -3e38] + [-1e4 - j for j in range(k - 3)]
        ids = np.tile(np.arange(k), (n, 1)) * 3
        tail = np.full(n, -1e4)
    elif case == "big_vocab":  # ids above 65535 need a third byte plane
        vocab = 200_003
        logits = lm_like_logits(n, 3000, 9)
        ids, lp, tail = exact_targets(logits, k)
        ids = np.where(ids % 2 == 0, vocab - 1 - ids, ids + 70_000)
        assert len(tc.step_fields(k, vocab)) == 3 + 2 + 2
    elif case == "neg_inf":  # masked logits: zero-probability entries and an empty tail are stored exactly
        logits = lm_like_logits(n, vocab, 10)
        logits[:, k - 4:] = -np.inf
        ids, lp, tail = exact_targets(logits, k)
        assert np.isneginf(lp[:, -4:]).all() and np.isneginf(tail).all()
    else:
        ids, lp, tail = np.zeros((0, k), np.int64), np.zeros((0, k)), np.zeros(0)
        offsets = np.zeros(1, np.int64)
    roundtrip(ids, lp, tail, offsets, vocab)


def test_tolerance_is_the_documented_bound():
    lp = tc._values(tc._codes(np.array([0.0, -0.01, -1.0, -4.6, -9.0, -20.0, -63.0, -70.0, -1e4, -3e38, -np.inf])))
    t = tc.tolerance(lp)
    assert t[0] < 0.002 and t[1] < 0.002 and t[-1] == 0  # about s at lp = 0
    assert 0.019 < t[3] < 0.020  # about s / sqrt(p) at p = 0.01
    assert np.all(t[4:7] < 0.1251) and np.all(t[4:7] > 0.1249)  # h/2 in the middle region
    assert np.all(t[7:10] <= 2e-3 * np.abs(lp[7:10]) + 1e-3)  # 0.2% of |lp| below -64
    # random values fall within the tolerance of their decoded values
    values = -np.exp(np.random.default_rng(0).uniform(-12, 10, 100_000))
    codes = tc._codes(values)
    decoded = tc._values(codes)
    assert (np.abs(decoded - values) <= tc.tolerance(decoded)).all()


# --- Arrow fit and size ----------------------------------------------------------------------------


def test_fields_fit_an_arrow_step_struct_and_survive_ipc_with_zstd():
    vocab, k = 49152, 50
    ids, lp, tail = exact_targets(lm_like_logits(300, 3000, 11), k)
    ids = ids * 16  # spread over the vocabulary
    offsets = offsets_of([100, 150, 50])
    arrays, extra = tc.encode_topk(ids, lp, tail, offsets, vocab)
    fields = tc.arrow_fields(k, vocab)
    columns = [pa.array(arrays[f.name]) if f.name in tc.SCALAR_FIELDS else
               pa.FixedSizeListArray.from_arrays(pa.array(arrays[f.name].reshape(-1)), k) for f in fields]
    steps = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.StructArray.from_arrays(columns, fields=fields))
    table = pa.table({"steps": steps, "kd_dictionary": pa.array([extra.tobytes()] * 3, pa.binary())})
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema, options=ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=3))) as w:
        w.write_table(table)
    back = ipc.open_file(sink.getvalue()).read_all()
    flat = back.column("steps").combine_chunks().flatten()
    read = {f.name: (flat.field(f.name).to_numpy() if f.name in tc.SCALAR_FIELDS else
                     flat.field(f.name).flatten().to_numpy().reshape(-1, k)) for f in fields}
    stored_extra = np.frombuffer(back.column("kd_dictionary")[0].as_py(), np.uint8)
    d_ids = tc.decode_topk(read, stored_extra, offsets, k, vocab)[0]
    np.testing.assert_array_equal(d_ids, tc.decode_topk(arrays, extra, offsets, k, vocab)[0])


def test_fields_are_fixed_width_and_named():
    assert tc.step_fields(50, 49152) == [("kd_gap_b0", pa.uint8(), 50), ("kd_gap_b1", pa.uint8(), 50),
                                         ("kd_height_b0", pa.uint8(), 50), ("kd_height_b1", pa.uint8(), 50),
                                         ("kd_floor", pa.uint16(), 1), ("kd_tail", pa.uint16(), 1)]
    assert [f.type for f in tc.arrow_fields(1, 200)][:3] == [pa.list_(pa.uint8(), 1)] * 3
    assert len(tc.step_fields(8, 256)) == 1 + 2 + 2 and len(tc.step_fields(8, 65537)) == 3 + 2 + 2


# --- teacher_topk -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_teacher_topk_match_a_float64_computation(dtype):
    logits = torch.from_numpy(lm_like_logits(97, 3001, 12) * 1.5).to(dtype)
    logits[0] = 0.0  # ties: ids ascending
    logits[1, 5:] = -math.inf  # fewer finite logits than k: -inf entries and an empty tail
    logits[2, :40] = 80.0  # the top-k hold nearly all the mass: the tail is tiny but exact
    k = 40
    ids, lp, tail = teacher_topk(logits, k, chunk_rows=16)
    assert ids.dtype == torch.int64 and lp.dtype == tail.dtype == torch.float32
    want_ids, want_lp, want_tail = exact_targets(logits.double().numpy(), k)
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    finite = np.isfinite(want_lp)
    assert (np.isfinite(lp.numpy()) == finite).all() and torch.isneginf(tail[1])
    np.testing.assert_allclose(lp.numpy()[finite], want_lp[finite], atol=2e-5, rtol=1e-6)
    ok = np.isfinite(want_tail)
    np.testing.assert_allclose(tail.numpy()[ok], want_tail[ok], atol=2e-5, rtol=1e-5)
    assert want_tail[2] < -60 and abs(tail[2].item() - want_tail[2]) < 1e-3  # never log(1 - sum p)
    # chunking does not change anything
    again = teacher_topk(logits, k)
    for a, b in zip((ids, lp, tail), again):
        assert torch.equal(a, b)


def test_teacher_topk_refuses_k_at_least_vocab_and_nan():
    logits = torch.randn(3, 10)
    with pytest.raises(PactError, match="kd_top_k 10 must be below the vocabulary size 10"):
        teacher_topk(logits, 10)
    with pytest.raises(PactError, match="positive integer"):
        teacher_topk(logits, 0)
    logits[1, 3] = math.nan
    with pytest.raises(PactError, match="step 1 give non-finite"):
        teacher_topk(logits, 3)
    with pytest.raises(PactError, match=r"\[N, V\]"):
        teacher_topk(torch.randn(10), 3)


# --- a real sample -----------------------------------------------------------------------------------


def _model_sample(loaded, texts, k):
    ids_all, lp_all, tail_all, lengths = [], [], [], []
    with torch.no_grad():
        for text in texts:
            tokens = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
            logits = loaded.model(tokens).logits[0, :-1].float()
            ids, lp, tail = teacher_topk(logits, k)
            ids_all.append(ids.numpy()), lp_all.append(lp.numpy()), tail_all.append(tail.numpy())
            lengths.append(len(ids))
    return np.concatenate(ids_all), np.concatenate(lp_all), np.concatenate(tail_all), offsets_of(lengths), \
        loaded.model.config.vocab_size


def test_real_sample_from_a_tiny_model_round_trips(tiny_model_dir):
    from pact.models.loading import load_model

    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    ids, lp, tail, offsets, vocab = _model_sample(loaded, ["The quick brown fox jumps over the lazy dog.",
                                                           "Hello there, how are you today?", "a"], k=8)
    assert roundtrip(ids, lp, tail, offsets, vocab)["kl"].max() < 1e-3


@pytest.mark.embedded
def test_embedded_model_top50_fits_the_budget(embedded):
    """At K = 50 on the embedded model: under 100 bytes per token (zstd level 3, dictionary included) and a mean KL
    under 1e-3 (benchmarks/bench_kd_storage.py measures the full demo data)."""
    from pact.data.chat import load_examples
    from pact.data.sources import demo_data_path

    examples, _ = load_examples(demo_data_path("refusals"), embedded.tokenizer, max_length=256, limit=6)
    ids_all, lp_all, tail_all, lengths = [], [], [], []
    with torch.no_grad():
        for ex in examples:
            logits = embedded.model(torch.tensor([ex.input_ids])).logits[0].float()
            positions = torch.tensor([p - 1 for start, end in ex.spans for p in range(start, end)])
            ids, lp, tail = teacher_topk(logits[positions], 50)
            ids_all.append(ids.numpy()), lp_all.append(lp.numpy()), tail_all.append(tail.numpy())
            lengths.append(len(positions))
    ids, lp, tail, offsets = np.concatenate(ids_all), np.concatenate(lp_all), np.concatenate(tail_all), offsets_of(lengths)
    vocab = embedded.model.config.vocab_size
    out = roundtrip(ids, lp, tail, offsets, vocab)
    zstd = zstandard.ZstdCompressor(level=3)
    size = sum(len(zstd.compress(a.tobytes())) for a in [*out["arrays"].values(), out["extra"]])
    assert size / len(ids) < 100, size / len(ids)
    assert out["kl"].mean() < 1e-3, out["kl"].mean()


# --- corrupt input ----------------------------------------------------------------------------------


def _good(n=20, k=5, vocab=300):
    ids, lp, tail = exact_targets(lm_like_logits(n, vocab, 13), k)
    return ids, lp.astype(np.float32), tail.astype(np.float32), offsets_of([5, 15]), vocab


@pytest.mark.parametrize("change, message", [
    (lambda a: a["ids"].__setitem__((3, 2), -1), r"ids, step 3: id outside the vocabulary 0\.\.299"),
    (lambda a: a["ids"].__setitem__((4, 1), 300), r"ids, step 4: id outside the vocabulary"),
    (lambda a: a["ids"].__setitem__((6, 1), a["ids"][6, 0]), r"ids, step 6: an id appears twice"),
    (lambda a: a.update(ids=a["ids"].astype(np.float64)), "ids must be integers"),
    (lambda a: a.update(ids=a["ids"][:, :, None]), r"ids must be \[steps, K\]"),
    (lambda a: a.update(lp=a["lp"][:, :4]), "shapes differ"),
    (lambda a: a.update(tail=a["tail"][:-1]), "shapes differ"),
    (lambda a: a["lp"].__setitem__((2, 0), np.nan), r"logprobs, step 2: not a log-probability"),
    (lambda a: a["lp"].__setitem__((2, 0), np.inf), r"logprobs, step 2: not a log-probability"),
    (lambda a: a["lp"].__setitem__((9, 0), 0.5), r"logprobs, step 9: not a log-probability"),
    (lambda a: a["tail"].__setitem__(7, np.nan), r"tail, step 7: not a log-probability"),
    (lambda a: a.update(lp=a["lp"] - 3.0, tail=a["tail"] - 3.0), r"logprobs, step 0: the top-K and tail probabilities sum to far from 1"),
    (lambda a: a.update(offsets=np.array([0, 5, 19])), "row_offsets must ascend from 0 to the number of steps 20"),
    (lambda a: a.update(offsets=np.array([0, 15, 5, 20])), "row_offsets must ascend"),
    (lambda a: a.update(vocab=5), r"top_k 5 must be below the vocabulary size 5"),
])
def test_encode_refuses_corrupt_input(change, message):
    ids, lp, tail, offsets, vocab = _good()
    args = {"ids": ids.copy(), "lp": lp.copy(), "tail": tail.copy(), "offsets": offsets, "vocab": vocab}
    change(args)
    with pytest.raises(CacheError, match=message):
        tc.encode_topk(args["ids"], args["lp"], args["tail"], args["offsets"], args["vocab"])


def _corrupt(arrays, extra, name, edit):
    arrays = {key: value.copy() for key, value in arrays.items()}
    if name == "extra":
        extra = edit(extra.copy())
    elif name == "drop":
        del arrays[edit]
    else:
        arrays[name] = edit(arrays[name])
    return arrays, extra


def _with_dictionary(extra, index, value):
    """`extra` re-encoded with dictionary entry `index` set to `value` (None: to entry 0's id)."""
    dictionary = tc.decode_dictionary(extra, 300)
    dictionary[index] = dictionary[0] if value is None else value
    deltas = np.diff(dictionary, prepend=0) & 0xFFFF
    return np.concatenate([(deltas & 255).astype(np.uint8), (deltas >> 8).astype(np.uint8)])


def _set(index, value):
    def edit(a):
        a[index] = value
        return a
    return edit


@pytest.mark.parametrize("name, edit, message", [
    ("drop", "kd_height_b1", "field kd_height_b1 is missing"),
    ("kd_gap_b0", lambda a: a[:, :3], r"kd_gap_b0 has shape \(20, 3\), expected \(20, 5\)"),
    ("kd_gap_b1", _set((11, 4), 200), r"kd_gap, step 11: rank outside the shard's dictionary"),
    ("kd_height_b1", _set((12, 0), 250), r"kd_height, step 12: code outside the grid"),
    ("kd_height_b0", lambda a: a + 1, r"kd_height, step 0: .*no entry at the step's floor"),
    ("kd_tail", _set(3, 65000), r"kd_tail, step 3: code outside the grid"),
    ("kd_floor", lambda a: a.astype(np.float32), "kd_floor must hold integers"),
    ("kd_gap_b0", lambda a: np.where(np.arange(a.shape[1]) == 0, -1, a.astype(np.int64)), r"kd_gap_b0, step 0: value outside 0\.\.255"),
    ("extra", lambda e: e[:-1], "shard_extra must be a 1-D uint8 array of a multiple of 2 bytes"),
    ("extra", lambda e: e.astype(np.int32), "shard_extra must be a 1-D uint8 array"),
    ("extra", lambda e: _with_dictionary(e, -1, 300), r"shard_extra, dictionary entry \d+: id outside the vocabulary"),
    ("extra", lambda e: _with_dictionary(e, 1, None), "the dictionary names an id twice"),
])
def test_decode_refuses_corrupt_input(name, edit, message):
    ids, lp, tail, offsets, vocab = _good()
    arrays, extra = tc.encode_topk(ids, lp, tail, offsets, vocab)
    arrays, extra = _corrupt(arrays, extra, name, edit)
    with pytest.raises(CacheError, match=message):
        tc.decode_topk(arrays, extra, offsets, 5, vocab)


def test_decode_refuses_offsets_and_sizes_that_do_not_match():
    ids, lp, tail, offsets, vocab = _good()
    arrays, extra = tc.encode_topk(ids, lp, tail, offsets, vocab)
    with pytest.raises(CacheError, match="row_offsets must ascend from 0 to the number of steps 20"):
        tc.decode_topk(arrays, extra, [0, 10], 5, vocab)
    with pytest.raises(CacheError, match=r"kd_gap_b0 has shape \(20, 5\), expected \(20, 6\)"):
        tc.decode_topk(arrays, extra, offsets, 6, vocab)
    with pytest.raises(CacheError, match="top_k must be a positive integer"):
        tc.decode_topk(arrays, extra, offsets, 0, vocab)
    flat = {key: value.reshape(-1) for key, value in arrays.items()}  # flattened list fields are accepted
    np.testing.assert_array_equal(tc.decode_topk(flat, extra, offsets, 5, vocab)[0], tc.decode_topk(arrays, extra, offsets, 5, vocab)[0])
