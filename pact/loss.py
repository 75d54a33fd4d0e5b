"""The PACT loss of a model on a batch: cross-entropy on the response tokens
(or, with the objective `pact+tokenwise`, Qi et al.'s token-wise constrained
loss in its place) plus lambda times the masked KL on the safety tokens, or
the token-wise loss alone (`tokenwise`), with targets that come live or from
the cache, both as a `pact.cache_tools.batch.CacheBatch`.

The student's safety-token logits are computed from the final hidden states
and the LM-head rows of S, so the KL never needs full-vocabulary logits, and
the cross-entropy is chunked so no float32 [tokens, vocab] copy is kept. Both
projections run inside the model's forward (`pact.projection`), where sharded
training (FSDP) has the head's full weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from pact.cache_tools.batch import CacheBatch, collate_rows
from pact.errors import PactError
from pact.objective import (PactConfig, chunked_target_logprob, float32_logits, mean_cross_entropy, pact_kl, pact_loss,
                            tokenwise_terms)
from pact.projection import projected_forward
from pact.reference import causal_attention_mask, head_device
from pact.targets import check_columns


@dataclass
class StudentOutputs:
    """What the objective needs from the student for a batch's N response positions: the mean CE, the log-prob of
    each response token [N] (None without CE), the logits on S and each token's step within its turn."""

    ce: torch.Tensor
    safety_logits: torch.Tensor | None
    steps: torch.Tensor
    logprob: torch.Tensor | None = None


@dataclass
class PactOutput:
    """The batch loss and its parts; `kl_per_position` [N] is KL_t (times T^2); `tokenwise` the mean token-wise
    constrained loss (docs/objective.md section 4). Parts the objective leaves out of `loss` are computed without
    gradient, for the logs: the KL under `tokenwise`, the token-wise loss under `pact`."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    kl_per_position: torch.Tensor
    steps: torch.Tensor
    tokens: int
    tokenwise: torch.Tensor


@dataclass
class StudentProjections(ModelOutput):
    """The student's forward output under `student_outputs`: the log-prob of each response token [N] (float32) and the
    logits on S [N, |S|] (float32), each None when not asked for. A `ModelOutput`, so the wrappers that walk a forward's
    output (FSDP registering its backward hooks, DDP) find its tensors."""

    logprob: torch.Tensor | None = None
    safety_logits: torch.Tensor | None = None


def student_outputs(
    model: PreTrainedModel,
    batch: CacheBatch,
    safety_ids: torch.Tensor | None,
    with_ce: bool = True,
    ce_chunk_size: int = 1024,
) -> StudentOutputs:
    """One forward pass of the student: the response tokens' log-probs and mean CE, and logits on S at every response
    position of `batch`.

    With `safety_ids=None` only the CE is computed (plain SFT on response tokens); with `with_ce=False` only the logits on S.
    """

    def project(hidden: torch.Tensor, head: torch.Tensor) -> StudentProjections:
        """The response positions' hidden states projected onto the LM head: target log-probs and logits on S."""
        device = hidden.device
        hidden = hidden[batch.rows.to(device), batch.positions.to(device)]
        # Projected in the head's dtype: a dequantised head's (pact.quantization.dense_weight) may differ from the hidden states'.
        logprob = chunked_target_logprob(hidden.to(head.dtype), head, batch.labels.to(device), ce_chunk_size) if with_ce else None
        safety_logits = None if safety_ids is None else float32_logits(hidden, head[safety_ids.to(device)])
        return StudentProjections(logprob=logprob, safety_logits=safety_logits)

    device = head_device(model)
    # The batch is right-padded: a plain causal mask gives the response positions their hidden states without the host
    # reads transformers makes to prepare a padding mask (see `causal_attention_mask`).
    mask = causal_attention_mask(model, batch.input_ids.shape[1], device)
    projected = projected_forward(model, batch.input_ids, batch.attention_mask if mask is None else mask, project)
    steps = batch.steps.to(device)
    ce = mean_cross_entropy(projected.logprob) if with_ce else torch.zeros((), dtype=torch.float32, device=steps.device)
    return StudentOutputs(ce=ce, safety_logits=projected.safety_logits, steps=steps, logprob=projected.logprob)


def pact_batch_loss(
    model: PreTrainedModel,
    batch: CacheBatch,
    safety_ids: torch.Tensor,
    weights: torch.Tensor,
    cfg: PactConfig,
    ce_chunk_size: int = 1024,
) -> PactOutput:
    """The objective `cfg.objective` over the batch's response tokens (docs/objective.md sections 2 and 4):
    pact L = CE + lambda * mean_t KL_t; tokenwise L = mean_t TW_t; pact+tokenwise L = mean_t TW_t + lambda * mean_t KL_t.

    `batch` carries its targets (cached, `collate_rows`, or online,
    `OnlineReference.fill`), the reference log-probs `target_logprob` among
    them; `safety_ids` is S, the columns of the student's logits.
    """
    student = student_outputs(model, batch, safety_ids, with_ce=True, ce_chunk_size=ce_chunk_size)
    device = student.safety_logits.device
    mask = torch.ones(student.steps.shape, dtype=torch.bool, device=device)
    columns = None if batch.columns is None else batch.columns.to(device)
    kl_per_position = pact_kl(
        _in_loss(student.safety_logits, cfg.uses_kl), batch.full_logits.to(device), batch.post_logits.to(device),
        batch.post_count.to(device), student.steps, mask, weights.to(device), cfg, columns,
    )
    tokenwise = tokenwise_terms(_in_loss(student.logprob, cfg.uses_tokenwise), _reference_logprob(batch), student.steps,
                                cfg.betas).sum() / mask.sum().clamp(min=1)
    loss, kl = pact_loss(tokenwise if cfg.uses_tokenwise else student.ce, kl_per_position, mask, cfg)
    return PactOutput(loss, student.ce, kl, kl_per_position, student.steps, batch.tokens, tokenwise)


def _in_loss(values: torch.Tensor, used: bool) -> torch.Tensor:
    """`values` as they are when the loss uses them, else detached (a part computed only for the logs needs no graph)."""
    return values if used else values.detach()


def _reference_logprob(batch: CacheBatch) -> torch.Tensor:
    """The reference's log-prob of each response token, which every cache row and every online batch carries."""
    if batch.target_logprob is None:
        raise PactError(f"batch of example_ids {batch.example_ids.tolist()}: no reference log-probs (target_logprob) to "
                        "compute the token-wise loss with; fill the batch with `collate_rows` or `OnlineReference.fill`")
    return batch.target_logprob


def cached_pact_loss(
    model: PreTrainedModel,
    rows: list[dict],
    safety_ids: torch.Tensor,
    weights: torch.Tensor,
    cfg: PactConfig,
    pad_id: int,
    ce_chunk_size: int = 1024,
) -> PactOutput:
    """The PACT loss of a batch of cache rows (`CacheReader` items): `collate_rows`, then `pact_batch_loss`."""
    batch = collate_rows(rows, pad_id)
    check_columns(batch, safety_ids)
    return pact_batch_loss(model, batch, safety_ids, weights, cfg, ce_chunk_size)
