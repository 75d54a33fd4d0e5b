"""The loss of a model on a batch whose targets are filled (`pact.objective.targets`): cross-entropy on the response
tokens (or, with the objective `pact+tokenwise`, Qi et al.'s token-wise constrained loss in its place; with `kd` and
`pact+kd`, mixed with the distillation loss to a teacher's top-K) plus lambda times the masked KL on the safety tokens,
or the token-wise loss alone (`tokenwise`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from pact.data.batch import CacheBatch
from pact.errors import PactError
from pact.objective.distillation import kd_per_position, teacher_ids
from pact.objective.kl import pact_kl, reference_kl
from pact.objective.settings import ObjectiveArguments
from pact.objective.student import student_outputs
from pact.objective.targets import CachedTargets
from pact.objective.tokenwise import schedule_at, tokenwise_terms


@dataclass
class PactOutput:
    """The batch loss and its parts; `kl_per_position` [N] is a_t KL_t (PACT's, times T^2, or the reference KL);
    `tokenwise` the mean token-wise constrained loss (docs/objective.md section 4). Parts the objective leaves out of
    `loss` are computed without gradient, for the logs: PACT's KL under `tokenwise`, the token-wise loss under `pact`
    and `refkl`, PACT's KL under `kd` (0 when the run has no safety tokens, as from a distillation-only cache); `kd` the mean
    distillation loss (0 unless the objective distils)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    kl_per_position: torch.Tensor
    steps: torch.Tensor
    tokens: int
    tokenwise: torch.Tensor
    kd: torch.Tensor


def pact_batch_loss(
    model: PreTrainedModel,
    batch: CacheBatch,
    safety_ids: torch.Tensor,
    weights: torch.Tensor,
    cfg: ObjectiveArguments,
    ce_chunk_size: int = 1024,
) -> PactOutput:
    """The objective `cfg.objective` over the batch's response tokens (docs/objective.md sections 2, 4 and 5), with
    KL_t PACT's (pact, pact+tokenwise, tokenwise) or the reference KL (refkl, refkl+tokenwise), weighted a_t by position:
    L = CE + lambda * mean_t a_t KL_t (pact, refkl); mean_t TW_t (tokenwise); mean_t TW_t + lambda * mean_t a_t KL_t
    (pact+tokenwise, refkl+tokenwise); (1 - alpha) CE + alpha mean_t KD_t (kd), plus lambda * mean_t a_t KL_t (pact+kd).

    `batch` carries its targets (cached, `CachedTargets`, or online,
    `OnlineTargets`), the reference log-probs `target_logprob` among them;
    `safety_ids` is S, the columns of the student's logits.
    """
    if not len(safety_ids) and (cfg.uses_kl or cfg.uses_tokenwise):
        raise PactError(f"--objective {cfg.objective} needs safety tokens and their targets, and this run has none (a "
                        "distillation-only cache): train --objective kd")
    student = student_outputs(model, batch, safety_ids if len(safety_ids) else None, with_ce=True, ce_chunk_size=ce_chunk_size,
                              with_rest=cfg.uses_reference_kl, kd_ids=teacher_ids(batch) if cfg.uses_kd else None)
    device = student.steps.device
    mask = torch.ones(student.steps.shape, dtype=torch.bool, device=device)
    kd = torch.zeros((), dtype=torch.float32, device=device)
    if cfg.uses_kd:
        kd = kd_per_position(student.kd_logits, student.rest, batch, mask, cfg).sum() / mask.sum().clamp(min=1)
    if student.safety_logits is None:  # distillation alone: no safety targets, so no KL to log
        kl_per_position = torch.zeros(student.steps.shape, dtype=torch.float32, device=device)
    elif cfg.uses_reference_kl:
        kl_per_position = reference_kl(student.safety_logits, student.rest, *_reference_distribution(batch, device), mask)
    else:
        columns = None if batch.columns is None else batch.columns.to(device)
        kl_per_position = pact_kl(
            _in_loss(student.safety_logits, cfg.uses_kl), batch.full_logits.to(device), batch.post_logits.to(device),
            batch.post_count.to(device), student.steps, mask, weights.to(device), cfg, columns,
        )
    kl_per_position = kl_per_position * schedule_at(student.steps, cfg.position_weights)
    tokenwise = tokenwise_terms(_in_loss(student.logprob, cfg.uses_tokenwise), _reference_logprob(batch), student.steps,
                                cfg.betas).sum() / mask.sum().clamp(min=1)
    fit = tokenwise if cfg.uses_tokenwise else student.ce
    if cfg.uses_kd:
        fit = (1.0 - cfg.kd_alpha) * fit + cfg.kd_alpha * kd
    loss, kl = pact_loss(fit, kl_per_position, mask, cfg)
    return PactOutput(loss, student.ce, kl, kl_per_position, student.steps, batch.tokens, tokenwise, kd)


def _in_loss(values: torch.Tensor, used: bool) -> torch.Tensor:
    """`values` as they are when the loss uses them, else detached (a part computed only for the logs needs no graph)."""
    return values if used else values.detach()


def _reference_distribution(batch: CacheBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's full-context logits on all of S and its log-probability outside S: what the reference KL needs."""
    if batch.reference_logits is None or batch.rest_logprob is None:
        raise PactError(f"batch of example_ids {batch.example_ids.tolist()}: no reference logits on all of S and no rest "
                        "log-probabilities, which the reference KL needs; rebuild the cache with this pact (format version "
                        "3, without --top-k)")
    return batch.reference_logits.to(device), batch.rest_logprob.to(device)


def _reference_logprob(batch: CacheBatch) -> torch.Tensor:
    """The reference's log-prob of each response token, which every cache row and every online batch carries."""
    if batch.target_logprob is None:
        raise PactError(f"batch of example_ids {batch.example_ids.tolist()}: no reference log-probs (target_logprob) to "
                        "compute the token-wise loss with; fill the batch with `collate_rows` or `OnlineTargets.fill`")
    return batch.target_logprob


def cached_pact_loss(
    model: PreTrainedModel,
    rows: list[dict],
    safety_ids: torch.Tensor,
    weights: torch.Tensor,
    cfg: ObjectiveArguments,
    pad_id: int,
    ce_chunk_size: int = 1024,
) -> PactOutput:
    """The loss of a batch of cache rows (`CacheReader` items): `collate_rows`, its targets checked (`CachedTargets`),
    then `pact_batch_loss`."""
    batch = CachedTargets(safety_ids).collate(rows, pad_id)
    return pact_batch_loss(model, batch, safety_ids, weights, cfg, ce_chunk_size)


def pact_loss(fit: torch.Tensor, kl_per_position: torch.Tensor, mask: torch.Tensor, cfg: ObjectiveArguments) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch loss and the mean KL_t over its response tokens: L = fit + lambda * mean KL (every objective with a
    KL), or `fit` alone (tokenwise, kd). `fit` is the mean CE, or the mean token-wise loss for the objectives naming
    it, mixed with the distillation loss under kd and pact+kd."""
    tokens = mask.sum().clamp(min=1)
    kl = kl_per_position.sum() / tokens
    return (fit + cfg.lam * kl if cfg.uses_kl else fit), kl
