"""Cached PACT equals online PACT: loss and LoRA gradients, and `pact eval drift`
equals an independent online computation of docs/objective.md section 2."""

import json

import pytest

from helpers import random_lora_student, write_jsonl
from pact.cache_tools import CacheReader
from pact.data.batch import collate_rows
from pact.cli.cache import main as cache_main
from pact.cli.main import main as pact_main
from pact.data.chat import assistant_header_ids
from pact.objective.loss import cached_pact_loss, pact_batch_loss
from pact.models.loading import load_model
from pact.objective.settings import ObjectiveArguments
from pact.objective.targets import OnlineTargets

from test_online_objective import independent_terms

ROWS = [
    {"instruction": "Name a colour.", "output": "Blue is a colour."},
    {"instruction": "What is two plus two?", "output": "Four."},
    {"instruction": "Say hello in French.", "input": "Be polite.", "output": "Bonjour, enchanté de vous rencontrer."},
    {"instruction": "Give me a fruit.", "output": "An apple."},
]


def _build(model_arg, root, dtype, max_examples, top):
    data = write_jsonl(root / "data.jsonl", ROWS)
    tokens = root / "safety.json"
    assert pact_main(["safety-tokens", "--aligned", model_arg, "--max-examples", str(max_examples), "--top", str(top),
                      "--device", "cpu", "--out", str(tokens)]) == 0
    cache = root / f"cache-{dtype}"
    assert cache_main(["build", "--model", model_arg, "--data", str(data), "--safety-tokens", str(tokens), "--out", str(cache),
                       "--dtype", dtype, "--device", "cpu", "--quiet"]) == 0
    return CacheReader(cache)


def _backward(student, output):
    student.zero_grad()
    output.loss.backward()
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def _online_and_cached(loaded, reader, seed, cfg=None, scale=0.02):
    """Loss and LoRA gradients of the same student, with online (adapter-disabled) and cached targets."""
    tok = loaded.tokenizer
    cfg = cfg or ObjectiveArguments()
    rows = [reader[i] for i in range(len(reader))]
    safety_ids, weights = reader.safety_ids, reader.safety_weights
    student = random_lora_student(loaded.model, seed=seed, scale=scale)
    online = OnlineTargets(student, safety_ids, assistant_header_ids(tok), cfg, tok.pad_token_id)
    online_out = pact_batch_loss(student, online.fill(collate_rows(rows, tok.pad_token_id)), safety_ids, weights, cfg)
    online_grads = _backward(student, online_out)
    cached_out = cached_pact_loss(student, rows, safety_ids, weights, cfg, tok.pad_token_id)
    cached_grads = _backward(student, cached_out)
    return online_out, online_grads, cached_out, cached_grads


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    loaded = load_model(str(tiny_model_dir), device="cpu")
    return loaded, {dtype: _build(str(tiny_model_dir), root, dtype, 8, 24) for dtype in ("float32", "bfloat16")}


def test_float32_cache_reproduces_online_loss_and_lora_gradients(tiny):
    """Float32 cache: loss, CE, KL and every LoRA gradient within 1e-5 relative of the online objective."""
    loaded, caches = tiny
    online, g_online, cached, g_cached = _online_and_cached(loaded, caches["float32"], seed=0)
    assert online.kl.item() > 0
    for part in ("loss", "ce", "kl"):
        assert getattr(cached, part).item() == pytest.approx(getattr(online, part).item(), rel=1e-5)
    for name in g_online:
        assert _relative(g_cached[name], g_online[name]) < 1e-5, name


@pytest.mark.parametrize("objective", ["refkl", "refkl+tokenwise"])
def test_float32_cache_reproduces_the_online_reference_kl(tiny, objective):
    """The reference KL (docs/objective.md section 5) from a float32 cache: loss, CE, KL, the token-wise part and
    every LoRA gradient within 1e-5 relative of the same objective with the reference computed online, with a
    student far enough from the reference for the KL's gradient to matter and position weights on."""
    loaded, caches = tiny
    cfg = ObjectiveArguments(objective=objective, lam=2.0, kl_position_weights="4,2,1")
    online, g_online, cached, g_cached = _online_and_cached(loaded, caches["float32"], seed=1, cfg=cfg, scale=1.0)
    assert online.kl.item() > 1e-3
    for part in ("loss", "ce", "kl", "tokenwise"):
        assert getattr(cached, part).item() == pytest.approx(getattr(online, part).item(), rel=1e-5)
    for name in g_online:
        assert _relative(g_cached[name], g_online[name]) < 1e-5, name


def test_bfloat16_cache_error_bound(tiny):
    """Bfloat16 cache: KL within 1e-2 relative and gradients within 2e-2 (bf16 keeps 8 mantissa bits)."""
    loaded, caches = tiny
    online, g_online, cached, g_cached = _online_and_cached(loaded, caches["bfloat16"], seed=0)
    assert cached.kl.item() == pytest.approx(online.kl.item(), rel=1e-2)
    assert cached.ce.item() == pytest.approx(online.ce.item(), rel=1e-6)
    for name in g_online:
        assert _relative(g_cached[name], g_online[name]) < 2e-2, name


