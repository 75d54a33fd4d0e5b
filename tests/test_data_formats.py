"""Data as users hold it (`pact.data`): the four row formats (Alpaca, chat `messages`, TRL prompt/completion,
ShareGPT), their detection per source and the `data_format` override, and every kind of source: a
`datasets.Dataset` in Python, a `save_to_disk` folder, files only `datasets` reads (`.arrow`, compressed), a
folder of data files, and a hub id (through a stand-in for `datasets.load_dataset`: no network in tests)."""

from __future__ import annotations

import gzip
import json
import time

import pytest

from helpers import make_tiny_tokenizer, write_csv, write_jsonl
from pact.data.rows import FORMATS, load_conversations, load_prompts, row_format, row_to_messages, row_to_prompt_messages
from pact.data.sources import DataError
from pact.data.chat import load_examples
from pact.errors import InvalidSetting

SYSTEM, USER_1, ANSWER_1, USER_2, ANSWER_2 = "Be brief.", "Hi.", "Hello.", "Name a colour.", "Red."
MULTI_TURN = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER_1},
              {"role": "assistant", "content": ANSWER_1}, {"role": "user", "content": USER_2},
              {"role": "assistant", "content": ANSWER_2}]
SINGLE_TURN = [{"role": "user", "content": USER_2}, {"role": "assistant", "content": ANSWER_2}]
ALPACA = {"instruction": USER_2, "output": ANSWER_2}


def _sharegpt(messages: list[dict]) -> dict:
    """`messages` as a ShareGPT row (`from` human/gpt/system, `value`)."""
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}


def _prompt_completion_lists(messages: list[dict]) -> dict:
    """`messages` as a conversational TRL prompt/completion row: everything but the last answer, then that answer."""
    return {"prompt": messages[:-1], "completion": messages[-1:]}


# (format, row, the messages it stands for)
ROWS = [
    ("alpaca", ALPACA, SINGLE_TURN),
    ("messages", {"messages": MULTI_TURN}, MULTI_TURN),
    ("prompt_completion", {"prompt": USER_2, "completion": ANSWER_2}, SINGLE_TURN),
    ("prompt_completion", _prompt_completion_lists(MULTI_TURN), MULTI_TURN),
    ("sharegpt", _sharegpt(MULTI_TURN), MULTI_TURN),
    ("sharegpt", {"conversations": [{"from": "user", "value": USER_2}, {"from": "assistant", "value": ANSWER_2}]},
     SINGLE_TURN),
]
ROW_IDS = ["alpaca", "messages-multi-turn", "prompt-completion-strings", "prompt-completion-lists",
           "sharegpt-multi-turn", "sharegpt-user-assistant"]


