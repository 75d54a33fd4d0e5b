"""The student's logsumexp outside S (the reference KL's rest category), computed beside the cross-entropy's log-probs
by `pact.objective.student._LogprobAndRest`: the values and gradients of autograd's own masked logsumexp, in float64,
for any vocabulary block size; and no [tokens, vocabulary] tensor beyond what the cross-entropy keeps."""

from __future__ import annotations

import pytest
import torch
from test_cache_support import one_thread, tiny  # noqa: F401  (fixtures)

from pact.objective import student
from pact.objective.settings import ObjectiveArguments
from pact.objective.student import chunked_projections
from pact.planning.step import measure_step, synthetic_rows


def _oracle(logits: torch.Tensor, targets: torch.Tensor, safety: torch.Tensor):
    """log softmax at the targets, and the logsumexp of the logits with S masked out, by plain autograd."""
    logprob = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    return logprob, torch.logsumexp(logits.index_fill(1, safety, float("-inf")), dim=-1)


def _mix(outputs, use, weights) -> torch.Tensor:
    """A scalar of the outputs, weighted per row, each output used or not."""
    return sum(u * (o * w).sum() for u, o, w in zip(use, outputs, weights))


@pytest.mark.parametrize("vocab,blocks", [(37, 8), (37, 1), (100, 7), (64, 4), (5, 8)])
@pytest.mark.parametrize("regime", ["spread", "safety-dominant", "safety-negligible"])
def test_values_and_gradients_match_autograd_in_float64(vocab, blocks, regime, monkeypatch):
    """Ragged, whole and single-column blocks, one block, and the mass on S near 1 (the rest ~1e-26) or near 0: the function's values and the
    gradient of any mix of its two outputs equal autograd's through the masked logsumexp."""
    monkeypatch.setattr(student, "VOCAB_BLOCKS", blocks)
    generator = torch.Generator().manual_seed(vocab + blocks)
    safety = torch.tensor([1, 3, vocab - 1])
    logits = torch.randn(7, vocab, generator=generator, dtype=torch.float64) * 4
    if regime == "safety-dominant":
        logits[:, 3] = 80.0
    elif regime == "safety-negligible":
        logits[:, safety] = -80.0
    targets = torch.randint(0, vocab, (7,), generator=generator)
    weights = torch.randn(2, 7, generator=generator, dtype=torch.float64)
    for use in [(1, 1), (1, 0), (0, 1)]:
        got_in = logits.clone().requires_grad_()
        want_in = logits.clone().requires_grad_()
        got = student._LogprobAndRest.apply(got_in, targets, safety)
        want = _oracle(want_in, targets, safety)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(_mix(got, use, weights), got_in)
        (expected,) = torch.autograd.grad(_mix(want, use, weights), want_in)
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
        assert torch.isfinite(grad).all()


def test_chunked_projections_give_the_masked_logsumexp_and_its_gradient():
    """Through the checkpointed chunks of the CE pass (float32, chunks of 5 rows over 13): the rest and the log-probs
    and the gradients to the hidden states and the head equal autograd's on the full logits."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 16, generator=generator, requires_grad=True)
    head = torch.randn(50, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (13,), generator=generator)
    safety = torch.tensor([0, 7, 9, 31])
    got = chunked_projections(hidden, head, targets, chunk_size=5, rest_of=safety)
    want = _oracle(hidden @ head.T, targets, safety)
    torch.testing.assert_close(got.logprob, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rest, want[1], rtol=1e-5, atol=1e-5)
    got_grads = torch.autograd.grad(got.logprob.sum() + 0.5 * got.rest.sum(), (hidden, head))
    want_grads = torch.autograd.grad(want[0].sum() + 0.5 * want[1].sum(), (hidden, head))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_the_reference_kl_keeps_no_more_vocabulary_sized_tensors_than_pact(tiny, one_thread):
    """One optimizer step of the tiny model, live tensor bytes: the logits-and-loss peak of `refkl` and
    `refkl+tokenwise` is at most PACT's (which keeps the CE's [N, V] log-softmax), while a masked copy of the logits
    would add 2 x N x V x 4 bytes."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    try:
        vocab = model.config.vocab_size
        rows = synthetic_rows(4, 48, 8, vocab, 6, reference_kl=True)
        peaks = {name: measure_step(model, rows, "cached_pact", objective=ObjectiveArguments(objective=name))
                 for name in ("pact", "refkl", "refkl+tokenwise")}
    finally:
        model.unload()
    logits_bytes = 4 * 40 * 4 * vocab
    for name in ("refkl", "refkl+tokenwise"):
        assert peaks[name].by_category["logits_loss"] <= peaks["pact"].by_category["logits_loss"], (name, peaks)
    assert peaks["pact"].by_category["logits_loss"] >= logits_bytes, "the measured step holds the CE's log-softmax"


