"""Model inference on chat prompts: batched greedy generation, and scoring of
given responses (the log-probability of a fixed answer).

Both render each prompt with the model's chat template (generation prompt on)
and batch sequences with LEFT padding: every sequence ends at the same column,
so generation appends new tokens right after each prompt and the scored
response positions line up at the end. Position ids follow the attention mask
(the first real token of every row is position 0), so a padded batch computes
what each sequence computes alone, up to floating-point rounding.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from pact.data.chat import encode_conversation, prompt_token_ids
from pact.data.rows import Conversation
from pact.errors import InvalidSetting
from pact.models.loading import pad_token_id

Messages = list[dict[str, str]]


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[int]:
    """Token ids that end an answer: end-of-sequence, the chat template's end-of-turn token and the model's `eos_token_id`s.

    The end-of-turn token (e.g. `<|im_end|>`, `<|eot_id|>`) is found the way
    the training data finds it: the special token the template puts right
    after an assistant message.
    """
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids = {tokenizer.eos_token_id}
    probe = Conversation(0, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}])
    end_of_turn = encode_conversation(tokenizer, probe).response_ids[-1]
    if end_of_turn in special:
        ids.add(end_of_turn)
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def left_pad(sequences: Sequence[Sequence[int]], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-pad token lists into `input_ids`, `attention_mask` and matching `position_ids` (0 at each first real token)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            input_ids[row, width - len(sequence):] = torch.tensor(list(sequence), dtype=torch.long)
            attention_mask[row, width - len(sequence):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "position_ids": position_ids.to(device)}


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to keep padding small."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
) -> list[list[int]]:
    """Greedy answer token ids for chat prompts, in the order given, each cut before its first stop token.

    Generation stops at any `stop_token_ids` token or after `max_new_tokens`
    tokens. Greedy decoding ignores the model's own sampling settings, so
    results are reproducible and do not depend on `batch_size` (up to
    floating-point near-ties between the two best tokens). More new tokens
    than the model's context length is refused (`InvalidSetting`) before any
    is generated: the answer could not be read past it, and its cache grows
    with every token.
    """
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and max_new_tokens > context:
        raise InvalidSetting("max_new_tokens", f"max_new_tokens must be at most the model's context length ({context} tokens, "
                                               f"max_position_embeddings of its config), got {max_new_tokens}")
    encoded = [prompt_token_ids(tokenizer, messages) for messages in prompts]
    stops = stop_token_ids(tokenizer, model)
    pad = pad_token_id(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=pad)
    device = _device(model)
    answers: list[list[int]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()
    for batch in tqdm(_batches([len(e) for e in encoded], batch_size), desc="generate", unit="batch", disable=not progress):
        inputs = left_pad([encoded[i] for i in batch], pad, device)
        inputs.pop("position_ids")  # generate derives them from the attention mask at every step
        output = model.generate(**inputs, generation_config=config)
        for row, index in enumerate(batch):
            new = output[row, inputs["input_ids"].shape[1]:].tolist()
            answers[index] = new[: next((k for k, token in enumerate(new) if token in stops), len(new))]
    model.train(was_training)
    return answers


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to chat prompts as text (`generate_ids` decoded, special tokens stripped, whitespace trimmed)."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    return [tokenizer.decode(answer, skip_special_tokens=True).strip() for answer in ids]


@torch.no_grad()
def score_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    candidates: Sequence[str],
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "score",
) -> torch.Tensor:
    """Log-probability of each candidate answer to each prompt: a float64 tensor `[len(prompts), len(candidates)]`.

    A candidate's score is the sum of the log-probs of its response tokens as
    the training data encodes them (the answer text followed by the template's
    end-of-turn token), teacher-forced after the rendered prompt. Including the
    end-of-turn token makes the score the probability that the answer is
    exactly this candidate, so a label that is a prefix of another (or of a
    longer reply) is not favoured.
    """
    pairs = [(p, c) for p in range(len(prompts)) for c in range(len(candidates))]
    sequences, starts = [], []
    for p, c in pairs:
        messages = list(prompts[p]) + [{"role": "assistant", "content": candidates[c]}]
        example = encode_conversation(tokenizer, Conversation(p, messages), train_on="last")  # the candidate alone
        sequences.append(example.input_ids)
        starts.append(example.response_start)
    scores = torch.zeros(len(prompts), len(candidates), dtype=torch.float64)
    device = _device(model)
    pad = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    for batch in tqdm(_batches([len(s) for s in sequences], batch_size), desc=desc, unit="batch", disable=not progress):
        lengths = [len(sequences[i]) - starts[i] for i in batch]
        keep = max(lengths) + 1  # the logit predicting token j sits at position j - 1
        inputs = left_pad([sequences[i] for i in batch], pad, device)
        logits = model(**inputs, logits_to_keep=keep).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = inputs["input_ids"][:, -(keep - 1):]
        token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().cpu()
        for row, index in enumerate(batch):
            p, c = pairs[index]
            scores[p, c] = token_logprobs[row, -lengths[row]:].sum()
    model.train(was_training)
    return scores
