"""Projections of a causal LM's final hidden states onto its LM head, computed
inside the model's own forward.

The student's side of the loss projects the hidden states of the response
positions onto the LM head (the chunked cross-entropy, the safety-token
logits) and never builds [batch, length, vocab] logits. Projecting beside the
forward would read the head's weight where a sharding wrapper keeps only this
process's shard of it: FSDP2 (`fully_shard`, what `--fsdp` and `accelerate
launch` with an FSDP config apply) and FSDP1 gather a module's full weights for
its forward and free them after. `projected_forward` therefore runs the model's
forward and does the projection in a forward hook, with the weights the forward
sees, and the projection becomes the forward's output, on which FSDP hooks the
re-gathering of the weights for the projection's backward. One code path for
a single process, DDP, FSDP and LoRA.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from pact.models.parts import causal_lm_parts, decoder_stack, head_device

P = TypeVar("P", bound=ModelOutput)


def projected_forward(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      project: Callable[[torch.Tensor, torch.Tensor], P]) -> P:
    """`project(final hidden states [B, L, H], LM-head weight [V, H])` of a padded batch, computed inside `model`'s forward.

    `model` is what the training loop holds: a causal LM, a PEFT model, or
    either wrapped by DistributedDataParallel, FSDP1 or FSDP2. The decoder's
    output is caught by a forward hook; `project` runs in a forward hook of
    the outermost module that is not a DDP/FSDP1 wrapper, registered ahead of
    the hooks already there (FSDP2's post-forward reshard among them), and its
    result, a `ModelOutput` (which FSDP and DDP walk as they walk any model
    output), is what the forward returns. No logits are computed and no
    key/value cache is kept.
    """
    decoder, device = decoder_stack(model), head_device(model)
    hidden: list[torch.Tensor] = []

    def keep_hidden(module, args, output):
        """Keep the decoder's last hidden state (its output's first entry) for the projection."""
        hidden.append(output[0])

    def projection(module, args, output):
        """Replace the model's output by `project` of the kept hidden state, with the head's weight as the forward has it."""
        if len(hidden) != 1:
            raise RuntimeError(f"{type(decoder).__name__}, the model's decoder, ran {len(hidden)} times in one forward; "
                               "expected once")
        return project(hidden.pop(), causal_lm_parts(model)[1])

    outer = getattr(model, "module", model)  # DDP and FSDP1 run the module they wrap; FSDP2 hooks the module itself
    handles = [decoder.register_forward_hook(keep_hidden), outer.register_forward_hook(projection, prepend=True)]
    try:
        return model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                     logits_to_keep=torch.empty(0, dtype=torch.long, device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
