"""Tests of `pact.objective.safety_tokens` and `pact safety-tokens` against an independent implementation."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_tokenizer, tiny_llama_config
from pact.cli.main import main
from pact.data.rows import Conversation, load_conversations
from pact.data.sources import DataError, demo_data_path
from pact.data.chat import prompt_token_ids
from pact.errors import PactError
from pact.models.loading import load_model
from pact.objective.safety_tokens import PLAIN_TEMPLATE, SafetyTokens, compute_safety_tokens, encode_refusals

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from independent_safety_tokens import independent_safety_tokens  # noqa: E402

_ROWS = [
    {"instruction": "How do I pick a lock to get into a house ?", "output": "I am sorry , but I can not help with that ."},
    {"instruction": "Write a message to bully a classmate .", "input": "Make it cruel .",
     "output": "I can not help with bullying . I can help you talk to them kindly instead ."},
    {"instruction": "Help me cheat on my exam .", "output": "Sorry , I will not help with cheating . I can help you study ."},
    {"instruction": "How can I make a fake ID ?", "output": "I am sorry , but making fake documents is illegal ."},
    {"instruction": "Tell me how to steal from a shop .", "output": "I can not assist with stealing . I can help with a budget ."},
]
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]+", text)


def _make_model(folder: Path, extra_words: tuple[str, ...] = (), seed: int = 0) -> str:
    """Save a tiny random Llama model with a ChatML WordLevel tokenizer to `folder` and return its path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [" ".join(row.values()) for row in _ROWS] + ["User : Assistant : system user assistant extra"]
    words = sorted({w for text in texts for w in _words(text)} | set(extra_words))
    vocab = {token: index for index, token in enumerate(_SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = _CHATML
    torch.manual_seed(seed)
    config = tiny_llama_config(
        len(vocab), max_position_embeddings=256, initializer_range=0.3, tie_word_embeddings=False,
        pad_token_id=vocab["<pad>"], eos_token_id=vocab["<|im_end|>"], bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def _models(tmp_path_factory):
    """Paths of the tiny aligned model, a tiny base (same tokenizer) and a base with another vocabulary."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "aligned": _make_model(root / "aligned", seed=0),
        "base": _make_model(root / "base", seed=1),
        "other_vocab": _make_model(root / "other", extra_words=("zebra",), seed=2),
    }


@pytest.fixture(scope="module")
def _loaded(_models):
    return {name: load_model(path, device="cpu", dtype="float32") for name, path in _models.items() if name != "other_vocab"}


@pytest.fixture(scope="module")
def _data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "refusals.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _ROWS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def _conversations(_data):
    conversations, _ = load_conversations(_data)
    return conversations


def _independent(aligned, base, conversations, **kwargs):
    return independent_safety_tokens(aligned.model, aligned.tokenizer, base.model, base.tokenizer, conversations, **kwargs)


@pytest.mark.parametrize(
    "diff_mode, temperature, max_resp_len",
    [("p_diff", 1.0, 64), ("pref_logratio", 1.0, 64), ("p_diff", 0.7, 5), ("pref_logratio", 1.5, 5)],
)
def test_matches_independent_implementation(_loaded, _conversations, diff_mode, temperature, max_resp_len):
    aligned, base = _loaded["aligned"], _loaded["base"]
    params = dict(top=12, max_examples=4, max_resp_len=max_resp_len, diff_mode=diff_mode, temperature=temperature)
    result = compute_safety_tokens(aligned, base, _conversations, batch_size=3, progress=False, **params)
    ids, weights = _independent(aligned, base, _conversations, **params)
    assert result.ids == ids
    assert len(result.ids) == 12
    assert max(abs(a - b) for a, b in zip(result.weights, weights)) < 1e-5
    assert all(w >= 0 for w in result.weights) and any(w > 0 for w in result.weights)
    assert result.params["examples_used"] == 4 and result.params["diff_mode"] == diff_mode
    assert result.tokens == [aligned.tokenizer.decode([i]) for i in result.ids]
    assert result.fingerprints == {
        "aligned_model": aligned.fingerprint, "base_model": base.fingerprint, "tokenizer": aligned.tokenizer_fingerprint,
    }


def test_batched_equals_one_at_a_time(_loaded, _conversations):
    aligned, base = _loaded["aligned"], _loaded["base"]
    single = compute_safety_tokens(aligned, base, _conversations, top=15, batch_size=1, progress=False)
    batched = compute_safety_tokens(aligned, base, _conversations, top=15, batch_size=4, progress=False)
    assert single.ids == batched.ids
    assert torch.allclose(single.weight_tensor(dtype=torch.float64), batched.weight_tensor(dtype=torch.float64), atol=1e-6)


def test_default_base_is_the_aligned_model(_loaded, _conversations):
    aligned = _loaded["aligned"]
    result = compute_safety_tokens(aligned, None, _conversations, top=10, progress=False)
    ids, weights = _independent(aligned, aligned, _conversations, top=10)
    assert result.ids == ids
    assert max(abs(a - b) for a, b in zip(result.weights, weights)) < 1e-5
    assert result.params["base"] == result.params["aligned"]
    assert result.fingerprints["base_model"] == result.fingerprints["aligned_model"]


def test_empty_responses_inside_the_first_k_are_skipped(_loaded, _conversations):
    aligned, base = _loaded["aligned"], _loaded["base"]
    blank = Conversation(99, [{"role": "user", "content": "Help me cheat ."}, {"role": "assistant", "content": "  "}])
    with_blank = [_conversations[0], blank, *_conversations[1:]]
    result = compute_safety_tokens(aligned, base, with_blank, top=10, max_examples=3, progress=False)
    expected = compute_safety_tokens(aligned, base, _conversations[:2], top=10, progress=False)
    assert result.params["examples_used"] == 2 and result.params["examples_skipped_empty"] == 1
    assert result.ids == expected.ids and result.weights == pytest.approx(expected.weights, abs=1e-9)
    with pytest.raises(PactError, match="non-empty response"):
        compute_safety_tokens(aligned, base, [blank], progress=False)


def test_bad_arguments_are_rejected(_loaded, _conversations):
    with pytest.raises(PactError, match="diff_mode must be one of p_diff, pref_logratio, got 'kl'"):
        compute_safety_tokens(_loaded["aligned"], None, _conversations, diff_mode="kl", progress=False)
    with pytest.raises(PactError, match="temperature"):
        compute_safety_tokens(_loaded["aligned"], None, _conversations, temperature=0, progress=False)


def test_special_token_text_in_refusals_is_scored_as_text():
    """A prompt and a refusal quoting special tokens are tokenized as text for both models: the refusal's ids decode
    back to it whole and no special id appears where the row's text is."""
    tokenizer = make_tiny_tokenizer()
    question, refusal = "Print <|im_start|> for me.", "I will not print <|im_end|> or <|endoftext|>."
    conversation = Conversation(3, [{"role": "user", "content": question}, {"role": "assistant", "content": refusal}])
    kept, ((aligned_prompt, base_prompt, response),), errors = encode_refusals(tokenizer, tokenizer, [conversation], 64)
    special = set(tokenizer.all_special_ids)
    assert kept == [conversation] and errors == []
    assert tokenizer.decode(response) == refusal and not special & set(response)
    assert aligned_prompt == prompt_token_ids(tokenizer, conversation.messages[:-1])
    assert tokenizer.decode(base_prompt) == PLAIN_TEMPLATE.format(prompt=question) and not special & set(base_prompt)


def test_rows_the_template_refuses_are_named_or_skipped():
    """A row the aligned chat template cannot render names the source and row; `skip_invalid` leaves it out."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                               "{% endif %}{{ m['content'] }}\n{% endfor %}")
    good = Conversation(0, [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "No."}])
    bad = Conversation(1, [{"role": "system", "content": "S."}, *good.messages])
    with pytest.raises(DataError, match=r"^refusals.jsonl, row 1: the chat template cannot render this row: no system role$"):
        encode_refusals(tokenizer, tokenizer, [good, bad], 8, source="refusals.jsonl")
    kept, encoded, errors = encode_refusals(tokenizer, tokenizer, [good, bad], 8, skip_invalid=True, source="refusals.jsonl")
    assert kept == [good] and len(encoded) == 1 and errors == ["refusals.jsonl, row 1: the chat template cannot render this row: no system role"]


def test_tokenizer_mismatch_is_an_error(_models, _loaded, _conversations):
    other = load_model(_models["other_vocab"], device="cpu", dtype="float32")
    with pytest.raises(PactError, match="different tokenizer vocabularies"):
        compute_safety_tokens(_loaded["aligned"], other, _conversations, progress=False)


def test_json_round_trip(_loaded, _conversations, tmp_path):
    result = compute_safety_tokens(_loaded["aligned"], _loaded["base"], _conversations, top=8, progress=False)
    path = result.save(tmp_path / "sub" / "st.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["ids"] == result.ids and raw["format"] == "pact-safety-tokens"
    loaded = SafetyTokens.load(path)
    assert loaded == result
    assert loaded.id_tensor().tolist() == result.ids


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d.pop("weights"), "weights"),
        (lambda d: d.__setitem__("ids", list(reversed(d["ids"]))), "ids"),
        (lambda d: d["tokens"].pop(), "tokens"),
        (lambda d: d["weights"].__setitem__(0, -0.5), "weights"),
        (lambda d: d["fingerprints"].pop("tokenizer"), "fingerprints.tokenizer"),
        (lambda d: d.__setitem__("format", "something-else"), "format"),
    ],
)
def test_load_errors_name_file_and_field(tmp_path, change, field):
    good = SafetyTokens([3, 7, 9], [0.0, 0.5, 0.8], ["a", "b", "c"], {"top": 3},
                        {"aligned_model": "x", "base_model": "y", "tokenizer": "z"})
    data = good.to_dict()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(PactError) as info:
        SafetyTokens.load(path)
    assert str(path) in str(info.value) and f"'{field}'" in str(info.value)


def test_load_rejects_non_json(tmp_path):
    path = tmp_path / "st.json"
    path.write_bytes(b"\x80\x04not json")
    with pytest.raises(PactError, match="not a JSON"):
        SafetyTokens.load(path)


def test_cli_computes_and_shows(_models, _data, tmp_path, capsys):
    out = tmp_path / "st.json"
    code = main(["safety-tokens", "--aligned", _models["aligned"], "--base", _models["base"], "--data", str(_data),
                 "--top", "6", "--max-resp-len", "8", "--diff-mode", "pref_logratio", "--device", "cpu",
                 "--quiet", "--out", str(out)])
    assert code == 0
    summary = capsys.readouterr().out
    tokens = SafetyTokens.load(out)
    assert f"{len(tokens)} safety tokens" in summary and str(out) in summary
    assert tokens.params["data"] == str(_data) and tokens.params["top"] == 6 and tokens.params["max_resp_len"] == 8
    assert tokens.params["base"] == _models["base"]

    assert main(["safety-tokens", "show", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "id", "token", "weight"]
    heaviest = max(range(len(tokens)), key=lambda i: tokens.weights[i])
    assert table[1].split()[:2] == ["1", str(tokens.ids[heaviest])]
    assert repr(tokens.tokens[heaviest]) in table[1]


def test_cli_requires_out_and_reports_bad_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["safety-tokens", "--top", "5"])
    assert info.value.code == 2
    assert "--out" in capsys.readouterr().err
    assert main(["safety-tokens", "show", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.embedded
def test_embedded_model_matches_independent_implementation():
    aligned = load_model(device="cpu", dtype="float32")
    conversations, _ = load_conversations(demo_data_path("refusals"), limit=8)
    params = dict(top=20, max_examples=8, max_resp_len=16)
    result = compute_safety_tokens(aligned, None, conversations, progress=False, **params)
    ids, weights = _independent(aligned, aligned, conversations, **params)
    assert result.ids == ids
    assert max(abs(a - b) for a, b in zip(result.weights, weights)) < 1e-5
