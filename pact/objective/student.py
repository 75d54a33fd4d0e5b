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
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from pact.data.batch import CacheBatch
from pact.models.parts import causal_attention_mask, float32_logits, head_device
from pact.models.projection import projected_forward


@dataclass
class StudentOutputs:
    """What the objective needs from the student for a batch's N response positions: the mean CE, the log-prob of
    each response token [N] (None without CE), the logits on S, each token's step within its turn and, when asked
    for, the logsumexp of the logits outside S [N] (`rest`, what the reference KL's rest category needs; under
    distillation, the logsumexp outside each token's teacher top-K, the tail category) and, under distillation, the
    logits at the teacher's top-K ids [N, K] (`kd_logits`)."""

    ce: torch.Tensor
    safety_logits: torch.Tensor | None
    steps: torch.Tensor
    logprob: torch.Tensor | None = None
    rest: torch.Tensor | None = None
    kd_logits: torch.Tensor | None = None


@dataclass
class StudentProjections(ModelOutput):
    """The student's forward output under `student_outputs`: the log-prob of each response token [N] (float32), the
    logits on S [N, |S|] (float32) and the logsumexp outside S [N] (float32), each None when not asked for. A
    `ModelOutput`, so the wrappers that walk a forward's output (FSDP registering its backward hooks, DDP) find its
    tensors."""

    logprob: torch.Tensor | None = None
    safety_logits: torch.Tensor | None = None
    rest: torch.Tensor | None = None
    kd_logits: torch.Tensor | None = None


def student_outputs(
    model: PreTrainedModel,
    batch: CacheBatch,
    safety_ids: torch.Tensor | None,
    with_ce: bool = True,
    ce_chunk_size: int = 1024,
    with_rest: bool = False,
    kd_ids: torch.Tensor | None = None,
) -> StudentOutputs:
    """One forward pass of the student: the response tokens' log-probs and mean CE, and logits on S at every response
    position of `batch`; `with_rest`, also the logsumexp of the logits outside S, from the CE's own chunks (no other
    full-vocabulary logits are made); with `kd_ids` (the teacher's top-K ids of each response token, [N, K]) instead,
    the logits at those ids and the logsumexp outside them, from the same chunks.

    With `safety_ids=None` only the CE is computed (plain SFT on response tokens); with `with_ce=False` only the logits on S.
    """

    def project(hidden: torch.Tensor, head: torch.Tensor) -> StudentProjections:
        """The response positions' hidden states projected onto the LM head: target log-probs and logits on S."""
        device = hidden.device
        hidden = hidden[batch.rows.to(device), batch.positions.to(device)]
        # Projected in the head's dtype: a dequantised head's (pact.models.quantization.dense_weight) may differ from the hidden states'.
        excluded = kd_ids if kd_ids is not None else (safety_ids if with_rest else None)
        chunks = (chunked_projections(hidden.to(head.dtype), head, batch.labels.to(device), ce_chunk_size,
                                      None if excluded is None else excluded.to(device)) if with_ce else None)
        safety_logits = None if safety_ids is None else float32_logits(hidden, head[safety_ids.to(device)])
        return StudentProjections(logprob=chunks and chunks.logprob, safety_logits=safety_logits, rest=chunks and chunks.rest,
                                  kd_logits=chunks and chunks.at_ids)

    device = head_device(model)
    # The batch is right-padded: a plain causal mask gives the response positions their hidden states without the host
    # reads transformers makes to prepare a padding mask (see `causal_attention_mask`).
    mask = causal_attention_mask(model, batch.input_ids.shape[1], device)
    projected = projected_forward(model, batch.input_ids, batch.attention_mask if mask is None else mask, project)
    steps = batch.steps.to(device)
    ce = mean_cross_entropy(projected.logprob) if with_ce else torch.zeros((), dtype=torch.float32, device=steps.device)
    return StudentOutputs(ce=ce, safety_logits=projected.safety_logits, steps=steps, logprob=projected.logprob,
                          rest=projected.rest, kd_logits=projected.kd_logits)


@dataclass
class ChunkedProjection:
    """Per response token, float32: the log-prob of the target token [N]; the logsumexp of the logits outside the
    `rest_of` ids [N] (None when not asked for); and, for per-row ids [N, E], the logits at them [N, E] (else None)."""

    logprob: torch.Tensor
    rest: torch.Tensor | None
    at_ids: torch.Tensor | None = None


def chunked_projections(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
                        rest_of: torch.Tensor | None = None) -> ChunkedProjection:
    """log softmax(hidden @ W.T)[target] of each row [N] (float32) without keeping [N, V] logits, and with `rest_of`
    (token ids: [E] for every row alike, or [N, E] one list per row) the logsumexp of each row's logits outside those
    ids; per-row ids also give the logits at them (what distillation compares with the teacher's top-K).

    Each chunk's logits are recomputed in backward (activation checkpointing),
    so peak memory holds one chunk of full-vocabulary logits, not all of them.
    """
    per_row = rest_of is not None and rest_of.dim() == 2
    parts = [checkpoint(_chunk, hidden[start:start + chunk_size], lm_head_weight, targets[start:start + chunk_size],
                        rest_of[start:start + chunk_size] if per_row else rest_of, use_reentrant=False)
             for start in range(0, hidden.shape[0], chunk_size)]
    if not parts:
        empty = hidden.new_zeros((0,), dtype=torch.float32)
        return ChunkedProjection(empty, empty if rest_of is not None else None,
                                 hidden.new_zeros((0, rest_of.shape[1]), dtype=torch.float32) if per_row else None)
    joined = [torch.cat([p[i] for p in parts]) if parts[0][i] is not None else None for i in range(3)]
    return ChunkedProjection(joined[0], joined[1], joined[2] if per_row else None)