@pytest.fixture
def stand_in_hub(monkeypatch):
    """Replace `datasets.load_dataset` for hub ids with a stand-in serving `hub[id][(config, split)]` (a list of rows)
    and recording each call's (id, config, split) in `hub["calls"]`; the `datasets` builders still read local files."""
    import datasets

    real = datasets.load_dataset
    hub: dict = {"calls": []}

    def load_dataset(path, name=None, split=None, **kwargs):
        if path not in hub:
            return real(path, name=name, split=split, **kwargs)
        hub["calls"].append((path, name, split))
        if (name, split) not in hub[path]:
            raise ValueError(f'Unknown split "{split}". Should be one of {sorted(s for _, s in hub[path])}.')
        return datasets.Dataset.from_list(hub[path][(name, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return hub


# --- row formats --------------------------------------------------------------------------------


@pytest.mark.parametrize("data_format, row, messages", ROWS, ids=ROW_IDS)
def test_every_row_format_gives_the_same_conversation(tmp_path, data_format, row, messages):
    """Each format, detected from its fields or given, reads to the same messages, every turn kept."""
    path = write_jsonl(tmp_path / "rows.jsonl", [row, row])
    for given in (None, data_format):
        conversations, report = load_conversations(path, data_format=given)
        assert [c.messages for c in conversations] == [messages, messages]
        assert (report.rows, report.skipped) == (2, 0)
    assert row_format(row) == data_format


@pytest.mark.parametrize("data_format, row, messages", ROWS, ids=ROW_IDS)
def test_every_row_format_is_a_prompt_with_its_answer_ignored(tmp_path, data_format, row, messages):
    """Prompt files take every format; the final answer is dropped, earlier turns are kept."""
    (prompt,), _ = load_prompts(write_jsonl(tmp_path / "prompts.jsonl", [row]))
    assert prompt.messages == messages[:-1] and prompt.text == USER_2


@pytest.mark.parametrize("row, messages", [
    ({"prompt": USER_2}, [{"role": "user", "content": USER_2}]),
    ({"prompt": MULTI_TURN[:-1]}, MULTI_TURN[:-1]),
    ({"instruction": USER_2, "input": "Not blue."}, [{"role": "user", "content": f"{USER_2}\n\nNot blue."}]),
    (_sharegpt(MULTI_TURN[:-1]), MULTI_TURN[:-1]),
], ids=["prompt-string", "prompt-messages", "alpaca-without-output", "sharegpt-ending-with-the-user"])
def test_prompt_rows_need_no_answer(row, messages):
    """A request alone is a valid prompt row in every format."""
    assert row_to_prompt_messages(row) == messages


def test_the_format_given_overrides_detection(tmp_path):
    """Rows holding the fields of two formats are read as the detected one, or as the one given."""
    row = {**ALPACA, "prompt": "Say yes.", "completion": "Yes."}
    path = write_jsonl(tmp_path / "both.jsonl", [row])
    (detected,), _ = load_conversations(path)
    (given,), _ = load_conversations(path, data_format="prompt_completion")
    assert detected.messages == SINGLE_TURN
    assert given.messages == [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}]


def test_a_row_of_another_format_names_its_row_and_fields(tmp_path):
    """The format is the first row's; a later row in another format is an error naming its line, its fields and the
    line the format was detected from (and skipped, counted, with skip_invalid)."""
    path = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA, ALPACA, _sharegpt(MULTI_TURN), ALPACA])
    with pytest.raises(DataError) as err:
        load_conversations(path)
    assert str(err.value) == (f"{path}, line 3: a row in the sharegpt format (field(s) 'conversations') among rows in "
                              "the alpaca format (detected from line 1); use one row format per file")
    conversations, report = load_conversations(path, skip_invalid=True)
    assert [c.example_id for c in conversations] == [0, 1, 3] and report.skipped == 1


def test_the_format_is_detected_from_the_first_row_with_known_fields(tmp_path):
    """Rows before it that are not JSON or have no known fields are errors of their own, not the file's format."""
    path = write_jsonl(tmp_path / "rows.jsonl", ["{cut", {"text": "plain"}, _sharegpt(SINGLE_TURN), _sharegpt(MULTI_TURN)])
    conversations, report = load_conversations(path, skip_invalid=True)
    assert [c.messages for c in conversations] == [SINGLE_TURN, MULTI_TURN]
    assert report.errors[1] == (f"{path}, line 2: no known row format: the row has field(s) 'text'; expected "
                                "'instruction'/'output' (alpaca), 'messages' (chat), 'prompt'/'completion' "
                                "(prompt_completion) or 'conversations' (sharegpt)")


def test_a_row_not_in_the_format_given_names_what_it_is(tmp_path):
    """A row read in a format it is not in says which format its fields name."""
    path = write_jsonl(tmp_path / "chat.jsonl", [_sharegpt(SINGLE_TURN)])
    with pytest.raises(DataError) as err:
        load_conversations(path, data_format="alpaca")
    assert str(err.value) == (f"{path}, line 1: missing field 'instruction' (the row's field(s) 'conversations' are "
                              "those of the sharegpt format, but the format given is alpaca)")


def test_an_unknown_format_names_the_setting(tmp_path):
    """`data_format` outside FORMATS is refused before any row is read, naming the field."""
    with pytest.raises(InvalidSetting) as err:
        load_conversations(tmp_path / "never-read.jsonl", data_format="xml")
    assert err.value.field == "data_format" and "'xml' is not a row format; choose one of " + ", ".join(FORMATS) in str(err.value)


