"""The parts of a causal LM the objective works with, whoever wraps it (PEFT, DDP): its decoder stack, its LM head,
the device the head is on, a plain causal attention mask, final hidden states at chosen positions, and logits on a
few vocabulary rows computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from pact.models.quantization import dense_weight


def unwrapped(model: PreTrainedModel) -> PreTrainedModel:
    """The transformers model inside a PEFT and/or DDP wrapper (LoRA layers stay active inside it)."""
    base = getattr(model, "module", model)
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def _output_head(model: PreTrainedModel) -> torch.nn.Module:
    """The LM-head module of a causal LM, refusing the heads the safety-column path cannot reproduce."""
    base = unwrapped(model)
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
    (`pact.models.quantization.dense_weight`), so its rows are the head's rows.
    """
    return decoder_stack(model), dense_weight(_output_head(model))


def decoder_stack(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack (tokens -> final hidden states) of a causal LM, PEFT- or DDP-wrapped or not."""
    return unwrapped(model).get_decoder()


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
    base = unwrapped(model)
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
    through its own forward instead (`pact.models.projection.projected_forward`).
    """
    device = head_device(model)
    hidden = decoder_stack(model)(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
    return hidden[rows.to(device), positions.to(device)]


def float32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`hidden @ weight.T` computed in float32 whatever the model's dtype (a no-op cast for float32 models).

    Logits feed softmaxes, log-softmaxes, top-p counts and the cache's stored
    values; projected in bfloat16 they would be off by ~0.1 (~10% in
    probability), so hidden states and head rows are cast before the matmul.
    """
    return F.linear(hidden.float(), weight.float())
