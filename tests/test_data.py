"""Training-data loading (`pact.data`): every file format, row validation and its error messages,
`skip_invalid`, empty inputs, truncation, and the response mask checked token by token for the
tiny ChatML tokenizer and the embedded SmolLM2 template."""

from __future__ import annotations

import json

import pytest

from helpers import make_tiny_tokenizer, write_csv, write_dataset_dir, write_json, write_jsonl, write_parquet
from pact.data.sources import DEMO_BENIGN, DEMO_REFUSALS, DataError, demo_data_path
from pact.data.chat import PLAIN_HEADER_FALLBACK, assistant_header, assistant_header_ids, encode_conversation, encode_conversations, load_examples, prompt_token_ids, render_prompt
from pact.data.rows import Conversation, load_conversations, row_to_messages

ALPACA_ROWS = [
    {"instruction": "Say hello.", "output": "Hello there!"},
    {"instruction": "Translate to French.", "input": "good morning", "output": "Bonjour."},
    {"instruction": "What is two plus two?", "input": "", "output": "Four."},
    {"instruction": "List two colours.", "output": "Red\nBlue"},
]

EXPECTED_MESSAGES = [
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}],
    [{"role": "user", "content": "Translate to French.\n\ngood morning"}, {"role": "assistant", "content": "Bonjour."}],
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
    [{"role": "user", "content": "List two colours."}, {"role": "assistant", "content": "Red\nBlue"}],
]

CHAT_ROWS = [{"messages": messages} for messages in EXPECTED_MESSAGES]

SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    """The tiny ChatML tokenizer (with a default system message, like SmolLM2)."""
    return make_tiny_tokenizer()


def _messages(path, **kwargs):
    """The validated messages of every row of a data file, and the load report."""
    conversations, report = load_conversations(path, **kwargs)
    assert [c.example_id for c in conversations] == list(range(len(conversations)))
    return [c.messages for c in conversations], report


def _alpaca_without_missing_inputs():
    """ALPACA_ROWS with an explicit `input` on every row (None where the row has none)."""
    return [{"instruction": r["instruction"], "input": r.get("input"), "output": r["output"]} for r in ALPACA_ROWS]


# --- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "writer, name",
    [
        (write_jsonl, "rows.jsonl"),
        (write_json, "rows.json"),
        (write_csv, "rows.csv"),
        (write_parquet, "rows.parquet"),
        (write_dataset_dir, "rows_dataset"),
    ],
)
@pytest.mark.parametrize("style", ["alpaca", "chat"])
def test_every_format_gives_the_same_conversations(tmp_path, writer, name, style):
    """JSONL, JSON array, CSV, Parquet and a save_to_disk folder, Alpaca or chat rows, all load to
    the same conversations (Alpaca `input` appended after a blank line, empty `input` ignored)."""
    if style == "alpaca":
        rows = ALPACA_ROWS if writer in (write_jsonl, write_json, write_csv) else _alpaca_without_missing_inputs()
    elif writer is write_csv:
        rows = [{"messages": json.dumps(row["messages"])} for row in CHAT_ROWS]  # CSV cells hold JSON text
    else:
        rows = CHAT_ROWS
    messages, report = _messages(writer(tmp_path / name, rows))
    assert messages == EXPECTED_MESSAGES
    assert (report.rows, report.skipped, report.errors) == (len(EXPECTED_MESSAGES), 0, [])


def test_json_object_with_data_array(tmp_path):
    """A JSON object holding the rows under `data` loads like a plain array."""
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"data": ALPACA_ROWS}))
    assert _messages(path)[0] == EXPECTED_MESSAGES


def test_dataset_dict_uses_train_split(tmp_path):
    """A saved `DatasetDict` loads its `train` split; one without `train` is a clear error."""
    from datasets import Dataset, DatasetDict

    train = Dataset.from_list(_alpaca_without_missing_inputs())
    DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(str(tmp_path / "with_train"))
    assert _messages(tmp_path / "with_train")[0] == EXPECTED_MESSAGES
    DatasetDict({"validation": train}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataError, match="'train' split"):
        load_conversations(tmp_path / "no_train")


