"""The student's side of the loss: one forward pass that yields, at every response position of a batch, the log-prob
of the response token (the cross-entropy, chunked so no float32 [tokens, vocab] copy is kept) and the logits on the
safety tokens (from the final hidden states and the LM-head rows of S, so the KL never needs full-vocabulary
logits). Both projections run inside the model's forward (`pact.models.projection`), where sharded training (FSDP)
has the head's full weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from pact.data.batch import CacheBatch
from pact.models.parts import causal_attention_mask, float32_logits, head_device
from pact.models.projection import projected_forward


@dataclass
class StudentOutputs:
    """What the objective needs from the student for a batch's N response positions: the mean CE, the log-prob of
    each response token [N] (None without CE), the logits on S and each token's step within its turn."""

    ce: torch.Tensor
    safety_logits: torch.Tensor | None
    steps: torch.Tensor
    logprob: torch.Tensor | None = None


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
        # Projected in the head's dtype: a dequantised head's (pact.models.quantization.dense_weight) may differ from the hidden states'.
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


def chunked_target_logprob(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                           chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(hidden @ W.T)[target] of each row [N] (float32) without keeping [N, V] logits.

    Each chunk's logits are recomputed in backward (activation checkpointing),
    so peak memory holds one chunk of full-vocabulary logits, not all of them.
    """
    from torch.utils.checkpoint import checkpoint

    parts = [checkpoint(_target_logprob, hidden[start:start + chunk_size], lm_head_weight, targets[start:start + chunk_size],
                        use_reentrant=False) for start in range(0, hidden.shape[0], chunk_size)]
    return torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)


def mean_cross_entropy(logprob: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy of response tokens whose log-probs are `logprob` (0 for none)."""
    return -logprob.sum() / max(logprob.shape[0], 1)


def _target_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One chunk of `chunked_target_logprob`: the full-vocabulary logits projected in the weights' dtype, then
    the log-softmax in float32.

    Unlike the safety rows, the whole LM head would have to be copied to
    float32 for this projection, in the forward and again in the checkpointed
    backward (V x H x 4 bytes: 2.2 GB for Qwen2.5-7B): the training step's
    largest transient. Upcasting the logits keeps the softmax in float32 at
    no memory cost, as transformers' own loss does.
    """
    return -F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
