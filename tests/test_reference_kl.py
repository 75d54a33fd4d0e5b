"""The reference KL of the objectives refkl and refkl+tokenwise (docs/objective.md section 5) against a float64
transcription of its definition from full-vocabulary distributions, its settings, and the cache it needs."""

from __future__ import annotations

import re

import pytest
import torch

from test_cache_support import downgrade, float32_cache, one_thread, tiny, tiny_examples, tiny_safety  # noqa: F401  (fixtures)

from pact.errors import InvalidSetting, PactError
from pact.objective.kl import log_mass_outside, reference_kl
from pact.objective.settings import OBJECTIVES, ObjectiveArguments
from pact.objective.tokenwise import schedule_at

VOCAB, SAFETY = 37, [2, 5, 11, 12, 30]


def coarse_kl_float64(student_vocab: torch.Tensor, reference_vocab: torch.Tensor, safety: list[int]) -> torch.Tensor:
    """Section 5 transcribed: KL(q || p) of the full-vocabulary distributions coarse-grained to each token of S and one
    category for every other token, per row, float64; p from the student's logits, q from the reference's."""
    others = [i for i in range(student_vocab.shape[1]) if i not in safety]

    def coarse(logits):
        probs = torch.softmax(logits.double(), dim=1)
        return torch.cat([probs[:, safety], probs[:, others].sum(dim=1, keepdim=True)], dim=1)

    p, q = coarse(student_vocab), coarse(reference_vocab)
    return (q * (torch.log(q) - torch.log(p))).sum(dim=1)


def ours(student_vocab: torch.Tensor, reference_vocab: torch.Tensor, safety: list[int], mask=None) -> torch.Tensor:
    """`reference_kl` from what the training step has: the student's logits on S and logsumexp outside S, the
    reference's logits on S and log-probability outside S (as the cache stores them)."""
    ids = torch.tensor(safety)
    outside = torch.ones(student_vocab.shape[1], dtype=torch.bool)
    outside[ids] = False
    rest_logprob = log_mass_outside(reference_vocab, ids)
    mask = torch.ones(len(student_vocab), dtype=torch.bool) if mask is None else mask
    return reference_kl(student_vocab[:, ids], torch.logsumexp(student_vocab[:, outside], dim=1),
                        reference_vocab[:, ids], rest_logprob, mask)


def test_reference_kl_is_the_coarse_grained_kl_of_the_full_distributions():
    """Loss and gradient with respect to the student's full-vocabulary logits within 1e-5 of the float64 definition."""
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(9, VOCAB, generator=gen) * 3).requires_grad_(True)
    reference = torch.randn(9, VOCAB, generator=gen) * 3
    reference[:, SAFETY[0]] += 6  # one row pattern where S holds most of the reference's mass
    got = ours(student, reference, SAFETY)
    got.sum().backward()
    student64 = student.detach().double().requires_grad_(True)
    want = coarse_kl_float64(student64, reference, SAFETY)
    want.sum().backward()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(student.grad.double(), student64.grad, rtol=1e-5, atol=1e-6)


def test_the_reference_kl_is_zero_at_the_reference_and_at_nothing_else():
    """At the start of fine-tuning (student = reference) the KL is 0; moving mass off S (the attack's first token)
    or within S both raise it."""
    reference = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1)) * 2
    reference[:, SAFETY] += 4.0  # most of the reference's mass on S, as at a refusal's first token
    assert ours(reference.clone(), reference, SAFETY).abs().max().item() < 1e-6
    off_s = reference.clone()
    off_s[:, 0] += 8.0  # a token outside S becomes likely
    within = reference.clone()
    within[:, SAFETY[1]] += 3.0  # the split inside S changes
    assert (ours(off_s, reference, SAFETY) > 1e-2).all() and (ours(within, reference, SAFETY) > 1e-3).all()


def test_masked_positions_give_zero():
    """Masked response positions add nothing."""
    gen = torch.Generator().manual_seed(2)
    student, reference = torch.randn(3, VOCAB, generator=gen), torch.randn(3, VOCAB, generator=gen)
    kl = ours(student, reference, SAFETY, mask=torch.tensor([True, False, True]))
    assert kl[1] == 0 and kl[0] > 0 and kl[2] > 0


def test_the_mass_outside_s_is_accurate_near_0_and_near_1():
    """`log_mass_outside` (what the cache stores) against float64 when S holds almost all the mass or almost none:
    both the mass outside S and the mass on S it implies are right to float32's relative precision."""
    logits = torch.full((2, VOCAB), -5.0)
    logits[0, SAFETY] = 6.0  # mass outside S about 1e-4
    logits[1, 0] = 9.0  # mass on S about 1e-6
    ids = torch.tensor(SAFETY)
    got = log_mass_outside(logits, ids).double()
    probs = torch.softmax(logits.double(), dim=1)
    on_s = probs[:, ids].sum(dim=1)
    assert torch.allclose(torch.exp(got), 1 - on_s, rtol=1e-6)
    assert torch.allclose(-torch.expm1(got), on_s, rtol=1e-5)


def test_a_reference_with_all_its_mass_on_s_or_none_stays_finite():
    """rest_logprob 0 (no mass on S) and a very negative one (all mass on S) give finite KLs equal to the definition."""
    reference = torch.full((2, VOCAB), -30.0)
    reference[0, SAFETY] = 10.0  # almost all mass on S
    reference[1, 0] = 40.0  # almost none
    student = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3))
    got = ours(student, reference, SAFETY)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), coarse_kl_float64(student, reference, SAFETY), rtol=1e-4, atol=1e-5)