def test_chat_rows_keep_system_and_earlier_turns(tmp_path):
    """Chat rows keep every message; the last assistant message is the response."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
        {"role": "assistant", "content": "Goodbye."},
    ]
    (conversation,), _ = load_conversations(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]))
    assert conversation.messages == messages
    assert (conversation.prompt, conversation.response) == ("Bye.", "Goodbye.")


def test_limit_reads_only_the_first_rows(tmp_path):
    """`limit` keeps the first rows of the file; a limit below 1 is an error, not an "empty file"."""
    path = write_jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS)
    messages, report = _messages(path, limit=2)
    assert messages == EXPECTED_MESSAGES[:2] and report.rows == 2
    with pytest.raises(DataError, match="the row limit must be at least 1, got 0"):
        load_conversations(path, limit=0)


def test_unsupported_format_and_missing_file(tmp_path):
    """Unknown extensions, missing files and folders that are not datasets are clear errors."""
    (tmp_path / "rows.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported data format '\.txt'"):
        load_conversations(tmp_path / "rows.txt")
    with pytest.raises(DataError, match="data file not found"):
        load_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        load_conversations(tmp_path / "not_a_dataset")


# --- malformed rows ---------------------------------------------------------------------------


def _error(path, **kwargs) -> str:
    """The `DataError` message loading `path` raises."""
    with pytest.raises(DataError) as err:
        load_conversations(path, **kwargs)
    return str(err.value)


def test_missing_output_names_file_line_and_field(tmp_path):
    """A JSONL row without `output` names the file, its line (blank lines counted) and the field."""
    path = write_jsonl(tmp_path / "rows.jsonl", [ALPACA_ROWS[0], "", {"instruction": "No answer."}])
    assert _error(path) == f"{path}, line 3: missing field 'output'"


def test_non_string_input_names_the_field(tmp_path):
    """A non-string `input` is rejected with its type."""
    path = write_jsonl(tmp_path / "rows.jsonl", [ALPACA_ROWS[0], {"instruction": "Add.", "input": 5, "output": "5"}])
    assert _error(path) == f"{path}, line 2: field 'input' must be a string, got int"


def test_non_string_and_empty_fields(tmp_path):
    """Non-string or blank `instruction`/`output` values are rejected by field name."""
    cases = [
        ({"instruction": ["a"], "output": "b"}, "field 'instruction' must be a string, got list"),
        ({"instruction": "a", "output": 3}, "field 'output' must be a string, got int"),
        ({"instruction": "a", "output": "   "}, "field 'output' is empty"),
        ({"output": "b"}, "missing field 'instruction'"),
        ("just text", "expected an object"),
    ]
    for row, expected in cases:
        path = write_json(tmp_path / "rows.json", [ALPACA_ROWS[0], row])
        message = _error(path)
        assert message.startswith(f"{path}, row 1: ") and expected in message


def test_bad_role_names_the_message(tmp_path):
    """A chat message with an unknown role names the message index and the bad role."""
    rows = [{"messages": [{"role": "user", "content": "Hi."}, {"role": "bot", "content": "Hello."}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    message = _error(path)
    assert message.startswith(f"{path}, line 1: messages[1].role must be one of")
    assert "'bot'" in message


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([], "field 'messages' must be a non-empty list"),
        ([{"role": "user", "content": "Hi."}], "last message must be a non-empty 'assistant' message"),
        ([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": " "}], "non-empty 'assistant'"),
        ([{"role": "system", "content": "S."}, {"role": "assistant", "content": "A."}], "no 'user' message"),
        ([{"role": "user", "content": 1}, {"role": "assistant", "content": "A."}], "messages[0].content must be a string"),
        (["Hi.", {"role": "assistant", "content": "A."}], "messages[0] must be an object"),
    ],
)
def test_malformed_chat_rows(messages, expected):
    """Chat rows without a usable structure are rejected with the reason."""
    with pytest.raises(DataError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        row_to_messages({"messages": messages})


def test_invalid_json_line_names_the_line(tmp_path):
    """A line that is not JSON names the file and line."""
    path = write_jsonl(tmp_path / "rows.jsonl", [ALPACA_ROWS[0], ALPACA_ROWS[1], '{"instruction": "x", '])
    message = _error(path)
    assert message.startswith(f"{path}, line 3: invalid JSON")


def test_invalid_json_array_file(tmp_path):
    """A `.json` file that does not parse names the file, line and column."""
    path = tmp_path / "rows.json"
    path.write_text('[{"instruction": "x",\n "output": }]')
    assert _error(path).startswith(f"{path}: invalid JSON at line 2")


def test_csv_and_parquet_errors_name_row_and_line(tmp_path):
    """CSV errors give the row and its line in the file (quoted multi-line cells counted);
    Parquet and dataset folders give the row index."""
    rows = [{"instruction": "Two lines\nof prompt.", "output": "Yes."}, {"instruction": "No answer.", "output": ""}]
    path = write_csv(tmp_path / "rows.csv", rows)
    assert _error(path) == f"{path}, row 1 (line 4): missing field 'output'"
    bad = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}]
    path = write_parquet(tmp_path / "rows.parquet", bad)
    assert _error(path) == f"{path}, row 1: missing field 'output'"
    path = write_dataset_dir(tmp_path / "rows_dataset", bad)
    assert _error(path) == f"{path}, row 1: missing field 'output'"


# --- skip_invalid and empty inputs ------------------------------------------------------------


def test_skip_invalid_skips_and_counts(tmp_path):
    """With `skip_invalid` bad rows are skipped, counted and described; good rows keep their index."""
    rows = [ALPACA_ROWS[0], {"instruction": "No answer."}, ALPACA_ROWS[1], "{not json", ALPACA_ROWS[2]]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    conversations, report = load_conversations(path, skip_invalid=True)
    assert [c.example_id for c in conversations] == [0, 2, 4]
    assert [c.messages for c in conversations] == EXPECTED_MESSAGES[:3]
    assert (report.rows, report.skipped) == (3, 2)
    assert report.errors[0] == f"{path}, line 2: missing field 'output'"
    assert report.errors[1].startswith(f"{path}, line 4: invalid JSON")
    with pytest.raises(DataError, match="line 2"):
        load_conversations(path)


def test_skip_invalid_skips_undecodable_lines_and_extra_cells(tmp_path):
    """A JSONL line that is not UTF-8 and a CSV record with a cell too many are single bad rows: `skip_invalid`
    skips them (named by line) and keeps the rest."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"instruction": "Caf\xe9?", "output": "Yes."}\n' + (json.dumps(ALPACA_ROWS[0]) + "\n").encode())
    conversations, report = load_conversations(path, skip_invalid=True)
    assert [c.example_id for c in conversations] == [1] and report.skipped == 1
    assert report.errors == [f"{path}, line 1: not UTF-8 text (byte 0xe9 at byte 21 of the line); "
                             "save the file as UTF-8 (a binary file is not data)"]
    path = tmp_path / "rows.csv"
    path.write_text("instruction,output\nSay hello.,Hello, there!\nSay hi.,Hi.\n", encoding="utf-8")
    conversations, report = load_conversations(path, skip_invalid=True)
    assert [c.messages for c in conversations] == [[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]]
    assert report.errors == [f"{path}, row 0 (line 2): 3 cells but the header has 2 columns; quote cells that contain a comma"]


