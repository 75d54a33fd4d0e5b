"""The KLs of the objectives, on tensors, shared by the online and the cached modes: PACT's safety-token KL
(docs/objective.md section 2: the gate, the mixed target and the masked KL) and the KL to the reference over S and
the rest of the vocabulary (section 5).

Shapes: the response positions of a batch are flattened to `N` rows; `S` is the safety-token set. Inputs on the
reference side are logits restricted to `S` (columns whose weight is zero may hold any finite value: the target puts
no mass there), plus the post-only top-p count that the gate needs.
"""

from __future__ import annotations

import math

import torch

from pact.kernels import masked_kl
from pact.objective.settings import ObjectiveArguments


def topp_count(logits: torch.Tensor, p0: float, temperature: float = 1.0) -> torch.Tensor:
    """Smallest k such that the k largest entries of softmax(logits / temperature) sum to at least p0.

    Computed in float32 over the last dimension; returns int64 of the leading shape.
    """
    probs = torch.softmax(logits.detach().float() / temperature, dim=-1)
    sorted_probs = torch.sort(probs, dim=-1, descending=True).values
    below = torch.cumsum(sorted_probs, dim=-1) < p0
    return (below.sum(dim=-1) + 1).clamp(max=logits.shape[-1])


def gate(student_count: torch.Tensor, post_count: torch.Tensor, steps: torch.Tensor, num_safety: int, cfg: ObjectiveArguments) -> torch.Tensor:
    """The mixing weight c_t: how much of the post-only reference enters the target (no gradient)."""
    spread = (student_count.float() - post_count.float()) / num_safety
    decay = torch.exp(-torch.clamp(steps.float() - cfg.n_free, min=0.0) / cfg.tau)
    return torch.sigmoid(cfg.alpha * (spread - cfg.b)) * decay * cfg.boost


def mixed_target(full_logits: torch.Tensor, post_logits: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """r_t = (1 - c_t) f_t + c_t p_t, mixed in logit space, in float32."""
    c = c.float().unsqueeze(-1)
    return (1.0 - c) * full_logits.float() + c * post_logits.float()


def pact_kl(
    student_logits: torch.Tensor,
    full_logits: torch.Tensor,
    post_logits: torch.Tensor,
    post_count: torch.Tensor,
    steps: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    cfg: ObjectiveArguments,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position KL_t (already times T^2) of section 1.2; zero where `mask` is False.

    student_logits [N, |S|] carries the gradient; steps [N] is each row's
    response step t. The reference side (live or cached) gives full/post
    logits on the target columns and post_count [N], the top-p count of the
    post-only distribution over all of S. `columns` maps target columns to
    positions in S ([k] or per row [N, k]); `None` means all of S. Columns of
    S outside `columns` get zero target mass, which is exact for zero-weight
    tokens and the documented top-k approximation otherwise.
    """
    num_safety = student_logits.shape[-1]
    student_count = topp_count(student_logits, cfg.p0, cfg.gate_temperature)
    c = gate(student_count, post_count, steps, num_safety, cfg)
    target = mixed_target(full_logits, post_logits, c)
    if columns is not None:
        index = columns.expand_as(target) if columns.dim() == 1 else columns
        target = torch.full(student_logits.shape, float("-inf"), device=target.device).scatter(1, index, target)
    return masked_kl(student_logits, target, weights, mask, cfg.temperature)


def log_mass_outside(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the softmax mass of `logits` [N, V] (float32) outside the columns `ids`, per row [N]: what the cache
    stores as `rest_logprob`. Accurate to float32's relative precision whether that mass is near 0 or near 1 (the
    reference KL reads both it and one minus it): log(1 - mass on `ids`) while that mass is below a half, else the
    logsumexp outside `ids` minus the whole logsumexp."""
    total = torch.logsumexp(logits, dim=-1)
    on_ids = torch.logsumexp(logits[:, ids], dim=-1) - total
    outside = torch.logsumexp(logits.index_fill(1, ids, float("-inf")), dim=-1) - total
    return torch.where(on_ids < -math.log(2.0), torch.log1p(-torch.exp(on_ids)), outside)


def reference_kl(
    student_logits: torch.Tensor,
    student_rest: torch.Tensor,
    reference_logits: torch.Tensor,
    rest_logprob: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Per-position KL(reference || student) over S and one rest category (docs/objective.md section 5); zero where
    `mask` is False.

    student_logits [N, |S|] and student_rest [N] carry the gradient:
    student_rest is the student's logsumexp over the vocabulary outside S, so
    softmax([student_logits, student_rest]) is the student's distribution
    coarse-grained to S's tokens and the rest. The reference's is given by its
    full-context logits on all of S [N, |S|] (their softmax splits the mass on
    S) and rest_logprob [N], the log of its probability outside S. At
    temperature 1, where the coarse-graining is exact.
    """
    rest = rest_logprob.float().clamp(max=0.0)
    on_safety = torch.log(-torch.expm1(rest))  # log of the reference's mass on S; -inf when it has none there
    target = torch.log_softmax(reference_logits.float(), dim=-1) + on_safety[:, None]
    weights = torch.ones(student_logits.shape[-1], dtype=torch.float32, device=student_logits.device)
    return masked_kl(student_logits, target, weights, mask, 1.0, student_rest=student_rest, target_rest=rest)
