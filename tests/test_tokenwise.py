"""Token-wise constrained SFT (Qi et al. 2024, arXiv 2406.05946, Eqn 3; docs/objective.md section 4) as a second
objective from the same cache: the math against an independent float64 transcription, the identity at init through
`pact train`, and cached = online parity (loss and LoRA gradients) for `tokenwise` and `pact+tokenwise`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import random_lora_student, write_jsonl
from pact.data.batch import collate_rows
from pact.cli.main import main as pact_main
from pact.data.chat import assistant_header_ids
from pact.objective.loss import cached_pact_loss, pact_batch_loss
from pact.models.loading import load_model
from pact.objective.settings import ObjectiveArguments
from pact.objective.tokenwise import schedule_at, tokenwise_terms
from pact.objective.student import chunked_target_logprob, mean_cross_entropy
from pact.objective.targets import OnlineTargets
from test_multi_turn import ROWS as MULTI_TURN_ROWS, _build

PAPER = (0.5, 2.0, 2.0, 2.0, 2.0, 0.1)


def _independent_term(student_logprob: float, reference_logprob: float, step: int, betas) -> float:
    """Eqn 3's term for one response token in float64, as the paper writes it: -(2 / beta_t) log sigmoid(beta_t * ratio),
    beta_t the schedule's value for position step + 1 (its last value past the end)."""
    beta = betas[min(step, len(betas) - 1)]
    return -(2.0 / beta) * math.log(1.0 / (1.0 + math.exp(-beta * (student_logprob - reference_logprob))))


def _random_case(seed: int, n: int = 23, hidden: int = 16, vocab: int = 50):
    """Student hidden states and LM head, reference logits, targets and steps of two turns (the second restarting at 0)."""
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(n, hidden, generator=generator)
    head = torch.randn(vocab, hidden, generator=generator) * 0.8
    reference = torch.randn(n, vocab, generator=generator) * 3.0
    labels = torch.randint(0, vocab, (n,), generator=generator)
    steps = torch.cat([torch.arange(15), torch.arange(n - 15)])
    return states, head, reference, labels, steps


@pytest.mark.parametrize("betas", [PAPER, (1.0,), (0.3, 7.0)], ids=["paper", "one", "two"])
def test_tokenwise_loss_equals_float64_transcription_on_random_logits(betas):
    """The mean of `tokenwise_terms` over per-token log-probs from `chunked_target_logprob` (chunks of 4) equals the
    float64 transcription of Eqn 3, and so does its gradient (float64 autograd of the transcription)."""
    states, head, reference, labels, steps = _random_case(0)
    states = states.requires_grad_()
    reference_logprob = torch.log_softmax(reference, -1).gather(1, labels[:, None]).squeeze(1)
    student_logprob = chunked_target_logprob(states, head, labels, chunk_size=4)
    loss = tokenwise_terms(student_logprob, reference_logprob, steps, betas).mean()
    loss.backward()
    student64 = torch.log_softmax(states.detach().double() @ head.double().T, -1).gather(1, labels[:, None]).squeeze(1)
    reference64 = torch.log_softmax(reference.double(), -1).gather(1, labels[:, None]).squeeze(1)
    terms = [_independent_term(s, r, t, betas) for s, r, t in zip(student64.tolist(), reference64.tolist(), steps.tolist())]
    ratios = student64 - reference64
    assert ratios.min() < -1 and ratios.max() > 1, "the case should exercise both signs of the log-ratio"
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    states64 = states.detach().double().requires_grad_()
    ratio = torch.log_softmax(states64 @ head.double().T, -1).gather(1, labels[:, None]).squeeze(1) - reference64
    beta = torch.tensor([betas[min(t, len(betas) - 1)] for t in steps.tolist()], dtype=torch.float64)
    (-(2 / beta) * torch.log(torch.sigmoid(beta * ratio))).mean().backward()
    torch.testing.assert_close(states.grad.double(), states64.grad, rtol=1e-5, atol=1e-7)


def test_per_token_logprob_mean_is_the_cross_entropy():
    """`mean_cross_entropy(chunked_target_logprob(...))` is the mean next-token CE, whatever the chunk size."""
    states, head, _, labels, _ = _random_case(1)
    expected = torch.nn.functional.cross_entropy(states.double() @ head.double().T, labels).item()
    for chunk in (1, 5, 1024):
        assert mean_cross_entropy(chunked_target_logprob(states, head, labels, chunk)).item() == pytest.approx(expected, rel=1e-6)