def _per_row_oracle(logits: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor):
    """log softmax at the targets, the logsumexp with each row's `ids` masked out, and the logits at them, by autograd."""
    logprob = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    masked = logits.scatter(1, ids, float("-inf"))
    return logprob, torch.logsumexp(masked, dim=-1), logits.gather(1, ids)


@pytest.mark.parametrize("vocab,blocks,k", [(37, 8, 5), (37, 1, 36), (100, 7, 1), (64, 4, 20)])
def test_per_row_ids_give_each_rows_tail_and_its_logits_at_them(vocab, blocks, k, monkeypatch):
    """Distillation's form: a different id list per row (the teacher's top-K, up to all but one column), its rows'
    masked logsumexp and the logits at the ids, and the gradient of any mix of the three outputs, equal autograd's in
    float64; a row whose ids hold nearly all the mass keeps a finite tail."""
    monkeypatch.setattr(student, "VOCAB_BLOCKS", blocks)
    generator = torch.Generator().manual_seed(vocab + k)
    logits = torch.randn(6, vocab, generator=generator, dtype=torch.float64) * 4
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(6)])
    logits[0, ids[0]] += 60.0  # the top-K hold all but ~e^-60 of row 0's mass
    targets = torch.randint(0, vocab, (6,), generator=generator)
    weights = [torch.randn(6, generator=generator, dtype=torch.float64), torch.randn(6, generator=generator, dtype=torch.float64),
               torch.randn(6, k, generator=generator, dtype=torch.float64)]
    for use in [(1, 1, 1), (0, 1, 1), (0, 0, 1), (1, 0, 0)]:
        got_in, want_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        got = student._LogprobAndRest.apply(got_in, targets, ids)
        want = _per_row_oracle(want_in, targets, ids)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        assert torch.isfinite(got[1]).all()
        (grad,) = torch.autograd.grad(_mix(got, use, weights), got_in)
        (expected,) = torch.autograd.grad(_mix(want, use, weights), want_in)
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_chunked_projections_with_per_row_ids():
    """Per-row ids through the checkpointed chunks (chunks of 4 rows over 11, float32): values and the gradients to
    the hidden states and the head equal autograd's on the full logits."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(11, 16, generator=generator, requires_grad=True)
    head = torch.randn(50, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (11,), generator=generator)
    ids = torch.stack([torch.randperm(50, generator=generator)[:7] for _ in range(11)])
    got = chunked_projections(hidden, head, targets, chunk_size=4, rest_of=ids)
    want = _per_row_oracle(hidden @ head.T, targets, ids)
    for g, w in zip((got.logprob, got.rest, got.at_ids), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    mix = lambda outs: outs[0].sum() + 0.5 * outs[1].sum() + (outs[2] * torch.linspace(-1, 1, 7)).sum()  # noqa: E731
    got_grads = torch.autograd.grad(mix((got.logprob, got.rest, got.at_ids)), (hidden, head))
    want_grads = torch.autograd.grad(mix(want), (hidden, head))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
