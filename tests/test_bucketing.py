"""Length-bucketed training batches (`bucket_window`): less padding, every row once per epoch, seeded and reproducible,
each shard still decoded once per epoch, the setting checked and recorded as result-changing, and the padding
benchmark's numbers."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from hostile import Case, check_case
from pact.cache_tools import CacheError, CacheReader
from pact.cache_tools.reader import ShardShuffleSampler, padding_fraction, shard_aware_order
from test_train import _trainer

SHARDS = [500, 500, 333, 167]  # uneven, and not multiples of the batch sizes below
BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "padding.py"


def _mixed_lengths(count: int = sum(SHARDS), seed: int = 0) -> np.ndarray:
    """Row lengths as in a refusal + classification mix: half short (20-40 tokens), half long (150-400), interleaved."""
    generator = np.random.default_rng(seed)
    short, long = generator.integers(20, 40, count), generator.integers(150, 400, count)
    return np.where(generator.random(count) < 0.5, short, long)


def _order(epoch: int, batch_size: int = 8, window: int = 64, seed: int = 0, lengths=None) -> list[int]:
    """The epoch's order of the `SHARDS` rows with `lengths` (the mixed ones by default)."""
    lengths = _mixed_lengths() if lengths is None else lengths
    return shard_aware_order(SHARDS, random.Random(seed * 1_000_003 + epoch), batch_size, window, lengths)


def _shard_of(row: int) -> int:
    """Which of the `SHARDS` holds row `row`."""
    return int(np.searchsorted(np.cumsum(SHARDS), row, side="right"))


@pytest.mark.parametrize("batch_size, at_most", [(1, 0.0), (3, 0.1), (8, 0.1), (64, 0.6)])
def test_bucketing_lowers_padding_on_mixed_lengths(batch_size, at_most):
    """Over three epochs of the mixed lengths the bucketed batches pad at most `at_most` of the plain shuffle's padding
    (batch 1 pads nothing either way; batches of 64 span a wide length range even sorted, in shards of 500 rows)."""
    lengths = _mixed_lengths()
    plain = [padding_fraction(_order(e, batch_size, 0), lengths, batch_size) for e in range(3)]
    bucketed = [padding_fraction(_order(e, batch_size, 64), lengths, batch_size) for e in range(3)]
    assert max(bucketed) <= at_most * min(plain), (plain, bucketed)


@pytest.mark.parametrize("window", [0, 1, 2, 64])
@pytest.mark.parametrize("batch_size", [1, 7, 8, 600])
def test_every_row_once_per_epoch_one_shard_at_a_time(batch_size, window):
    """The order is a permutation of the rows, each shard's rows form one run of it (so the reader holds one shard at
    a time), and a batch mixes at most two shards (the previous shard's last rows and the next one's first)."""
    for epoch in range(3):
        order = _order(epoch, batch_size, window)
        assert sorted(order) == list(range(sum(SHARDS)))
        shards = [_shard_of(row) for row in order]
        runs = [s for i, s in enumerate(shards) if i == 0 or s != shards[i - 1]]
        assert sorted(runs) == list(range(len(SHARDS)))
        batches = [set(shards[i:i + batch_size]) for i in range(0, len(shards), batch_size)]
        assert max(len(b) for b in batches) <= (2 if batch_size <= min(SHARDS) else len(SHARDS))


def test_a_window_of_the_whole_shard_gives_the_sorted_batches():
    """With one window over a 16-row shard, the batches are the length-sorted rows cut in fours (in shuffled order),
    each sorted inside."""
    lengths = list(range(16, 0, -1))  # distinct: row i has length 16 - i
    order = shard_aware_order([16], random.Random(5), 4, 4, lengths)
    batches = [order[i:i + 4] for i in range(0, 16, 4)]
    assert sorted(sorted(b) for b in batches) == [list(range(i, i + 4)) for i in range(0, 16, 4)]
    assert all([lengths[r] for r in b] == sorted(lengths[r] for r in b) for b in batches)


def test_the_order_is_seeded_and_each_epoch_differs():
    """Same seed and epoch, same order; another epoch or seed, another order (bucketed or not)."""
    for window in (0, 64):
        assert _order(0, window=window) == _order(0, window=window)
        assert _order(0, window=window) != _order(1, window=window)
        assert _order(0, window=window, seed=1) != _order(0, window=window)
    assert _order(0, window=64) != _order(0, window=0)


def test_row_lengths_read_without_decoding(float32_cache):
    """`row_lengths` gives each row's token count from the shards' offsets, decoding no shard."""
    reader = CacheReader(float32_cache, buffer_bytes=1)
    lengths = reader.row_lengths()
    assert reader.shards_decoded == 0
    assert lengths.tolist() == [len(row["input_ids"]) for row in CacheReader(float32_cache)]
    assert len(set(lengths.tolist())) > 2  # the demo rows differ in length: the padding test below means something


def test_a_damaged_shard_is_named_when_lengths_are_read(float32_cache, tmp_path):
    """A shard file cut short fails the length read with the reader's own message, naming the shard."""
    copy = tmp_path / "cache"
    shutil.copytree(float32_cache, copy)
    (copy / "shard-00001.arrow").write_bytes((copy / "shard-00001.arrow").read_bytes()[:100])
    with pytest.raises(CacheError, match="shard-00001.arrow: 100 bytes, the manifest says"):
        CacheReader(copy).row_lengths()


