"""The weight dtype (`--dtype`) and the float32 policy: whatever the weights' dtype, the logits that feed a softmax, a
log-softmax, a top-p count or the cache's stored values are projected in float32 from the hidden states."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pact.training.arguments import PactTrainingArguments
from pact.cache_tools import CacheReader, build_cache, load_manifest
from pact.data.batch import collate_rows
from pact.errors import InvalidSetting
from pact.objective.loss import cached_pact_loss
from pact.objective.student import student_outputs
from pact.models.loading import load_model
from pact.devices import resolve_dtype
from pact.objective.settings import ObjectiveArguments
from pact.objective.student import chunked_target_logprob
from pact.models.parts import float32_logits
from pact.models.parts import causal_lm_parts, hidden_states_at
from pact.training.train import train
from test_cache_support import float32_cache, one_thread, tiny, tiny_examples, tiny_safety  # noqa: F401  (fixtures)

BF16 = {"rtol": 1.6e-2, "atol": 1e-2}  # bfloat16 keeps 8 significant bits: ~0.4% per rounding, a few roundings deep
STORED = ("full_logits", "post_logits", "logsumexp", "target_logprob")


def _not_bf16_rounded(values: torch.Tensor) -> bool:
    """Whether some of `values` carry more precision than bfloat16 holds (so they were not computed in bfloat16)."""
    return bool((values != values.bfloat16().float()).any())


@pytest.fixture(scope="module")
def tiny_bf16(tiny_model_dir):
    """The tiny model with bfloat16 weights, on CPU."""
    return load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")


@pytest.fixture(scope="module")
def bf16_cache(tiny_bf16, tiny_examples, tiny_safety, tmp_path_factory):
    """A float32-stored cache built by the bfloat16 tiny model (same rows and shards as `float32_cache`)."""
    out = tmp_path_factory.mktemp("cache") / "bf16-weights"
    build_cache(tiny_bf16, tiny_examples, tiny_safety, out, dtype="float32", rows_per_shard=4, batch_size=3, progress=False)
    return out


@pytest.mark.parametrize(("device", "bf16_supported", "expected"), [
    ("cpu", True, torch.float32), ("cuda", True, torch.bfloat16), ("cuda", False, torch.float16)])
def test_auto_is_bf16_on_a_gpu_that_supports_it_float16_on_an_older_one_float32_on_cpu(monkeypatch, device, bf16_supported,
                                                                                        expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert resolve_dtype("auto", torch.device(device)) == expected
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_float32_logits_are_projected_in_float32_from_half_precision_inputs():
    generator = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(5, 16, generator=generator).bfloat16(), torch.randn(40, 16, generator=generator).bfloat16()
    logits = float32_logits(hidden, head)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hidden.float() @ head.float().T, rtol=1e-6, atol=1e-6)
    assert _not_bf16_rounded(logits)
    # The CE's full-vocabulary logits come from the weights' dtype (no float32 copy of the head), softmaxed in float32.
    targets = torch.randint(0, 40, (5,), generator=generator)
    expected = torch.log_softmax((hidden @ head.T).float(), dim=-1).gather(1, targets[:, None])[:, 0]
    logprob = chunked_target_logprob(hidden, head, targets, chunk_size=2)
    assert logprob.dtype == torch.float32
    torch.testing.assert_close(logprob, expected, rtol=1e-6, atol=1e-6)


def test_a_bf16_cache_is_within_bf16_tolerance_of_the_float32_one_and_records_its_dtype(float32_cache, bf16_cache):
    assert load_manifest(bf16_cache)["params"]["model_dtype"] == "bfloat16"
    assert load_manifest(float32_cache)["params"]["model_dtype"] == "float32"
    for exact, half in zip(CacheReader(float32_cache), CacheReader(bf16_cache)):
        assert (exact["post_count"] - half["post_count"]).abs().max() <= 1  # a near-tie at p0 may tip by one token
        for key in STORED:
            assert half[key].dtype == torch.float32
            torch.testing.assert_close(half[key], exact[key], **BF16)
    stored = torch.cat([row["full_logits"].flatten() for row in CacheReader(bf16_cache)])
    assert _not_bf16_rounded(stored), "the bf16 model's cached logits were projected in bfloat16"


def test_verify_recomputes_a_bf16_cache_in_the_batches_it_was_built_in(tmp_path):
    """`verify --recompute` of every row of a cache the embedded model built in bfloat16 (the default on a GPU), rows of
    different lengths in one batch: each row recomputed in its build batch repeats the build's arithmetic (the same
    values, stored in float32); recomputed alone (as verify did before), a row's logits move beyond the allowed
    difference."""
    from pact.cache_tools.verify import RECOMPUTE_ATOL, RECOMPUTE_RTOL, _example, verify_cache
    from pact.data.chat import assistant_header_ids, load_examples
    from pact.data.sources import DEMO_BENIGN, demo_data_path
    from pact.objective.reference import reference_targets
    from test_cache_support import make_safety_tokens

    loaded = load_model(None, device="cpu", dtype="bfloat16")
    examples, _ = load_examples(demo_data_path(DEMO_BENIGN), loaded.tokenizer, limit=4)
    assert len({len(ex.input_ids) for ex in examples}) > 1  # padding differs between a row's batch and the row alone
    safety = make_safety_tokens(loaded)
    build_cache(loaded, examples, safety, tmp_path / "cache", dtype="float32", batch_size=8, progress=False)
    reader = CacheReader(tmp_path / "cache")
    report = verify_cache(reader.directory, recompute=len(reader), model=loaded)
    assert report.ok, report.problems
    assert report.recomputed_rows == len(reader) and report.worst_recompute_ratio < 1e-3  # float32 storage: the same values
    gate, header, pad = reader.manifest["gate"], assistant_header_ids(loaded.tokenizer), loaded.tokenizer.pad_token_id
    worst = 0.0
    for row in reader:
        alone = reference_targets(loaded.model, [_example(row)], reader.safety_ids, header, gate["p0"], gate["gate_temperature"],
                                  pad)[0].full_logits.gather(1, row["columns"].expand_as(row["full_logits"]))
        allowed = RECOMPUTE_ATOL + RECOMPUTE_RTOL * row["full_logits"].abs()
        worst = max(worst, float(((alone - row["full_logits"]).abs() / allowed).max()))
    assert worst > 1


def test_student_logits_and_loss_are_float32_under_bf16_weights(tiny, tiny_bf16, float32_cache):
    reader = CacheReader(float32_cache)
    rows = [reader[i] for i in range(4)]
    batch = collate_rows(rows, 0)
    student = student_outputs(tiny_bf16.model, batch, reader.safety_ids)
    assert student.safety_logits.dtype == student.logprob.dtype == torch.float32
    _, head = causal_lm_parts(tiny_bf16.model)
    with torch.no_grad():
        hidden = hidden_states_at(tiny_bf16.model, batch.input_ids, batch.attention_mask, batch.rows, batch.positions)
    torch.testing.assert_close(student.safety_logits.detach(), hidden.float() @ head[reader.safety_ids].float().T)
    exact = cached_pact_loss(tiny.model, rows, reader.safety_ids, reader.safety_weights, ObjectiveArguments(), 0)
    half = cached_pact_loss(tiny_bf16.model, rows, reader.safety_ids, reader.safety_weights, ObjectiveArguments(), 0)
    assert half.loss.dtype == torch.float32
    for part in ("loss", "ce", "kl"):
        torch.testing.assert_close(getattr(half, part).detach(), getattr(exact, part).detach(), **BF16)


@pytest.mark.parametrize(("dtype", "fp16", "device"), [
    ("bfloat16", False, "cpu"),
    pytest.param("float16", True, "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 trains on a GPU")])])
def test_train_in_half_precision_writes_a_float32_adapter_and_records_the_dtype(float32_cache, tmp_path, dtype, fp16, device):
    out = tmp_path / "run"
    result = train(PactTrainingArguments(cache=str(float32_cache), output_dir=str(out), max_steps=2, per_device_train_batch_size=4,
                                         learning_rate=1e-3, train_device=device, disable_tqdm=True, dtype=dtype))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics)
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and {w.dtype for w in weights.values()} == {torch.float32}
    config = json.loads((out / "pact_config.json").read_text())
    assert (config["dtype"], config["fp16"]) == (dtype, fp16)


def test_training_dtype_auto_resolves_by_device_and_float16_refuses_what_it_cannot_scale(tmp_path):
    common = {"output_dir": str(tmp_path), "train_device": "cpu"}
    assert PactTrainingArguments(**common).dtype == "float32"
    with pytest.raises(InvalidSetting, match="dtype float16 trains under a GPU's loss scaler"):
        PactTrainingArguments(**common, dtype="float16")
    with pytest.raises(InvalidSetting, match="dtype float16 trains LoRA adapters only"):
        PactTrainingArguments(**common, dtype="float16", full=True)
    with pytest.raises(InvalidSetting, match="dtype must be one of auto, bfloat16, float16, float32, got 'int8'"):
        PactTrainingArguments(**common, dtype="int8")
