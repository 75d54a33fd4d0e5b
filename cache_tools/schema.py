"""The Arrow schema of a cache shard and the conversion between reference
values and shard tables, both ways, with the invariant checks of a load.

One Arrow row per example: `example_id`, `input_ids`, `response_start`,
`response_spans` (format version 2: the (start, end) token range of each
response, one per assistant turn trained on; version 1 has no such column and
its one response runs from `response_start` to the end) and `steps`, a `list<struct<...>>` with one struct per response step whose fields
are the stored values (the logit fields are `fixed_size_list`s of the stored
columns). One list column keeps a single offsets buffer per row, and each
struct field is still its own contiguous buffer, so it compresses as well
as separate columns. Encoding works on whole batches and decoding on whole
shards with numpy, so no Python loop runs per element; a row is sliced out
of the decoded shard on demand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

import zstandard

from pact.cache_tools import codec, topk_codec
from pact.cache_tools.errors import CacheError
from pact.cache_tools.layout import FORMAT_VERSION, Layout
from pact.cache_tools.writer import SCHEMA_VERSION_KEY
from pact.data.chat import EncodedExample

LOGIT_COLUMNS = ("full_logits", "post_logits")
OTHER_COLUMN = "other_logits"  # format 3: the full-context logits on the zero-weight safety tokens (format 4, int8: their log-probability codes)
MATRIX_COLUMNS = (*LOGIT_COLUMNS, OTHER_COLUMN, "safety_index")  # fixed_size_list fields: [n_resp, width] per row
# A distillation layout's teacher top-K, as `encode_steps` passes them on to `build_table`, which encodes a shard's at once.
RAW_KD = ("raw_kd_ids", "raw_kd_logprobs", "raw_kd_tail")
KD_DICTIONARY_KEY = b"pact_kd_dictionary"  # shard schema metadata: the zstd-compressed per-shard id dictionary of topk_codec


def is_matrix(name: str) -> bool:
    """Whether step field `name` holds a fixed-size list per step (else one value)."""
    return name in MATRIX_COLUMNS or (name.startswith(topk_codec.PREFIX) and name not in topk_codec.SCALAR_FIELDS)


def logit_columns(layout: Layout) -> tuple[str, ...]:
    """The logit fields a shard of `layout` stores in its logit dtype (each with the codec's side parts); none in a
    distillation-only layout."""
    if not layout.stores_safety:
        return ()
    return (*LOGIT_COLUMNS, OTHER_COLUMN) if layout.stores_reference and not layout.other_as_logprob else LOGIT_COLUMNS


@dataclass
class StepValues:
    """Reference values to store for a run of response steps (one row per step).

    target_logprob, logsumexp: [n]; full_logits/post_logits: [n, width]
    float32 on the stored columns and post_count [n] (None in a
    distillation-only layout); index: [n, K] positions in S+ of the kept
    columns (top-k layouts) or None; other_logits [n, |S| - |S+|] and
    rest_logprob [n] where the layout stores the reference (else None);
    kd_ids [n, K], kd_logprobs [n, K], kd_tail [n]: a distillation layout's
    teacher top-K (else None).
    """

    target_logprob: np.ndarray
    logsumexp: np.ndarray
    full_logits: np.ndarray | None = None
    post_logits: np.ndarray | None = None
    post_count: np.ndarray | None = None
    index: np.ndarray | None = None
    other_logits: np.ndarray | None = None
    rest_logprob: np.ndarray | None = None
    kd_ids: np.ndarray | None = None
    kd_logprobs: np.ndarray | None = None
    kd_tail: np.ndarray | None = None


def step_columns(layout: Layout) -> list[tuple[str, pa.DataType, int]]:
    """The fields of a step in `layout` as (name, Arrow value type, values per step)."""
    logit_type = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16(), "int8": pa.uint8()}[layout.dtype]
    extras = pa.from_numpy_dtype(np.dtype(codec.extras_dtype(layout.dtype)))
    columns = [("post_count", layout.count_type, 1)] if layout.stores_safety else []
    for name in logit_columns(layout):
        columns.append((name, logit_type, len(layout.other_positions) if name == OTHER_COLUMN else layout.width))
        columns += [(f"{name}_{part}", pa.float16(), 1) for part in codec.side_parts(layout.dtype)]
    if layout.other_as_logprob:
        columns.append((OTHER_COLUMN, pa.uint8(), len(layout.other_positions)))
    columns += [("target_logprob", extras, 1), ("logsumexp", extras, 1)]
    if layout.stores_reference:
        columns.append(("rest_logprob", extras, 1))
    if layout.top_k is not None:
        columns.append(("safety_index", layout.index_type, layout.top_k))
    if layout.kd_top_k is not None:
        columns += topk_codec.step_fields(layout.kd_top_k, layout.vocab_size)
    return columns


def arrow_schema(layout: Layout) -> pa.Schema:
    """The shard schema of `layout` (documented in docs/cache_format.md)."""
    fields = [
        pa.field("example_id", pa.int64(), nullable=False),
        pa.field("input_ids", pa.list_(layout.token_type), nullable=False),
        pa.field("response_start", pa.int32(), nullable=False),
    ]
    if layout.format_version >= 2:
        fields.append(pa.field("response_spans", pa.list_(pa.list_(pa.int32(), 2)), nullable=False))
    step = pa.struct([pa.field(name, pa.list_(kind, width) if is_matrix(name) else kind, nullable=False)
                      for name, kind, width in step_columns(layout)])
    fields.append(pa.field("steps", pa.list_(step), nullable=False))
    return pa.schema(fields, metadata={SCHEMA_VERSION_KEY: str(layout.format_version), "dtype": layout.dtype})


def encode_steps(values: StepValues, layout: Layout) -> dict[str, np.ndarray]:
    """Encode a run of steps into the storage arrays of every step field ([n] or [n, width]); a distillation layout's
    teacher top-K pass through raw (`RAW_KD`), for `build_table` to encode with the rest of the shard's."""
    count_dtype = np.uint8 if layout.count_type == pa.uint8() else np.uint16
    extras = codec.extras_dtype(layout.dtype)
    convert = codec.to_float16 if extras == "float16" else (lambda x: np.asarray(x, dtype=np.float32))
    out = {"post_count": values.post_count.astype(count_dtype)} if layout.stores_safety else {}
    for name in logit_columns(layout):
        encoded = codec.encode(getattr(values, name), layout.dtype)
        out[name] = encoded.pop("values")
        out.update({f"{name}_{part}": array for part, array in encoded.items()})
    out["target_logprob"] = convert(values.target_logprob)
    out["logsumexp"] = convert(values.logsumexp)
    if layout.other_as_logprob:
        out[OTHER_COLUMN] = codec.encode_logprob(values.other_logits, out["logsumexp"])
    if layout.stores_reference:
        out["rest_logprob"] = convert(np.minimum(values.rest_logprob, 0.0))
    if layout.top_k is not None:
        out["safety_index"] = values.index.astype(np.uint8 if layout.index_type == pa.uint8() else np.uint16)
    if layout.kd_top_k is not None:
        out |= dict(zip(RAW_KD, (values.kd_ids, values.kd_logprobs, values.kd_tail)))
    return out


def _list_array(offsets: np.ndarray, values: pa.Array) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def build_table(examples: list[EncodedExample], steps: list[dict[str, np.ndarray]], layout: Layout) -> pa.Table:
    """One shard table: `examples` in order, with `steps[i]` the encoded per-step arrays of example i.

    Only the current format version is written: a layout read from an older
    cache is refused, so no cache ever mixes shards of two versions.
    """
    if layout.format_version != FORMAT_VERSION:
        raise CacheError(f"cannot write a shard of format version {layout.format_version}: this pact writes version "
                         f"{FORMAT_VERSION} only and a cache never mixes versions; rebuild the cache (--overwrite)")
    lengths = np.array([len(ex.input_ids) for ex in examples], dtype=np.int64)
    n_resp = np.array([len(ex.response_ids) for ex in examples], dtype=np.int64)
    span_counts = np.array([len(ex.spans) for ex in examples], dtype=np.int64)
    spans = np.array([span for ex in examples for span in ex.spans], dtype=np.int32).reshape(-1)
    token_offsets = np.concatenate([[0], np.cumsum(lengths)])
    step_offsets = np.concatenate([[0], np.cumsum(n_resp)])
    token_dtype = np.uint16 if layout.token_type == pa.uint16() else np.int32
    schema = arrow_schema(layout)
    encoded, metadata = _encode_shard_kd(steps, step_offsets, layout)
    fields = []
    for name, kind, width in step_columns(layout):
        stored = encoded[name] if name in encoded else np.concatenate([s[name].reshape(-1) for s in steps])
        values = pa.array(stored.reshape(-1), type=kind)
        fields.append(pa.FixedSizeListArray.from_arrays(values, width) if is_matrix(name) else values)
    arrays = [
        pa.array([ex.example_id for ex in examples], type=pa.int64()),
        _list_array(token_offsets, pa.array(np.concatenate([np.asarray(ex.input_ids, dtype=token_dtype) for ex in examples]), type=layout.token_type)),
        pa.array([ex.response_start for ex in examples], type=pa.int32()),
        _list_array(np.concatenate([[0], np.cumsum(span_counts)]), pa.FixedSizeListArray.from_arrays(pa.array(spans, pa.int32()), 2)),
        _list_array(step_offsets, pa.StructArray.from_arrays(fields, fields=list(schema.field("steps").type.value_type))),
    ]
    return pa.Table.from_arrays(arrays, schema=schema.with_metadata({**schema.metadata, **metadata}))


def _encode_shard_kd(steps: list[dict[str, np.ndarray]], step_offsets: np.ndarray, layout: Layout
                     ) -> tuple[dict[str, np.ndarray], dict[bytes, bytes]]:
    """A distillation layout's teacher top-K of a whole shard, encoded at once (the codec's id dictionary is per shard):
    the step fields, and the schema metadata holding the dictionary. Nothing for other layouts."""
    if layout.kd_top_k is None:
        return {}, {}
    raw = [np.concatenate([s[name] for s in steps]) for name in RAW_KD]
    fields, dictionary = topk_codec.encode_topk(*raw, step_offsets, layout.vocab_size)
    return fields, {KD_DICTIONARY_KEY: zstandard.ZstdCompressor(level=3).compress(np.asarray(dictionary, np.uint8).tobytes())}


def _offsets_and_values(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """(offsets from 0 as numpy, flattened values) of a list column."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0], array.flatten()


def _field_types(schema: pa.Schema) -> dict[str, str]:
    """Column name -> type, ignoring nullability flags (nulls are checked on the data)."""
    return {field.name: str(field.type).replace(" not null", "") for field in schema}


def _numpy(array: pa.Array) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False)


class ShardRows:
    """A decoded, checked shard: numpy arrays in storage form, rows decoded on demand.

    Construction checks every invariant (schema, lengths, token ids within the
    vocabulary, response spans ascending, disjoint and inside the sequence, the
    first starting at response_start, finite values, post_count in 1..|S|,
    top-k indices inside S+) and raises `CacheError` naming `name`
    and the first bad row. Holding the storage form (e.g. 8-bit codes) keeps a
    cached shard about as small as its decompressed file.
    """

    def __init__(self, table: pa.Table, layout: Layout, name: str):
        self.layout = layout
        self.name = name
        self._stored_ids = torch.tensor(layout.stored_ids, dtype=torch.long)
        self._stored_positions = torch.tensor(layout.stored_positions, dtype=torch.long)
        found, expected = _field_types(table.schema), _field_types(arrow_schema(layout))
        if found != expected:
            wrong = [f"{n}: {found.get(n, 'missing')} (expected {t})" for n, t in expected.items() if found.get(n) != t]
            wrong += [f"{n}: unexpected column" for n in found if n not in expected]
            raise CacheError(f"{name}: schema differs from the manifest's layout: {'; '.join(wrong)}")
        self.example_id = table.column("example_id").to_numpy()
        self.response_start = table.column("response_start").to_numpy().astype(np.int64)
        self.token_offsets, tokens = _offsets_and_values(table.column("input_ids"))
        self.step_offsets, steps = _offsets_and_values(table.column("steps"))
        fields = dict(zip([f.name for f in steps.type], steps.flatten()))
        arrays = [table.column(c) for c in ("example_id", "response_start", "input_ids", "steps")] + [tokens, steps, *fields.values()]
        arrays += [fields[c].flatten() for c in MATRIX_COLUMNS if c in fields]
        if any(a.null_count for a in arrays):
            raise CacheError(f"{name}: the shard holds null values")
        self.input_ids = _numpy(tokens)
        lengths = np.diff(self.token_offsets)
        self._check_rows((self.response_start < 1) | (self.response_start >= lengths), "response_start is not inside the sequence (needs 1 <= start < length)")
        self.span_offsets, self.spans = self._read_spans(table, lengths)
        span_tokens = np.add.reduceat(self.spans[:, 1] - self.spans[:, 0], self.span_offsets[:-1]) if len(self.spans) else np.zeros(0, np.int64)
        self._check_rows(np.diff(self.step_offsets) != span_tokens,
                         "the number of steps is not the number of response tokens (the spans' total length)")
        self.columns: dict[str, np.ndarray] = {
            column: _numpy(fields[column].flatten()).reshape(-1, width) if is_matrix(column) else _numpy(fields[column])
            for column, _, width in step_columns(layout)
        }
        self._check_values()
        self.kd = self._decode_kd(table.schema.metadata or {})

    def _read_spans(self, table: pa.Table, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(offsets [rows + 1], spans [M, 2]) of the rows' response spans, checked; version 1: [response_start, length)."""
        if self.layout.format_version < 2:
            return np.arange(len(lengths) + 1, dtype=np.int64), np.stack([self.response_start, lengths], axis=1)
        column = table.column("response_spans").combine_chunks()
        if column.null_count or column.flatten().null_count or column.flatten().flatten().null_count:
            raise CacheError(f"{self.name}: the shard holds null values")
        offsets = column.offsets.to_numpy().astype(np.int64)
        offsets -= offsets[0]
        spans = _numpy(column.flatten().flatten()).astype(np.int64).reshape(-1, 2)
        self._check_rows(np.diff(offsets) < 1, "no response span")
        row_of = np.repeat(np.arange(len(lengths)), np.diff(offsets))
        first = np.zeros(len(spans), dtype=bool)
        first[offsets[:-1][np.diff(offsets) > 0]] = True
        previous_end = np.concatenate([[0], spans[:-1, 1]])
        bad = (spans[:, 0] >= spans[:, 1]) | (spans[:, 1] > lengths[row_of]) | (~first & (spans[:, 0] < previous_end))
        bad |= first & (spans[:, 0] != self.response_start[row_of])
        self._check_items(bad, offsets, "response span",
                          "not an ascending, disjoint token range inside the sequence starting at response_start")
        return offsets, spans

    def _check_rows(self, bad_rows: np.ndarray, problem: str) -> None:
        """Raise for the first row flagged in `bad_rows`."""
        if bad_rows.any():
            row = int(np.argmax(bad_rows))
            raise CacheError(f"{self.name}: row {row} (example_id {int(self.example_id[row])}): {problem}")

    def _check_items(self, bad: np.ndarray, offsets: np.ndarray, unit: str, problem: str) -> None:
        """Raise for the row holding the first flagged item of a flattened per-row sequence ([items] or [items, k])."""
        if bad.ndim > 1:
            bad = bad.any(axis=1)
        if bad.any():
            item = int(np.argmax(bad))
            row = int(np.searchsorted(offsets, item, side="right") - 1)
            raise CacheError(f"{self.name}: row {row} (example_id {int(self.example_id[row])}), {unit} {item - int(offsets[row])}: {problem}")

    def _check_values(self) -> None:
        layout, steps = self.layout, self.step_offsets
        _, inverse, counts = np.unique(self.example_id, return_inverse=True, return_counts=True)
        self._check_rows(counts[inverse] > 1, "example_id appears more than once in the shard")
        bad_token = self.input_ids >= layout.vocab_size
        if layout.token_type == pa.int32():
            bad_token |= self.input_ids < 0
        self._check_items(bad_token, self.token_offsets, "token", f"id outside the vocabulary (size {layout.vocab_size})")
        if layout.stores_safety:
            count = self.columns["post_count"]
            self._check_items((count < 1) | (count > layout.num_safety), steps, "response step", f"post_count outside 1..{layout.num_safety}")
        for column_name, values in self.columns.items():
            if values.dtype.kind == "f":
                self._check_items(~np.isfinite(values), steps, "response step", f"{column_name} holds a non-finite value")
        if layout.dtype == "bfloat16":
            for column_name in logit_columns(layout):
                self._check_items((self.columns[column_name] & 0x7F80) == 0x7F80, steps, "response step", f"{column_name} holds a non-finite value")
        if layout.dtype == "int8":
            for column_name in logit_columns(layout):
                self._check_items(self.columns[f"{column_name}_range"] <= 0, steps, "response step", f"{column_name}_range is not positive")
        if layout.top_k is not None:
            self._check_items(self.columns["safety_index"] >= len(layout.stored_ids), steps, "response step",
                              f"safety_index outside 0..{len(layout.stored_ids) - 1}")

    def _decode_kd(self, metadata: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """A distillation layout's teacher top-K of every step (ids int32 [steps, K], log-probs float32 [steps, K],
        tail float32 [steps]), decoded once for the shard; the storage fields are dropped. None for other layouts."""
        layout = self.layout
        if layout.kd_top_k is None:
            return None
        if KD_DICTIONARY_KEY not in metadata:
            raise CacheError(f"{self.name}: the schema metadata holds no {KD_DICTIONARY_KEY.decode()} (the teacher top-K's "
                             "id dictionary) although the manifest says kd_top_k")
        try:
            dictionary = np.frombuffer(zstandard.ZstdDecompressor().decompress(metadata[KD_DICTIONARY_KEY]), dtype=np.uint8)
            names = [name for name, _, _ in topk_codec.step_fields(layout.kd_top_k, layout.vocab_size)]
            ids, logprobs, tail = topk_codec.decode_topk({name: self.columns.pop(name) for name in names}, dictionary,
                                                         self.step_offsets, layout.kd_top_k, layout.vocab_size)
        except (zstandard.ZstdError, CacheError) as err:
            raise CacheError(f"{self.name}: the teacher top-K cannot be decoded: {err}") from err
        return ids.astype(np.int32 if layout.vocab_size <= 1 << 31 else np.int64), logprobs, tail

    def __len__(self) -> int:
        return len(self.example_id)

    @property
    def response_tokens(self) -> int:
        """Response steps held by the shard."""
        return int(self.step_offsets[-1])

    @property
    def nbytes(self) -> int:
        """Memory held by the decoded arrays."""
        arrays = [self.example_id, self.response_start, self.token_offsets, self.input_ids, self.step_offsets, self.span_offsets,
                  self.spans, *self.columns.values(), *(self.kd or ())]
        return sum(a.nbytes for a in arrays)

    def _parts(self, column: str, steps: slice) -> dict[str, np.ndarray]:
        """The stored parts of logit `column` over a range of steps, as `codec.decode` takes them."""
        parts = {part: self.columns[f"{column}_{part}"][steps] for part in codec.side_parts(self.layout.dtype)}
        return {"values": self.columns[column][steps], **parts}

    def logits(self, column: str, steps: slice) -> np.ndarray:
        """Decoded float32 logits of `column` (`full_logits`/`post_logits`/`other_logits`) for a range of steps, [n, width]."""
        if column == OTHER_COLUMN and self.layout.other_as_logprob:
            return codec.decode_logprob(self.columns[column][steps], self.columns["logsumexp"][steps])
        return codec.decode(self._parts(column, steps), self.layout.dtype)

    def storage_tolerance(self, column: str, steps: slice) -> np.ndarray:
        """Largest storage error of each decoded value of `column` over a range of steps (what recomputation may differ
        by; for format 4's `other_logits`, against the logits raised to the stored floor, `codec.floor_logprob`)."""
        if column == OTHER_COLUMN and self.layout.other_as_logprob:
            return codec.logprob_tolerance(self.columns[column][steps], self.columns["logsumexp"][steps])
        if column in logit_columns(self.layout):
            return codec.tolerance(self._parts(column, steps), self.layout.dtype)
        return codec.tolerance({"values": self.columns[column][steps]}, codec.extras_dtype(self.layout.dtype))

    def _safety_targets(self, steps: slice) -> dict[str, torch.Tensor]:
        """A row's PACT targets over `steps` (see `row`)."""
        if self.layout.top_k is None:
            safety_ids, columns = self._stored_ids, self._stored_positions
        else:
            kept = torch.from_numpy(self.columns["safety_index"][steps].astype(np.int64))
            safety_ids, columns = self._stored_ids[kept], self._stored_positions[kept]
        full = self.logits("full_logits", steps)
        targets = {
            "safety_ids": safety_ids,
            "columns": columns,
            "full_logits": torch.from_numpy(full),
            "post_logits": torch.from_numpy(self.logits("post_logits", steps)),
            "post_count": torch.from_numpy(self.columns["post_count"][steps].astype(np.int64)),
        }
        if self.layout.stores_reference:
            reference = np.empty((len(full), self.layout.num_safety), dtype=np.float32)
            reference[:, list(self.layout.stored_positions)] = full
            reference[:, list(self.layout.other_positions)] = self.logits(OTHER_COLUMN, steps)
            targets |= {"reference_logits": torch.from_numpy(reference),
                        "rest_logprob": torch.from_numpy(self.columns["rest_logprob"][steps].astype(np.float32))}
        return targets

    def step_range(self, index: int) -> slice:
        """The response steps of row `index` in the shard's per-step arrays."""
        return slice(int(self.step_offsets[index]), int(self.step_offsets[index + 1]))

    def row(self, index: int) -> dict:
        """Row `index` as the dict `CacheReader` returns (torch tensors, float32 logits, int64 ids): the tokens, spans,
        `target_logprob` and `logsumexp`; unless the layout is distillation-only, the PACT targets `safety_ids`,
        `columns`, `full_logits`, `post_logits` and `post_count`; where the layout stores the reference (format 3
        without top-k), also `reference_logits`, the full-context logits on all of S in S's order, and `rest_logprob`,
        the log of the reference's probability outside S; with a distillation layout,
        `kd_ids` (int64 [n_resp, K], by descending log-prob), `kd_logprobs` (float32 [n_resp, K]) and `kd_tail`
        (float32 [n_resp]), the teacher's top-K and the log of its remaining mass."""
        tokens = slice(int(self.token_offsets[index]), int(self.token_offsets[index + 1]))
        steps = self.step_range(index)
        row = {
            "example_id": int(self.example_id[index]),
            "input_ids": torch.from_numpy(self.input_ids[tokens].astype(np.int64)),
            "response_start": int(self.response_start[index]),
            "response_spans": torch.from_numpy(self.spans[self.span_offsets[index]:self.span_offsets[index + 1]].copy()),
            "target_logprob": torch.from_numpy(self.columns["target_logprob"][steps].astype(np.float32)),
            "logsumexp": torch.from_numpy(self.columns["logsumexp"][steps].astype(np.float32)),
        }
        if self.layout.stores_safety:
            row |= self._safety_targets(steps)
        if self.kd is not None:
            ids, logprobs, tail = self.kd
            row |= {"kd_ids": torch.from_numpy(ids[steps].astype(np.int64)), "kd_logprobs": torch.from_numpy(logprobs[steps].copy()),
                    "kd_tail": torch.from_numpy(tail[steps].copy())}
        return row