@pytest.mark.parametrize("row, expected", [
    ({"prompt": USER_2, "completion": SINGLE_TURN[1:]},
     "fields 'prompt' and 'completion' must both be strings or both be lists of messages, got str and list"),
    ({"prompt": SINGLE_TURN[:1], "completion": [{"role": "user", "content": "x"}]},
     "completion[0].role must be 'assistant' (the completion is the response), got 'user'"),
    ({"prompt": SINGLE_TURN[:1], "completion": [{"role": "assistant", "content": " "}]}, "completion[0].content is empty"),
    ({"prompt": MULTI_TURN[:1], "completion": SINGLE_TURN[1:]}, "'prompt' has no 'user' message"),
    ({"prompt": USER_2}, "missing field 'completion'"),
    ({"completion": ANSWER_2}, "missing field 'prompt'"),
    ({"conversations": [{"from": "human", "value": "Hi."}, {"from": "bot", "value": "Hello."}]},
     "conversations[1].from must be one of ('system', 'human', 'user', 'gpt', 'assistant'), got 'bot'"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "Hello."}]},
     "conversations[0].value must be a string"),
    ({"conversations": [{"from": "human", "value": "Hi."}]},
     "field 'conversations': the last message must be a non-empty 'assistant' message (the response), got a 'user' "
     "message (conversations[0])"),
    ({"conversations": "[{\"from\": \"human\""}, "field 'conversations' is a string but not JSON"),
], ids=["mixed-types", "completion-by-the-user", "empty-completion", "prompt-without-user", "no-completion",
        "no-prompt", "sharegpt-unknown-from", "sharegpt-value-number", "sharegpt-no-answer", "sharegpt-bad-json"])
def test_malformed_rows_name_the_field(row, expected):
    """Every format's errors name the field (and the message index within it)."""
    with pytest.raises(DataError) as err:
        row_to_messages(row)
    assert str(err.value).startswith(expected)


def test_csv_cells_may_hold_sharegpt_conversations_as_json(tmp_path):
    """A CSV cell holds a conversation as JSON text, as for `messages`."""
    path = write_csv(tmp_path / "rows.csv", [{"conversations": json.dumps(_sharegpt(MULTI_TURN)["conversations"])}])
    (conversation,), _ = load_conversations(path)
    assert conversation.messages == MULTI_TURN


# --- sources --------------------------------------------------------------------------------------


def test_a_datasets_dataset_in_python(tmp_path):
    """A `datasets.Dataset` (or a `DatasetDict` and a split) is read like the file of the same rows, through
    `load_conversations` and `load_examples`; errors call it by its name and the report keeps its fingerprint."""
    from datasets import Dataset, DatasetDict

    rows = [_sharegpt(MULTI_TURN), _sharegpt(SINGLE_TURN)]
    dataset = Dataset.from_list(rows)
    tokenizer = make_tiny_tokenizer()
    expected, _ = load_examples(write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer, max_length=128)
    examples, report = load_examples(dataset, tokenizer, max_length=128)
    assert [(e.input_ids, e.spans) for e in examples] == [(e.input_ids, e.spans) for e in expected]
    assert (report.path, report.fingerprint) == ("the datasets.Dataset", dataset._fingerprint)
    (conversation,), _ = load_conversations(DatasetDict({"test": dataset.select([1])}), dataset_split="test")
    assert conversation.messages == SINGLE_TURN
    with pytest.raises(DataError, match=r"the datasets.Dataset, row 0: missing field 'instruction'"):
        load_conversations(dataset, data_format="alpaca")
    with pytest.raises(DataError, match=r"the DatasetDict: the DatasetDict has no 'train' split \(splits: \['test'\]\)"):
        load_conversations(DatasetDict({"test": dataset}))
    with pytest.raises(DataError, match="data must be a path, a hub dataset id or a datasets.Dataset, got list"):
        load_conversations(rows)


def test_a_save_to_disk_dataset_dict_reads_the_split_asked_for(tmp_path):
    """`dataset_split` picks the split of a saved `DatasetDict` (train by default)."""
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([ALPACA]), "validation": Dataset.from_list([_sharegpt(MULTI_TURN)])}
                ).save_to_disk(str(tmp_path / "saved"))
    assert [c.messages for c in load_conversations(tmp_path / "saved")[0]] == [SINGLE_TURN]
    assert [c.messages for c in load_conversations(tmp_path / "saved", dataset_split="validation")[0]] == [MULTI_TURN]
    with pytest.raises(DataError, match="has no 'test' split"):
        load_conversations(tmp_path / "saved", dataset_split="test")


