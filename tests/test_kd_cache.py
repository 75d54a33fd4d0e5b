"""A distillation cache (`pact-cache build --kd_top_k K`): what it stores against the teacher computed online, the
cached KD loss and gradients against online KD, another teacher, and the refusals."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_cache_support import float32_cache, one_thread, tiny, tiny_examples, tiny_safety  # noqa: F401  (fixtures)

from pact.cache_tools import CacheError, CacheReader, build_cache
from pact.cache_tools.topk_codec import tolerance
from pact.data.batch import collate_examples
from pact.data.chat import assistant_header_ids
from pact.objective.distillation import OnlineTeacher, teacher_batch_topk
from pact.objective.loss import cached_pact_loss, pact_batch_loss
from pact.objective.settings import ObjectiveArguments
from pact.objective.targets import OnlineTargets

K = 8


@pytest.fixture(scope="module")
def kd_cache(tiny, tiny_examples, tiny_safety, tmp_path_factory):
    """A float32 cache of 6 tiny examples with the model's own top-8, built one example per forward pass (so an online
    pass over one example does the same arithmetic)."""
    out = tmp_path_factory.mktemp("kd") / "cache"
    torch.set_num_threads(1)
    build_cache(tiny, tiny_examples[:6], tiny_safety, out, dtype="float32", batch_size=1, rows_per_shard=4, progress=False,
                kd_top_k=K)
    return CacheReader(out)


def test_the_cache_holds_the_teachers_top_k_within_the_stated_error(tiny, tiny_examples, kd_cache, one_thread):
    """Every row: the top-K ids of the online teacher exactly, its log-probs and tail within the codec's tolerance; the
    manifest records K and the teacher."""
    assert kd_cache.manifest["kd_top_k"] == K and kd_cache.layout.kd_top_k == K
    assert kd_cache.manifest["kd_teacher"] == {"source": tiny.source, "fingerprint": tiny.fingerprint}
    for index in range(len(kd_cache)):
        row = kd_cache[index]
        example = tiny_examples[index]
        top = teacher_batch_topk(tiny.model, collate_examples([example], tiny.tokenizer.pad_token_id), K)
        # The same set; the stored order is by the decoded (quantised) log-probs, so near-ties may swap.
        stored_ids, stored_order = row["kd_ids"].sort(dim=1)
        online_ids, online_order = top.ids.sort(dim=1)
        assert torch.equal(stored_ids, online_ids)
        stored, online = row["kd_logprobs"].gather(1, stored_order), top.logprobs.gather(1, online_order)
        assert (stored - online).abs().le(torch.from_numpy(tolerance(online.numpy())) + 1e-6).all()
        assert (row["kd_tail"] - top.tail).abs().le(torch.from_numpy(tolerance(top.tail.numpy())) + 1e-6).all()


def test_cached_kd_equals_online_kd_within_storage_precision(tiny, tiny_examples, tiny_safety, kd_cache, one_thread):
    """`kd` and `pact+kd` of a student (the model scaled by 1.2) from the cache, against the same teacher in memory:
    the loss and every parameter's gradient agree to the storage error of the log-probs, the KD part being the only
    difference."""
    safety_ids, weights = tiny_safety.id_tensor(), tiny_safety.weight_tensor()
    header, pad = assistant_header_ids(tiny.tokenizer), tiny.tokenizer.pad_token_id
    rows = [kd_cache[i] for i in range(3)]
    student = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.mul_(1.2)
    params = [p for p in student.parameters() if p.requires_grad]
    for objective in ("kd", "pact+kd"):
        cfg = ObjectiveArguments(objective=objective, kd_temperature=2.0)
        cached = cached_pact_loss(student, rows, safety_ids, weights, cfg, pad)
        cached_grads = torch.autograd.grad(cached.loss, params)
        teacher = OnlineTeacher(tiny.model, K, OnlineTargets(tiny.model, safety_ids, header, cfg, pad))
        online = pact_batch_loss(student, teacher.fill(collate_examples(tiny_examples[:3], pad)), safety_ids, weights, cfg)
        online_grads = torch.autograd.grad(online.loss, params)
        assert float(online.kd.detach()) > 1e-3
        # The stored log-probs are within the codec's tolerance of the teacher's (test above): up to 0.06 nats for this
        # near-uniform teacher's entries (p ~ 0.003), which moves its tiny KD (0.0024) by ~6e-5 and the gradients by 0.3%.
        torch.testing.assert_close(cached.kd, online.kd, rtol=0, atol=1e-4)
        torch.testing.assert_close(cached.loss, online.loss, rtol=1e-4, atol=1e-4)
        for c, o in zip(cached_grads, online_grads):
            assert float((c - o).norm()) <= 1e-2 * float(o.norm()) + 1e-7


def test_another_teacher_and_its_refusals(tiny, tiny_examples, tiny_safety, tmp_path, one_thread):
    """A teacher of the same tokenizer (a perturbed copy) fills the top-K instead of the reference; one with another
    tokenizer, or a teacher without K, or K not below the vocabulary, is refused naming the problem."""
    teacher_model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for parameter in teacher_model.parameters():
            parameter.mul_(1.3)
    teacher = dataclasses.replace(tiny, model=teacher_model, source="teacher", fingerprint="sha256:" + "1" * 64)
    build_cache(tiny, tiny_examples[:2], tiny_safety, tmp_path / "t", batch_size=1, progress=False, kd_top_k=K, teacher=teacher)
    reader = CacheReader(tmp_path / "t")
    assert reader.manifest["kd_teacher"]["source"] == "teacher"
    top = teacher_batch_topk(teacher_model, collate_examples(tiny_examples[:1], tiny.tokenizer.pad_token_id), K)
    assert torch.equal(reader[0]["kd_ids"].sort(dim=1).values, top.ids.sort(dim=1).values)
    other = dataclasses.replace(teacher, tokenizer=copy.deepcopy(tiny.tokenizer))
    other.tokenizer.chat_template = "{{ messages }}"
    with pytest.raises(CacheError, match="the teacher teacher has another tokenizer than the model"):
        build_cache(tiny, tiny_examples[:2], tiny_safety, tmp_path / "o", progress=False, kd_top_k=K, teacher=other)
    with pytest.raises(CacheError, match="a teacher was given without --kd_top_k"):
        build_cache(tiny, tiny_examples[:2], tiny_safety, tmp_path / "n", progress=False, teacher=teacher)
    vocab = tiny.model.get_output_embeddings().weight.shape[0]
    with pytest.raises(CacheError, match=f"--kd_top_k {vocab} must be below the vocabulary size {vocab}"):
        build_cache(tiny, tiny_examples[:2], tiny_safety, tmp_path / "v", progress=False, kd_top_k=vocab)


def test_the_commands_build_train_and_refuse(tiny_model_dir, tiny_safety_file, tmp_path, capsys, one_thread):
    """`pact-cache build --kd_top_k 6` then `pact train --objective kd` (and pact+kd, reverse KL) train and log the KD
    part; `stats --json` reports the bytes per response token; a cache built without it is refused for kd, naming
    the flag that adds it."""
    import json

    from pact.cli.cache import main as cache_main
    from pact.cli.main import main as pact_main

    base = ["build", "--model", str(tiny_model_dir), "--safety-tokens", str(tiny_safety_file), "--limit", "6",
            "--device", "cpu", "--quiet", "--max-length", "256"]
    assert cache_main([*base, "--out", str(tmp_path / "kd"), "--kd_top_k", "6"]) == 0
    assert cache_main([*base, "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert cache_main(["stats", str(tmp_path / "kd"), "--json"]) == 0
    with_kd = json.loads(capsys.readouterr().out)["bytes_per_response_token"]
    assert cache_main(["stats", str(tmp_path / "plain"), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["bytes_per_response_token"]
    assert with_kd > plain
    assert cache_main(["inspect", str(tmp_path / "kd")]) == 0
    assert "distillation: the top-6 log-probs and tail of" in capsys.readouterr().out
    common = ["--max-steps", "2", "--batch-size", "3", "--device", "cpu", "--no-progress", "--lora-targets", "q_proj,v_proj"]
    for objective, extra in (("kd", []), ("pact+kd", ["--kd_loss", "reverse", "--kd_temperature", "2"])):
        out = tmp_path / ("run-" + objective.replace("+", "-"))
        assert pact_main(["train", "--cache", str(tmp_path / "kd"), "--out", str(out), "--objective", objective,
                          *extra, *common]) == 0
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert logged and all(entry["kd"] > 0 for entry in logged)
    capsys.readouterr()
    assert pact_main(["train", "--cache", str(tmp_path / "plain"), "--out", str(tmp_path / "refused"), "--objective", "kd",
                      *common]) != 0
    assert "holds no teacher top-K (it was built without --kd_top_k)" in capsys.readouterr().err


def test_export_writes_what_axolotl_reads_from_a_real_kd_cache(kd_cache, float32_cache, tmp_path, capsys):
    """`pact-cache export DIR --format axolotl` on a built cache: the dataset's targets are the cache's teacher
    top-K at the position before each response token (renormalised over the top-K at T = 1), the mask exactly there;
    the YAML names the export. A cache without --kd_top_k is refused naming the flag."""
    import datasets

    from pact.cli.cache import main as cache_main

    out = tmp_path / "axolotl"
    assert cache_main(["export", str(kd_cache.directory), "--format", "axolotl", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "kd_trainer: true" in printed
    exported = datasets.load_from_disk(str(out))
    assert len(exported) == len(kd_cache)
    for index in range(len(kd_cache)):
        row, got = kd_cache[index], exported[index]
        positions = torch.cat([torch.arange(start, end) for start, end in row["response_spans"].tolist()]) - 1
        mask = torch.tensor(got["target_mask"])
        assert torch.equal(mask.nonzero()[:, 0].unique(), positions)
        ids = torch.tensor(got["target_token_ids"])[positions]
        assert torch.equal(ids, row["kd_ids"])
        logprobs = torch.tensor(got["target_logprobs"])[positions]
        torch.testing.assert_close(logprobs, torch.log_softmax(row["kd_logprobs"], dim=1), rtol=1e-5, atol=1e-5)
    assert cache_main(["export", str(float32_cache), "--out", str(tmp_path / "plain"), "--quiet"]) != 0
    assert "pact-cache build --kd_top_k" in capsys.readouterr().err


def test_to_hf_dataset_carries_the_teacher_top_k(kd_cache, tmp_path):
    """`reader.to_hf_dataset()` of a distillation cache: kd_ids, kd_logprobs and kd_tail per row, equal to the rows'."""
    dataset = kd_cache.to_hf_dataset(cache_dir=str(tmp_path / "hf"))
    for index in (0, len(kd_cache) - 1):
        row, got = kd_cache[index], dataset[index]
        assert torch.equal(torch.tensor(got["kd_ids"]), row["kd_ids"])
        assert torch.equal(torch.tensor(got["kd_logprobs"]), row["kd_logprobs"])
        assert torch.equal(torch.tensor(got["kd_tail"]), row["kd_tail"])


