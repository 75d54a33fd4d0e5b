"""A deliberately plain, independent implementation of docs/objective.md section 1 (safety tokens).

One example at a time, full-model forward passes, float64 probabilities and
Python loops over response steps. It shares no code with
`pact.objective.safety_tokens`, so the test suite and `check_safety_tokens.py` can
check that module against it.
"""

from __future__ import annotations

import torch


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _step_logprobs(model, prompt_ids: list[int], response_ids: list[int], temperature: float) -> torch.Tensor:
    """[n_resp, V] float64 log-probabilities at the positions that predict each response token."""
    ids = torch.tensor([prompt_ids + response_ids], device=model.device)
    logits = model(input_ids=ids).logits[0].double()
    start = len(prompt_ids)
    rows = logits[start - 1: start - 1 + len(response_ids)]
    return torch.log_softmax(rows / temperature, dim=-1).cpu()


@torch.no_grad()
def independent_safety_tokens(
    aligned_model,
    aligned_tokenizer,
    base_model,
    base_tokenizer,
    conversations,
    top: int = 50,
    max_examples: int = 512,
    max_resp_len: int = 64,
    diff_mode: str = "p_diff",
    temperature: float = 1.0,
) -> tuple[list[int], list[float]]:
    """Safety-token ids (sorted) and weights, computed the slow, obvious way.

    `conversations` are objects with `.messages` (chat messages ending with
    the assistant's refusal), `.prompt` (last user message) and `.response`.
    """
    d_total = None
    m_total = None
    used = 0
    for conversation in list(conversations)[:max_examples]:
        refusal = conversation.response.strip()
        if not refusal:
            continue
        response_ids = _ids(aligned_tokenizer, refusal, special=False)[:max_resp_len]
        chat_text = aligned_tokenizer.apply_chat_template(
            conversation.messages[:-1], tokenize=False, add_generation_prompt=True
        )
        aligned_prompt = _ids(aligned_tokenizer, chat_text, special=False)
        base_prompt = _ids(base_tokenizer, "User: " + conversation.prompt + "\n\nAssistant: ", special=True)
        logp_a = _step_logprobs(aligned_model, aligned_prompt, response_ids, temperature)
        logp_b = _step_logprobs(base_model, base_prompt, response_ids, temperature)
        d_example = torch.zeros(logp_a.shape[1], dtype=torch.float64)
        m_example = torch.zeros(logp_a.shape[1], dtype=torch.float64)
        for t in range(len(response_ids)):
            p_a = torch.exp(logp_a[t])
            p_b = torch.exp(logp_b[t])
            if diff_mode == "p_diff":
                d_example += p_a - p_b
            else:
                d_example += p_a * (logp_b[t] - logp_a[t])
            m_example += p_a
        d_example /= len(response_ids)
        m_example /= len(response_ids)
        d_total = d_example if d_total is None else d_total + d_example
        m_total = m_example if m_total is None else m_total + m_example
        used += 1
    d = d_total / used
    m = m_total / used

    order = sorted(range(len(m)), key=lambda i: float(m[i]), reverse=True)[:top]
    v = [0.0] * len(d)
    for i in order:
        v[i] = float(d[i])
    big = [i for i in range(len(v)) if abs(v[i]) > 1e-9]
    if big:
        mean = sum(v[i] for i in big) / len(big)
        std = (sum((v[i] - mean) ** 2 for i in big) / (len(big) - 1)) ** 0.5 if len(big) > 1 else 0.0
        for i in big:
            v[i] = (v[i] - mean) / (std + 1e-6)
    norm = sum(x * x for x in v) ** 0.5
    v = [x / (norm + 1e-6) for x in v]
    ids = [i for i in range(len(v)) if v[i] != 0]
    return ids, [max(v[i], 0.0) for i in ids]
