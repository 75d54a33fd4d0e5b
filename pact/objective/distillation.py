"""Knowledge distillation from a teacher's top-K log-probs and the exact mass of its tail (docs/distillation.md).

At each response step the teacher's distribution is coarse-grained to K + 1 categories: its K most likely tokens and
one category for the rest of the vocabulary, whose log-probability is computed from the logits outside the top-K
(never as log(1 - sum p), so it stays exact when the top-K hold nearly all the mass). The student's distribution is
coarse-grained the same way: its logits at the teacher's K ids and its logsumexp outside them, both from the
cross-entropy's own chunks of full-vocabulary logits (`pact.objective.student`). A divergence over those K + 1
categories (`pact.kernels.kd_loss`: forward KL, reverse KL or JSD) is then exact for that coarse-graining.

The same targets come from a cache (`pact-cache build --kd_top_k K`) or live from a teacher in memory
(`OnlineTeacher`), through `teacher_topk` in both cases, so the two paths see identical values up to storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from pact.data.batch import CacheBatch
from pact.errors import PactError
from pact.kernels import kd_loss
from pact.models.parts import causal_lm_parts, float32_logits, hidden_states_at
from pact.objective.settings import ObjectiveArguments
from pact.objective.student import logsumexp_outside


@dataclass
class TeacherTopK:
    """A teacher's targets for N response steps: its top-K ids [N, K] (int64, by descending log-prob, ties by id),
    their log-probs at temperature 1 [N, K] (float32, log_softmax of the full logits) and the log of its remaining
    mass [N] (float32)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor

    def __iter__(self):
        """(ids, logprobs, tail), so the targets unpack like a tuple."""
        return iter((self.ids, self.logprobs, self.tail))


def _lowest_ids_first(x: torch.Tensor, cut: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the top-k of rows `x` whose k-th and (k+1)-th largest values tie at `cut` [r, 1]: every id above the cut
    and the smallest ids at it, ascending."""
    above = x > cut
    at = x == cut
    need = k - above.sum(dim=1, keepdim=True)
    chosen = above | (at & (at.cumsum(dim=1, dtype=torch.int32) <= need))
    return chosen.nonzero()[:, 1].view(len(x), k)


def teacher_topk(logits: torch.Tensor, k: int, chunk_rows: int | None = None) -> TeacherTopK:
    """The exact top-`k` targets of logits [N, V] at temperature 1, on the logits' device: what a KD cache stores and
    what the online teacher gives, so both paths see the same values. Canonical: entries by descending log-prob, ties
    by ascending id, and a tie across the K-th place keeps the smallest ids.

    The tail is summed over the logits outside the top-k (never log(1 - sum p)), so it is exact however much mass the
    top-k hold. Rows go in chunks of `chunk_rows` (default: about 2^24 logits each), read twice (the top-k, then the
    masked exp-sum), so the memory beyond the input is one chunk-sized float32 temporary (two for non-float32
    logits), never an [N, V] copy. Raises `PactError` for k >= V (the tail would be empty) or logits that give
    non-finite log-probs.
    """
    if logits.ndim != 2:
        raise PactError(f"teacher logits must be [N, V], got shape {tuple(logits.shape)}")
    n, vocab = logits.shape
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PactError(f"kd_top_k must be a positive integer, got {k!r}")
    if k >= vocab:
        raise PactError(f"kd_top_k {k} must be below the vocabulary size {vocab}: the top-K would be the whole vocabulary "
                        "and the tail empty")
    rows = chunk_rows or max(1, (1 << 24) // vocab)
    ids = torch.empty((n, k), dtype=torch.long, device=logits.device)
    logprobs = torch.empty((n, k), dtype=torch.float32, device=logits.device)
    tail = torch.empty((n,), dtype=torch.float32, device=logits.device)
    for start in range(0, n, rows):
        x = logits[start:start + rows].float()
        top, index = x.topk(k + 1, dim=1)
        # A tie across the cut: keep the smallest ids of the tied value, so the set is canonical (meta tensors, a memory
        # plan, hold no values to tie).
        tied = top.new_empty(0, dtype=torch.long) if x.is_meta else (top[:, k - 1] == top[:, k]).nonzero()[:, 0]
        if len(tied):
            index[tied, :k] = _lowest_ids_first(x[tied], top[tied, k - 1:k], k)
            top[tied, :k] = x[tied].gather(1, index[tied, :k])
        rest_max = top[:, k:]  # the largest logit outside the top-k
        shift = torch.where(torch.isfinite(rest_max), rest_max, torch.zeros_like(rest_max))
        outside = (x - shift).exp_().scatter_(1, index[:, :k], 0.0)  # the one chunk-sized temporary
        log_rest = torch.log(outside.sum(dim=1, keepdim=True)) + shift
        del outside
        lse = torch.logaddexp(torch.logsumexp(top[:, :k], dim=1, keepdim=True), log_rest)
        by_id_index, by_id = index[:, :k].sort(dim=1)  # canonical order: descending value, ties by ascending id
        values, by_value = top[:, :k].gather(1, by_id).sort(dim=1, descending=True, stable=True)
        ids[start:start + rows] = by_id_index.gather(1, by_value)
        logprobs[start:start + rows] = (values - lse).clamp_(max=0.0)
        tail[start:start + rows] = (log_rest - lse)[:, 0].clamp_(max=0.0)  # float32 rounding can put a tiny tail above 0
    bad = torch.isnan(logprobs).any(dim=1) | torch.isnan(tail)
    if not bad.is_meta and bool(bad.any()):
        raise PactError(f"teacher logits of response step {int(bad.float().argmax())} give non-finite log-probs "
                        "(NaN or +inf logits)")
    return TeacherTopK(ids, logprobs, tail)


@torch.inference_mode()
def teacher_logits(teacher: PreTrainedModel, batch: CacheBatch) -> torch.Tensor:
    """The teacher's float32 full-vocabulary logits at every response position of `batch` [N, V] (full context, one
    forward pass; only the response positions are projected)."""
    _, head = causal_lm_parts(teacher)
    return float32_logits(hidden_states_at(teacher, batch.input_ids, batch.attention_mask, batch.rows, batch.positions), head)


def teacher_batch_topk(teacher: PreTrainedModel, batch: CacheBatch, k: int) -> TeacherTopK:
    """The teacher's top-`k` targets at every response position of `batch` (`teacher_logits`, then `teacher_topk`)."""
    return teacher_topk(teacher_logits(teacher, batch), k)


