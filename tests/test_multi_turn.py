"""Multi-turn conversations: every assistant turn a response span (`train_on="all"`, or only the last), spans token by
token for the tiny ChatML template and SmolLM2's, truncation, the version-2 cache that stores the spans (and the
version-1 caches it still reads), the one batch contract (`CacheBatch`) and cached = online parity on multi-turn rows."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from helpers import make_tiny_tokenizer, random_lora_student, write_jsonl
from pact.cache_tools import CacheError, CacheReader
from pact.data.batch import collate_rows, collate_spans
from pact.cli.cache import main as cache_main
from pact.cache_tools.layout import FORMAT_VERSION, Layout
from pact.cache_tools.merge import merge_caches
from pact.cache_tools.reader import read_shard_table
from pact.cache_tools.schema import build_table
from pact.data.rows import Conversation
from pact.data.sources import DataError
from pact.data.chat import EncodedExample, assistant_header_ids, encode_conversation, load_examples
from pact.errors import InvalidSetting
from pact.objective.loss import cached_pact_loss, pact_batch_loss
from pact.models.loading import load_model
from pact.objective.settings import ObjectiveArguments
from pact.objective.targets import OnlineTargets
from test_cache_support import downgrade, one_thread, tiny_safety_file, tiny, tiny_safety  # noqa: F401  (fixtures)
from test_online_objective import independent_terms

CONVERSATION = [
    {"role": "user", "content": "Hi."},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye."},
    {"role": "assistant", "content": " Goodbye, friend."},
]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
THREE_TURNS = [*WITH_SYSTEM, {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}]
ROWS = [
    {"messages": CONVERSATION},
    {"messages": THREE_TURNS},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue is a colour."}]},
    {"messages": WITH_SYSTEM[:3]},
]


def _assistant_turns(messages, train_on):
    """Indices of the assistant messages `train_on` makes responses."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return turns if train_on == "all" else turns[-1:]


def _check_spans(tokenizer, messages, train_on):
    """Encode `messages` and check, token by token, each span against the chat template's own rendering: the tokens
    before a span are the rendering of the conversation before that turn with the generation prompt, the span is the
    message's tokens plus one `<|im_end|>`, and the ids are the whole rendering's less its trailing newline."""
    example = encode_conversation(tokenizer, Conversation(3, messages), train_on=train_on)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    turns = _assistant_turns(messages, train_on)
    assert len(example.spans) == len(turns)
    for (start, end), turn in zip(example.spans, turns):
        before = tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
        assert example.input_ids[:start] == tokenizer(before, add_special_tokens=False)["input_ids"]
        content = messages[turn]["content"]
        assert example.input_ids[start:end] == tokenizer(content, add_special_tokens=False)["input_ids"] + [eos]
        assert tokenizer.decode(example.input_ids[start:end]) == content + "<|im_end|>"
    full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert full[:len(example.input_ids)] == example.input_ids
    assert tokenizer.decode(full[len(example.input_ids):]) == "\n"
    assert example.response_start == example.spans[0][0]
    assert example.response_ids == [t for s, e in example.spans for t in example.input_ids[s:e]]
    return example


@pytest.mark.parametrize("train_on", ["all", "last"])
@pytest.mark.parametrize("messages", [CONVERSATION, WITH_SYSTEM, THREE_TURNS], ids=["no-system", "system", "three-turns"])
def test_tiny_template_spans_token_by_token(messages, train_on):
    """Tiny ChatML template (with its default system turn when the row has none): one span per assistant turn with
    "all", the last one only with "last"; the same ids either way."""
    tokenizer = make_tiny_tokenizer()
    example = _check_spans(tokenizer, messages, train_on)
    other = encode_conversation(tokenizer, Conversation(3, messages), train_on="last" if train_on == "all" else "all")
    assert other.input_ids == example.input_ids
    assert other.spans[-1] == example.spans[-1]


@pytest.mark.embedded
@pytest.mark.parametrize("train_on", ["all", "last"])
@pytest.mark.parametrize("messages", [CONVERSATION, WITH_SYSTEM, THREE_TURNS], ids=["no-system", "system", "three-turns"])
def test_smollm2_template_spans_token_by_token(embedded, messages, train_on):
    """SmolLM2's ChatML template (its default system turn when the row has none, replaced by a given one)."""
    _check_spans(embedded.tokenizer, messages, train_on)