def test_files_only_datasets_reads(tmp_path):
    """An `.arrow` file (as `datasets` writes), a gzip-compressed JSONL file, a TSV file and a `.json` file of JSON
    Lines (as `Dataset.to_json` writes) all read to the same conversations."""
    import pyarrow as pa
    from datasets import Dataset

    rows = [{"messages": MULTI_TURN}, {"messages": SINGLE_TURN}]
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(str(tmp_path / "rows.arrow"), table.schema) as writer:
        writer.write_table(table)
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    (tmp_path / "rows.tsv").write_text("instruction\toutput\n" + f"{USER_2}\t{ANSWER_2}\n" * 2, encoding="utf-8")
    Dataset.from_list(rows).to_json(str(tmp_path / "lines.json"))
    for name in ("rows.arrow", "rows.jsonl.gz", "lines.json"):
        assert [c.messages for c in load_conversations(tmp_path / name)[0]] == [MULTI_TURN, SINGLE_TURN], name
    assert [c.messages for c in load_conversations(tmp_path / "rows.tsv")[0]] == [SINGLE_TURN, SINGLE_TURN]


def test_a_broken_file_only_datasets_reads_names_the_file(tmp_path):
    """A file named `.arrow` that is not Arrow data is one error naming the file."""
    (tmp_path / "fake.arrow").write_text("not arrow", encoding="utf-8")
    with pytest.raises(DataError, match=f"{tmp_path / 'fake.arrow'}: not a readable arrow file"):
        load_conversations(tmp_path / "fake.arrow")


def test_a_folder_of_data_files_reads_its_splits(tmp_path):
    """A folder of data files (a hub dataset cloned locally) loads with `datasets.load_dataset`, split by file name."""
    (tmp_path / "repo").mkdir()
    write_jsonl(tmp_path / "repo" / "train.jsonl", [_sharegpt(SINGLE_TURN)])
    write_jsonl(tmp_path / "repo" / "test.jsonl", [_sharegpt(MULTI_TURN)])
    conversations, report = load_conversations(tmp_path / "repo", dataset_split="test")
    assert [c.messages for c in conversations] == [MULTI_TURN] and report.fingerprint
    assert [c.messages for c in load_conversations(tmp_path / "repo")[0]] == [SINGLE_TURN]
    with pytest.raises(DataError, match=r"repo: datasets.load_dataset cannot load this folder of data files \(ValueError: "
                                        r'Unknown split "validation"'):
        load_conversations(tmp_path / "repo", dataset_split="validation")


def test_a_hub_id_is_loaded_with_its_config_and_split(stand_in_hub):
    """A hub id is loaded with `datasets.load_dataset(id, name=config, split=split)`; errors name the id, split and config."""
    stand_in_hub["owner/chat"] = {("short", "validation"): [_sharegpt(MULTI_TURN), {"conversations": []}]}
    conversations, report = load_conversations("owner/chat", skip_invalid=True, dataset_split="validation",
                                               dataset_config="short")
    assert stand_in_hub["calls"] == [("owner/chat", "short", "validation")]
    assert [c.messages for c in conversations] == [MULTI_TURN] and report.fingerprint
    assert report.errors == ["owner/chat (split validation, config short), row 1: field 'conversations' must be a non-empty list"]
    with pytest.raises(DataError, match=r"owner/chat \(split train\): no such local file or folder, and no hub dataset "
                                        r"that can be loaded \(ValueError: Unknown split \"train\""):
        load_prompts("owner/chat")


def test_a_missing_path_with_a_data_suffix_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """`rows.jsonl`, `./x` or a bare `name` that does not exist is a missing file, never a hub lookup."""
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("looked up on the hub"))
    for missing in ("rows.jsonl", "./data", str(tmp_path / "gone"), "mydata"):
        with pytest.raises(DataError, match="data file not found"):
            load_conversations(missing)