def test_skip_invalid_with_nothing_valid_is_an_error(tmp_path):
    """Skipping every row is an error that says how many were invalid and why."""
    path = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a"}, {"instruction": "b"}])
    message = _error(path, skip_invalid=True)
    assert "no usable rows (2 invalid, first:" in message and "missing field 'output'" in message


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv", "blank.jsonl", "array.json", "header.csv", "empty.parquet"])
def test_empty_file_is_an_error(tmp_path, name):
    """Empty files of every format are errors that say so, never zero silent rows."""
    path = tmp_path / name
    contents = {"blank.jsonl": "\n  \n", "array.json": "[]", "header.csv": "instruction,output\n"}
    if name == "empty.parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}), path)
    else:
        path.write_text(contents.get(name, ""))
    assert _error(path) == f"{path}: no usable rows (the file is empty)"


def test_response_rendering_to_zero_tokens_is_an_error(tmp_path, tok):
    """A response that renders to no token (only the end-of-turn token) is an error naming the row."""
    with pytest.raises(DataError, match="zero tokens"):
        encode_conversation(tok, Conversation(0, [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": ""}]))

    dropping = make_tiny_tokenizer()  # a template that writes the assistant turn without its content
    dropping.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    path = write_jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS[:2])
    with pytest.raises(DataError) as err:
        load_examples(path, dropping)
    assert str(err.value) == f"{path}, row 0: the response (messages[1]) renders to zero tokens"
    with pytest.raises(DataError, match="no row could be encoded"):
        load_examples(path, dropping, skip_invalid=True)


# --- rendering and the response mask (tiny tokenizer) -----------------------------------------


def _pieces(tokenizer, ids):
    """Each token id decoded on its own."""
    return [tokenizer.decode([i]) for i in ids]


def _check_mask(tokenizer, conversation, expected_prompt, expected_response):
    """Encode `conversation` and check, token by token, that the prompt part decodes to
    `expected_prompt` and the response part to `expected_response` (content plus `<|im_end|>`); only the last
    assistant turn is a response (`train_on="last"`: earlier turns are prompt; tests/test_multi_turn.py covers "all")."""
    example = encode_conversation(tokenizer, conversation, train_on="last")
    prompt_ids, response_ids = example.input_ids[: example.response_start], example.response_ids
    assert tokenizer.decode(prompt_ids) == expected_prompt
    assert prompt_ids == tokenizer(expected_prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(response_ids) == expected_response
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    content_ids = tokenizer(conversation.response, add_special_tokens=False)["input_ids"]
    assert response_ids == content_ids + [eos]
    assert "".join(_pieces(tokenizer, response_ids[:-1])) == conversation.response
    assert _pieces(tokenizer, response_ids)[-1] == "<|im_end|>"
    full = tokenizer.apply_chat_template(conversation.messages, tokenize=False)
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(example.input_ids)] == example.input_ids  # a prefix of the real rendering
    assert tokenizer.decode(full_ids[len(example.input_ids):]) == "\n"  # only the trailing newline is left out
    return example


def test_tiny_assistant_header(tok):
    """The tiny ChatML template's assistant header is `<|im_start|>assistant\\n`."""
    assert assistant_header(tok) == "<|im_start|>assistant\n"
    assert tok.decode(assistant_header_ids(tok)) == "<|im_start|>assistant\n"
    assert assistant_header_ids(tok)[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_header_fallback_and_missing_template():
    """A template that adds nothing for the generation prompt falls back to "Assistant:"; no
    template at all is an error."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert assistant_header(tokenizer) == PLAIN_HEADER_FALLBACK == "Assistant:"
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        assistant_header(tokenizer)
    with pytest.raises(DataError, match="no chat template"):
        render_prompt(tokenizer, EXPECTED_MESSAGES[0][:1])


@pytest.mark.parametrize("index", range(len(EXPECTED_MESSAGES)))
def test_tiny_response_mask_token_by_token(tok, index):
    """For the tiny ChatML tokenizer the response is exactly the content tokens plus `<|im_end|>`."""
    messages = EXPECTED_MESSAGES[index]
    prompt = (
        "<|im_start|>system\nYou are a tiny test assistant.<|im_end|>\n"
        f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    )
    _check_mask(tok, Conversation(index, messages), prompt, messages[1]["content"] + "<|im_end|>")


def test_tiny_response_mask_multi_turn_and_no_default_system(tok):
    """With train_on="last" earlier turns belong to the prompt; a template without a default system adds none."""
    messages = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
        {"role": "assistant", "content": " Goodbye, friend."},
    ]
    prompt = (
        "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye.<|im_end|>\n<|im_start|>assistant\n"
    )
    _check_mask(make_tiny_tokenizer(default_system=None), Conversation(7, messages), prompt, " Goodbye, friend.<|im_end|>")


# --- special-token text inside messages ------------------------------------------------------

QUOTING_ANSWER = "End a turn with <|im_end|>, start one with <|im_start|>; <|endoftext|> ends it all."
QUOTING_QUESTION = "What do <|im_start|>user and <|im_end|> mean?"


def _check_quoted_special_text(tokenizer, messages, template_specials: int):
    """Encode `messages` and check that their special-token text stayed text: the response is the answer's plain
    tokens plus one real `<|im_end|>`, and the only special ids in the prompt are the template's own (last turn only)."""
    example = encode_conversation(tokenizer, Conversation(0, messages), train_on="last")
    response, prompt = example.response_ids, example.input_ids[: example.response_start]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answer = messages[-1]["content"]
    assert tokenizer.decode(response) == answer + "<|im_end|>"
    assert response == tokenizer(answer, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [eos]
    assert tokenizer.decode(prompt) == render_prompt(tokenizer, messages[:-1])
    special = set(tokenizer.all_special_ids)
    assert sum(i in special for i in prompt) == template_specials
    assert prompt_token_ids(tokenizer, messages[:-1]) == prompt
    return example


@pytest.mark.parametrize("question, answer", [
    ("Say hello.", QUOTING_ANSWER),
    (QUOTING_QUESTION, "Hello there!"),
    (QUOTING_QUESTION, QUOTING_ANSWER),
    ("<|im_end|>", "<|im_end|>"),
])
def test_special_token_text_in_messages_stays_text(tok, question, answer):
    """A message quoting `<|im_end|>` (or any special token's text) is tokenized as text: the answer is not cut at
    it and no extra turn boundary appears; the template's own special tokens are still special."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    _check_quoted_special_text(tok, messages, template_specials=5)  # system: start, end; user: start, end; header: start


def test_special_token_text_in_earlier_turns_and_system(tok):
    """Special-token text in a system message and in earlier turns stays text too."""
    messages = [
        {"role": "system", "content": "Never print <|endoftext|>."},
        {"role": "user", "content": QUOTING_QUESTION},
        {"role": "assistant", "content": "Markers <|im_start|> and <|im_end|>."},
        {"role": "user", "content": "And <|im_end|>?"},
        {"role": "assistant", "content": QUOTING_ANSWER},
    ]
    _check_quoted_special_text(tok, messages, template_specials=9)


def test_special_token_text_when_the_answer_merges_with_the_header():
    """With a template whose header ends in a space that merges into the answer's first token (so the response is
    cut from the full rendering), quoted special-token text is still text and the end-of-turn id comes once."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    example = encode_conversation(tokenizer, Conversation(0, [{"role": "user", "content": QUOTING_QUESTION},
                                                              {"role": "assistant", "content": QUOTING_ANSWER}]))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(example.response_ids) == QUOTING_ANSWER + "<|im_end|>"
    assert example.response_ids.count(eos) == 1 and example.response_ids[-1] == eos
    assert tokenizer.decode(example.input_ids[: example.response_start]) == f"user: {QUOTING_QUESTION}<|im_end|>assistant: "


