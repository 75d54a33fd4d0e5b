"""Hostile data files given to every command that reads training or prompt data (`pact safety-tokens --data`,
`pact-cache build --data`, `pact eval refusal --prompts`, `pact eval task --data`): see tests/hostile.py.

Every table case must fail before any model is loaded (the `no_model_loading` fixture makes loading one an error). Hostile inputs that must be accepted (a byte-order mark, a 1 MB answer, special-token text inside an
answer) are ordinary tests below that check what was read or encoded, not only the exit code.
"""

from __future__ import annotations

import json
import random
import resource
import time

import pytest
from helpers import make_tiny_tokenizer, write_csv, write_jsonl, write_parquet

from hostile import Case, check_case
from pact.cache_tools import CacheReader
from pact.data.rows import Conversation, load_conversations, load_prompts
from pact.data.chat import encode_conversation, load_examples

FAMILY = "data files (every command that reads training or prompt data)"

ROW = {"instruction": "Say hello.", "output": "Hello there!"}
PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"


def safety_tokens(w, data: str) -> list[str]:
    """`pact safety-tokens` of the tiny model on the file `data` of the case's folder."""
    return ["safety-tokens", "--aligned", str(w.model), "--data", str(w.path(data)), "--device", "cpu", "--quiet",
            "--out", str(w.path("st.json"))]


def build(w, data: str, *extra: str) -> list[str]:
    """`pact-cache build` with the tiny model and its safety tokens on the file `data` of the case's folder."""
    return ["build", "--model", str(w.model), "--data", str(w.path(data)), "--safety-tokens", str(w.safety),
            "--out", str(w.path("out")), "--device", "cpu", "--quiet", *extra]


def refusal(w, data: str) -> list[str]:
    """`pact eval refusal` of the tiny model on the prompts file `data` of the case's folder."""
    return ["eval", "refusal", "--prompts", str(w.path(data)), "--model", str(w.model), "--device", "cpu"]


def task(w, data: str) -> list[str]:
    """`pact eval task` of the tiny model on the file `data` of the case's folder."""
    return ["eval", "task", "--data", str(w.path(data)), "--model", str(w.model), "--device", "cpu"]


def lines(rows: list) -> str:
    """JSONL text of `rows` (strings are written as they are)."""
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def chat(*messages) -> dict:
    """A chat row of (role, content) pairs."""
    return {"messages": [{"role": role, "content": content} for role, content in messages]}


def latin1_line_3(w) -> None:
    """`latin1.jsonl`: rows in UTF-8 except line 3, which holds an `é` in Latin-1 (byte 0xe9)."""
    good = lines([ROW, ROW]).encode()
    w.write("latin1.jsonl", good + '{"instruction": "Caf\xe9?", "output": "Yes."}\n'.encode("latin-1") + lines([ROW]).encode())


def latin1_csv(w) -> None:
    """`latin1.csv`: a header and two rows, the second (line 3) with an `é` in Latin-1."""
    w.write("latin1.csv", "instruction,output\nSay hello.,Hello.\nCaf\xe9?,Yes.\n".encode("latin-1"))


def sharegpt(*turns) -> dict:
    """A ShareGPT row of (from, value) pairs."""
    return {"conversations": [{"from": speaker, "value": value} for speaker, value in turns]}


def saved_dataset_dict(w) -> None:
    """`saved`: a DatasetDict saved with save_to_disk, with `train` and `validation` splits only."""
    from datasets import Dataset, DatasetDict

    rows = Dataset.from_list([ROW])
    DatasetDict({"train": rows, "validation": rows}).save_to_disk(str(w.path("saved")))


def invalid_json_line_7(w) -> None:
    """`bad.jsonl`: 12 rows, line 7 cut off in the middle."""
    rows = [ROW] * 12
    rows[6] = '{"instruction": "Say hello.", "output": "Hel'
    w.write("bad.jsonl", lines(rows))