def test_verify_recomputes_the_teacher_top_k(tiny, kd_cache, monkeypatch, one_thread):
    """`verify --recompute` re-runs the teacher (the reference itself) at the stored ids: a sound cache passes; stored
    log-probs moved by 0.5 nats (as if the ids named other tokens) are reported."""
    from pact.cache_tools import schema
    from pact.cache_tools.verify import verify_cache

    report = verify_cache(kd_cache.directory, recompute=3, model=tiny)
    assert report.ok, report.problems
    assert report.recomputed_rows == 3
    decode = schema.ShardRows._decode_kd

    def shifted(self, metadata):
        ids, logprobs, tail = decode(self, metadata)
        return ids, logprobs - 0.5, tail

    monkeypatch.setattr(schema.ShardRows, "_decode_kd", shifted)
    report = verify_cache(kd_cache.directory, recompute=2, model=tiny)
    assert any("recomputed kd_logprobs differs from the stored value" in problem for problem in report.problems), report.problems


def test_parts_merge_and_resume_keep_the_teacher_top_k(tiny, tiny_examples, tiny_safety, kd_cache, tmp_path, one_thread):
    """A --num-shards 2 build of the same examples, merged, holds the same rows as the single build; resuming with
    another --kd_top_k is refused naming it."""
    from pact.cache_tools.merge import merge_caches

    kwargs = dict(dtype="float32", batch_size=1, rows_per_shard=4, progress=False, kd_top_k=K)
    for part in (1, 0):
        build_cache(tiny, tiny_examples[:6], tiny_safety, tmp_path / f"part{part}", part_index=part, part_count=2, **kwargs)
    merge_caches(tmp_path / "merged", [tmp_path / "part0", tmp_path / "part1"])
    merged = CacheReader(tmp_path / "merged")
    assert len(merged) == len(kd_cache)
    for index in range(len(kd_cache)):
        for key in ("kd_ids", "kd_logprobs", "kd_tail"):
            assert torch.equal(merged[index][key], kd_cache[index][key])
    with pytest.raises(CacheError, match="kd_top_k: 8 vs 4"):
        build_cache(tiny, tiny_examples[:6], tiny_safety, tmp_path / "part0", part_index=0, part_count=2,
                    resume=True, **(kwargs | {"kd_top_k": 4}))
