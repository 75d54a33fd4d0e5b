"""Reference-model passes: what the objective needs from the aligned model.

Used live by the online objective and once, offline, by `pact-cache build`, so both modes see identical reference
values. Only the rows of response positions ever get full-vocabulary logits, one batch at a time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from pact.data.batch import CacheBatch, collate_examples, collate_spans
from pact.data.chat import EncodedExample
from pact.models.parts import causal_lm_parts, float32_logits, hidden_states_at
from pact.objective.distillation import TeacherTopK, teacher_at, teacher_logits, teacher_topk
from pact.objective.kl import log_mass_outside, topp_count


@dataclass
class ReferenceTargets:
    """Reference values for every response step of one example (float32, on CPU or the model's device).

    full_logits/post_logits: [n_resp, |S|] logits on the safety tokens with the
    full context and with the post-only context; post_count: [n_resp] top-p
    count of softmax(post_logits / Tg) (the gate's I_p times |S|);
    target_logprob: [n_resp] reference log-prob of the response token;
    logsumexp: [n_resp] full-vocabulary logsumexp (full context);
    rest_logprob: [n_resp] log of the probability outside S (full context);
    kd_ids/kd_logprobs [n_resp, K], kd_tail [n_resp]: its own top-K as a
    distillation teacher (`pact.objective.distillation.teacher_topk`), when
    asked for.
    """

    full_logits: torch.Tensor
    post_logits: torch.Tensor
    post_count: torch.Tensor
    target_logprob: torch.Tensor
    logsumexp: torch.Tensor
    rest_logprob: torch.Tensor
    kd_ids: torch.Tensor | None = None
    kd_logprobs: torch.Tensor | None = None
    kd_tail: torch.Tensor | None = None


def response_hidden_states(
    model: PreTrainedModel, sequences: list[list[int]], starts: list[int], pad_id: int, device: torch.device
) -> torch.Tensor:
    """Final hidden states at the positions that predict each response token `sequences[i][starts[i]:]`, [sum n_resp, H]."""
    batch = collate_spans([torch.tensor(s, dtype=torch.long) for s in sequences],
                          [torch.tensor([[start, len(s)]]) for s, start in zip(sequences, starts)], list(range(len(sequences))), pad_id)
    return hidden_states_at(model, batch.input_ids, batch.attention_mask, batch.rows, batch.positions).to(device)


def post_only_batch(batch: "CacheBatch", header_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The post-only contexts of a batch, one sequence per response span: the assistant header, then that turn's tokens.

    Returns (input_ids [M, P + longest span], attention_mask, positions [N]);
    response token n is predicted in sequence `span of n` at position
    P - 1 + its step, so the rows are the tokens' span indices.
    """
    header = torch.tensor(header_ids, dtype=torch.long)
    lengths = batch.span_lengths
    offsets = torch.arange(int(lengths.max()))
    inside = offsets[None, :] < lengths[:, None]
    index = (batch.span_starts[:, None] + offsets[None, :]).clamp(max=batch.input_ids.shape[1] - 1)
    body = torch.where(inside, batch.input_ids[batch.span_rows[:, None], index], pad_id)
    ids = torch.cat([header.expand(len(lengths), -1), body], dim=1)
    mask = torch.cat([torch.ones(len(lengths), len(header), dtype=torch.long), inside.long()], dim=1)
    return ids, mask, len(header) - 1 + batch.steps


def _pad_to(ids: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """`ids` [B, L] right-padded with `value` to width `width`."""
    return torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=value)


@torch.inference_mode()
def reference_batch(
    model: PreTrainedModel,
    batch: "CacheBatch",
    safety_ids: torch.Tensor,
    header_ids: list[int],
    p0: float,
    gate_temperature: float,
    pad_id: int,
    kd_top_k: int | None = None,
    kd_ids: torch.Tensor | None = None,
) -> ReferenceTargets:
    """Reference values for every response token of `batch` (flattened, batch order), full and post-only contexts
    in one batched forward pass (the post-only context of a token is the header followed by its turn so far); with
    `kd_top_k`, also the model's own top-K as a distillation teacher, from the same full-vocabulary logits; with
    `kd_ids` [N, K] instead, its targets at those ids (`teacher_at`: a stored top-K recomputed)."""
    _, head = causal_lm_parts(model)
    device = head.device
    post_ids, post_mask, post_positions = post_only_batch(batch, header_ids, pad_id)
    width = max(batch.input_ids.shape[1], post_ids.shape[1])
    ids = torch.cat([_pad_to(batch.input_ids, width, pad_id), _pad_to(post_ids, width, pad_id)])
    mask = torch.cat([_pad_to(batch.attention_mask, width, 0), _pad_to(post_mask, width, 0)])
    token_span = torch.repeat_interleave(torch.arange(len(batch.span_lengths)), batch.span_lengths)
    rows = torch.cat([batch.rows, len(batch.lengths) + token_span])
    hidden = hidden_states_at(model, ids, mask, rows, torch.cat([batch.positions, post_positions]))
    full_hidden, post_hidden = hidden[:batch.tokens], hidden[batch.tokens:]
    safety_ids = safety_ids.to(device)
    logits = float32_logits(full_hidden, head)
    logsumexp, target_logprob = token_logprobs(logits, batch.labels)
    full_logits = logits[:, safety_ids]
    rest_logprob = log_mass_outside(logits, safety_ids)
    if kd_top_k is not None:
        teacher = teacher_topk(logits, kd_top_k)
    else:
        teacher = None if kd_ids is None else teacher_at(logits, kd_ids)
    del logits
    post_logits = float32_logits(post_hidden, head[safety_ids])
    post_count = topp_count(post_logits, p0, gate_temperature)
    return ReferenceTargets(full_logits, post_logits, post_count, target_logprob, logsumexp, rest_logprob,
                            *((teacher.ids, teacher.logprobs, teacher.tail) if teacher else ()))


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp [N], log-prob of each response token [N]) of full-vocabulary logits [N, V] and the tokens `labels`."""
    logsumexp = torch.logsumexp(logits, dim=-1)
    return logsumexp, logits.gather(1, labels.to(logits.device)[:, None]).squeeze(1) - logsumexp


@torch.inference_mode()
def distillation_batch(teacher: PreTrainedModel, batch: "CacheBatch", kd_top_k: int
                       ) -> tuple[TeacherTopK, torch.Tensor, torch.Tensor]:
    """What a distillation-only cache stores for every response token of `batch` (flattened, batch order), from one
    full-context forward pass of `teacher` and no post-only one: its top-K targets (`teacher_topk`), its log-prob of the
    token and its logsumexp."""
    logits = teacher_logits(teacher, batch)
    logsumexp, target_logprob = token_logprobs(logits, batch.labels)
    return teacher_topk(logits, kd_top_k), target_logprob, logsumexp


def reference_targets(
    model: PreTrainedModel,
    examples: list[EncodedExample],
    safety_ids: torch.Tensor,
    header_ids: list[int],
    p0: float,
    gate_temperature: float,
    pad_id: int,
    kd_top_k: int | None = None,
    kd_ids: torch.Tensor | None = None,
) -> list[ReferenceTargets]:
    """`reference_batch` for a list of examples, split back into one `ReferenceTargets` per example."""
    values = reference_batch(model, collate_examples(examples, pad_id), safety_ids, header_ids, p0, gate_temperature, pad_id,
                             kd_top_k, kd_ids)
    sizes = [len(ex.response_ids) for ex in examples]
    fields = [t for t in (getattr(values, f.name) for f in dataclasses.fields(values)) if t is not None]
    return [ReferenceTargets(*parts) for parts in zip(*(t.split(sizes) for t in fields))]