def teacher_at(logits: torch.Tensor, ids: torch.Tensor) -> TeacherTopK:
    """A teacher's targets at given ids [N, K] from its logits [N, V]: its log-probs there and the log of its mass
    outside them. What `pact-cache verify` recomputes a stored top-K with: at the stored ids, not by a new top-K, so
    recompute noise cannot swap near-tied ids at the K-th place (wrong ids show as wrong log-probs)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ids = ids.to(logp.device)
    return TeacherTopK(ids, logp.gather(1, ids), logsumexp_outside(logp, ids).clamp(max=0.0))


def teacher_ids(batch: CacheBatch) -> torch.Tensor:
    """The teacher's top-K ids of each response token [N, K], which a KD cache's rows and `OnlineTeacher` give (with
    their log-probs and tail: `CacheBatch.with_distillation` sets the three together); `PactError` when the batch
    has none."""
    if batch.kd_ids is None:
        raise PactError(f"batch of example_ids {batch.example_ids.tolist()}: no teacher top-K targets to distil from; "
                        "build the cache with `pact-cache build --kd_top_k K`, or fill the batch with `OnlineTeacher`")
    return batch.kd_ids


def kd_per_position(kd_logits: torch.Tensor, student_tail: torch.Tensor, batch: CacheBatch, mask: torch.Tensor,
                    cfg: ObjectiveArguments) -> torch.Tensor:
    """The divergence `cfg.kd_loss` between the teacher's and the student's distributions over the teacher's top-K
    and the tail, at temperature `cfg.kd_temperature` (times its square), per response position [N]; 0 where `mask`
    is False. `kd_logits` [N, K] and `student_tail` [N] carry the gradient; `batch` holds the targets (its ids were
    taken with `teacher_ids`)."""
    device = kd_logits.device
    return kd_loss(kd_logits, student_tail, batch.kd_logprobs.to(device), batch.kd_tail.to(device), mask,
                   cfg.kd_temperature, loss=cfg.kd_loss, beta=cfg.kd_jsd_beta)


class OnlineTeacher:
    """Distillation targets computed live by a teacher model in memory (online KD, the baseline a KD cache
    replaces): wraps another target source and adds the teacher's top-K to each batch it fills."""

    def __init__(self, teacher: PreTrainedModel, top_k: int, targets=None):
        self.teacher = teacher
        self.top_k = top_k
        self.targets = targets

    def fill(self, batch: CacheBatch) -> CacheBatch:
        """`batch` filled by the wrapped source (if any), then with the teacher's top-K targets."""
        if self.targets is not None:
            batch = self.targets.fill(batch)
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            top = teacher_batch_topk(self.teacher, batch, self.top_k)
        finally:
            self.teacher.train(was_training)
        return batch.with_distillation(top.ids.clone(), top.logprobs.clone(), top.tail.clone())
