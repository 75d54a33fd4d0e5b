"""Reference-model passes: what the objective needs from the aligned model.

Used live by the online objective and once, offline, by `pact-cache build`,
so both modes see identical reference values. Only the rows of response
positions ever get full-vocabulary logits, one batch at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from pact.data import EncodedExample
from pact.objective import topp_count


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


def causal_lm_parts(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.Tensor]:
    """The decoder stack (tokens -> final hidden states) and the LM-head weight [V, H] of a causal LM.

    Works on PEFT- and DDP-wrapped models too (LoRA layers stay active inside the decoder).
    """
    base = getattr(model, "module", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    if getattr(base.config, "final_logit_softcapping", None):
        raise NotImplementedError("models with final_logit_softcapping are not supported by the safety-column path")
    head = base.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("LM heads with a bias are not supported by the safety-column path")
    return base.get_decoder(), head.weight


def pad_batch(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into `(input_ids, attention_mask)`; right padding leaves earlier positions exact."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
    return ids.to(device), attention.to(device)


def response_hidden_states(
    model: PreTrainedModel, sequences: list[list[int]], starts: list[int], pad_id: int, device: torch.device
) -> torch.Tensor:
    """Final hidden states at the positions that predict each response token, flattened to [sum n_resp, H].

    Response step t of sequence i is predicted at position starts[i] - 1 + t.
    In grad mode the call goes through the model's own forward (asking it for
    no logits), so wrappers such as DistributedDataParallel see the forward;
    without grad the decoder stack is called directly and no per-layer
    hidden states are kept.
    """
    ids, attention = pad_batch(sequences, pad_id, device)
    if torch.is_grad_enabled():
        no_logits = torch.empty(0, dtype=torch.long, device=device)
        hidden = model(input_ids=ids, attention_mask=attention, logits_to_keep=no_logits, output_hidden_states=True).hidden_states[-1]
    else:
        decoder, _ = causal_lm_parts(model)
        hidden = decoder(input_ids=ids, attention_mask=attention).last_hidden_state
    rows, cols = response_index(sequences, starts, device)
    return hidden[rows, cols]


def response_index(sequences: list[list[int]], starts: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) indices of the positions that predict the response tokens, in order."""
    rows, cols = [], []
    for row, (seq, start) in enumerate(zip(sequences, starts)):
        rows.extend([row] * (len(seq) - start))
        cols.extend(range(start - 1, len(seq) - 1))
    return torch.tensor(rows, device=device), torch.tensor(cols, device=device)


def response_targets_flat(examples: list[EncodedExample], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened response token ids and their response steps t for a batch of examples."""
    targets = [token for ex in examples for token in ex.response_ids]
    steps = [t for ex in examples for t in range(len(ex.response_ids))]
    return torch.tensor(targets, device=device), torch.tensor(steps, device=device)


@torch.inference_mode()
def reference_targets(
    model: PreTrainedModel,
    examples: list[EncodedExample],
    safety_ids: torch.Tensor,
    header_ids: list[int],
    p0: float,
    gate_temperature: float,
    pad_id: int,
) -> list[ReferenceTargets]:
    """Run the reference on the full and post-only contexts of `examples` in one batched forward pass."""
    _, head = causal_lm_parts(model)
    device = head.device
    full_seqs = [ex.input_ids for ex in examples]
    post_seqs = [header_ids + ex.response_ids for ex in examples]
    starts = [ex.response_start for ex in examples] + [len(header_ids)] * len(examples)
    hidden = response_hidden_states(model, full_seqs + post_seqs, starts, pad_id, device)
    n_full = sum(len(ex.response_ids) for ex in examples)
    full_hidden, post_hidden = hidden[:n_full], hidden[n_full:]
    safety_ids = safety_ids.to(device)
    logits = F.linear(full_hidden, head).float()
    targets, _ = response_targets_flat(examples, device)
    logsumexp = torch.logsumexp(logits, dim=-1)
    target_logprob = logits.gather(1, targets[:, None]).squeeze(1) - logsumexp
    full_logits = logits[:, safety_ids]
    del logits
    post_logits = F.linear(post_hidden, head[safety_ids]).float()
    post_count = topp_count(post_logits, p0, gate_temperature)
    sizes = [len(ex.response_ids) for ex in examples]
    parts = zip(*(t.split(sizes) for t in (full_logits, post_logits, post_count, target_logprob, logsumexp)))
    return [ReferenceTargets(*fields) for fields in parts]
