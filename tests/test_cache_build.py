"""Building and reading caches through the Python API, on the tiny model."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from test_cache_support import float32_cache, one_thread, tiny, tiny_examples, tiny_safety  # noqa: F401  (fixtures)
from torch.utils.data import DataLoader

from pact.cache_tools import CacheError, CacheReader, CacheWriteError, ShardShuffleSampler, build_cache, load_manifest
from pact.cache_tools.manifest import save_manifest
from pact.cache_tools.quality import objective_error
from pact.data.chat import assistant_header_ids
from pact.errors import InvalidSetting
from pact.objective.reference import reference_targets
from pact.objective.settings import ObjectiveArguments


def _build(tiny, examples, safety, out, **kwargs):
    kwargs = {"rows_per_shard": 4, "batch_size": 3, "progress": False, **kwargs}
    return build_cache(tiny, examples, safety, out, **kwargs)


def _shard_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.arrow"))}


def _without_time(manifest):
    """A manifest less its build time (and the checksums, which cover the time)."""
    return {k: v for k, v in manifest.items() if k not in ("created_at", "checksums")}


def _topp_count(logits, p0, temperature):
    """Independent top-p count: smallest k whose k largest probabilities reach p0."""
    probs = torch.softmax(logits / temperature, dim=-1).sort(dim=-1, descending=True).values
    return (probs.cumsum(dim=-1) < p0).sum(dim=-1) + 1


def test_float32_cache_equals_an_unpadded_forward_pass(tiny, tiny_examples, tiny_safety, float32_cache):
    reader = CacheReader(float32_cache)
    assert len(reader) == len(tiny_examples) and len(reader.shards) == 3
    ids = torch.tensor(tiny_safety.ids)
    plus = torch.tensor([i for i, w in zip(tiny_safety.ids, tiny_safety.weights) if w > 0])
    header = assistant_header_ids(tiny.tokenizer)
    cfg = ObjectiveArguments()
    with torch.no_grad():
        for example, row in zip(tiny_examples, reader):
            start, tokens = example.response_start, example.input_ids
            logits = tiny.model(torch.tensor([tokens])).logits[0, start - 1:len(tokens) - 1].float()
            post = tiny.model(torch.tensor([header + tokens[start:]])).logits[0, len(header) - 1:-1].float()
            assert row["example_id"] == example.example_id and row["input_ids"].tolist() == tokens
            assert row["response_start"] == start
            assert torch.equal(row["safety_ids"], plus)
            torch.testing.assert_close(row["full_logits"], logits[:, plus], atol=2e-3, rtol=0)
            torch.testing.assert_close(row["post_logits"], post[:, plus], atol=2e-3, rtol=0)
            lse = logits.logsumexp(dim=-1)
            torch.testing.assert_close(row["logsumexp"], lse, atol=2e-3, rtol=0)
            target = torch.tensor(tokens[start:])
            torch.testing.assert_close(row["target_logprob"], logits.gather(1, target[:, None])[:, 0] - lse, atol=2e-3, rtol=0)
            assert torch.equal(row["post_count"], _topp_count(post[:, ids], cfg.p0, cfg.gate_temperature))


def test_storing_only_positive_weight_columns_is_exact(tiny, tiny_examples, tiny_safety, float32_cache):
    reader = CacheReader(float32_cache)
    exact = reference_targets(tiny.model, tiny_examples, torch.tensor(tiny_safety.ids), assistant_header_ids(tiny.tokenizer),
                              0.9, 1.0, tiny.tokenizer.pad_token_id)
    error = objective_error(list(reader), exact, reader.safety_ids, reader.safety_weights)
    assert error["mean_kl"] > 0
    assert error["token_relative_error"] < 1e-5


def test_default_int8_layout_keeps_the_objective_within_1e_3(tiny, tiny_examples, tiny_safety, tmp_path):
    result = _build(tiny, tiny_examples, tiny_safety, tmp_path / "int8")
    assert result.manifest["dtype"] == "int8" and result.manifest["complete"]
    reader = CacheReader(tmp_path / "int8")
    exact = reference_targets(tiny.model, tiny_examples, torch.tensor(tiny_safety.ids), assistant_header_ids(tiny.tokenizer),
                              0.9, 1.0, tiny.tokenizer.pad_token_id)
    error = objective_error(list(reader), exact, reader.safety_ids, reader.safety_weights)
    assert error["mean_kl_relative_error"] < 1e-3 and error["token_relative_error"] < 1e-3
    top = _build(tiny, tiny_examples, tiny_safety, tmp_path / "top2", top_k=2, dtype="float32")
    assert top.manifest["top_k"] == 2 and top.manifest["objective_temperature"] == 2.0
    row = CacheReader(tmp_path / "top2")[0]
    assert row["safety_ids"].shape == row["full_logits"].shape == (len(tiny_examples[0].response_ids), 2)


def test_reader_views(float32_cache, tmp_path):
    reader = CacheReader(float32_cache)
    rows = list(reader)
    assert [r["example_id"] for r in rows] == list(range(len(reader)))
    assert reader[-1]["example_id"] == rows[-1]["example_id"]
    with pytest.raises(IndexError):
        reader[len(reader)]
    dataset = reader.torch_dataset()
    assert len(dataset) == len(reader) and dataset[5]["example_id"] == 5
    batches = list(DataLoader(dataset, batch_size=4, sampler=ShardShuffleSampler(reader, seed=1), collate_fn=list))
    order = [row["example_id"] for batch in batches for row in batch]
    assert sorted(order) == list(range(len(reader))) and order != sorted(order)
    assert [o // 4 for o in order] == [o // 4 for o in order[::4] for _ in range(4)]  # one shard at a time
    seen = [row["example_id"] for rank in range(2) for row in reader.iterable_dataset(rank=rank, world_size=2, shuffle=True)]
    assert sorted(seen) == list(range(len(reader)))
    hf = reader.to_hf_dataset(cache_dir=str(tmp_path / "hf"))
    assert len(hf) == len(reader)
    assert hf[3]["input_ids"] == rows[3]["input_ids"].tolist()
    torch.testing.assert_close(torch.tensor(hf[3]["full_logits"]), rows[3]["full_logits"])


def test_reader_memory_is_bounded(float32_cache):
    reader = CacheReader(float32_cache, buffer_bytes=1)
    assert sum(1 for _ in reader) == len(reader)
    assert reader.shards_decoded == 3 and reader.peak_shards_held == 1
    for index in ShardShuffleSampler(reader, seed=3):
        reader[index]
    assert reader.shards_decoded == 6 and reader.peak_shards_held == 1
    roomy = CacheReader(float32_cache)
    for index in [0, 11, 5, 0, 11, 5]:
        roomy[index]
    assert roomy.shards_decoded == 3


def test_reader_refuses_corrupt_and_incomplete_caches(float32_cache, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in float32_cache.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    shard = copy / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = CacheReader(copy)
    reader[0]
    with pytest.raises(CacheError, match="shard-00001.arrow: sha256"):
        reader[4]
    manifest = load_manifest(copy)
    save_manifest(copy, {**manifest, "complete": False})
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(copy)


def test_non_empty_directory_needs_resume_or_overwrite(tiny, tiny_examples, tiny_safety, float32_cache, tmp_path):
    with pytest.raises(CacheError, match="not empty; pass --resume .* or --overwrite"):
        _build(tiny, tiny_examples, tiny_safety, float32_cache, dtype="float32")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="--overwrite touches only pact-cache's own files, but .* also holds notes.txt"):
        _build(tiny, tiny_examples, tiny_safety, foreign, overwrite=True)
    assert (foreign / "notes.txt").exists()
    out = tmp_path / "again"
    _build(tiny, tiny_examples[:4], tiny_safety, out)
    _build(tiny, tiny_examples, tiny_safety, out, overwrite=True)
    assert len(CacheReader(out)) == len(tiny_examples)


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
    ({"rows_per_shard": 0}, r"rows_per_shard must be an integer >= 1, got 0"),
    ({"threads": 0}, r"threads must be an integer >= 1 and <= 1024, got 0"),
    ({"top_k": 0}, r"top_k must be an integer >= 1, got 0"),
    ({"zstd_level": 23}, r"zstd_level must be an integer >= 1 and <= 22, got 23"),
])
def test_build_refuses_invalid_counts_naming_the_parameter(tiny, tiny_examples, tiny_safety, tmp_path, kwargs, message):
    """`build_cache` called from Python refuses a count it cannot use, as an `InvalidSetting` naming the parameter
    (the command line adds its flag), before anything is written."""
    with pytest.raises(InvalidSetting, match=message) as refused:
        _build(tiny, tiny_examples, tiny_safety, tmp_path / "out", **kwargs)
    assert refused.value.field == next(iter(kwargs))
    assert not (tmp_path / "out").exists()


def test_resume_with_other_settings_is_refused_naming_them(tiny, tiny_examples, tiny_safety, float32_cache):
    with pytest.raises(CacheError, match=r"different settings \(dtype: 'float32' vs 'int8'\)"):
        _build(tiny, tiny_examples, tiny_safety, float32_cache, dtype="int8", resume=True)
    with pytest.raises(CacheError, match="examples fingerprint"):
        _build(tiny, tiny_examples[:5], tiny_safety, float32_cache, dtype="float32", resume=True)
    with pytest.raises(CacheError, match="rows per shard: 4 vs 5"):
        _build(tiny, tiny_examples, tiny_safety, float32_cache, dtype="float32", rows_per_shard=5, resume=True)


def test_resume_after_an_interruption_equals_a_clean_build(tiny, tiny_examples, tiny_safety, float32_cache, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    clean = load_manifest(float32_cache)
    for path in float32_cache.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    save_manifest(out, {**clean, "complete": False, "shards": clean["shards"][:1]})  # as left after the first shard
    (out / "shard-00002.arrow").unlink()
    (out / "shard-00001.arrow").write_bytes((out / "shard-00000.arrow").read_bytes())  # a stale shard, not listed
    (out / ".tmp-shard-00002.arrow.123").write_bytes(b"torn")
    result = _build(tiny, tiny_examples, tiny_safety, out, dtype="float32", resume=True)
    assert (result.shards_resumed, result.shards_built) == (1, 2)
    assert _shard_bytes(out) == _shard_bytes(float32_cache)
    assert _without_time(load_manifest(out)) == _without_time(clean)
    assert not list(out.glob(".tmp-*"))


def test_disk_full_keeps_a_valid_manifest(tiny, tiny_examples, tiny_safety, float32_cache, tmp_path, monkeypatch):
    import pact.cache_tools.writer as writer

    real_fsync = os.fsync

    def failing_fsync(fd):  # the disk fills up while shard 1 is written
        if "shard-00001" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(writer.os, "fsync", failing_fsync)
    out = tmp_path / "full"
    with pytest.raises(CacheWriteError, match=r"No space left on device \(ENOSPC\).*keeps its 1 complete shard\(s\).*--resume"):
        _build(tiny, tiny_examples, tiny_safety, out, dtype="float32")
    monkeypatch.undo()
    manifest = load_manifest(out, allow_incomplete=True)
    assert not manifest["complete"] and not list(out.glob(".tmp-*"))
    assert [s["file"] for s in manifest["shards"]] == [p.name for p in out.glob("shard-*.arrow")] == ["shard-00000.arrow"]
    _build(tiny, tiny_examples, tiny_safety, out, dtype="float32", resume=True)
    assert _shard_bytes(out) == _shard_bytes(float32_cache)


@pytest.mark.embedded
def test_embedded_model_layouts_stay_within_their_documented_error(embedded, tmp_path):
    from pact.cache_tools.quality import objective_error
    from pact.data.chat import load_examples
    from pact.data.rows import load_conversations
    from pact.data.sources import demo_data_path
    from pact.objective.safety_tokens import compute_safety_tokens

    refusals, _ = load_conversations(demo_data_path("refusals"), limit=8)
    safety = compute_safety_tokens(embedded, None, refusals, max_examples=8, max_resp_len=24, progress=False)
    examples, _ = load_examples(demo_data_path("benign"), embedded.tokenizer, max_length=256, limit=4)
    exact = reference_targets(embedded.model, examples, safety.id_tensor(), assistant_header_ids(embedded.tokenizer),
                              0.9, 1.0, embedded.tokenizer.pad_token_id)
    # docs/cache_format.md: int8 (default) within 1e-3 relative; top-8 of |S+| ~ 20 a few percent.
    for name, kwargs, bound in (("int8", {}, 1e-3), ("top8", {"top_k": 8}, 0.1)):
        build_cache(embedded, examples, safety, tmp_path / name, progress=False, **kwargs)
        reader = CacheReader(tmp_path / name)
        error = objective_error(list(reader), exact, reader.safety_ids, reader.safety_weights)
        assert error["mean_kl_relative_error"] < bound, (name, error)


def test_safety_tokens_of_the_older_tokenizer_fingerprint_still_build(tiny, tiny_examples, tiny_safety, tmp_path):
    """A safety-token file written before the pad token left the tokenizer fingerprint records the older form: the
    build accepts it (the same tokenizer) and still refuses another tokenizer's, naming both."""
    import dataclasses

    from pact.models.loading import _tokenizer_hash

    legacy = _tokenizer_hash(tiny.tokenizer, with_pad=True)
    assert legacy != tiny.tokenizer_fingerprint
    older = dataclasses.replace(tiny_safety, fingerprints={**tiny_safety.fingerprints, "tokenizer": legacy})
    build_cache(tiny, tiny_examples[:2], older, tmp_path / "legacy", progress=False)
    other = dataclasses.replace(tiny_safety, fingerprints={**tiny_safety.fingerprints, "tokenizer": "sha256:" + "0" * 64})
    with pytest.raises(CacheError, match="computed with another tokenizer .*sha256:0{64} vs the model's"):
        build_cache(tiny, tiny_examples[:2], other, tmp_path / "other", progress=False)