def test_beta_schedule_positions_and_the_limits_of_the_term():
    """beta_t by response position (position 1 is step 0; the last value holds after the schedule), the value
    (2 / beta) log 2 when the student equals the reference, no overflow at extreme ratios, and the SFT limit: as
    beta -> 0 the term's gradient is the cross-entropy's."""
    assert schedule_at(torch.tensor([0, 1, 4, 5, 99]), PAPER).tolist() == pytest.approx([0.5, 2.0, 2.0, 0.1, 0.1])
    equal = tokenwise_terms(torch.full((3,), -2.5), torch.full((3,), -2.5), torch.tensor([0, 1, 9]), PAPER)
    assert equal.tolist() == pytest.approx([2 / 0.5 * math.log(2), 2 / 2 * math.log(2), 2 / 0.1 * math.log(2)], rel=1e-6)
    extreme = tokenwise_terms(torch.tensor([-500.0, 0.0]), torch.tensor([0.0, -500.0]), torch.tensor([1, 1]), PAPER)
    assert extreme.tolist() == pytest.approx([1000.0, 0.0], abs=1e-4)
    states, head, reference, labels, steps = _random_case(2)
    reference_logprob = torch.log_softmax(reference, -1).gather(1, labels[:, None]).squeeze(1)
    grads = []
    for loss_of in (lambda lp: tokenwise_terms(lp, reference_logprob, steps, (1e-4,)).mean(), mean_cross_entropy):
        leaf = states.clone().requires_grad_()
        loss_of(chunked_target_logprob(leaf, head, labels)).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-6)


# --- the identity at init, through `pact train` ---------------------------------------------------------------------

def _first_step(cache, out, *extra) -> dict:
    """metrics.jsonl's first record of a one-step `pact train` of every cache row (one micro-batch) on CPU."""
    argv = ["train", "--cache", str(cache), "--out", str(out), "--max-steps", "1", "--batch-size", "12", "--device", "cpu",
            "--no-progress", *extra]
    assert pact_main(argv) == 0
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_student_equal_to_reference_gives_two_log_two_over_beta(float32_cache, tmp_path):
    """A fresh LoRA (B = 0) on the cache's model is the reference: `--objective tokenwise --beta-schedule 1` logs a first
    loss of 2 log 2 whatever `--lambda` (the KL, logged and > 0, is not in the loss); the default schedule logs the mean
    over the response tokens of (2 / beta_t) log 2; `pact+tokenwise` logs that plus lambda times the KL."""
    from pact.cache_tools import CacheReader

    reader = CacheReader(float32_cache)
    assert len(reader) == 12
    steps = collate_rows(list(reader), 0).steps
    one = _first_step(float32_cache, tmp_path / "one", "--objective", "tokenwise", "--beta-schedule", "1", "--lambda", "3")
    assert one["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)
    assert one["tokenwise"] == pytest.approx(one["loss"], abs=1e-9) and one["kl"] > 1e-3
    expected = sum(2 / PAPER[min(t, len(PAPER) - 1)] * math.log(2) for t in steps.tolist()) / len(steps)
    paper = _first_step(float32_cache, tmp_path / "paper", "--objective", "tokenwise")
    assert paper["loss"] == pytest.approx(expected, abs=1e-5)
    combined = _first_step(float32_cache, tmp_path / "combined", "--objective", "pact+tokenwise", "--lambda", "3")
    assert combined["tokenwise"] == pytest.approx(expected, abs=1e-5)
    assert combined["loss"] == pytest.approx(combined["tokenwise"] + 3 * combined["kl"], rel=1e-6)
    recorded = json.loads((tmp_path / "one" / "pact_config.json").read_text())["objective"]
    assert (recorded["objective"], recorded["beta_schedule"]) == ("tokenwise", "1.0")


def test_resume_accepts_the_recorded_schedule_written_another_way(world):
    """The schedule is recorded in one canonical form, so `--resume` with the same betas written differently (and the
    default objective named) is the same run: accepted; the run's pact_config.json keeps the canonical text."""
    argv = ["train", "--cache", str(world.cache), "--out", str(world.run), "--resume", "--device", "cpu", "--batch-size", "4",
            "--max-steps", "1", "--lr", "1e-3", "--no-progress", "--objective", "pact", "--beta-schedule", "0.50, 2,2.0,2,2,1e-1"]
    assert pact_main(argv) == 0
    assert json.loads((world.run / "pact_config.json").read_text())["objective"]["beta_schedule"] == "0.5,2.0,2.0,2.0,2.0,0.1"


# --- cached = online, on multi-turn rows --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def multi_turn(tiny_model_dir, tiny_safety_file, tmp_path_factory):
    """A float32 cache of multi-turn rows (every assistant turn a span) and the tiny model it was built with."""
    root = tmp_path_factory.mktemp("tokenwise")
    reader = _build(tiny_model_dir, tiny_safety_file, write_jsonl(root / "rows.jsonl", MULTI_TURN_ROWS), root / "cache")
    return reader, load_model(str(tiny_model_dir), device="cpu", dtype="float32")


def test_the_cache_stores_the_reference_logprob_of_each_response_token(multi_turn):
    """`target_logprob` of a float32 cache is log_softmax of the reference's full-context logits at the response token
    (float64 of an unpadded pass), so the token-wise loss needs nothing the cache lacks."""
    reader, loaded = multi_turn
    for row in reader:
        ids = row["input_ids"].tolist()
        with torch.no_grad():
            logprobs = torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].double(), -1)
        expected = [logprobs[i - 1, ids[i]].item() for start, end in row["response_spans"].tolist() for i in range(start, end)]
        assert row["target_logprob"].double().tolist() == pytest.approx(expected, abs=1e-5)