@pytest.mark.embedded
def test_smollm2_spans_spelled_out(embedded):
    """One example spelled out under SmolLM2: both answers with their end of turn, nothing of the template."""
    tokenizer = embedded.tokenizer
    example = encode_conversation(tokenizer, Conversation(0, WITH_SYSTEM))
    pieces = [[tokenizer.decode([t]) for t in example.input_ids[s:e]] for s, e in example.spans]
    assert pieces == [["Hello", ".", "<|im_end|>"], [" Good", "bye", ",", " friend", ".", "<|im_end|>"]]


def test_truncation_keeps_the_prompt_and_clips_later_turns():
    """--max-length: the prompt before the first span is kept whole, the last turns are cut from the right (a span
    clipped, one left empty dropped), and a prompt leaving no room is an error naming the limit."""
    tokenizer = make_tiny_tokenizer()
    conversation = Conversation(0, THREE_TURNS)
    full = encode_conversation(tokenizer, conversation)
    (s0, e0), (s1, e1), (s2, e2) = full.spans
    clipped = encode_conversation(tokenizer, conversation, max_length=s1 + 2)
    assert clipped.input_ids == full.input_ids[:s1 + 2] and clipped.spans == [(s0, e0), (s1, s1 + 2)]
    dropped = encode_conversation(tokenizer, conversation, max_length=s1)
    assert dropped.spans == [(s0, e0)] and len(dropped.input_ids) == s1
    inside_first = encode_conversation(tokenizer, conversation, max_length=s0 + 1)
    assert inside_first.spans == [(s0, s0 + 1)]
    with pytest.raises(DataError, match=f"leaving no room for the response within --max-length {s0}"):
        encode_conversation(tokenizer, conversation, max_length=s0)


def test_empty_earlier_turn_is_context_and_bad_train_on_is_named(tmp_path):
    """An empty earlier assistant message is context, not a response; `train_on` other than all/last names the field."""
    tokenizer = make_tiny_tokenizer()
    messages = [*CONVERSATION[:1], {"role": "assistant", "content": ""}, *CONVERSATION[2:]]
    example = encode_conversation(tokenizer, Conversation(0, messages))
    assert len(example.spans) == 1 and tokenizer.decode(example.response_ids) == " Goodbye, friend.<|im_end|>"
    with pytest.raises(InvalidSetting, match="train_on must be one of .*got 'first'") as err:
        load_examples(write_jsonl(tmp_path / "rows.jsonl", ROWS), tokenizer, train_on="first")
    assert err.value.field == "train_on"


