"""The objective's tensor math against an independent float64 transcription of docs/objective.md section 2."""

import math

import pytest
import torch

from pact.objective.settings import ObjectiveArguments
from pact.objective.kl import gate, pact_kl, topp_count
from pact.objective.loss import pact_loss


def _count(probs, p0):
    """Smallest k whose k largest probabilities sum to at least p0 (plain Python)."""
    total = 0.0
    for k, p in enumerate(sorted(probs, reverse=True), start=1):
        total += p
        if total >= p0:
            return k
    return len(probs)


def _softmax(values):
    top = max(values)
    exps = [math.exp(v - top) if v != -math.inf else 0.0 for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _kl_reference(z, f, p, t, w, cfg):
    """KL_t for one position, written term by term from docs/objective.md section 2 in float64."""
    size = len(z)
    i_s = _count(_softmax([v / cfg.gate_temperature for v in z]), cfg.p0) / size
    i_p = _count(_softmax([v / cfg.gate_temperature for v in p]), cfg.p0) / size
    c = 1 / (1 + math.exp(-cfg.alpha * (i_s - i_p - cfg.b))) * math.exp(-max(t - cfg.n_free, 0) / cfg.tau) * cfg.boost
    r = [(1 - c) * fi + c * pi for fi, pi in zip(f, p)]
    soft = _softmax([v / cfg.temperature for v in r])
    unnorm = [s * wi for s, wi in zip(soft, w)]
    q = [u / sum(unnorm) for u in unnorm]
    log_student = [math.log(s) for s in _softmax([v / cfg.temperature for v in z])]
    return cfg.temperature**2 * sum(qi * (math.log(qi) - ls) for qi, ls in zip(q, log_student) if qi > 0)


def _random_case(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, size, generator=g, dtype=torch.float64) * 3
    f = torch.randn(n, size, generator=g, dtype=torch.float64) * 3
    p = torch.randn(n, size, generator=g, dtype=torch.float64) * 3
    w = torch.rand(size, generator=g, dtype=torch.float64)
    w[::3] = 0.0
    steps = torch.arange(n) * 2
    return z, f, p, w, steps


@pytest.mark.parametrize("cfg", [ObjectiveArguments(), ObjectiveArguments(temperature=1.0, alpha=5.0, b=0.1, gate_temperature=0.7, n_free=2, tau=3.0, boost=0.8, p0=0.5)])
def test_pact_kl_matches_design_transcription(cfg):
    """Gate, logit-space mixing, weighted target and T^2-scaled KL equal the float64 transcription."""
    z, f, p, w, steps = _random_case(13, 11, seed=0)
    post_count = topp_count(p, cfg.p0, cfg.gate_temperature)
    mask = torch.ones(13, dtype=torch.bool)
    got = pact_kl(z.float(), f.float(), p.float(), post_count, steps, mask, w.float(), cfg)
    want = torch.tensor([_kl_reference(z[i].tolist(), f[i].tolist(), p[i].tolist(), int(steps[i]), w.tolist(), cfg) for i in range(13)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_pact_kl_on_positive_columns_equals_all_columns():
    """Targets stored only on positive-weight columns give the same KL (the cache's exact layout)."""
    cfg = ObjectiveArguments()
    z, f, p, w, steps = _random_case(9, 10, seed=1)
    post_count = topp_count(p, cfg.p0, cfg.gate_temperature)
    mask = torch.ones(9, dtype=torch.bool)
    full = pact_kl(z.float(), f.float(), p.float(), post_count, steps, mask, w.float(), cfg)
    keep = torch.nonzero(w > 0).squeeze(1)
    part = pact_kl(z.float(), f[:, keep].float(), p[:, keep].float(), post_count, steps, mask, w.float(), cfg, columns=keep)
    torch.testing.assert_close(part, full, rtol=1e-6, atol=1e-6)


def test_gradient_flows_only_through_student_logits():
    """The gate and target carry no gradient: d KL / d z equals T (softmax(z/T) - q) per row."""
    cfg = ObjectiveArguments()
    z, f, p, w, steps = _random_case(5, 7, seed=2)
    z = z.float().requires_grad_()
    post_count = topp_count(p, cfg.p0, cfg.gate_temperature)
    kl = pact_kl(z, f.float(), p.float(), post_count, steps, torch.ones(5, dtype=torch.bool), w.float(), cfg)
    kl.sum().backward()
    c = gate(topp_count(z, cfg.p0), post_count, steps, 7, cfg).double()[:, None]
    r = (1 - c) * f + c * p
    q = torch.softmax(r / cfg.temperature, -1) * w
    q = q / q.sum(-1, keepdim=True)
    want = cfg.temperature * (torch.softmax(z.detach().double() / cfg.temperature, -1) - q)
    torch.testing.assert_close(z.grad.double(), want, rtol=1e-5, atol=1e-6)


def test_topp_count_examples():
    """count(p, p0) on hand-made distributions."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]]))
    assert topp_count(logits, 0.9).tolist() == [3, 1, 4]
    assert topp_count(logits, 0.5).tolist() == [1, 1, 2]


def test_pact_loss_is_ce_plus_lambda_mean_kl():
    """L = CE + lambda * mean over response tokens, ignoring masked positions."""
    kl = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    loss, mean_kl = pact_loss(torch.tensor(0.5), kl * mask, mask, ObjectiveArguments(lam=2.0))
    assert mean_kl.item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(4.5)
