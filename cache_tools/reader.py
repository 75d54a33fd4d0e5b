"""Reading a cache: `CacheReader` gives rows by index or streams them shard by
shard, in bounded memory, and serves them as a torch map-style `Dataset`, a
torch `IterableDataset` or a Hugging Face `datasets.Dataset`.

Each shard is checked as it loads: size and sha256 against the manifest, the
Arrow schema, row and response-token counts, and the row invariants of
`schema.ShardRows`. Any failure raises `CacheError` naming the shard (and
row). Decoded shards are held in a least-recently-used buffer bounded in
bytes; at least one shard is always held.

`ShardShuffleSampler` orders rows shard by shard (each shard decoded once per
epoch) and can length-bucket batches within windows of that order, planned
from the rows' token counts, which `CacheReader.row_lengths` reads from the
shards' `input_ids` offsets without decoding them.
"""

from __future__ import annotations

import bisect
import random
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from pact.cache_tools.errors import CacheError, RowOutOfRange
from pact.cache_tools.layout import Layout
from pact.cache_tools.manifest import load_manifest
from pact.cache_tools.schema import ShardRows
from pact.cache_tools.writer import is_shard_name, sha256_hex

DEFAULT_BUFFER_BYTES = 256 << 20


def read_shard_bytes(directory: Path, entry: dict) -> bytes:
    """Read one shard file and check its size and sha256 against its manifest `entry`.

    The entry's file must be a shard name of `directory` itself: nothing
    outside the cache directory is ever read.
    """
    if not is_shard_name(entry.get("file")):
        raise CacheError(f"{directory}: shard entry file {entry.get('file')!r} is not a shard file name of the cache directory "
                         "(shard-NNNNN.arrow); the manifest was edited")
    path = Path(directory) / entry["file"]
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CacheError(f"{entry['file']}: cannot read {path}: {err.strerror or err}") from err
    if len(data) != entry["bytes"]:
        raise CacheError(f"{entry['file']}: {len(data)} bytes, the manifest says {entry['bytes']} (truncated or replaced?)")
    digest = sha256_hex(data)
    if digest != entry["sha256"]:
        raise CacheError(f"{entry['file']}: sha256 {digest[:16]}... does not match the manifest's {entry['sha256'][:16]}... (corrupt)")
    return data


def read_shard_table(directory: Path, entry: dict) -> pa.Table:
    """Read one shard as an Arrow table, checking size, sha256 and row count against its manifest `entry`."""
    try:
        table = ipc.open_file(pa.py_buffer(read_shard_bytes(directory, entry))).read_all()
    except (pa.ArrowException, OSError, ValueError) as err:
        raise CacheError(f"{entry['file']}: not a readable Arrow IPC file ({err})") from err
    if table.num_rows != entry["rows"]:
        raise CacheError(f"{entry['file']}: {table.num_rows} rows, the manifest says {entry['rows']}")
    return table


def read_row_lengths(directory: Path, entry: dict) -> np.ndarray | None:
    """Tokens of each row of one shard (its `input_ids` lengths), from that column alone: the file is memory-mapped and
    only the column's buffers are read and decompressed, no checksum, no decoding (cheap enough to plan an epoch's order).

    Returns None when the file is not what the manifest says (name, size, Arrow format, column, row count): the caller
    then reads it in full with `read_shard_table`, whose checks name the fault.
    """
    path = Path(directory) / str(entry.get("file"))
    try:
        if not is_shard_name(entry.get("file")) or path.stat().st_size != entry["bytes"]:
            return None
        with pa.memory_map(str(path)) as source:
            names = ipc.open_file(source).schema.names
            if "input_ids" not in names:
                return None
            column_only = ipc.open_file(source, options=ipc.IpcReadOptions(included_fields=[names.index("input_ids")]))
            parts = [pc.list_value_length(column_only.get_batch(i).column(0)).to_numpy(zero_copy_only=False)
                     for i in range(column_only.num_record_batches)]
    except (pa.ArrowException, OSError, ValueError):
        return None
    lengths = np.concatenate([np.zeros(0, dtype=np.int64), *parts]).astype(np.int64)
    return lengths if len(lengths) == entry["rows"] else None


def decode_shard(table: pa.Table, layout: Layout, entry: dict) -> ShardRows:
    """Decode and check a shard table read by `read_shard_table` (row invariants and response-token count)."""
    rows = ShardRows(table, layout, entry["file"])
    if rows.response_tokens != entry["response_tokens"]:
        raise CacheError(f"{entry['file']}: {rows.response_tokens} response tokens, the manifest says {entry['response_tokens']}")
    return rows