def _loss_and_grads(student, compute):
    """The `PactOutput` of `compute()` and the LoRA gradients of its loss."""
    student.zero_grad()
    out = compute()
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in student.named_parameters() if p.requires_grad}


def _independent_tokenwise(student, reference, rows, betas) -> float:
    """Mean Eqn 3 term over every response token of `rows`, from unpadded float64 passes, t restarting at each turn."""
    terms = []
    with torch.no_grad():
        for row in rows:
            ids = row["input_ids"].tolist()
            student_lp, reference_lp = (torch.log_softmax(m(torch.tensor([ids])).logits[0].double(), -1) for m in (student, reference))
            for start, end in row["response_spans"].tolist():
                terms += [_independent_term(student_lp[i - 1, ids[i]].item(), reference_lp[i - 1, ids[i]].item(), i - start, betas)
                          for i in range(start, end)]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("objective", ["tokenwise", "pact+tokenwise"])
def test_cached_equals_online_for_the_tokenwise_objectives(multi_turn, objective):
    """Float32 cache of multi-turn rows: loss, CE, KL, token-wise loss and every LoRA gradient within 1e-5 of the online
    objective (reference = the student with adapters disabled); the online token-wise loss equals the float64 per-turn
    transcription; the gradients differ from PACT's, and `tokenwise`'s do not depend on lambda."""
    reader, loaded = multi_turn
    tok, rows = loaded.tokenizer, list(reader)
    safety_ids, weights = reader.safety_ids, reader.safety_weights
    student = random_lora_student(loaded.model, seed=4, scale=0.3)

    def run(cfg, cached):
        """Loss and gradients with cached or online (adapter-disabled) targets."""
        if cached:
            return _loss_and_grads(student, lambda: cached_pact_loss(student, rows, safety_ids, weights, cfg, tok.pad_token_id))
        online = OnlineTargets(student, safety_ids, assistant_header_ids(tok), cfg, tok.pad_token_id)
        batch = online.fill(collate_rows(rows, tok.pad_token_id))
        return _loss_and_grads(student, lambda: pact_batch_loss(student, batch, safety_ids, weights, cfg))

    cfg = ObjectiveArguments(objective=objective, lam=2.0)
    (online, g_online), (cached, g_cached) = run(cfg, cached=False), run(cfg, cached=True)
    assert online.kl.item() > 0 and max(len(r["response_spans"]) for r in rows) > 1
    for part in ("loss", "ce", "kl", "tokenwise"):
        assert getattr(cached, part).item() == pytest.approx(getattr(online, part).item(), rel=1e-5), part
    for name, grad in g_online.items():
        assert ((g_cached[name] - grad).norm() / grad.norm()).item() < 1e-5, name
    assert online.tokenwise.item() == pytest.approx(_independent_tokenwise(student, loaded.model, rows, PAPER), rel=1e-5)
    fit = online.tokenwise + (cfg.lam * online.kl if objective == "pact+tokenwise" else 0)
    assert online.loss.item() == pytest.approx(fit.item(), rel=1e-6)
    _, g_pact = run(ObjectiveArguments(lam=2.0), cached=True)
    assert any(((g_pact[name] - grad).norm() / grad.norm()).item() > 1e-3 for name, grad in g_cached.items())
    if objective == "tokenwise":
        _, g_other_lambda = run(ObjectiveArguments(objective=objective, lam=0.0), cached=True)
        for name, grad in g_cached.items():
            torch.testing.assert_close(g_other_lambda[name], grad, rtol=0, atol=0)
