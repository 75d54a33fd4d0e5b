"""Reference-model passes: what the objective needs from the aligned model.

Used live by the online objective and once, offline, by `pact-cache build`,
so both modes see identical reference values. Only the rows of response
positions ever get full-vocabulary logits, one batch at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from pact.data import EncodedExample
from pact.objective import float32_logits, topp_count
from pact.quantization import dense_weight

if TYPE_CHECKING:
    from pact.cache_tools.batch import CacheBatch


def _collate_spans(*args) -> "CacheBatch":
    """`pact.cache_tools.batch.collate_spans`, imported on first use: `pact.cache_tools` imports this module (the
    builder runs the reference), so importing it at the top would be circular."""
    from pact.cache_tools.batch import collate_spans

    return collate_spans(*args)


@dataclass
class ReferenceTargets:
    """Reference values for every response step of one example (float32, on CPU or the model's device).

    full_logits/post_logits: [n_resp, |S|] logits on the safety tokens with the
    full context and with the post-only context; post_count: [n_resp] top-p
    count of softmax(post_logits / Tg) (the gate's I_p times |S|);
    target_logprob: [n_resp] reference log-prob of the response token;
    logsumexp: [n_resp] full-vocabulary logsumexp (full context).
    """

    full_logits: torch.Tensor
    post_logits: torch.Tensor
    post_count: torch.Tensor
    target_logprob: torch.Tensor
    logsumexp: torch.Tensor


def _unwrapped(model: PreTrainedModel) -> PreTrainedModel:
    """The transformers model inside a PEFT and/or DDP wrapper (LoRA layers stay active inside it)."""
    base = getattr(model, "module", model)
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def _output_head(model: PreTrainedModel) -> torch.nn.Module:
    """The LM-head module of a causal LM, refusing the heads the safety-column path cannot reproduce."""
    base = _unwrapped(model)
    if getattr(base.config, "final_logit_softcapping", None):
        raise NotImplementedError("models with final_logit_softcapping are not supported by the safety-column path")
    head = base.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("LM heads with a bias are not supported by the safety-column path")
    return head


def causal_lm_parts(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.Tensor]:
    """The decoder stack (tokens -> final hidden states) and the LM-head weight [V, H] of a causal LM.

    Works on PEFT- and DDP-wrapped models too (LoRA layers stay active inside
    the decoder). A head bitsandbytes quantised comes back dequantised
    (`pact.quantization.dense_weight`), so its rows are the head's rows.
    """
    return decoder_stack(model), dense_weight(_output_head(model))


def decoder_stack(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack (tokens -> final hidden states) of a causal LM, PEFT- or DDP-wrapped or not."""
    return _unwrapped(model).get_decoder()


def head_device(model: PreTrainedModel) -> torch.device:
    """The device of the LM head's weight, where the projections onto it run; a quantised head is not dequantised."""
    return _output_head(model).weight.device


def causal_attention_mask(model: PreTrainedModel, length: int, device: torch.device) -> torch.Tensor | None:
    """A plain causal attention mask [1, 1, length, length] in the form the model's attention takes, built on `device`
    (sdpa: bool, True where a position may attend; eager: 0 or the dtype's minimum, added to the scores); None for a
    model whose attention needs more than causality (sliding windows, chunks, non-causal layers) or takes no such mask
    (flash or flex attention), for which transformers builds its own.

    For a right-padded batch under causal attention the padding needs no mask: a position never attends to a later
    one, so every real position gets the hidden state a padding mask would give it. Why a mask at all then: given
    none (or a 2-D one), transformers reads the position ids (or the mask) on the host to decide whether it may leave
    the mask out, a host sync at every forward pass; a 4-D mask is used as given. The mask is one [L, L] for the whole
    batch, where transformers' padding mask is [B, 1, L, L].
    """
    base = _unwrapped(model)
    config = base.config
    plain = (getattr(config, "is_causal", True) and not getattr(config, "sliding_window", None)
             and not getattr(config, "attention_chunk_size", None)
             and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ["full_attention"]))
    implementation = getattr(config, "_attn_implementation", None)
    if not plain or implementation not in ("sdpa", "eager"):
        return None
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    if implementation == "sdpa":
        return allowed
    dtype = base.get_input_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def hidden_states_at(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """Final hidden states at (rows, positions) of a padded batch, [N, H].

    The decoder stack is called directly, so no logits and no per-layer
    hidden states are computed: the reference's passes, on a model nobody
    wraps. The student, which a training loop may wrap (DDP, FSDP), goes
    through its own forward instead (`pact.projection.projected_forward`).
    """
    device = head_device(model)
    hidden = decoder_stack(model)(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
    return hidden[rows.to(device), positions.to(device)]


def response_hidden_states(
    model: PreTrainedModel, sequences: list[list[int]], starts: list[int], pad_id: int, device: torch.device
) -> torch.Tensor:
    """Final hidden states at the positions that predict each response token `sequences[i][starts[i]:]`, [sum n_resp, H]."""
    batch = _collate_spans([torch.tensor(s, dtype=torch.long) for s in sequences],
                          [torch.tensor([[start, len(s)]]) for s, start in zip(sequences, starts)], list(range(len(sequences))), pad_id)
    return hidden_states_at(model, batch.input_ids, batch.attention_mask, batch.rows, batch.positions).to(device)


def collate_examples(examples: list[EncodedExample], pad_id: int) -> "CacheBatch":
    """The token side of a batch of encoded examples (`CacheBatch` without targets)."""
    return _collate_spans([torch.tensor(ex.input_ids, dtype=torch.long) for ex in examples],
                         [torch.tensor(ex.spans, dtype=torch.long).reshape(-1, 2) for ex in examples],
                         [ex.example_id for ex in examples], pad_id)


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
) -> ReferenceTargets:
    """Reference values for every response token of `batch` (flattened, batch order), full and post-only contexts
    in one batched forward pass (the post-only context of a token is the header followed by its turn so far)."""
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
    logsumexp = torch.logsumexp(logits, dim=-1)
    target_logprob = logits.gather(1, batch.labels.to(device)[:, None]).squeeze(1) - logsumexp
    full_logits = logits[:, safety_ids]
    del logits
    post_logits = float32_logits(post_hidden, head[safety_ids])
    post_count = topp_count(post_logits, p0, gate_temperature)
    return ReferenceTargets(full_logits, post_logits, post_count, target_logprob, logsumexp)


def reference_targets(
    model: PreTrainedModel,
    examples: list[EncodedExample],
    safety_ids: torch.Tensor,
    header_ids: list[int],
    p0: float,
    gate_temperature: float,
    pad_id: int,
) -> list[ReferenceTargets]:
    """`reference_batch` for a list of examples, split back into one `ReferenceTargets` per example."""
    values = reference_batch(model, collate_examples(examples, pad_id), safety_ids, header_ids, p0, gate_temperature, pad_id)
    sizes = [len(ex.response_ids) for ex in examples]
    fields = (values.full_logits, values.post_logits, values.post_count, values.target_logprob, values.logsumexp)
    return [ReferenceTargets(*parts) for parts in zip(*(t.split(sizes) for t in fields))]