class CacheReader:
    """Rows of a complete cache directory, by index (`r[i]`, `len(r)`) or streamed (`for row in r`).

    A row is a dict: `example_id` (int), `input_ids` (int64 [L], the whole
    sequence), `response_start` (int, index of the first response token),
    `response_spans` (int64 [m, 2], the (start, end) token range of each
    response, one per assistant turn trained on; the n_resp response steps are
    their tokens in order), `target_logprob` and `logsumexp` (float32
    [n_resp]); unless the cache is distillation-only (built with
    `--safety_targets false`), `safety_ids` (int64 vocabulary ids of the logit
    columns: [k], the same at every step, or [n_resp, k] for top-k caches),
    `columns` (int64 positions of those columns in S, same shape, from the
    layout), `full_logits` and
    `post_logits` (float32 [n_resp, k]) and `post_count` (int64 [n_resp]);
    caches of format 3 and later built with safety targets and without top-k
    also hold `reference_logits` (float32 [n_resp, |S|], the full-context
    logits on all of S) and `rest_logprob` (float32 [n_resp], the log of the
    reference's probability outside S); distillation caches (`--kd_top_k`)
    `kd_ids`, `kd_logprobs` and `kd_tail` (`ShardRows.row`).

    `buffer_bytes` bounds the memory of decoded shards (least recently used
    first out; one shard is always held). Random access across more shards
    than fit decodes a shard per miss, so shuffle with `ShardShuffleSampler`
    (or the iterable dataset), which visits one shard at a time.
    """

    def __init__(self, directory: str | Path, buffer_bytes: int = DEFAULT_BUFFER_BYTES, allow_incomplete: bool = False):
        self.directory = Path(directory).expanduser()
        self.manifest = load_manifest(self.directory, allow_incomplete=allow_incomplete)
        self.layout = Layout.from_manifest(self.manifest)
        self.buffer_bytes = buffer_bytes
        self._row_starts = np.cumsum([0] + [s["rows"] for s in self.shards]).tolist()
        self._buffer: OrderedDict[int, ShardRows] = OrderedDict()
        self._row_lengths: np.ndarray | None = None
        self.shards_decoded = 0
        self.peak_shards_held = 0

    @property
    def shards(self) -> list[dict]:
        """The manifest's shard entries, in row order."""
        return self.manifest["shards"]

    @property
    def safety_ids(self) -> torch.Tensor:
        """All safety-token ids S (int64), the columns the student's logits are taken on (none in a distillation-only
        cache)."""
        return torch.tensor((self.manifest["safety_tokens"] or {"ids": []})["ids"], dtype=torch.long)

    @property
    def safety_weights(self) -> torch.Tensor:
        """The weights w of S (float32), aligned with `safety_ids`."""
        return torch.tensor((self.manifest["safety_tokens"] or {"weights": []})["weights"], dtype=torch.float32)

    def __len__(self) -> int:
        return self._row_starts[-1]

    def __getstate__(self) -> dict:
        """Pickle without the decoded-shard buffer (DataLoader workers decode their own)."""
        state = dict(self.__dict__)
        state["_buffer"] = OrderedDict()
        return state

    def load_shard(self, index: int) -> ShardRows:
        """Read, verify and decode shard `index` (no buffering)."""
        entry = self.shards[index]
        rows = decode_shard(read_shard_table(self.directory, entry), self.layout, entry)
        self.shards_decoded += 1
        return rows

    def shard(self, index: int) -> ShardRows:
        """Shard `index`, decoded, through the bounded LRU buffer."""
        if index in self._buffer:
            self._buffer.move_to_end(index)
            return self._buffer[index]
        rows = self.load_shard(index)
        self._buffer[index] = rows
        held = sum(r.nbytes for r in self._buffer.values())
        while len(self._buffer) > 1 and held > self.buffer_bytes:
            held -= self._buffer.popitem(last=False)[1].nbytes
        self.peak_shards_held = max(self.peak_shards_held, len(self._buffer))
        return rows

    def row_lengths(self) -> np.ndarray:
        """Tokens of every row (`len(input_ids)`, int64, in row order), read once per reader by `read_row_lengths`
        without decoding a shard; a shard file that is not what the manifest says is loaded in full, which names its fault."""
        if self._row_lengths is None:
            parts = []
            for index, entry in enumerate(self.shards):
                lengths = read_row_lengths(self.directory, entry)
                parts.append(lengths if lengths is not None else np.diff(self.load_shard(index).token_offsets))
            self._row_lengths = np.concatenate([np.zeros(0, dtype=np.int64), *parts]).astype(np.int64)
        return self._row_lengths

    def shard_row_range(self, index: int) -> range:
        """Global row indices held by shard `index`."""
        return range(self._row_starts[index], self._row_starts[index + 1])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row within shard) of global row `index` (negative counts from the end); `RowOutOfRange` past either end."""
        given = index
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            valid = f"rows 0..{len(self) - 1}, or -{len(self)}..-1 counting from the end" if len(self) else "none to read"
            raise RowOutOfRange(f"{self.directory}: row {given} is out of range: the cache has {len(self)} rows ({valid})")
        shard = bisect.bisect_right(self._row_starts, index) - 1
        return shard, index - self._row_starts[shard]

    def __getitem__(self, index: int) -> dict:
        shard, row = self.locate(int(index))
        return self.shard(shard).row(row)

    def iter_shard_rows(self, shard_indices: list[int], shuffle_rows: random.Random | None = None) -> Iterator[dict]:
        """Rows of the given shards, shard after shard (rows in order, or shuffled by `shuffle_rows`)."""
        for index in shard_indices:
            rows = self.shard(index)
            order = list(range(len(rows)))
            if shuffle_rows is not None:
                shuffle_rows.shuffle(order)
            for row in order:
                yield rows.row(row)

    def __iter__(self) -> Iterator[dict]:
        return self.iter_shard_rows(list(range(len(self.shards))))

    def torch_dataset(self) -> "CacheDataset":
        """A map-style `torch.utils.data.Dataset` over the rows (pair it with `ShardShuffleSampler` to shuffle)."""
        return CacheDataset(self)

    def iterable_dataset(self, rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0) -> "CacheIterableDataset":
        """A `torch.utils.data.IterableDataset` streaming whole shards: rank r of `world_size` gets shards r, r+W, ...,
        further split among DataLoader workers; `shuffle` permutes shards and rows within them (call `set_epoch`)."""
        return CacheIterableDataset(self, rank, world_size, shuffle, seed)

    def to_hf_dataset(self, cache_dir: str | None = None):
        """The rows as a `datasets.Dataset` (written once to the datasets cache, keyed by the shards' sha256): every key a
        row has, the teacher top-K of a distillation cache included, for any other training loop."""
        from datasets import Dataset, Features, List, Value

        per_step = List(List(Value("float32")))
        features = Features({
            "example_id": Value("int64"),
            "input_ids": List(Value("int64")),
            "response_start": Value("int64"),
            "response_spans": List(List(Value("int64"))),
            "target_logprob": List(Value("float32")),
            "logsumexp": List(Value("float32")),
            **({"safety_ids": List(List(Value("int64"))) if self.layout.top_k else List(Value("int64")),
                "columns": List(List(Value("int64"))) if self.layout.top_k else List(Value("int64")),
                "full_logits": per_step, "post_logits": per_step, "post_count": List(Value("int64"))}
               if self.layout.stores_safety else {}),
            **({"reference_logits": per_step, "rest_logprob": List(Value("float32"))} if self.layout.stores_reference else {}),
            **({"kd_ids": List(List(Value("int64"))), "kd_logprobs": per_step, "kd_tail": List(Value("float32"))}
               if self.layout.kd_top_k else {}),
        })
        return Dataset.from_generator(
            _hf_rows, features=features, cache_dir=cache_dir,
            gen_kwargs={"directory": str(self.directory), "shard_sha256": [s["sha256"] for s in self.shards]},
        )


def _hf_rows(directory: str, shard_sha256: list[str]) -> Iterator[dict]:
    """Generator behind `to_hf_dataset`: the rows of the listed shards as numpy arrays."""
    reader = CacheReader(directory)
    index = {s["sha256"]: i for i, s in enumerate(reader.shards)}
    for row in reader.iter_shard_rows([index[digest] for digest in shard_sha256]):
        yield {key: value.numpy() if isinstance(value, torch.Tensor) else value for key, value in row.items()}


class CacheDataset(Dataset):
    """Map-style torch dataset over a `CacheReader` (each item is a row dict)."""

    def __init__(self, reader: CacheReader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict:
        return self.reader[index]


class CacheIterableDataset(IterableDataset):
    """Streams a cache shard by shard (see `CacheReader.iterable_dataset`)."""

    def __init__(self, reader: CacheReader, rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0):
        if not 0 <= rank < world_size:
            raise CacheError(f"rank {rank} is not in 0..{world_size - 1}")
        self.reader, self.rank, self.world_size, self.shuffle, self.seed = reader, rank, world_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of the next pass (same seed and epoch, same order on every rank)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch) if self.shuffle else None
        shards = list(range(len(self.reader.shards)))
        if rng is not None:
            rng.shuffle(shards)
        shards = shards[self.rank::self.world_size]
        worker = get_worker_info()
        if worker is not None:
            shards = shards[worker.id::worker.num_workers]
        return self.reader.iter_shard_rows(shards, rng)


def shard_aware_order(shard_rows: Sequence[int], rng: random.Random, batch_size: int = 1, window: int = 0,
                      lengths: Sequence[int] | None = None) -> list[int]:
    """One epoch's row order: shards in random order, the rows of each shuffled, all drawn from `rng`.

    Rows are numbered consecutively across shards (`shard_rows[i]` rows in
    shard i). With `window` > 0, batches are also length-bucketed (see
    `_bucketed`, which needs every row's token count in `lengths`): cutting
    the order into consecutive `batch_size` pieces gives batches of rows of
    similar length. Either way each row comes exactly once and a shard's rows
    stay together, so a reader decodes each shard once per epoch. Works on row
    counts and lengths alone (no cache needed), so a benchmark can plan the
    order of a data set that was never cached.
    """
    starts = np.cumsum([0, *shard_rows]).tolist()
    shards = list(range(len(shard_rows)))
    rng.shuffle(shards)
    order: list[int] = []
    for shard in shards:
        rows = list(range(starts[shard], starts[shard + 1]))
        rng.shuffle(rows)
        order.extend(_bucketed(rows, lengths, batch_size, window, -len(order) % batch_size, rng) if window else rows)
    return order


def _bucketed(rows: list[int], lengths: Sequence[int], batch_size: int, window: int, head: int, rng: random.Random) -> list[int]:
    """One shard's shuffled `rows` regrouped into batches of similar lengths.

    The first `head` rows complete the batch the previous shard left open and
    the last rows that fill no whole batch stay last (the next shard completes
    theirs): batches then line up with the order's `batch_size` cuts. The rows
    between are taken in windows of `window` batches; each window is sorted by
    length (ties in shuffled order), cut into batches, and its batches are
    shuffled so that long batches do not always come last.
    """
    head = min(head, len(rows))
    full = head + (len(rows) - head) // batch_size * batch_size
    middle: list[int] = []
    for start in range(head, full, window * batch_size):
        part = sorted(rows[start:min(start + window * batch_size, full)], key=lambda row: lengths[row])
        batches = [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
        rng.shuffle(batches)
        middle.extend(row for batch in batches for row in batch)
    return rows[:head] + middle + rows[full:]


def padding_fraction(order: Sequence[int], lengths: Sequence[int], batch_size: int) -> float:
    """Share of padding in the batches cut from `order` in `batch_size` pieces, each padded to its longest row:
    padded tokens over all tokens of the padded batches (0 for no rows). What `bucket_window` lowers."""
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = [int(lengths[row]) for row in order[start:start + batch_size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return (padded - real) / padded if padded else 0.0


class ShardShuffleSampler(Sampler[int]):
    """Random row order that visits shards one at a time (shards shuffled, rows shuffled within each), seeded by
    `seed` and the epoch (`set_epoch`), every row once per epoch.

    With a map-style dataset over a cache larger than the reader's buffer,
    this keeps decoding to one pass over each shard per epoch.

    `bucket_window` > 0 length-buckets the batches a consumer cuts from the
    order in `batch_size` pieces (the global micro-batch, before it is split
    among processes): within each shard, windows of `bucket_window` batches are
    sorted by row length, cut into batches and those batches shuffled (see
    `shard_aware_order`), so a batch holds rows of similar length and pads
    little. The lengths come from `CacheReader.row_lengths` (the shards'
    `input_ids` offsets, read once per reader, no decoding), so shards are
    still decoded once per epoch. Rows that span two shards' batch boundary
    (fewer than a batch per shard) are not bucketed. 0 gives the plain shuffle.
    """

    def __init__(self, reader: CacheReader, seed: int = 0, batch_size: int = 1, bucket_window: int = 0):
        for name, value, low in (("batch_size", batch_size, 1), ("bucket_window", bucket_window, 0)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise CacheError(f"ShardShuffleSampler: {name} must be an integer >= {low}, got {value!r}")
        self.reader, self.seed, self.epoch = reader, seed, 0
        self.batch_size, self.bucket_window = batch_size, bucket_window

    def set_epoch(self, epoch: int) -> None:
        """Choose the order of the next pass."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.reader)

    def __iter__(self) -> Iterator[int]:
        """This epoch's rows in order (`shard_aware_order`)."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        lengths = self.reader.row_lengths() if self.bucket_window else None
        shard_rows = [entry["rows"] for entry in self.reader.shards]
        return iter(shard_aware_order(shard_rows, rng, self.batch_size, self.bucket_window, lengths))