def test_sampler_on_a_small_cache_pads_less_and_keeps_the_rows(float32_cache):
    """On the 12-row cache (3 shards of 4) with batches of 2: bucketing pads less over ten epochs, the same rows
    come each epoch, and an epoch reads each shard once through a one-shard buffer."""
    reader = CacheReader(float32_cache, buffer_bytes=1)
    lengths = reader.row_lengths()
    plain, bucketed = ShardShuffleSampler(reader, 3, batch_size=2), ShardShuffleSampler(reader, 3, batch_size=2, bucket_window=2)
    fractions = {"plain": 0.0, "bucketed": 0.0}
    for epoch in range(10):
        for name, sampler in (("plain", plain), ("bucketed", bucketed)):
            sampler.set_epoch(epoch)
            order = list(sampler)
            assert sorted(order) == list(range(len(reader)))
            fractions[name] += padding_fraction(order, lengths, 2)
    assert fractions["bucketed"] < fractions["plain"]
    before = reader.shards_decoded
    for index in bucketed:
        reader[index]
    assert reader.shards_decoded - before == len(reader.shards) and reader.peak_shards_held == 1


def test_sampler_refuses_bad_sizes(float32_cache):
    """A batch size below 1 or a negative window is refused, naming the parameter."""
    reader = CacheReader(float32_cache)
    with pytest.raises(CacheError, match="batch_size must be an integer >= 1, got 0"):
        ShardShuffleSampler(reader, batch_size=0)
    with pytest.raises(CacheError, match="bucket_window must be an integer >= 0, got -1"):
        ShardShuffleSampler(reader, bucket_window=-1)


@pytest.mark.parametrize("window", [0, 1])
def test_the_trainer_loader_decodes_each_shard_once_and_buckets(float32_cache, tiny_model_dir, tmp_path, window):
    """The train loader with batches of 3 (crossing shard boundaries) and `bucket_window` 0 or 1: each epoch decodes
    each shard once through a one-shard buffer and gives every row once; with a window each whole batch inside a
    shard is sorted by length."""
    reader = CacheReader(float32_cache, buffer_bytes=1)  # collated in this process (no workers), so this reader decodes
    loader = _trainer(reader, tiny_model_dir, tmp_path / "s", per_device_train_batch_size=3, bucket_window=window,
                      dataloader_num_workers=0).get_train_dataloader()
    lengths = CacheReader(float32_cache).row_lengths()
    for epoch in (0, 1):
        loader.batch_sampler.set_epoch(epoch)
        before = reader.shards_decoded
        batches = [batch["batch"].example_ids.tolist() for batch in loader]
        assert reader.shards_decoded - before == len(reader.shards)
        assert sorted(row for batch in batches for row in batch) == list(range(len(reader)))
        if window:
            whole = [b for b in batches if len({row // 4 for row in b}) == 1]
            assert whole and all([lengths[r] for r in b] == sorted(lengths[r] for r in b) for b in whole)


def test_bucket_window_is_checked_recorded_and_result_changing(world, capsys):
    """`--bucket-window -1` is refused naming the flag; the run records its window; resuming it with another window is
    refused (the order, so the result, would change), naming the setting with both values."""
    check_case(Case("bucket-window-negative", "", "pact", lambda w: _train_argv(w, "out", "--bucket-window", "-1"), 2,
                    "--bucket-window: bucket_window must be an integer >= 0, got -1"), world, capsys)
    assert json.loads((world.run / "pact_config.json").read_text())["bucket_window"] == 64
    check_case(Case("resume-other-bucket-window", "", "pact",
                    lambda w: [*_train_argv(w, str(w.run), "--lr", "1e-3", "--bucket-window", "0"), "--resume"], 2,
                    "bucket_window 64 -> 0"), world, capsys)


def _train_argv(w, out: str, *extra: str) -> list[str]:
    """argv of a one-step `pact train` of batch 4 on the world's cache into `out` (a world folder name or a path)."""
    return ["train", "--cache", str(w.cache), "--out", str(w.path(out)), "--device", "cpu", "--batch-size", "4",
            "--max-steps", "1", "--no-progress", *extra]


def test_padding_benchmark_prints_both_orders(tiny_model_dir, tmp_path, capsys):
    """`benchmarks/padding.py` on two small files of short and long rows prints the plain and bucketed padding
    fractions side by side, the bucketed one lower."""
    short = "\n".join(json.dumps({"instruction": "Say hi", "output": "hi"}) for _ in range(24))
    long = "\n".join(json.dumps({"instruction": "Tell a story " * (5 + i), "output": "Once upon a time " * (3 + i)})
                     for i in range(24))
    (tmp_path / "short.jsonl").write_text(short + "\n")
    (tmp_path / "long.jsonl").write_text(long + "\n")
    spec = importlib.util.spec_from_file_location("padding_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--data", str(tmp_path / "short.jsonl"), "--data", str(tmp_path / "long.jsonl"), "--limit", "20",
                 "--batch-size", "4", "--model", str(tiny_model_dir)])
    out = capsys.readouterr().out
    cells = next(line for line in out.splitlines() if "short.jsonl + long.jsonl (mixed)" in line).strip("|").split("|")
    rows, plain, bucketed = int(cells[1]), float(cells[2].strip(" %")), float(cells[3].strip(" %"))
    assert rows == 40 and bucketed < plain