def _independent_drift(student, reference, reader, cfg):
    """Mean KL_t by unpadded per-example passes and the float64 transcription of section 1.2, and the mean shift of
    the response tokens' log-probs at each response position, log p_student - log p_reference (the CE terms of both,
    swapped)."""
    header = reader.manifest["header_ids"]
    safety_ids = reader.safety_ids
    terms, shifts = [], {}
    for i in range(len(reader)):
        row = reader[i]
        ids = row["input_ids"].tolist()
        spans = [tuple(span) for span in row["response_spans"].tolist()]
        ce_student, kl = independent_terms(student, reference, ids, spans, header, safety_ids, reader.safety_weights, cfg)
        ce_reference, _ = independent_terms(reference, reference, ids, spans, header, safety_ids, reader.safety_weights, cfg)
        terms += kl
        steps = [t for start, end in spans for t in range(end - start)]
        for t, s, r in zip(steps, ce_student, ce_reference):
            shifts.setdefault(t, []).append(r - s)
    by_position = [sum(shifts[t]) / len(shifts[t]) for t in range(len(shifts))]
    return sum(terms) / len(terms), len(terms), by_position


def _drift_cli(capsys, reader, model_arg, adapter=None):
    argv = ["eval", "drift", "--cache", str(reader.directory), "--model", model_arg, "--device", "cpu", "--json"]
    if adapter:
        argv += ["--adapter", str(adapter)]
    assert pact_main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _check_drift(capsys, loaded, reader, model_arg, tmp_path):
    cfg = ObjectiveArguments()
    reference_value, tokens, _ = _independent_drift(loaded.model, loaded.model, reader, cfg)
    result = _drift_cli(capsys, reader, model_arg)
    assert result["tokens"] == tokens
    assert result["kl_mean"] > 0
    assert result["kl_mean"] == pytest.approx(reference_value, rel=1e-3)
    assert abs(result["logprob_shift_mean"]) < 5e-5  # the reference against its own float32 cache (float32 log-probs)
    student = random_lora_student(loaded.model, seed=5, scale=0.02)
    student.save_pretrained(tmp_path / "adapter")
    adapted_value, _, adapted_shift = _independent_drift(student, loaded.model, reader, cfg)
    adapted = _drift_cli(capsys, reader, model_arg, tmp_path / "adapter")
    assert adapted["kl_mean"] == pytest.approx(adapted_value, rel=1e-3)
    assert adapted["kl_mean"] != pytest.approx(result["kl_mean"], rel=1e-3)
    longest = max(len(reader[i]["post_count"]) for i in range(len(reader)))
    assert len(adapted["kl_by_position"]) == len(adapted["logprob_shift_by_position"]) == longest == len(adapted_shift)
    assert max(abs(v) for v in adapted_shift) > 1e-3  # the adapter moves the response's log-probs, far above 5e-5
    assert adapted["logprob_shift_by_position"] == pytest.approx(adapted_shift, rel=1e-3, abs=5e-5)
    by_position = zip(adapted["logprob_shift_by_position"], adapted["tokens_by_position"])
    assert adapted["logprob_shift_mean"] == pytest.approx(sum(v * n for v, n in by_position) / adapted["tokens"], abs=1e-9)


def test_drift_equals_independent_online_computation_tiny(tiny, tiny_model_dir, capsys, tmp_path):
    """`pact eval drift` for the reference and for a random LoRA adapter equals section 1.2 computed online."""
    loaded, caches = tiny
    _check_drift(capsys, loaded, caches["float32"], str(tiny_model_dir), tmp_path)


@pytest.fixture(scope="module")
def embedded_cache(embedded, tmp_path_factory):
    return _build(embedded.source, tmp_path_factory.mktemp("parity-embedded"), "float32", 8, 50)


@pytest.mark.embedded
def test_float32_cache_reproduces_online_on_embedded_model(embedded, embedded_cache):
    """The parity holds on the real SmolLM2 with its own 50 safety tokens."""
    online, g_online, cached, g_cached = _online_and_cached(embedded, embedded_cache, seed=0)
    assert cached.loss.item() == pytest.approx(online.loss.item(), rel=1e-5)
    assert cached.kl.item() == pytest.approx(online.kl.item(), rel=1e-5)
    for name in g_online:
        assert _relative(g_cached[name], g_online[name]) < 1e-5, name


@pytest.mark.embedded
def test_drift_equals_independent_online_computation_embedded(embedded, embedded_cache, capsys, tmp_path):
    """`pact eval drift` on SmolLM2, reference and random LoRA adapter, equals section 1.2 computed online."""
    _check_drift(capsys, embedded, embedded_cache, embedded.source, tmp_path)