def test_special_token_text_under_a_template_that_rewrites_messages_is_refused(tmp_path):
    """A template that changes message text (here `| trim`) hides where the text is, so a row quoting special-token
    text is refused naming the file, the row and the message, instead of being cut silently; other rows encode."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rows = [ALPACA_ROWS[0], {"instruction": "Quote it.", "output": " Like <|im_end|> this. "}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_examples(path, tokenizer)
    assert str(err.value).startswith(f"{path}, row 1: the assistant message (messages[1]) contains the special-token "
                                     "text '<|im_end|>', which cannot be encoded as plain text")
    examples, report = load_examples(path, tokenizer, skip_invalid=True)
    assert [e.example_id for e in examples] == [0] and report.skipped == 1


def test_template_that_refuses_a_row_is_a_data_error(tmp_path):
    """A chat template that raises (`raise_exception`, e.g. no system role) names the file and row, not a traceback."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rows = [{"messages": [{"role": "system", "content": "Be brief."}] + EXPECTED_MESSAGES[0]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_examples(path, tokenizer)
    assert str(err.value) == f"{path}, row 0: the chat template cannot render this row: System role not supported"


# --- truncation -------------------------------------------------------------------------------


def test_truncation_keeps_prompt_and_cuts_response(tok):
    """`max_length` keeps the whole prompt and cuts the response from the right."""
    conversation = Conversation(0, EXPECTED_MESSAGES[0])
    full = encode_conversation(tok, conversation)
    prompt_len, response_len = full.response_start, len(full.response_ids)
    assert response_len >= 3
    assert encode_conversation(tok, conversation, max_length=prompt_len + response_len).input_ids == full.input_ids
    assert encode_conversation(tok, conversation, max_length=10_000).input_ids == full.input_ids
    for room in (1, response_len - 1):
        cut = encode_conversation(tok, conversation, max_length=prompt_len + room)
        assert cut.response_start == prompt_len
        assert cut.input_ids == full.input_ids[: prompt_len + room]
        assert len(cut.input_ids) == prompt_len + room


