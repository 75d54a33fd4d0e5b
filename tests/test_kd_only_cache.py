"""A distillation-only cache (`pact-cache build --kd_top_k K --safety_targets false`): the model is the teacher, one
full-context pass per batch stores its top-K and nothing of safety tokens; it reads, verifies, merges, resumes, exports
and trains `--objective kd` as a combined cache does, with the same loss and gradients, and refuses the objectives that
need safety targets."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from test_cache_support import one_thread, tiny, tiny_examples, tiny_safety  # noqa: F401  (fixtures)
from test_kd_cache import K, kd_cache  # noqa: F401  (fixture)

from pact.cache_tools import CacheError, CacheReader, build_cache
from pact.cache_tools.topk_codec import tolerance
from pact.cache_tools.writer import SAFETY_TOKENS_NAME
from pact.data.batch import collate_examples
from pact.errors import PactError
from pact.objective.distillation import teacher_batch_topk
from pact.objective.loss import cached_pact_loss
from pact.objective.settings import ObjectiveArguments

SAFETY_FIELDS = ("safety_ids", "columns", "full_logits", "post_logits", "post_count", "reference_logits", "rest_logprob")


@pytest.fixture(scope="module")
def kd_only(tiny, tiny_examples, tmp_path_factory):
    """The 6 examples of `kd_cache` (same dtype, batching and shards), stored without safety targets."""
    out = tmp_path_factory.mktemp("kd-only") / "cache"
    torch.set_num_threads(1)
    build_cache(tiny, tiny_examples[:6], None, out, dtype="float32", batch_size=1, rows_per_shard=4, progress=False,
                kd_top_k=K)
    return CacheReader(out)


def test_it_stores_the_teachers_top_k_and_no_safety_targets(tiny, tiny_examples, kd_only, kd_cache, one_thread):
    """Every row holds the online teacher's top-K ids exactly and its log-probs, tail and token log-probs within the
    storage error, and no safety field; the manifest has no safety tokens, gate or header, no safety_tokens.json is
    written, and the cache costs fewer bytes per token than one that also holds the safety targets."""
    manifest = kd_only.manifest
    assert manifest["safety_tokens"] is None and manifest["gate"] is None and manifest["header_ids"] == []
    assert manifest["stored_ids"] == [] and manifest["kd_top_k"] == K
    assert manifest["kd_teacher"] == {"source": tiny.source, "fingerprint": tiny.fingerprint}
    assert not (kd_only.directory / SAFETY_TOKENS_NAME).exists()
    assert kd_only.safety_ids.numel() == 0 and not kd_only.layout.stores_safety
    pad = tiny.tokenizer.pad_token_id
    for index in range(len(kd_only)):
        row, combined = kd_only[index], kd_cache[index]
        assert not set(SAFETY_FIELDS) & set(row)
        top = teacher_batch_topk(tiny.model, collate_examples([tiny_examples[index]], pad), K)
        assert torch.equal(row["kd_ids"].sort(dim=1).values, top.ids.sort(dim=1).values)
        stored, online = row["kd_logprobs"].sort(dim=1).values, top.logprobs.sort(dim=1).values
        assert (stored - online).abs().le(torch.from_numpy(tolerance(online.numpy())) + 1e-6).all()
        assert (row["kd_tail"] - top.tail).abs().le(torch.from_numpy(tolerance(top.tail.numpy())) + 1e-6).all()
        torch.testing.assert_close(row["target_logprob"], combined["target_logprob"], rtol=0, atol=1e-4)
        torch.testing.assert_close(row["logsumexp"], combined["logsumexp"], rtol=0, atol=1e-4)
    only, both = kd_only.manifest["totals"], kd_cache.manifest["totals"]
    assert only["response_tokens"] == both["response_tokens"]
    assert only["bytes_per_response_token"] < both["bytes_per_response_token"]


def test_kd_trains_from_it_as_from_a_combined_cache(tiny, tiny_safety, kd_only, kd_cache, one_thread):
    """`--objective kd` of a student on the same rows: the loss and every gradient equal those from the cache that also
    holds the safety targets (the KD targets are the same values within storage); objectives that need safety targets
    are refused, naming kd."""
    student = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.mul_(1.2)
    params = [p for p in student.parameters() if p.requires_grad]
    cfg = ObjectiveArguments(objective="kd", kd_temperature=2.0, kd_alpha=0.7)
    pad = tiny.tokenizer.pad_token_id
    none = torch.zeros(0, dtype=torch.long)
    only = cached_pact_loss(student, [kd_only[i] for i in range(3)], none, none.float(), cfg, pad)
    both = cached_pact_loss(student, [kd_cache[i] for i in range(3)], tiny_safety.id_tensor(), tiny_safety.weight_tensor(), cfg, pad)
    assert float(only.kd.detach()) > 1e-3 and float(only.kl) == 0.0
    torch.testing.assert_close(only.kd, both.kd, rtol=0, atol=1e-5)
    torch.testing.assert_close(only.loss, both.loss, rtol=0, atol=1e-5)
    for a, b in zip(torch.autograd.grad(only.loss, params), torch.autograd.grad(both.loss, params)):
        assert float((a - b).norm()) <= 1e-3 * float(b.norm()) + 1e-7
    for objective in ("pact", "pact+kd", "tokenwise"):
        with pytest.raises(PactError, match="train --objective kd"):
            cached_pact_loss(student, [kd_only[0]], none, none.float(), ObjectiveArguments(objective=objective), pad)


def test_verify_recompute_parts_merge_and_resume(tiny, tiny_examples, kd_only, tmp_path, one_thread):
    """`verify --recompute` re-runs the teacher and passes; a --num-shards 2 build merged holds the same rows; resuming it
    with safety targets is refused; a teacher beside --model, no K, or top_k are refused."""
    from pact.cache_tools.merge import merge_caches
    from pact.cache_tools.verify import verify_cache

    report = verify_cache(kd_only.directory, recompute=3, model=tiny)
    assert report.ok, report.problems
    assert report.recomputed_rows == 3 and report.worst_recompute_ratio < 1
    kwargs = dict(dtype="float32", batch_size=1, rows_per_shard=4, progress=False, kd_top_k=K)
    for part in (1, 0):
        build_cache(tiny, tiny_examples[:6], None, tmp_path / f"part{part}", part_index=part, part_count=2, **kwargs)
    merge_caches(tmp_path / "merged", [tmp_path / "part0", tmp_path / "part1"])
    merged = CacheReader(tmp_path / "merged")
    assert merged.manifest["safety_tokens"] is None and not (merged.directory / SAFETY_TOKENS_NAME).exists()
    for index in range(len(kd_only)):
        for key, value in kd_only[index].items():
            assert torch.equal(merged[index][key], value) if torch.is_tensor(value) else merged[index][key] == value
    assert verify_cache(tmp_path / "merged").ok
    with pytest.raises(CacheError, match="safety-token ids: None vs"):
        build_cache(tiny, tiny_examples[:6], make_safety(tiny), tmp_path / "part0", part_index=0, part_count=2,
                    resume=True, **kwargs)
    with pytest.raises(CacheError, match="give teacher as --model rather than --teacher"):
        build_cache(tiny, tiny_examples[:2], None, tmp_path / "t", progress=False, kd_top_k=K,
                    teacher=dataclasses.replace(tiny, source="teacher"))
    with pytest.raises(CacheError, match="needs --kd_top_k"):
        build_cache(tiny, tiny_examples[:2], None, tmp_path / "n", progress=False)
    with pytest.raises(CacheError, match="top_k chooses among safety tokens"):
        build_cache(tiny, tiny_examples[:2], None, tmp_path / "k", progress=False, kd_top_k=K, top_k=2)


def make_safety(tiny):
    """Safety tokens for the tiny model (a resume with them differs from a distillation-only build)."""
    from test_cache_support import make_safety_tokens

    return make_safety_tokens(tiny)


def test_the_commands(tiny_model_dir, tmp_path, capsys, one_thread):
    """`pact-cache build --kd_top_k 6 --safety_targets false` builds without computing safety tokens; stats, inspect and
    export read it; `pact train --objective kd` trains from it, logs the KD part and says so on its model card; pact+kd is refused naming kd; the
    flag's misuses are refused naming the field."""
    import datasets

    from pact.cli.cache import main as cache_main
    from pact.cli.main import main as pact_main

    cache = tmp_path / "kd"
    base = ["build", "--model", str(tiny_model_dir), "--limit", "6", "--device", "cpu", "--quiet", "--max-length", "256"]
    assert cache_main([*base, "--out", str(cache), "--kd_top_k", "6", "--safety_targets", "false"]) == 0
    assert "computing them from" not in capsys.readouterr().err
    assert cache_main(["stats", str(cache), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["safety_tokens"] == 0 and stats["kd_top_k"] == 6 and 0 < stats["kd_tail_mass"]["mean"] < 1
    assert stats["bytes_per_response_token"] > 0
    assert cache_main(["stats", str(cache)]) == 0
    assert "no safety targets (a distillation-only cache); the teacher's top-6" in capsys.readouterr().out
    assert cache_main(["inspect", str(cache), "--row", "0"]) == 0
    shown = capsys.readouterr().out
    assert "no safety targets" in shown and "top tokens (teacher probability)" in shown
    assert cache_main(["export", str(cache), "--out", str(tmp_path / "axolotl"), "--quiet"]) == 0
    assert len(datasets.load_from_disk(str(tmp_path / "axolotl"))) == 6
    common = ["--max-steps", "2", "--batch-size", "3", "--device", "cpu", "--no-progress", "--lora-targets", "q_proj,v_proj"]
    out = tmp_path / "run"
    assert pact_main(["train", "--cache", str(cache), "--out", str(out), "--objective", "kd", *common]) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(entry["kd"] > 0 and entry["kl"] == 0 for entry in logged)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"distilled with the `kd` objective from the top-6 log-probs of the teacher `{tiny_model_dir}`" in card
    capsys.readouterr()
    assert pact_main(["train", "--cache", str(cache), "--out", str(tmp_path / "no"), "--objective", "pact+kd", *common]) != 0
    assert "is a distillation-only cache (built with --safety_targets false)" in capsys.readouterr().err
    for extra, message in ((["--safety_targets", "false"], "safety_targets false needs kd_top_k"),
                           (["--safety_targets", "false", "--kd_top_k", "6", "--teacher", "x"], "give x as --model"),
                           (["--safety_targets", "false", "--kd_top_k", "6", "--top_k", "2"], "top_k chooses safety tokens")):
        assert cache_main([*base, "--out", str(tmp_path / "refused"), *extra]) != 0
        assert message in capsys.readouterr().err


def test_hf_dataset_has_no_safety_columns_and_drift_is_refused(tiny, kd_only, tmp_path):
    """`to_hf_dataset()` of a distillation-only cache: the teacher top-K and token log-probs per row, equal to the rows',
    and no safety column; `safety_drift`, which measures against safety targets, refuses it naming the flag."""
    from pact.evaluation.drift import safety_drift

    dataset = kd_only.to_hf_dataset(cache_dir=str(tmp_path / "hf"))
    assert not set(SAFETY_FIELDS) & set(dataset.column_names)
    for index in (0, len(kd_only) - 1):
        row, got = kd_only[index], dataset[index]
        for key in ("kd_ids", "kd_logprobs", "kd_tail", "target_logprob"):
            assert torch.equal(torch.tensor(got[key]), row[key])
    with pytest.raises(PactError, match="distillation-only \\(built with --safety_targets false\\)"):
        safety_drift(tiny.model, kd_only, tiny.tokenizer.pad_token_id, progress=False)
