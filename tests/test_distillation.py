"""Distillation from a teacher's top-K and tail (docs/distillation.md): each KD loss of the objectives `kd` and
`pact+kd` against a float64 transcription from the full-vocabulary distributions, and the online teacher (the exact
targets, `teacher_topk`, are tested in tests/test_topk_codec.py)."""

from __future__ import annotations

import pytest
import torch
from test_cache_support import one_thread, tiny, tiny_examples, tiny_safety  # noqa: F401  (fixtures)

from pact.data.batch import collate_examples
from pact.data.chat import assistant_header_ids
from pact.errors import InvalidSetting, PactError
from pact.objective.distillation import OnlineTeacher
from pact.objective.loss import pact_batch_loss
from pact.objective.settings import ObjectiveArguments
from pact.objective.targets import OnlineTargets


def coarse_divergence_float64(student_vocab, teacher_vocab, ids, loss: str, temperature: float, beta: float = 0.5):
    """The KD loss transcribed from docs/distillation.md, in float64, from full-vocabulary logits: both distributions
    coarse-grained to the teacher's top-K ids and one tail category, softened by T, the divergence times T^2."""
    def coarse(logits):
        logp = torch.log_softmax(logits.double(), dim=-1)
        at = logp.gather(1, ids)
        tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=1, keepdim=True)
        return torch.log_softmax(torch.cat([at, tail], dim=1) / temperature, dim=1)

    log_q, log_p = coarse(student_vocab), coarse(teacher_vocab)
    p, q = log_p.exp(), log_q.exp()
    if loss == "forward":
        value = (p * (log_p - log_q)).sum(1)
    elif loss == "reverse":
        value = (q * (log_q - log_p)).sum(1)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        value = beta * (p * (log_p - log_m)).sum(1) + (1 - beta) * (q * (log_q - log_m)).sum(1)
    return temperature**2 * value


@pytest.fixture(scope="module")
def models(tiny, tiny_examples):
    """The tiny model as student, and a perturbed copy of it as teacher, with a batch of 3 examples."""
    import copy

    teacher = copy.deepcopy(tiny.model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return tiny, teacher, collate_examples(tiny_examples[:3], tiny.tokenizer.pad_token_id)


def _full_logits(model, batch):
    """float32 full-vocabulary logits at the batch's response positions, with autograd."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[batch.rows, batch.positions].float()


@pytest.mark.parametrize("loss,temperature", [("forward", 1.0), ("forward", 2.0), ("reverse", 1.0), ("jsd", 1.5)])
def test_kd_loss_and_gradients_equal_the_float64_transcription(models, tiny_safety, one_thread, loss, temperature):
    """`kd` with an online teacher: the loss, (1 - alpha) CE + alpha mean KD_t, and the gradient of every student
    parameter equal those of the transcription through the student's full-vocabulary logits."""
    tiny, teacher, batch = models
    cfg = ObjectiveArguments(objective="kd", kd_loss=loss, kd_temperature=temperature, kd_alpha=0.7)
    safety_ids = tiny_safety.id_tensor()
    reference = OnlineTargets(tiny.model, safety_ids, assistant_header_ids(tiny.tokenizer), cfg, tiny.tokenizer.pad_token_id)
    filled = OnlineTeacher(teacher, 6, reference).fill(batch)
    params = [p for p in tiny.model.parameters() if p.requires_grad]
    out = pact_batch_loss(tiny.model, filled, safety_ids, tiny_safety.weight_tensor(), cfg)
    got = torch.autograd.grad(out.loss, params)
    with torch.no_grad():
        teacher_logits = _full_logits(teacher, batch)
    student_logits = _full_logits(tiny.model, batch)
    kd = coarse_divergence_float64(student_logits, teacher_logits, filled.kd_ids, loss, temperature).mean()
    ce = torch.nn.functional.cross_entropy(student_logits.double(), batch.labels)
    want_loss = 0.3 * ce + 0.7 * kd
    torch.testing.assert_close(out.kd.double(), kd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), want_loss, rtol=1e-4, atol=1e-6)
    want = torch.autograd.grad(want_loss, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-3, atol=1e-5)


def test_pact_plus_kd_adds_pacts_kl_and_a_teacher_equal_to_the_student_costs_nothing(models, tiny_safety, one_thread):
    """pact+kd is kd's loss plus lambda times PACT's KL (the same batch under pact gives that KL), and distilling the
    student from itself gives a forward KD of 0."""
    tiny, _, batch = models
    safety_ids, weights = tiny_safety.id_tensor(), tiny_safety.weight_tensor()
    header, pad = assistant_header_ids(tiny.tokenizer), tiny.tokenizer.pad_token_id
    cfg = ObjectiveArguments(objective="pact+kd", lam=0.5, kd_alpha=0.4)
    filled = OnlineTeacher(tiny.model, 5, OnlineTargets(tiny.model, safety_ids, header, cfg, pad)).fill(batch)
    with torch.no_grad():
        both = pact_batch_loss(tiny.model, filled, safety_ids, weights, cfg)
        kd_only = pact_batch_loss(tiny.model, filled, safety_ids, weights, ObjectiveArguments(objective="kd", kd_alpha=0.4))
        pact = pact_batch_loss(tiny.model, filled, safety_ids, weights, ObjectiveArguments())
    assert abs(float(both.kd)) < 1e-5
    torch.testing.assert_close(both.loss, kd_only.loss + 0.5 * pact.kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd_only.loss, 0.6 * kd_only.ce + 0.4 * kd_only.kd, rtol=1e-6, atol=1e-7)


def test_kd_needs_teacher_targets_and_valid_settings(models, tiny_safety, one_thread):
    """A batch without top-K targets is refused naming the command that makes them; bad settings name the field."""
    tiny, _, batch = models
    safety_ids = tiny_safety.id_tensor()
    cfg = ObjectiveArguments(objective="kd")
    filled = OnlineTargets(tiny.model, safety_ids, assistant_header_ids(tiny.tokenizer), cfg, tiny.tokenizer.pad_token_id).fill(batch)
    with pytest.raises(PactError, match="no teacher top-K targets.*pact-cache build --kd_top_k K"):
        pact_batch_loss(tiny.model, filled, safety_ids, tiny_safety.weight_tensor(), cfg)
    for kwargs, name in [({"kd_loss": "tvd"}, "kd_loss"), ({"kd_alpha": 1.5}, "kd_alpha"),
                         ({"kd_temperature": 0.0}, "kd_temperature"), ({"kd_jsd_beta": 1.0}, "kd_jsd_beta")]:
        with pytest.raises(InvalidSetting, match=name):
            ObjectiveArguments(objective="kd", **kwargs)