def test_a_missing_path_named_like_a_local_file_names_that_file(stand_in_hub, tmp_path, monkeypatch):
    """A bare `mydata` beside `mydata.jsonl` is refused naming `mydata.jsonl`; `owner/name` beside `owner/name.jsonl` is
    refused too (which one was meant is the user's to say), and `hub:owner/name` then loads the hub dataset."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "mydata.jsonl", [ALPACA])
    (tmp_path / "owner").mkdir()
    write_jsonl(tmp_path / "owner" / "chat.jsonl", [ALPACA])
    stand_in_hub["owner/chat"] = {(None, "train"): [_sharegpt(MULTI_TURN)]}
    with pytest.raises(DataError, match=r"data file not found: mydata; did you mean mydata.jsonl\? \(a hub dataset is named "
                                        r"owner/name, or hub:NAME to load it from the hub explicitly\)"):
        load_conversations("mydata")
    with pytest.raises(DataError, match="owner/chat: no such local file or folder, but owner/chat.jsonl is; give that path to "
                                        "read it, or hub:owner/chat to load the hub dataset owner/chat"):
        load_conversations("owner/chat")
    assert stand_in_hub["calls"] == []
    (conversation,), _ = load_conversations("hub:owner/chat")
    assert conversation.messages == MULTI_TURN and stand_in_hub["calls"] == [("owner/chat", None, "train")]


def test_hub_prefix_names_a_hub_dataset_even_without_an_owner(stand_in_hub, tmp_path, monkeypatch):
    """`hub:NAME` loads the hub dataset NAME, even where a local path of that name exists; a malformed id is named."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "squad", [ALPACA])
    stand_in_hub["squad"] = {(None, "train"): [_sharegpt(SINGLE_TURN)]}
    (conversation,), report = load_conversations("hub:squad")
    assert conversation.messages == SINGLE_TURN and report.path == "squad (split train)"
    with pytest.raises(DataError, match="hub:no such: not a hub dataset id"):
        load_conversations("hub:no such")