def chunked_target_logprob(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                           chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(hidden @ W.T)[target] of each row [N] (float32) without keeping [N, V] logits (`chunked_projections`'
    log-probs)."""
    return chunked_projections(hidden, lm_head_weight, targets, chunk_size).logprob


def mean_cross_entropy(logprob: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy of response tokens whose log-probs are `logprob` (0 for none)."""
    return -logprob.sum() / max(logprob.shape[0], 1)


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rest_of: torch.Tensor | None
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One chunk of `chunked_projections`: the full-vocabulary logits projected in the weights' dtype, then the
    log-softmax (and the logsumexp outside `rest_of`, and the logits at those ids) in float32.

    Unlike the safety rows, the whole LM head would have to be copied to
    float32 for this projection, in the forward and again in the checkpointed
    backward (V x H x 4 bytes: 2.2 GB for Qwen2.5-7B): the training step's
    largest transient. Upcasting the logits keeps the softmax in float32 at
    no memory cost, as transformers' own loss does.
    """
    logits = F.linear(hidden, weight).float()
    if rest_of is None:
        return -F.cross_entropy(logits, targets, reduction="none"), None, None
    return _LogprobAndRest.apply(logits, targets, rest_of)


VOCAB_BLOCKS = 8  # `_LogprobAndRest` works through the vocabulary in this many column blocks: its temporaries are 1/8 of [N, V]


class _LogprobAndRest(torch.autograd.Function):
    """(log softmax(logits)[target], the logsumexp of the logits outside the `excluded` ids, the logits at those ids)
    of each row, keeping one [N, V] tensor for the backward (the log-softmax, as the cross-entropy does) and making one
    in it (the gradient).

    `excluded` is one id list for every row ([E]: S, for the reference KL's
    rest category) or one per row ([N, E]: the teacher's top-K, for
    distillation's tail category). Masking them out of a copy of the logits
    and autograd's logsumexp would keep two more [N, V] tensors through the
    backward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor):
        excluded = excluded.expand(logits.shape[0], -1) if excluded.dim() == 1 else excluded
        logp = torch.log_softmax(logits, dim=-1)
        logprob = logp.gather(1, targets[:, None]).squeeze(1)
        log_mass = logsumexp_outside(logp, excluded)
        log_total = logits.gather(1, targets[:, None]).squeeze(1) - logprob
        ctx.save_for_backward(logp, targets, excluded, log_mass)
        ctx.set_materialize_grads(False)
        return logprob, log_total + log_mass, logits.gather(1, excluded)

    @staticmethod
    def backward(ctx, grad_logprob: torch.Tensor | None, grad_rest: torch.Tensor | None, grad_gathered: torch.Tensor | None):
        logp, targets, excluded, log_mass = ctx.saved_tensors
        grad = torch.empty_like(logp)
        # Outside the excluded ids, d logprob / d logits = onehot - p and d rest / d logits = p / mass: both multiples of
        # p, so one exp per element serves both, as share = p / mass (at most 1 there) times (g_rest - g_logprob * mass);
        # the excluded columns, where the rest's term is 0, are then written exactly.
        if grad_rest is None:
            shift, coef = None, -grad_logprob
        else:
            shift = log_mass[:, None]
            coef = grad_rest if grad_logprob is None else grad_rest - grad_logprob * torch.exp(log_mass)
        for columns in _column_blocks(logp.shape[1]):
            part = grad[:, columns]
            torch.exp(logp[:, columns] if shift is None else logp[:, columns] - shift, out=part).mul_(coef[:, None])
        if grad_rest is not None:
            at_excluded = torch.zeros_like(excluded, dtype=grad.dtype) if grad_logprob is None else \
                torch.exp(logp.gather(1, excluded)).mul_(-grad_logprob[:, None])
            grad.scatter_(1, excluded, at_excluded)
        if grad_logprob is not None:
            grad.scatter_add_(1, targets[:, None], grad_logprob[:, None])
        if grad_gathered is not None:
            grad.scatter_add_(1, excluded, grad_gathered)
        return grad, None, None


def _column_blocks(width: int) -> list[slice]:
    """`VOCAB_BLOCKS` slices that cover `width` columns."""
    step = -(-width // VOCAB_BLOCKS)
    return [slice(start, start + step) for start in range(0, width, step)]


def _set_at(block: torch.Tensor, ids: torch.Tensor, start: int, value: float) -> torch.Tensor:
    """`block` (the columns from `start` of an [N, V] tensor) with `value` at each row's `ids` [N, E] that fall inside
    it; a scatter into one spare column takes the ids outside, so nothing is read back to the host."""
    width = block.shape[1]
    local = ids - start
    index = torch.where((local >= 0) & (local < width), local, width)
    padded = torch.cat([block, block.new_empty(block.shape[0], 1)], dim=1).scatter_(1, index, value)
    return padded[:, :width]


def logsumexp_outside(values: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """logsumexp over each row of `values` [N, V] but its `excluded` columns [N, E], a block of columns at a time (a
    temporary of 1/`VOCAB_BLOCKS` of `values`, not a masked copy of it)."""
    top = torch.full(values.shape[:1], float("-inf"), device=values.device, dtype=values.dtype)
    total = torch.zeros_like(top)
    for columns in _column_blocks(values.shape[1]):
        block = _set_at(values[:, columns], excluded, columns.start, float("-inf"))
        new_top = torch.maximum(top, block.amax(dim=1))
        shift = torch.where(torch.isfinite(new_top), new_top, torch.zeros_like(new_top))
        total = total * torch.exp(top - shift) + block.sub_(shift[:, None]).exp_().sum(dim=1)
        top = new_top
    return torch.log(total) + torch.where(torch.isfinite(top), top, torch.zeros_like(top))

