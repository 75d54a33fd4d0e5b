"""The PACT loss of a model on a batch: cross-entropy on the response tokens
plus lambda times the masked KL on the safety tokens, with targets that come
live or from the cache (see `pact.targets`).

The student's safety-token logits are computed from the final hidden states
and the LM-head rows of S, so the KL never needs full-vocabulary logits, and
the cross-entropy is chunked so no float32 [tokens, vocab] copy is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from pact.data import EncodedExample
from pact.objective import PactConfig, chunked_cross_entropy, pact_kl, pact_loss
from pact.reference import causal_lm_parts, response_hidden_states, response_targets_flat
from pact.targets import TargetBatch, examples_from_cache_rows, targets_from_cache_rows


@dataclass
class StudentOutputs:
    """What the objective needs from the student for a batch's N response positions."""

    ce: torch.Tensor
    safety_logits: torch.Tensor | None
    steps: torch.Tensor


@dataclass
class PactOutput:
    """The batch loss and its parts; `kl_per_position` [N] is KL_t (times T^2)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    kl_per_position: torch.Tensor
    steps: torch.Tensor
    tokens: int


def student_outputs(
    model: PreTrainedModel,
    examples: list[EncodedExample],
    safety_ids: torch.Tensor | None,
    pad_id: int,
    with_ce: bool = True,
    ce_chunk_size: int = 1024,
) -> StudentOutputs:
    """One forward pass of the student: mean response CE and logits on S at every response position.

    With `safety_ids=None` only the CE is computed (plain SFT on response tokens).
    """
    _, head = causal_lm_parts(model)
    device = head.device
    hidden = response_hidden_states(
        model, [ex.input_ids for ex in examples], [ex.response_start for ex in examples], pad_id, device
    )
    targets, steps = response_targets_flat(examples, device)
    ce = chunked_cross_entropy(hidden, head, targets, ce_chunk_size) if with_ce else hidden.new_zeros((), dtype=torch.float32)
    safety_logits = None if safety_ids is None else F.linear(hidden, head[safety_ids.to(device)])
    return StudentOutputs(ce=ce, safety_logits=safety_logits, steps=steps)


def compute_pact_loss(
    model: PreTrainedModel,
    examples: list[EncodedExample],
    targets: TargetBatch,
    safety_ids: torch.Tensor,
    weights: torch.Tensor,
    cfg: PactConfig,
    pad_id: int,
    ce_chunk_size: int = 1024,
) -> PactOutput:
    """L = CE + lambda * mean_t KL_t over the batch's response tokens (docs/objective.md section 2)."""
    student = student_outputs(model, examples, safety_ids, pad_id, with_ce=True, ce_chunk_size=ce_chunk_size)
    device = student.safety_logits.device
    targets = targets.to(device)
    mask = torch.ones(student.steps.shape, dtype=torch.bool, device=device)
    kl_per_position = pact_kl(
        student.safety_logits, targets.full_logits, targets.post_logits, targets.post_count,
        student.steps, mask, weights.to(device), cfg, targets.columns,
    )
    loss, kl = pact_loss(student.ce, kl_per_position, mask, cfg)
    return PactOutput(loss, student.ce, kl, kl_per_position, student.steps, int(mask.sum()))


def cached_pact_loss(
    model: PreTrainedModel,
    rows: list[dict],
    safety_ids: torch.Tensor,
    weights: torch.Tensor,
    cfg: PactConfig,
    pad_id: int,
    ce_chunk_size: int = 1024,
) -> PactOutput:
    """The PACT loss of a batch of cache rows (`CacheReader` items): the one call a custom training loop needs."""
    return compute_pact_loss(
        model, examples_from_cache_rows(rows), targets_from_cache_rows(rows, safety_ids),
        safety_ids, weights, cfg, pad_id, ce_chunk_size,
    )