def test_collate_flattens_spans_with_steps_restarting_per_turn():
    """`collate_spans`: per response token its row, predicting position, id and step within its turn."""
    sequences = [torch.tensor([10, 11, 12, 13, 14, 15, 16]), torch.tensor([20, 21, 22])]
    batch = collate_spans(sequences, [torch.tensor([[2, 4], [5, 7]]), torch.tensor([[1, 3]])], [7, 9], pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 0, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert batch.rows.tolist() == [0, 0, 0, 0, 1, 1]
    assert batch.positions.tolist() == [1, 2, 4, 5, 0, 1]
    assert batch.labels.tolist() == [12, 13, 15, 16, 21, 22]
    assert batch.steps.tolist() == [0, 1, 0, 1, 0, 1]
    assert batch.span_rows.tolist() == [0, 0, 1] and batch.tokens == 6


# --- caches of multi-turn rows ------------------------------------------------------------------


def _build(model_dir, safety_file, data, out, *extra):
    """`pact-cache build` of `data` into `out` (float32, 2 rows per shard) on the tiny model; returns the summary line."""
    argv = ["build", "--model", str(model_dir), "--data", str(data), "--safety-tokens", str(safety_file), "--out", str(out),
            "--dtype", "float32", "--rows-per-shard", "2", "--device", "cpu", "--quiet", *extra]
    assert cache_main(argv) == 0
    return CacheReader(out)


@pytest.fixture(scope="module")
def caches(tiny_model_dir, tiny_safety_file, tmp_path_factory):
    """Caches of ROWS with --train-on all and last, and the examples each was built from."""
    root = tmp_path_factory.mktemp("multi-turn")
    data = write_jsonl(root / "rows.jsonl", ROWS)
    tokenizer = load_model(str(tiny_model_dir), device="cpu").tokenizer
    built = {}
    for train_on in ("all", "last"):
        reader = _build(tiny_model_dir, tiny_safety_file, data, root / train_on, "--train-on", train_on)
        built[train_on] = reader, load_examples(data, tokenizer, max_length=512, train_on=train_on)[0]
    return root, built


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_cache_stores_every_span_and_counts_their_tokens(caches, train_on):
    """The cache rows hold the encoded spans, one step per span token; the manifest counts every span's tokens."""
    _, built = caches
    reader, examples = built[train_on]
    assert reader.manifest["format_version"] == FORMAT_VERSION == 4
    for row, example in zip(reader, examples):
        assert [tuple(s) for s in row["response_spans"].tolist()] == example.spans
        assert len(row["post_count"]) == len(example.response_ids)
    assert reader.manifest["totals"]["response_tokens"] == sum(len(e.response_ids) for e in examples)
    assert max(len(e.spans) for e in examples) == (3 if train_on == "all" else 1)


def test_cached_equals_online_on_multi_turn_rows(caches, tiny_model_dir):
    """Float32 cache of multi-turn rows: loss, CE, KL and LoRA gradients within 1e-5 of the online objective, and the
    online loss equals the float64 per-turn transcription (post-only context = header + that turn so far)."""
    _, built = caches
    reader, _ = built["all"]
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    tok, cfg = loaded.tokenizer, ObjectiveArguments(n_free=1, tau=2.0)
    rows = list(reader)
    safety_ids, weights = reader.safety_ids, reader.safety_weights
    student = random_lora_student(loaded.model, seed=3, scale=0.3)
    online = OnlineTargets(student, safety_ids, assistant_header_ids(tok), cfg, tok.pad_token_id)
    results = []
    for compute in (lambda: pact_batch_loss(student, online.fill(collate_rows(rows, tok.pad_token_id)), safety_ids, weights, cfg),
                    lambda: cached_pact_loss(student, rows, safety_ids, weights, cfg, tok.pad_token_id)):
        student.zero_grad()
        out = compute()
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}))
    (online_out, online_grads), (cached_out, cached_grads) = results
    assert online_out.kl.item() > 0 and online_out.tokens == sum(len(r["post_count"]) for r in rows)
    for part in ("loss", "ce", "kl"):
        assert getattr(cached_out, part).item() == pytest.approx(getattr(online_out, part).item(), rel=1e-5)
    for name, grad in online_grads.items():
        assert ((cached_grads[name] - grad).norm() / grad.norm()).item() < 1e-5, name
    ce_terms, kl_terms = [], []
    for row in rows:
        spans = [tuple(s) for s in row["response_spans"].tolist()]
        ce, kl = independent_terms(student, loaded.model, row["input_ids"].tolist(), spans, reader.manifest["header_ids"],
                                   safety_ids, weights, cfg)
        ce_terms += ce
        kl_terms += kl
    assert online_out.ce.item() == pytest.approx(sum(ce_terms) / len(ce_terms), rel=1e-4)
    assert online_out.kl.item() == pytest.approx(sum(kl_terms) / len(kl_terms), rel=1e-4)


def test_batch_columns_come_from_the_layout_without_a_search(caches, tiny_model_dir, monkeypatch):
    """The rows' columns are the layout's precomputed positions of S+ in S, and the loss runs with searching disabled."""
    _, built = caches
    reader, _ = built["all"]
    layout = Layout.from_manifest(reader.manifest)
    weights = reader.manifest["safety_tokens"]["weights"]
    assert layout.stored_positions == tuple(i for i, w in enumerate(weights) if w > 0)
    rows = [reader[0], reader[1]]
    assert all(row["columns"].tolist() == list(layout.stored_positions) for row in rows)
    assert torch.equal(reader.safety_ids[rows[0]["columns"]], rows[0]["safety_ids"])
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")

    def no_search(*args, **kwargs):
        raise AssertionError("a per-batch id search ran")

    monkeypatch.setattr(torch, "searchsorted", no_search)
    monkeypatch.setattr(torch.Tensor, "searchsorted", no_search, raising=False)
    out = cached_pact_loss(loaded.model, rows, reader.safety_ids, reader.safety_weights, ObjectiveArguments(), loaded.tokenizer.pad_token_id)
    assert out.tokens == sum(len(r["post_count"]) for r in rows)


