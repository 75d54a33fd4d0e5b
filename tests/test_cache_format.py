"""Cache format units without a model: value codecs, the Arrow row schema and
the invariant checks of a shard load."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pact.cache_tools import CacheError, Layout
from pact.cache_tools import codec
from pact.cache_tools.layout import select_columns
from pact.cache_tools.schema import ShardRows, StepValues, arrow_schema, build_table, encode_steps
from pact.data.chat import EncodedExample

IDS = [3, 7, 11, 20, 31]
WEIGHTS = [0.5, 0.0, 1.0, 0.25, 0.0]  # S+ = 3, 11, 20
VOCAB = 40


def _values(n: int, layout: Layout, seed: int = 0) -> StepValues:
    rng = np.random.default_rng(seed)
    width = layout.width
    full = (rng.standard_normal((n, width)) * 4).astype(np.float32)
    # Spread wide enough that some of them fall more than codec.LOGPROB_FLOOR below the logsumexp.
    other = (rng.standard_normal((n, len(layout.other_positions))) * 8).astype(np.float32)
    return StepValues(
        full_logits=full,
        post_logits=(rng.standard_normal((n, width)) * 4).astype(np.float32),
        post_count=rng.integers(1, layout.num_safety + 1, n),
        target_logprob=-rng.random(n).astype(np.float32) * 5,
        # A vocabulary's logsumexp is above every logit in it.
        logsumexp=(np.concatenate([full, other], axis=1).max(axis=1, initial=0.0) + rng.random(n) * 3).astype(np.float32),
        index=np.sort(np.stack([rng.choice(len(layout.stored_ids), layout.top_k, replace=False) for _ in range(n)]), axis=1)
        if layout.top_k else None,
        other_logits=other if layout.stores_reference else None,
        rest_logprob=-rng.random(n).astype(np.float32) * 3 if layout.stores_reference else None,
    )


def _shard(layout: Layout, examples: list[EncodedExample], seed: int = 0) -> tuple[pa.Table, list[StepValues]]:
    values = [_values(len(ex.response_ids), layout, seed + i) for i, ex in enumerate(examples)]
    return build_table(examples, [encode_steps(v, layout) for v in values], layout), values


EXAMPLES = [EncodedExample(10, [1, 2, 3, 4, 5], 3), EncodedExample(11, [1, 9, 9, 9], 1), EncodedExample(12, [5, 6], 1)]


@pytest.mark.parametrize("dtype", codec.DTYPES)
def test_codec_round_trip_within_tolerance(dtype):
    x = (np.random.default_rng(0).standard_normal((64, 9)) * 6 + 3).astype(np.float32)
    x[5] = 2.5  # a constant row
    parts = codec.encode(x, dtype)
    decoded = codec.decode(parts, dtype)
    bound = codec.tolerance(parts, dtype)
    assert decoded.dtype == np.float32
    assert np.all(np.abs(decoded - x) <= bound + 1e-7)
    if dtype == "float32":
        assert np.array_equal(decoded, x)


def test_bfloat16_rounds_like_torch():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)[None] * 100
    ours = codec.decode(codec.encode(x, "bfloat16"), "bfloat16")
    assert np.array_equal(ours, torch.from_numpy(x).bfloat16().float().numpy())


def test_layout_stores_positive_weights_and_drops_useless_top_k():
    layout = Layout.create("int8", IDS, WEIGHTS, VOCAB, top_k=None)
    assert layout.stored_ids == (3, 11, 20) and layout.width == 3 and layout.num_safety == 5
    assert layout.other_positions == (1, 4) and layout.stores_reference  # the zero-weight tokens, for the reference KL
    assert not Layout.create("int8", IDS, WEIGHTS, VOCAB, top_k=2).stores_reference
    assert Layout.create("int8", IDS, WEIGHTS, VOCAB, top_k=3).top_k is None  # K >= |S+| is exact
    assert Layout.create("int8", IDS, WEIGHTS, VOCAB, top_k=2).width == 2
    assert layout.raw_float32_bytes_per_token == 4 * (2 * 5 + 2)


def test_select_columns_keeps_the_largest_weighted_targets():
    layout = Layout.create("float32", IDS, WEIGHTS, VOCAB, top_k=2)
    full = torch.tensor([[0.0, 9.0, 0.0, 3.0, 9.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    post = full + 100
    kept_full, kept_post, index = select_columns(full, post, WEIGHTS, layout, temperature=2.0)
    # scores log w + f / T over S+ = ids 3, 11, 20 (weights .5, 1, .25); zero-weight columns never count
    # row 0: -0.69, 0.0, 0.11 -> ids 11 and 20; row 1: 1.81, 0.0, -1.39 -> ids 3 and 11
    assert index.tolist() == [[1, 2], [0, 1]]
    assert torch.equal(kept_post, kept_full + 100)


@pytest.mark.parametrize("dtype,top_k", [("float32", None), ("int8", None), ("float16", 2), ("bfloat16", None)])
def test_table_round_trip(dtype, top_k):
    layout = Layout.create(dtype, IDS, WEIGHTS, VOCAB, top_k)
    table, values = _shard(layout, EXAMPLES)
    assert table.schema.equals(arrow_schema(layout))
    shard = ShardRows(table, layout, "shard-x.arrow")
    assert len(shard) == 3 and shard.response_tokens == 2 + 3 + 1
    for i, (example, expected) in enumerate(zip(EXAMPLES, values)):
        row = shard.row(i)
        assert row["example_id"] == example.example_id and row["response_start"] == example.response_start
        assert row["input_ids"].dtype == torch.int64 and row["input_ids"].tolist() == example.input_ids
        n = len(example.response_ids)
        for name in ("full_logits", "post_logits"):
            assert row[name].shape == (n, layout.width) and row[name].dtype == torch.float32
            bound = shard.storage_tolerance(name, shard.step_range(i))
            assert np.all(np.abs(row[name].numpy() - getattr(expected, name)) <= bound + 1e-6)
        assert row["post_count"].tolist() == expected.post_count.tolist()
        assert np.allclose(row["logsumexp"].numpy(), expected.logsumexp, rtol=1e-3)
        stored = torch.tensor(layout.stored_ids)
        assert torch.equal(row["safety_ids"], stored if top_k is None else stored[torch.from_numpy(expected.index)])
        assert ("reference_logits" in row) == ("rest_logprob" in row) == (top_k is None) == layout.stores_reference
        if layout.stores_reference:
            reference = row["reference_logits"].numpy()
            assert reference.shape == (n, len(IDS))
            assert np.array_equal(reference[:, list(layout.stored_positions)], row["full_logits"].numpy())
            bound = shard.storage_tolerance("other_logits", shard.step_range(i))
            other = codec.floor_logprob(expected.other_logits, row["logsumexp"].numpy()) if layout.other_as_logprob else expected.other_logits
            assert np.all(np.abs(reference[:, list(layout.other_positions)] - other) <= bound + 1e-6)
            assert np.allclose(row["rest_logprob"].numpy(), expected.rest_logprob, rtol=1e-3, atol=1e-6)


def _replace_step_field(table: pa.Table, field: str, change) -> pa.Table:
    """A copy of `table` whose steps.<field> values are passed through `change` (numpy in, numpy out)."""
    steps = table.column("steps").combine_chunks()
    struct = steps.flatten()
    arrays = []
    for f, child in zip(struct.type, struct.flatten()):
        if f.name == field:
            if pa.types.is_fixed_size_list(f.type):
                child = pa.FixedSizeListArray.from_arrays(pa.array(change(child.flatten().to_numpy().copy()), f.type.value_type), f.type.list_size)
            else:
                child = pa.array(change(child.to_numpy().copy()), f.type)
        arrays.append(child)
    new = pa.ListArray.from_arrays(steps.offsets, pa.StructArray.from_arrays(arrays, fields=list(struct.type)))
    return table.set_column(table.schema.get_field_index("steps"), table.schema.field("steps"), new)


def _set(array, index, value):
    array[index] = value
    return array


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.set_column(2, "response_start", pa.array([3, 4, 1], pa.int32())), "row 1 (example_id 11): response_start"),
    (lambda t: t.set_column(1, "input_ids", pa.array([[1, 2, 3, 4, 5], [1, 9, 99, 9], [5, 6]], pa.list_(pa.uint16()))),
     "row 1 (example_id 11), token 2: id outside the vocabulary"),
    (lambda t: _replace_step_field(t, "full_logits", lambda a: _set(a, 7, np.nan)), "row 1 (example_id 11), response step 0: full_logits holds a non-finite"),
    (lambda t: _replace_step_field(t, "post_count", lambda a: _set(a, 5, 0)), "row 2 (example_id 12), response step 0: post_count outside 1..5"),
    (lambda t: t.set_column(0, "example_id", pa.array([10, 11, 10], pa.int64())), "example_id appears more than once"),
])
def test_invariant_errors_name_shard_and_row(mutate, message):
    layout = Layout.create("float32", IDS, WEIGHTS, VOCAB, None)
    table, _ = _shard(layout, EXAMPLES)
    with pytest.raises(CacheError, match="shard-00007.arrow: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        ShardRows(mutate(table), layout, "shard-00007.arrow")


def test_schema_mismatch_is_named():
    table, _ = _shard(Layout.create("float32", IDS, WEIGHTS, VOCAB, None), EXAMPLES)
    with pytest.raises(CacheError, match="shard-1.arrow: schema differs"):
        ShardRows(table, Layout.create("int8", IDS, WEIGHTS, VOCAB, None), "shard-1.arrow")


def test_int8_grid_is_finest_at_the_row_maximum():
    x = np.array([[-30.0, -3.3, 9.99, 10.001]], np.float32)
    parts = codec.encode(x, "int8")
    assert parts["max"][0] >= np.float16(10.001) and parts["max"][0] - parts["range"][0] <= -30.0  # rounded outwards
    bound = codec.tolerance(parts, "int8")[0]
    assert bound[3] < bound[0] / 20
    assert abs(codec.decode(parts, "int8")[0, 3] - 10.001) <= bound[3]


def test_logprob_codes_round_trip_and_floor():
    """Format 4's other logits: within the stated tolerance of the logits above the floor, at the floor below it, with
    a probability error under exp(-LOGPROB_FLOOR) there and under the grid's relative error above it."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((400, 37)) * 12).astype(np.float32)
    logsumexp = np.logaddexp.reduce(logits, axis=1) + rng.random(400).astype(np.float32) * 5  # the rest of a vocabulary
    stored_lse = codec.to_float16(logsumexp)
    codes = codec.encode_logprob(logits, stored_lse)
    decoded = codec.decode_logprob(codes, stored_lse)
    floored = codec.floor_logprob(logits, stored_lse.astype(np.float32))
    assert (floored > logits).mean() > 0.1 and (codes == codec.INT8_LEVELS).any()
    assert np.all(np.abs(decoded - floored) <= codec.logprob_tolerance(codes, stored_lse))
    prob_error = np.abs(np.exp(decoded - logsumexp[:, None]) - np.exp(logits - logsumexp[:, None]))
    assert prob_error[floored > logits].max() <= np.exp(-codec.LOGPROB_FLOOR) * 1.05  # the float16 logsumexp: a few percent
    assert prob_error.max() < 0.02
