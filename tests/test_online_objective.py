"""Online objective on a tiny model: separate reference == PEFT adapter-disabled reference,
and the batch loss equals an independent per-example transcription."""

import pytest
import torch

from helpers import random_lora_student
from pact.data.chat import assistant_header_ids, load_examples
from pact.data.sources import demo_data_path
from pact.objective.loss import pact_batch_loss
from pact.models.loading import load_model
from pact.objective.settings import ObjectiveArguments
from pact.objective.targets import OnlineTargets

from test_objective import _kl_reference


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    tok = loaded.tokenizer
    examples, _ = load_examples(demo_data_path("benign"), tok, max_length=192, limit=5)
    safety_ids = torch.tensor([5, 17, 40, 41, 99, 150, 200, 301])
    weights = torch.tensor([0.5, 0.0, 0.2, 0.9, 0.0, 0.1, 0.3, 0.0])
    return loaded, examples, safety_ids, weights


@torch.no_grad()
def independent_terms(student, reference, ids, spans, header, safety_ids, weights, cfg):
    """Per response token, CE and the float64 section-1.2 KL_t from unpadded single-sequence passes: the full
    context once, and for each response span its post-only context (the header, then that turn's tokens so far),
    with t the step within the turn."""
    z_all = student(torch.tensor([ids])).logits[0].double()
    f_all = reference(torch.tensor([ids])).logits[0].double()
    ce_terms, kl_terms = [], []
    for start, end in spans:
        z, f = z_all[start - 1 : end - 1], f_all[start - 1 : end - 1]
        p = reference(torch.tensor([list(header) + list(ids[start:end])])).logits[0, len(header) - 1 : -1].double()
        ce_terms.extend(torch.nn.functional.cross_entropy(z, torch.tensor(ids[start:end]), reduction="none").tolist())
        kl_terms.extend(_kl_reference(z[t, safety_ids].tolist(), f[t, safety_ids].tolist(), p[t, safety_ids].tolist(), t,
                                      weights.tolist(), cfg) for t in range(end - start))
    return ce_terms, kl_terms


def _loss_and_grads(student, reference_model, examples, safety_ids, weights, tok, cfg):
    reference = OnlineTargets(reference_model, safety_ids, assistant_header_ids(tok), cfg, tok.pad_token_id)
    out = pact_batch_loss(student, reference.batch(examples), safety_ids, weights, cfg)
    student.zero_grad()
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
    return out, grads


def test_adapter_disabled_reference_equals_separate_reference(setup):
    """Online PACT with the student's own adapters disabled matches a separate copy of the reference."""
    loaded, examples, safety_ids, weights = setup
    cfg = ObjectiveArguments()
    student = random_lora_student(loaded.model, seed=0, scale=0.5)
    shared, g_shared = _loss_and_grads(student, student, examples, safety_ids, weights, loaded.tokenizer, cfg)
    separate, g_separate = _loss_and_grads(student, loaded.model, examples, safety_ids, weights, loaded.tokenizer, cfg)
    assert shared.kl.item() > 0
    torch.testing.assert_close(shared.loss, separate.loss, rtol=1e-6, atol=0)
    for name in g_shared:
        torch.testing.assert_close(g_shared[name], g_separate[name], rtol=1e-5, atol=1e-8)


def test_online_loss_equals_independent_transcription(setup):
    """CE and KL of the batch equal unpadded per-example forward passes and the float64 section-1.2 transcription."""
    loaded, examples, safety_ids, weights = setup
    tok = loaded.tokenizer
    cfg = ObjectiveArguments(n_free=1, tau=2.0)
    student = random_lora_student(loaded.model, seed=1, scale=0.5)
    reference = OnlineTargets(loaded.model, safety_ids, assistant_header_ids(tok), cfg, tok.pad_token_id)
    out = pact_batch_loss(student, reference.batch(examples), safety_ids, weights, cfg)
    header = assistant_header_ids(tok)
    ce_terms, kl_terms = [], []
    for ex in examples:
        ce, kl = independent_terms(student, loaded.model, ex.input_ids, ex.spans, header, safety_ids, weights, cfg)
        ce_terms += ce
        kl_terms += kl
    ce = sum(ce_terms) / len(ce_terms)
    kl = sum(kl_terms) / len(kl_terms)
    assert out.tokens == len(kl_terms)
    assert out.ce.item() == pytest.approx(ce, rel=1e-5)
    assert out.kl.item() == pytest.approx(kl, rel=1e-4)
    assert out.loss.item() == pytest.approx(ce + cfg.lam * kl, rel=1e-5)