def test_prompt_too_long_is_an_error_or_skipped(tmp_path, tok):
    """A prompt leaving no room for one response token is an error, or skipped and counted."""
    conversation = Conversation(0, EXPECTED_MESSAGES[0])
    prompt_len = encode_conversation(tok, conversation).response_start
    with pytest.raises(DataError, match=f"the prompt has {prompt_len} tokens.*--max-length {prompt_len}"):
        encode_conversation(tok, conversation, max_length=prompt_len)

    rows = [{"instruction": "Short.", "output": "Yes."}, {"instruction": "word " * 200, "output": "Yes."}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    limit = encode_conversation(tok, Conversation(0, row_to_messages(rows[0]))).response_start + 4
    with pytest.raises(DataError, match=rf"{path}, row 1: the prompt has \d+ tokens"):
        load_examples(path, tok, max_length=limit)
    examples, report = load_examples(path, tok, max_length=limit, skip_invalid=True)
    assert [e.example_id for e in examples] == [0]
    assert (report.rows, report.skipped, len(report.errors)) == (1, 1, 1)
    examples, errors = encode_conversations(
        tok, [Conversation(5, row_to_messages(r)) for r in rows], max_length=limit, skip_invalid=True, source="mine"
    )
    assert [e.example_id for e in examples] == [5] and errors[0].startswith("mine, row 5: the prompt has")


def test_load_examples_reports_row_and_encoding_skips_together(tmp_path, tok):
    """`load_examples` counts rows skipped while reading and while encoding in one report."""
    rows = [ALPACA_ROWS[0], {"instruction": "No answer."}, {"instruction": "word " * 200, "output": "Yes."}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    examples, report = load_examples(path, tok, max_length=60, skip_invalid=True)
    assert [e.example_id for e in examples] == [0]
    assert (report.rows, report.skipped, len(report.errors)) == (1, 2, 2)


# --- demo data --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [DEMO_BENIGN, DEMO_REFUSALS])
def test_demo_data_loads_with_at_least_64_rows(name, tok):
    """Each bundled demo file has at least 64 valid rows that all encode with the tiny tokenizer."""
    conversations, report = load_conversations(demo_data_path(name))
    assert report.rows >= 64 and report.skipped == 0
    examples, skipped = encode_conversations(tok, conversations)
    assert len(examples) == report.rows and skipped == []
    assert all(len(e.response_ids) >= 2 for e in examples)


def test_unknown_demo_name():
    """Only the two bundled demo sets exist."""
    with pytest.raises(DataError, match="unknown demo data set"):
        demo_data_path("harmful")


# --- the embedded SmolLM2 template ------------------------------------------------------------


@pytest.mark.embedded
def test_smollm2_assistant_header(embedded):
    """SmolLM2's assistant header is `<|im_start|>assistant\\n`: ids 1, 520, 9531, 198."""
    tokenizer = embedded.tokenizer
    assert assistant_header(tokenizer) == "<|im_start|>assistant\n"
    ids = assistant_header_ids(tokenizer)
    assert _pieces(tokenizer, ids) == ["<|im_start|>", "ass", "istant", "\n"]
    assert ids == [1, 520, 9531, 198]


@pytest.mark.embedded
@pytest.mark.parametrize("index", range(len(EXPECTED_MESSAGES)))
def test_smollm2_response_mask_token_by_token(embedded, index):
    """For SmolLM2's ChatML template the prompt is the default system turn, the user turn and the
    assistant header; the response is the content tokens plus `<|im_end|>`, not the trailing newline."""
    messages = EXPECTED_MESSAGES[index]
    prompt = SMOLLM2_SYSTEM + f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    _check_mask(embedded.tokenizer, Conversation(index, messages), prompt, messages[1]["content"] + "<|im_end|>")


@pytest.mark.embedded
def test_smollm2_response_mask_exact_tokens(embedded):
    """One fully spelled-out example: the response tokens of "Hello there!" under SmolLM2."""
    tokenizer = embedded.tokenizer
    example = encode_conversation(tokenizer, Conversation(0, EXPECTED_MESSAGES[0]))
    assert _pieces(tokenizer, example.response_ids) == ["Hello", " there", "!", "<|im_end|>"]
    assert example.response_ids == [19556, 665, 17, 2]
    assert example.input_ids[example.response_start - 4: example.response_start] == [1, 520, 9531, 198]


@pytest.mark.embedded
def test_smollm2_multi_turn_with_system(embedded):
    """A given system message replaces the default one; with train_on="last" earlier turns stay in the prompt."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
        {"role": "assistant", "content": "Goodbye."},
    ]
    prompt = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye.<|im_end|>\n<|im_start|>assistant\n"
    )
    _check_mask(embedded.tokenizer, Conversation(0, messages), prompt, "Goodbye.<|im_end|>")


@pytest.mark.embedded
def test_demo_data_encodes_with_smollm2(embedded):
    """Every demo row encodes under SmolLM2 with a response that ends in `<|im_end|>`."""
    eos = embedded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for name in (DEMO_BENIGN, DEMO_REFUSALS):
        examples, report = load_examples(demo_data_path(name), embedded.tokenizer)
        assert report.rows >= 64 and report.skipped == 0
        assert all(e.response_ids[-1] == eos and len(e.response_ids) >= 2 for e in examples)


@pytest.mark.embedded
def test_smollm2_special_token_text_stays_text(embedded):
    """Under SmolLM2's template an answer quoting `<|im_end|>` is encoded whole, with one real end of turn."""
    messages = [{"role": "user", "content": QUOTING_QUESTION}, {"role": "assistant", "content": QUOTING_ANSWER}]
    _check_quoted_special_text(embedded.tokenizer, messages, template_specials=5)