def test_position_weights_are_a_schedule_like_beta():
    """`kl_position_weights` 8,4,2,1 weighs response positions 1..3 and every later one; written in canonical form."""
    cfg = ObjectiveArguments(objective="refkl", kl_position_weights="8, 4,2,1")
    assert cfg.kl_position_weights == "8.0,4.0,2.0,1.0" and cfg.position_weights == (8.0, 4.0, 2.0, 1.0)
    assert schedule_at(torch.tensor([0, 1, 2, 3, 50]), cfg.position_weights).tolist() == [8.0, 4.0, 2.0, 1.0, 1.0]
    assert ObjectiveArguments().position_weights == (1.0,)  # the paper's PACT: every position alike


def test_objective_names_and_what_they_use():
    """The objectives' parts: refkl and refkl+tokenwise use the reference KL; the token-wise loss replaces the CE in
    every objective naming it; kd and pact+kd distil, only pact+kd with PACT's KL; an unknown name and a negative position weight are refused, naming the field."""
    assert OBJECTIVES == ("pact", "tokenwise", "pact+tokenwise", "refkl", "refkl+tokenwise", "kd", "pact+kd")
    uses = {name: (ObjectiveArguments(objective=name).uses_reference_kl, ObjectiveArguments(objective=name).uses_tokenwise,
                   ObjectiveArguments(objective=name).uses_kl, ObjectiveArguments(objective=name).uses_kd) for name in OBJECTIVES}
    assert uses == {"pact": (False, False, True, False), "tokenwise": (False, True, False, False),
                    "pact+tokenwise": (False, True, True, False), "refkl": (True, False, True, False),
                    "refkl+tokenwise": (True, True, True, False), "kd": (False, False, False, True),
                    "pact+kd": (False, False, True, True)}
    with pytest.raises(InvalidSetting, match="objective must be one of pact, tokenwise, pact\\+tokenwise, refkl"):
        ObjectiveArguments(objective="kl")
    with pytest.raises(InvalidSetting, match="kl_position_weights must be a finite number >= 0, got -1.0") as refused:
        ObjectiveArguments(kl_position_weights="2,-1")
    assert refused.value.field == "kl_position_weights"


def _trainer(tiny, cache, tmp_path, objective: str):
    """A PactTrainer of the tiny model on `cache` with `objective` (constructed, not trained)."""
    from pact.training.arguments import PactTrainingArguments
    from pact.training.trainer import PactTrainer

    args = PactTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, train_device="cpu", disable_tqdm=True,
                                 dataloader_num_workers=0)
    return PactTrainer(tiny.model, args, cache=cache, processing_class=tiny.tokenizer,
                       objective=ObjectiveArguments(objective=objective))


def test_an_older_cache_trains_what_it_holds_and_refuses_the_reference_kl(tiny, float32_cache, tmp_path):
    """A format-version-2 cache (no reference columns) still trains pact, tokenwise and pact+tokenwise; refkl and
    refkl+tokenwise are refused at construction, naming the cache, its version and the command that rebuilds it."""
    import shutil

    old = tmp_path / "v2"
    shutil.copytree(float32_cache, old)
    downgrade(old, 2)
    for objective in ("pact", "tokenwise", "pact+tokenwise"):
        _trainer(tiny, old, tmp_path, objective)
    for objective in ("refkl", "refkl+tokenwise"):
        with pytest.raises(PactError, match=rf"the cache {old} cannot train --objective {re.escape(objective)}: it is a "
                                            r"format version 2 cache, older than this pact's 4.*pact-cache build --out "):
            _trainer(tiny, old, tmp_path, objective)
    _trainer(tiny, float32_cache, tmp_path, "refkl")  # this pact's own cache serves every objective


def test_a_version_3_int8_cache_still_serves_the_reference_kl(tiny, tiny_examples, tiny_safety, tmp_path):
    """Format 3 stored the int8 layout's other logits as logits with side parts; such a cache still reads, verifies and
    trains refkl, its rows within version 3's storage error of the version-4 cache it was rewritten from."""
    import numpy as np

    from pact.cache_tools import CacheReader, build_cache
    from pact.cache_tools.verify import verify_cache

    new, old = tmp_path / "v4", tmp_path / "v3"
    build_cache(tiny, tiny_examples[:6], tiny_safety, new, rows_per_shard=4, progress=False)
    build_cache(tiny, tiny_examples[:6], tiny_safety, old, rows_per_shard=4, progress=False)
    downgrade(old, 3)
    current, older = CacheReader(new), CacheReader(old)
    assert current.layout.other_as_logprob and older.layout.format_version == 3 and not older.layout.other_as_logprob
    assert verify_cache(old).ok
    other = list(older.layout.other_positions)
    for index in range(len(current)):
        shard, row = older.locate(index)
        bound = older.shard(shard).storage_tolerance("other_logits", older.shard(shard).step_range(row))
        difference = (older[index]["reference_logits"] - current[index]["reference_logits"])[:, other].abs().numpy()
        assert np.all(difference <= bound + 1e-6)
    _trainer(tiny, old, tmp_path, "refkl")


def test_a_top_k_cache_refuses_the_reference_kl(tiny, tiny_examples, tiny_safety, tmp_path):
    """A cache built with --top-k keeps only K columns of S+, so the reference KL cannot read all of S: refused, saying
    to rebuild without --top-k."""
    from pact.cache_tools import build_cache

    out = tmp_path / "top2"
    build_cache(tiny, tiny_examples[:4], tiny_safety, out, dtype="float32", top_k=2, progress=False)
    with pytest.raises(PactError, match="it was built with --top-k 2.*without --top-k"):
        _trainer(tiny, out, tmp_path, "refkl")