def test_a_hub_id_offline_fails_at_once_naming_it(monkeypatch):
    """Offline (HF_HUB_OFFLINE), a hub id missing from the local cache is one clear error within seconds."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_conversations("pact-tests/no-such-dataset")
    assert time.perf_counter() - started < 20
    assert str(err.value).startswith("pact-tests/no-such-dataset (split train): no such local file or folder, and no hub "
                                     "dataset that can be loaded (ConnectionError: Couldn't reach")


def test_the_manifest_identifies_a_hub_dataset_by_id_config_split_and_fingerprint(tmp_path):
    """`describe_data` of a hub dataset or a `datasets.Dataset` records what identifies it (no file to hash); a local
    file is hashed as before, and a given format is part of the fingerprint."""
    from datasets import Dataset

    from pact.cache_tools.manifest import describe_data

    dataset = Dataset.from_list([ALPACA])
    hub = describe_data("owner/chat", None, 64, False, None, dataset_split="validation", dataset_config="short",
                        dataset_fingerprint="abc")
    assert {k: hub[k] for k in ("dataset", "dataset_config", "dataset_split", "dataset_fingerprint")} == {
        "dataset": "owner/chat", "dataset_config": "short", "dataset_split": "validation", "dataset_fingerprint": "abc"}
    other_split = describe_data("owner/chat", None, 64, False, None, dataset_split="train", dataset_config="short",
                                dataset_fingerprint="abc")
    assert other_split["fingerprint"] != hub["fingerprint"]
    assert describe_data(dataset, None, 64, False, None)["dataset_fingerprint"] == dataset._fingerprint
    path = write_jsonl(tmp_path / "rows.jsonl", [ALPACA])
    local = describe_data(path, None, 64, False, None)
    assert local["path"] == str(path) and len(local["sha256"]) == 64 and "format" not in local
    explicit = describe_data("hub:owner/chat", None, 64, False, None, dataset_split="validation", dataset_config="short",
                             dataset_fingerprint="abc")
    assert explicit["dataset"] == "owner/chat" and explicit["fingerprint"] == hub["fingerprint"]
    assert [d["source"] for d in (local, describe_data(tmp_path, None, 64, False, None), hub,
                                  describe_data(dataset, None, 64, False, None))] == [
        "local file", "local folder", "hub dataset", "datasets.Dataset"]
    assert describe_data(path, None, 64, False, None, data_format="alpaca")["fingerprint"] != local["fingerprint"]
    with pytest.raises(ValueError, match="pass dataset_fingerprint"):
        describe_data("owner/chat", None, 64, False, None)


# --- the commands ---------------------------------------------------------------------------------


def test_cache_build_from_a_hub_dataset(stand_in_hub, tiny_model_dir, tiny_safety_file, tmp_path, capsys):
    """`pact-cache build --data ID --dataset_config --dataset_split --format` reads that split of that config, caches
    the same examples as the rows read in Python, and records the dataset in the manifest."""
    from datasets import Dataset

    from pact.cache_tools import CacheReader, load_manifest
    from pact.cli.cache import main

    rows = [_sharegpt(MULTI_TURN), _sharegpt(SINGLE_TURN), _sharegpt(MULTI_TURN[1:])]
    stand_in_hub["owner/chat"] = {("short", "validation"): rows}
    out = tmp_path / "cache"
    assert main(["build", "--model", str(tiny_model_dir), "--safety-tokens", str(tiny_safety_file), "--data", "owner/chat",
                 "--dataset_config", "short", "--dataset_split", "validation", "--format", "sharegpt", "--out", str(out),
                 "--device", "cpu", "--dtype", "float32", "--max-length", "128", "--quiet"]) == 0, capsys.readouterr().err
    assert stand_in_hub["calls"] == [("owner/chat", "short", "validation")]
    expected, _ = load_examples(Dataset.from_list(rows), make_tiny_tokenizer(), max_length=128)
    assert [row["input_ids"].tolist() for row in CacheReader(out)] == [e.input_ids for e in expected]
    data = load_manifest(out)["data"]
    assert (data["dataset"], data["dataset_config"], data["dataset_split"], data["format"]) == (
        "owner/chat", "short", "validation", "sharegpt")
    assert data["dataset_fingerprint"] == Dataset.from_list(rows)._fingerprint


@pytest.mark.parametrize("argv", [
    ["safety-tokens", "--data", "owner/chat", "--out", "st.json"],
    ["eval", "refusal", "--prompts", "owner/chat"],
    ["eval", "task", "--data", "owner/chat"],
], ids=["safety-tokens", "eval-refusal", "eval-task"])
def test_pact_commands_pass_the_data_settings_through(argv, stand_in_hub, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`pact safety-tokens --data`, `pact eval refusal --prompts` and `pact eval task --data` take --dataset_split,
    --dataset_config and --format: the rows of that split are read in that format and a bad one is named, before any
    model is loaded."""
    from pact.cli.main import main

    monkeypatch.chdir(tmp_path)
    stand_in_hub["owner/chat"] = {("short", "test"): [{"instruction": "Hi.", "output": "Hello."}]}
    model = ["--aligned" if argv[0] == "safety-tokens" else "--model", str(tiny_model_dir), "--device", "cpu"]
    code = main([*argv, *model, "--dataset_split", "test", "--dataset_config", "short", "--format", "sharegpt"])
    err = capsys.readouterr().err
    assert code == 2 and stand_in_hub["calls"] == [("owner/chat", "short", "test")]
    assert ("owner/chat (split test, config short), row 0: missing field 'conversations' (the row's field(s) "
            "'instruction', 'output' are those of the alpaca format, but the format given is sharegpt)") in err, err


def test_a_table_of_several_formats_detects_each_row_by_the_fields_holding_values():
    """A `datasets` table gives every row all columns (None where a row has none): only fields with a value count, so a
    table of chat rows with an empty `instruction` column reads as chat, and a row of another format is still named."""
    from datasets import Dataset

    (conversation,), _ = load_conversations(Dataset.from_list([{"messages": SINGLE_TURN, "instruction": None}]))
    assert conversation.messages == SINGLE_TURN
    with pytest.raises(DataError, match=r"the datasets.Dataset, row 1: a row in the alpaca format \(field\(s\) 'instruction', "
                                        r"'output'\) among rows in the messages format \(detected from row 0\)"):
        load_conversations(Dataset.from_list([{"messages": SINGLE_TURN, "instruction": None, "output": None},
                                              {"messages": None, **ALPACA}]))