def test_cached_loss_refuses_rows_of_other_safety_tokens(caches, tiny_model_dir):
    """Rows whose stored columns are not the run's S (another safety-token set) are refused naming the rows."""
    _, built = caches
    reader, _ = built["all"]
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    other = reader.safety_ids.flip(0)
    with pytest.raises(Exception, match=r"cache rows \(example_id \[0\]\): their stored columns are not the safety tokens"):
        cached_pact_loss(loaded.model, [reader[0]], other, reader.safety_weights, ObjectiveArguments(), loaded.tokenizer.pad_token_id)


# --- format version 1 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v1_and_v2(caches, tiny_model_dir, tiny_safety_file):
    """A single-turn cache in this pact's version and the same cache rewritten as version 1."""
    root, _ = caches
    data = write_jsonl(root / "single.jsonl", [ROWS[2], ROWS[3], {"messages": THREE_TURNS[-2:]}])
    v2 = _build(tiny_model_dir, tiny_safety_file, data, root / "single-v2")
    v1 = _build(tiny_model_dir, tiny_safety_file, data, root / "single-v1")
    downgrade(v1.directory, 1)
    return data, CacheReader(v1.directory), v2


def test_version_1_cache_reads_and_trains_as_before(v1_and_v2, tiny_model_dir):
    """A version-1 cache reads with one span per row ([response_start, length)), the same rows as the current version
    (less the reference columns versions 3 and 4 added), the same loss, and `pact-cache verify` accepts it."""
    _, v1, v2 = v1_and_v2
    assert v1.manifest["format_version"] == 1 and v1.layout.format_version == 1
    for old, new in zip(v1, v2):
        assert old.keys() == new.keys() - {"reference_logits", "rest_logprob"}
        assert old["response_spans"].tolist() == [[old["response_start"], len(old["input_ids"])]]
        for key, value in old.items():
            assert torch.equal(value, new[key]) if isinstance(value, torch.Tensor) else value == new[key], key
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    losses = [cached_pact_loss(loaded.model, list(reader), reader.safety_ids, reader.safety_weights, ObjectiveArguments(),
                               loaded.tokenizer.pad_token_id).loss.item() for reader in (v1, v2)]
    assert losses[0] == losses[1]
    assert cache_main(["verify", str(v1.directory)]) == 0


def test_a_cache_never_mixes_versions(v1_and_v2, tiny_model_dir, tiny_safety_file, tmp_path, capsys):
    """Resuming a version-1 build with this (version-4) writer, writing a version-1 layout and merging version 1 with
    version 4 are refused, each naming the versions; the version-1 cache is left as it was."""
    data, v1, v2 = v1_and_v2
    before = {p.name: p.read_bytes() for p in v1.directory.iterdir()}
    argv = ["build", "--model", str(tiny_model_dir), "--data", str(data), "--safety-tokens", str(tiny_safety_file),
            "--out", str(v1.directory), "--dtype", "float32", "--rows-per-shard", "2", "--device", "cpu", "--quiet", "--resume"]
    assert cache_main(argv) == 2
    assert "holds a format version 1 cache and this pact writes version 4" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in v1.directory.iterdir()} == before
    example = EncodedExample(0, [1, 2, 3], 1)
    with pytest.raises(CacheError, match="cannot write a shard of format version 1"):
        build_table([example], [{}], v1.layout)
    with pytest.raises(CacheError, match="format version: 1 vs 4"):
        merge_caches(tmp_path / "merged", [v1.directory, v2.directory])
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())


def test_version_2_shard_with_bad_spans_is_named(caches, tmp_path):
    """A version-2 shard whose spans overlap is refused naming the shard, the row and the span."""
    from pact.cache_tools.schema import ShardRows

    _, built = caches
    reader, _ = built["all"]
    table = read_shard_table(reader.directory, reader.shards[0])
    index = table.schema.get_field_index("response_spans")
    spans = table.column(index).to_pylist()
    spans[0] = [spans[0][0], [spans[0][0][0], spans[0][0][1]]] + spans[0][2:] if len(spans[0]) > 1 else spans[0]
    broken = table.set_column(index, table.schema.field(index), pa.array(spans, table.schema.field(index).type))
    with pytest.raises(CacheError, match=r"shard-x.arrow: row 0 \(example_id 0\), response span 1: not an ascending"):
        ShardRows(broken, reader.layout, "shard-x.arrow")
