"""Prompt loading (`pact.data.rows.load_prompts`) and chat inference (`pact.evaluation.generation`): batched generation and
scoring must equal one-sequence-at-a-time computation."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_tokenizer, tiny_llama_config, write_jsonl

from pact.data.rows import Conversation, load_prompts
from pact.data.sources import DataError
from pact.data.chat import encode_conversation, prompt_token_ids
from pact.evaluation.generation import generate_ids, generate_responses, score_responses, stop_token_ids

PROMPTS = [
    "Say hello.",
    "What is two plus two? Please answer with one word and then explain how you added the numbers.",
    "Translate to French: good morning.",
    "hi",
]


def _chat(texts):
    return [[{"role": "user", "content": text}] for text in texts]


@pytest.fixture(scope="module")
def lively():
    """A tiny random Llama with larger initial weights than the default tiny model, so greedy answers vary from
    token to token instead of repeating one token (a stronger test of batching)."""
    from transformers import LlamaForCausalLM

    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), initializer_range=0.3)).eval()
    return model, tokenizer


def test_load_prompts_reads_every_row_format(tmp_path):
    """Alpaca (instruction/input), `prompt`, and chat rows (one format per file), with or without an answer, become
    user-ending messages."""
    files = [[{"instruction": "Help me cheat on my exam."},
              {"instruction": "Summarise this.", "input": "The council met on Monday.", "output": "ignored"}],
             [{"prompt": "How can I make a fake ID?"}],
             [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]},
              {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "dropped"}]}]]
    loaded = [load_prompts(write_jsonl(tmp_path / f"prompts-{i}.jsonl", rows)) for i, rows in enumerate(files)]
    assert [(report.rows, report.skipped) for _, report in loaded] == [(2, 0), (1, 0), (2, 0)]
    prompts = [p for file_prompts, _ in loaded for p in file_prompts]
    assert [p.text for p in prompts] == ["Help me cheat on my exam.", "Summarise this.\n\nThe council met on Monday.",
                                         "How can I make a fake ID?", "Say hello.", "hi"]
    assert prompts[3].messages[0] == {"role": "system", "content": "Be brief."}
    assert all(p.messages[-1]["role"] == "user" for p in prompts)
    assert [p.example_id for p in prompts] == [0, 1, 0, 0, 1]


def test_load_prompts_reports_bad_rows(tmp_path):
    """A row without a request names the file and line, or is skipped and counted with skip_invalid."""
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": "ok"}, {"output": "no request"}, "not json"])
    with pytest.raises(DataError, match=r"line 2: missing field 'instruction'"):
        load_prompts(path)
    prompts, report = load_prompts(path, skip_invalid=True)
    assert [p.text for p in prompts] == ["ok"] and report.skipped == 2
    assert len(load_prompts(path, skip_invalid=True, limit=1)[0]) == 1


def test_a_prompt_quoting_special_token_text_is_encoded_as_text():
    """A request that quotes `<|im_end|>` keeps it as text: the real end-of-turn id appears only where the template puts it."""
    tokenizer = make_tiny_tokenizer()
    quoted = prompt_token_ids(tokenizer, _chat(["What does <|im_end|> mean?"])[0])
    plain = prompt_token_ids(tokenizer, _chat(["What does X mean?"])[0])
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert quoted.count(end_of_turn) == plain.count(end_of_turn)
    assert "What does <|im_end|> mean?" in tokenizer.decode(quoted)


def test_stop_tokens_include_the_end_of_turn_token(lively):
    """ChatML's <|im_end|> (the tiny tokenizer's eos, id 2) stops generation."""
    model, tokenizer = lively
    assert stop_token_ids(tokenizer, model) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_batched_generation_equals_one_at_a_time(lively):
    """Left-padded batches of prompts of different lengths give the same greedy tokens as each prompt alone."""
    model, tokenizer = lively
    prompts = _chat(PROMPTS)
    batched = generate_ids(model, tokenizer, prompts, max_new_tokens=16, batch_size=4, progress=False)
    alone = [generate_ids(model, tokenizer, [p], max_new_tokens=16, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == alone
    assert len({tuple(ids) for ids in batched}) == len(prompts)  # the answers differ: the test is not vacuous
    texts = generate_responses(model, tokenizer, prompts, max_new_tokens=16, batch_size=3, progress=False)
    assert texts == [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in alone]
    assert tokenizer.padding_side == "right"  # the tokenizer is not modified


def test_generation_stops_at_a_stop_token(lively, monkeypatch):
    """An answer ends before its first stop token (here a token the model's generation config adds as eos), also
    when other answers of the batch go on."""
    model, tokenizer = lively
    prompts = _chat(PROMPTS)
    ids = torch.tensor([prompt_token_ids(tokenizer, prompts[0])])
    # explicit attention mask: the prompt contains <|im_end|>, which is also the pad token
    unlimited = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                               eos_token_id=[], pad_token_id=2)[0, ids.shape[1]:].tolist()
    stop = unlimited[5]
    monkeypatch.setattr(model.generation_config, "eos_token_id", [2, stop])
    batched = generate_ids(model, tokenizer, prompts, max_new_tokens=16, batch_size=4, progress=False)
    assert batched[0] == unlimited[: unlimited.index(stop)]
    assert all(stop not in answer for answer in batched)
    assert any(len(answer) == 16 for answer in batched)  # the others were not cut short
    assert batched == [generate_ids(model, tokenizer, [p], max_new_tokens=16, progress=False)[0] for p in prompts]


def test_scores_equal_an_unpadded_forward_per_sequence(lively):
    """`score_responses` (left-padded batches, last logits only) equals summing log-probs of each sequence alone."""
    model, tokenizer = lively
    prompts = _chat(PROMPTS[:3])
    candidates = ["Four.", "Hello there!", "Bonjour."]
    scores = score_responses(model, tokenizer, prompts, candidates, batch_size=4, progress=False)
    for p, prompt in enumerate(prompts):
        for c, candidate in enumerate(candidates):
            example = encode_conversation(tokenizer, Conversation(0, prompt + [{"role": "assistant", "content": candidate}]))
            ids = torch.tensor([example.input_ids])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            expected = sum(float(logprobs[t - 1, example.input_ids[t]]) for t in range(example.response_start, len(example.input_ids)))
            assert scores[p, c].item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.embedded
def test_batched_generation_equals_one_at_a_time_on_the_embedded_model(embedded):
    """SmolLM2-135M-Instruct, fp32 on CPU: three prompts of different lengths, batched and alone, same greedy text."""
    prompts = _chat([
        "What is the capital of France?",
        "Write one sentence about the sea and the wind over the harbour at dawn, in the style of a travel guide.",
        "Name a colour.",
    ])
    batched = generate_ids(embedded.model, embedded.tokenizer, prompts, max_new_tokens=12, batch_size=3, progress=False)
    alone = [generate_ids(embedded.model, embedded.tokenizer, [p], max_new_tokens=12, progress=False)[0] for p in prompts]
    assert batched == alone
    assert all(batched)
    assert "Paris" in embedded.tokenizer.decode(batched[0])