CASES = [
    Case("empty-jsonl", "an empty JSONL file", "pact-cache",
         lambda w: build(w, "empty.jsonl"), 2, "empty.jsonl: no usable rows (the file is empty)",
         prepare=lambda w: w.write("empty.jsonl", "")),
    Case("empty-json-prompts", "an empty JSON file as prompts", "pact",
         lambda w: refusal(w, "empty.json"), 2, "empty.json: no usable rows (the file is empty)",
         prepare=lambda w: w.write("empty.json", "")),
    Case("empty-csv-task", "a CSV file with only a header", "pact",
         lambda w: task(w, "header.csv"), 2, "header.csv: no usable rows (the file is empty)",
         prepare=lambda w: w.write("header.csv", "instruction,output\n")),
    Case("empty-jsonl-safety", "an empty JSONL file of refusals", "pact",
         lambda w: safety_tokens(w, "empty.jsonl"), 2, "empty.jsonl: no usable rows (the file is empty)",
         prepare=lambda w: w.write("empty.jsonl", "\n\n")),
    Case("random-bytes", "4 KiB of random bytes named `.jsonl`", "pact",
         lambda w: safety_tokens(w, "random.jsonl"), 2, "random.jsonl, line 1: not UTF-8 text",
         prepare=lambda w: w.write("random.jsonl", b"\xff" + random.Random(0).randbytes(4096))),
    Case("png-as-jsonl", "a PNG image named `.jsonl`", "pact",
         lambda w: refusal(w, "image.jsonl"), 2, "image.jsonl, line 1: not UTF-8 text (byte 0x89 at byte 1",
         prepare=lambda w: w.write("image.jsonl", PNG_HEADER)),
    Case("png-as-csv", "a PNG image named `.csv`", "pact-cache",
         lambda w: build(w, "image.csv"), 2, "image.csv, line 1: not UTF-8 text (byte 0x89",
         prepare=lambda w: w.write("image.csv", PNG_HEADER)),
    Case("invalid-json-line-7", "line 7 of 12 is cut-off JSON", "pact-cache",
         lambda w: build(w, "bad.jsonl"), 2, "bad.jsonl, line 7: invalid JSON", prepare=invalid_json_line_7),
    Case("json-array-truncated", "a `.json` array cut off at the end", "pact",
         lambda w: task(w, "cut.json"), 2, "cut.json: invalid JSON at line 2",
         prepare=lambda w: w.write("cut.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c", ')),
    Case("json-nested-too-deep", "a line of 100 000 nested `[`", "pact-cache",
         lambda w: build(w, "deep.jsonl"), 2, "deep.jsonl, line 1: invalid JSON (nested too deeply)",
         prepare=lambda w: w.write("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")),
    Case("output-number", "`output` is a number", "pact",
         lambda w: task(w, "number.jsonl"), 2, "number.jsonl, line 2: field 'output' must be a string, got int",
         prepare=lambda w: w.write("number.jsonl", lines([ROW, {"instruction": "Two plus two?", "output": 4}]))),
    Case("output-list", "`output` is a list", "pact",
         lambda w: safety_tokens(w, "list.jsonl"), 2, "list.jsonl, line 1: field 'output' must be a string, got list",
         prepare=lambda w: w.write("list.jsonl", lines([{"instruction": "Hi.", "output": ["Hello", "there"]}]))),
    Case("messages-not-a-list", "`messages` is an object", "pact-cache",
         lambda w: build(w, "chat.jsonl"), 2, "chat.jsonl, line 1: field 'messages' must be a non-empty list",
         prepare=lambda w: w.write("chat.jsonl", lines([{"messages": {"role": "user", "content": "Hi."}}]))),
    Case("role-not-a-string", "a message's `role` is a list", "pact",
         lambda w: refusal(w, "chat.jsonl"), 2, "chat.jsonl, line 1: messages[0].role must be one of",
         prepare=lambda w: w.write("chat.jsonl", lines([{"messages": [{"role": ["user"], "content": "Hi."}]}]))),
    Case("content-not-a-string", "a message's `content` is a number", "pact",
         lambda w: task(w, "chat.jsonl"), 2, "chat.jsonl, line 1: messages[1].content must be a string",
         prepare=lambda w: w.write("chat.jsonl", lines([{"messages": [{"role": "user", "content": "Hi."},
                                                                       {"role": "assistant", "content": 7}]}]))),
    Case("latin1-jsonl-line-3", "Latin-1 `é` on line 3 of a JSONL file", "pact-cache",
         lambda w: build(w, "latin1.jsonl"), 2, "latin1.jsonl, line 3: not UTF-8 text (byte 0xe9", prepare=latin1_line_3),
    Case("latin1-csv-line-3", "Latin-1 `é` on line 3 of a CSV file", "pact",
         lambda w: safety_tokens(w, "latin1.csv"), 2, "latin1.csv, line 3: not UTF-8 text (byte 0xe9", prepare=latin1_csv),
    Case("csv-unquoted-comma", "a CSV answer with an unquoted comma (one cell too many)", "pact",
         lambda w: safety_tokens(w, "comma.csv"), 2, "comma.csv, row 0 (line 2): 3 cells but the header has 2 columns",
         prepare=lambda w: w.write("comma.csv", "instruction,output\nSay hello.,Hello, there!\n")),
    Case("csv-repeated-column", "a CSV header naming `instruction` twice (a row would keep only the second cell)", "pact-cache",
         lambda w: build(w, "twice.csv"), 2, "twice.csv, line 1: the header names column(s) 'instruction' more than once",
         prepare=lambda w: w.write("twice.csv", "instruction,instruction,output\nSay hello.,Say bye.,Hello.\n")),
    Case("folder-of-two-formats", "a folder of a JSONL and a CSV file (`datasets` would read only one format)", "pact-cache",
         lambda w: build(w, "folder"), 2, "folder: a folder of data files of several formats (csv, json)",
         prepare=lambda w: (w.write("folder/a.jsonl", lines([ROW])), w.write("folder/b.csv", "instruction,output\nHi.,Hello.\n"))),
    Case("chat-without-answer", "training chat rows with no assistant turn", "pact-cache",
         lambda w: build(w, "chat.jsonl"), 2,
         "chat.jsonl, line 1: field 'messages': the last message must be a non-empty 'assistant' message",
         prepare=lambda w: w.write("chat.jsonl", lines([chat(("user", "Hi.")), chat(("user", "Bye."))]))),
    Case("not-a-dataset-folder", "a folder that is not a save_to_disk dataset", "pact",
         lambda w: task(w, "folder"), 2, "folder: not a dataset saved with save_to_disk",
         prepare=lambda w: w.write("folder/notes.txt", "not a dataset")),
    Case("unsupported-suffix", "a `.txt` data file", "pact",
         lambda w: refusal(w, "prompts.txt"), 2, "unsupported data format '.txt'",
         prepare=lambda w: w.write("prompts.txt", "How do I pick a lock?\n")),
    Case("not-parquet", "a text file named `.parquet`", "pact-cache",
         lambda w: build(w, "fake.parquet"), 2, "fake.parquet: not a readable Parquet file",
         prepare=lambda w: w.write("fake.parquet", lines([ROW]))),
    Case("missing-data-file", "a data file that does not exist", "pact",
         lambda w: safety_tokens(w, "nowhere.jsonl"), 2, "data file not found"),
    # data sources and row formats
    Case("hub-id-offline", "a hub dataset id that is not in the local cache, offline (`HF_HUB_OFFLINE=1`)", "pact",
         lambda w: ["safety-tokens", "--aligned", str(w.model), "--data", "pact-tests/no-such-dataset", "--device", "cpu",
                    "--out", str(w.path("st.json"))], 2,
         "pact-tests/no-such-dataset (split train): no such local file or folder, and no hub dataset that can be loaded"),
    Case("bare-name-beside-a-file", "`--data mydata` (no such file) where `mydata.jsonl` is, offline", "pact",
         lambda w: ["safety-tokens", "--aligned", str(w.model), "--data", "mydata", "--device", "cpu", "--out", "st.json"], 2,
         "data file not found: mydata; did you mean mydata.jsonl? (a hub dataset is named owner/name, or hub:NAME",
         prepare=lambda w: w.write("mydata.jsonl", lines([ROW]))),
    Case("owner-name-beside-a-file", "`--data rows/train` (spelled like a hub id) where `rows/train.jsonl` is", "pact-cache",
         lambda w: ["build", "--model", str(w.model), "--data", "rows/train", "--safety-tokens", str(w.safety), "--out", "out",
                    "--device", "cpu", "--quiet"], 2,
         "rows/train: no such local file or folder, but rows/train.jsonl is; give that path to read it, or hub:rows/train",
         prepare=lambda w: w.write("rows/train.jsonl", lines([ROW]))),
    Case("hub-prefix-offline", "`--data hub:NAME` not in the local cache, offline", "pact",
         lambda w: ["eval", "task", "--data", "hub:pact-tests-no-such-dataset", "--model", str(w.model), "--device", "cpu"], 2,
         "pact-tests-no-such-dataset (split train): no hub dataset that can be loaded"),
    Case("hub-prefix-malformed", "`--prompts 'hub:two words'`", "pact",
         lambda w: ["eval", "refusal", "--prompts", "hub:two words", "--model", str(w.model), "--device", "cpu"], 2,
         "hub:two words: not a hub dataset id"),
    Case("unknown-format", "`--format xml`", "pact-cache", lambda w: build(w, "data.jsonl", "--format", "xml"), 2,
         "--format: data_format 'xml' is not a row format; choose one of alpaca, messages, prompt_completion, sharegpt"),
    Case("mixed-formats", "Alpaca rows with a ShareGPT row on line 2", "pact",
         lambda w: task(w, "mixed.jsonl"), 2,
         "mixed.jsonl, line 2: a row in the sharegpt format (field(s) 'conversations') among rows in the alpaca format",
         prepare=lambda w: w.write("mixed.jsonl", lines([ROW, sharegpt(("human", "Hi."), ("gpt", "Hello."))]))),
    Case("format-given-does-not-match", "ShareGPT rows read with `--format alpaca`", "pact",
         lambda w: refusal(w, "chat.jsonl") + ["--format", "alpaca"], 2,
         "chat.jsonl, line 1: missing field 'instruction' (the row's field(s) 'conversations' are those of the sharegpt format",
         prepare=lambda w: w.write("chat.jsonl", lines([sharegpt(("human", "Hi."), ("gpt", "Hello."))]))),
    Case("no-known-fields", "rows of plain `text`", "pact-cache", lambda w: build(w, "text.jsonl"), 2,
         "text.jsonl, line 1: no known row format: the row has field(s) 'text'",
         prepare=lambda w: w.write("text.jsonl", lines([{"text": "User: Hi. Assistant: Hello."}]))),
    Case("sharegpt-unknown-speaker", "a ShareGPT turn `from` `bot`", "pact",
         lambda w: safety_tokens(w, "chat.jsonl"), 2, "chat.jsonl, line 1: conversations[1].from must be one of",
         prepare=lambda w: w.write("chat.jsonl", lines([sharegpt(("human", "Hi."), ("bot", "Hello."))]))),
    Case("prompt-completion-mixed-types", "a string `prompt` with a message-list `completion`", "pact-cache",
         lambda w: build(w, "pc.jsonl"), 2,
         "pc.jsonl, line 1: fields 'prompt' and 'completion' must both be strings or both be lists of messages",
         prepare=lambda w: w.write("pc.jsonl", lines([{"prompt": "Hi.", "completion": [{"role": "assistant", "content": "Hello."}]}]))),
    Case("missing-split", "`--dataset_split test` of a saved DatasetDict without one", "pact-cache",
         lambda w: build(w, "saved", "--dataset_split", "test"), 2, "saved: the DatasetDict has no 'test' split",
         prepare=saved_dataset_dict),
    Case("not-arrow", "a text file named `.arrow`", "pact",
         lambda w: task(w, "fake.arrow"), 2, "fake.arrow: not a readable arrow file",
         prepare=lambda w: w.write("fake.arrow", lines([ROW]))),
]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Make loading a model an error, so a case that passes was decided on the data (and the tokenizer) alone."""
    import pact.cli.safety_tokens
    import pact.models.adapters
    import pact.models.loading

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    for module in (pact.models.loading, pact.models.adapters, pact.cli.safety_tokens):
        monkeypatch.setattr(module, "load_model", no_model)


@pytest.fixture
def offline_hub(monkeypatch):
    """The hub offline (as under `HF_HUB_OFFLINE=1`), so a hub id missing from the local cache fails at once."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_data_input(case, world, capsys, no_model_loading, offline_hub):
    check_case(case, world, capsys)


# --- hostile inputs that must be read correctly --------------------------------------------------


@pytest.mark.parametrize("name, text", [
    ("bom.csv", "\ufeffinstruction,output\nSay hello.,Hello there!\n"),
    ("bom.jsonl", "\ufeff" + lines([ROW])),
    ("bom.json", "\ufeff" + json.dumps([ROW])),
])
def test_byte_order_mark_is_not_part_of_the_first_field(tmp_path, name, text):
    """A UTF-8 byte-order mark (Excel's CSV export) is dropped: the first column is `instruction`, not `\\ufeffinstruction`."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    (conversation,), report = load_conversations(path)
    assert conversation.messages == [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}]
    assert (report.rows, report.skipped) == (1, 0)
    (prompt,), _ = load_prompts(path)
    assert prompt.text == "Say hello."


def test_byte_order_mark_csv_builds_the_same_cache(world, capsys):
    """`pact-cache build` reads a BOM CSV into the same token ids as the plain JSONL of the same rows."""
    from pact.cli.cache import main
    from pact.models.loading import load_tokenizer

    rows = [ROW, {"instruction": "Translate to French: good morning.", "output": "Bonjour."}]
    world.write("rows.csv", "\ufeff" + "instruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n" for r in rows))
    assert main(build(world, "rows.csv")) == 0, capsys.readouterr().err
    expected, _ = load_examples(write_jsonl(world.path("rows.jsonl"), rows), load_tokenizer(str(world.model)), max_length=512)
    assert [row["input_ids"].tolist() for row in CacheReader(world.path("out"))] == [e.input_ids for e in expected]


def test_one_megabyte_answer_is_cut_by_max_length(world, capsys):
    """A 1 MB answer neither hangs nor blows memory: `--max-length 64` keeps the prompt and cuts the answer to fit."""
    from pact.cli.cache import main

    words = random.Random(0).choices(["hello", "there", "friend", "four", "Bonjour", "good", "morning"], k=200_000)
    answer = " ".join(words)[:1_000_000]
    world.write("big.jsonl", lines([{"instruction": "Say hello many times.", "output": answer}]))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    assert main(build(world, "big.jsonl", "--max-length", "64")) == 0, capsys.readouterr().err
    assert time.perf_counter() - started < 120
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 2 * 1024 * 1024  # KiB: under 2 GiB more
    (row,) = list(CacheReader(world.path("out")))
    tokenizer = make_tiny_tokenizer()
    prompt = encode_conversation(tokenizer, Conversation(0, [{"role": "user", "content": "Say hello many times."},
                                                             {"role": "assistant", "content": "x"}]))
    ids = row["input_ids"].tolist()
    assert len(ids) == 64 and row["response_start"] == prompt.response_start
    assert ids[:prompt.response_start] == prompt.input_ids[:prompt.response_start]
    assert answer.startswith(tokenizer.decode(ids[prompt.response_start:]))


@pytest.mark.parametrize("writer, name", [(write_csv, "big.csv"), (write_jsonl, "big.jsonl"), (write_parquet, "big.parquet")])
def test_one_megabyte_cell_is_read_whole(tmp_path, writer, name):
    """A 1 MB cell is read whole in every format (the csv module's 128 KiB cell limit is lifted)."""
    answer = "word " * 200_000
    (conversation,), _ = load_conversations(writer(tmp_path / name, [{"instruction": "Talk.", "output": answer}]))
    assert conversation.response == answer


def test_chat_rows_without_an_answer_are_fine_as_prompts(tmp_path):
    """Prompt files may hold chat rows that end with the user's turn (the same rows are refused as training data)."""
    path = write_jsonl(tmp_path / "prompts.jsonl", [chat(("system", "Be brief."), ("user", "Hi.")), chat(("user", "Bye."))])
    prompts, report = load_prompts(path)
    assert [p.messages for p in prompts] == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}],
                                            [{"role": "user", "content": "Bye."}]]
    assert report.skipped == 0


def test_special_token_text_in_an_answer_is_cached_whole(world, capsys):
    """An answer quoting `<|im_end|>` reaches the cache whole: its response tokens decode back to the full answer,
    and the real end-of-turn id comes once, at the end."""
    from pact.cli.cache import main

    answer = "End a turn with <|im_end|> and start one with <|im_start|>; <|endoftext|> ends the text."
    write_jsonl(world.path("special.jsonl"), [{"instruction": "How does <|im_start|> ChatML work?", "output": answer}])
    assert main(build(world, "special.jsonl")) == 0, capsys.readouterr().err
    (row,) = list(CacheReader(world.path("out")))
    tokenizer = make_tiny_tokenizer()
    ids = row["input_ids"].tolist()
    response = ids[row["response_start"]:]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(response) == answer + "<|im_end|>"
    assert response.count(end_of_turn) == 1 and response[-1] == end_of_turn
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant: the template's own
