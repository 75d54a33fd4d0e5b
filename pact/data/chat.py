"""Chat-template tokenization: a conversation rendered with the model's chat template, and its response tokens found
(`encode_conversation`, `load_examples`), the assistant header the post-only context starts with, prompts rendered
for generation.

Message text is always tokenized as text: an answer that quotes a special token (`<|im_end|>`) keeps those
characters instead of ending the turn there (see "Special-token text inside messages" below).

Truncation policy (`max_length`): the prompt (everything before the first response) is always kept whole and later
turns are cut from the right so the sequence fits (response spans clipped, empty ones dropped); a row whose prompt
alone leaves no room for one response token is invalid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from pact.data.rows import Conversation, LoadReport, load_conversations
from pact.data.sources import DEFAULT_SPLIT, DataError
from pact.errors import InvalidSetting

PLAIN_HEADER_FALLBACK = "Assistant:"


@dataclass
class EncodedExample:
    """A tokenized row: `spans` are the (start, end) token ranges of its responses, one per assistant turn trained on.

    Each span runs up to and including its turn's end-of-turn token;
    `response_start` is the first span's start (everything before it is the
    prompt). Without `spans` the response is `input_ids[response_start:]`.
    """

    example_id: int
    input_ids: list[int]
    response_start: int
    spans: list[tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        """Default to one response running from `response_start` to the end (a single-turn row)."""
        if self.spans is None:
            self.spans = [(self.response_start, len(self.input_ids))]

    @property
    def response_ids(self) -> list[int]:
        """The assistant's tokens, the positions the objective is computed on (every span, in order)."""
        return [token for start, end in self.spans for token in self.input_ids[start:end]]


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of every special token (end of turn, BOS, pad, ...), registered or added."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def _special_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The texts the tokenizer reads as special tokens when it parses them (e.g. `<|im_end|>`), longest first."""
    texts = set(tokenizer.all_special_tokens)
    texts.update(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    return sorted((text for text in texts if text), key=len, reverse=True)


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str, plain: bool = False) -> list[int]:
    """Token ids of `text` without added BOS/EOS; `plain` reads special-token texts in it as ordinary text."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=plain)["input_ids"])


def _require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer without a chat template: rows are rendered with it."""
    if not tokenizer.chat_template:
        raise DataError("the tokenizer has no chat template, so rows cannot be rendered as chat; use an instruction-tuned model")


def _apply_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text for `messages`; a template that refuses them (`raise_exception`) is a `DataError`."""
    from jinja2 import TemplateError

    _require_chat_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        raise DataError(f"the chat template cannot render this row: {err}") from None


def assistant_header(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the chat template adds for `add_generation_prompt=True` (the post-only context's prefix).

    Falls back to "Assistant:" when the template adds nothing.
    """
    probe = [{"role": "user", "content": "x"}]
    without = _apply_template(tokenizer, probe, add_generation_prompt=False)
    with_prompt = _apply_template(tokenizer, probe, add_generation_prompt=True)
    if with_prompt.startswith(without) and len(with_prompt) > len(without):
        return with_prompt[len(without):]
    return PLAIN_HEADER_FALLBACK


def assistant_header_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of `assistant_header`."""
    return _tokens(tokenizer, assistant_header(tokenizer))


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The chat-template text up to where the assistant's answer starts (generation prompt on)."""
    return _apply_template(tokenizer, messages, add_generation_prompt=True)


Segments = list[tuple[str, bool]]
_CONTENT_MARK = "\ue000pact-message-{}\ue001"


def _has_special_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> bool:
    """Whether any message's text contains a special token's text."""
    texts = _special_texts(tokenizer)
    return any(text in message["content"] for message in messages for text in texts)


def _special_text_error(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], why: str) -> DataError:
    """The error for a row whose special-token text cannot be encoded as plain text, naming the message and the text."""
    texts = _special_texts(tokenizer)
    index, found = next((i, t) for i, m in enumerate(messages) for t in texts if t in m["content"])
    return DataError(f"the {messages[index]['role']} message (messages[{index}]) contains the special-token text {found!r}, "
                     f"which cannot be encoded as plain text with this tokenizer ({why}); remove it from the data")


def _content_segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool,
                      text: str) -> Segments | None:
    """`text`, the rendering of `messages`, cut into (piece, is_message_text) pieces; None if the template rewrites messages.

    The template is rendered once more with a unique mark in place of each
    message's text, so template text and message text are told apart without
    guessing; the pieces must join back into `text` exactly.
    """
    marks = [_CONTENT_MARK.format(i) for i in range(len(messages))]
    marked = _apply_template(tokenizer, [{**m, "content": mark} for m, mark in zip(messages, marks)], add_generation_prompt)
    segments: Segments = []
    last = 0
    for match in re.finditer("|".join(map(re.escape, marks)), marked):
        segments += [(marked[last:match.start()], False), (messages[marks.index(match.group())]["content"], True)]
        last = match.end()
    segments.append((marked[last:], False))
    return segments if "".join(piece for piece, _ in segments) == text else None


def _stretches(tokenizer: PreTrainedTokenizerBase, segments: Segments) -> list[str | int]:
    """The text between the template's special tokens (strings) and those tokens' ids (ints), in order."""
    pattern = re.compile("|".join(map(re.escape, _special_texts(tokenizer))))
    stretches: list[str | int] = [""]
    for piece, is_message in segments:
        last = 0
        for match in ([] if is_message else pattern.finditer(piece)):
            stretches[-1] += piece[last:match.start()]
            stretches += [tokenizer.convert_tokens_to_ids(match.group()), ""]
            last = match.end()
        stretches[-1] += piece[last:]
    return stretches


def _stretch_ids(tokenizer: PreTrainedTokenizerBase, stretches: list[str | int], plain: bool) -> list[int]:
    """Token ids of `stretches`, each text tokenized on its own (`plain`: special-token texts as ordinary text)."""
    ids: list[int] = []
    for stretch in stretches:
        ids += [stretch] if isinstance(stretch, int) else _tokens(tokenizer, stretch, plain)
    return ids


def _plain_message_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], segments: Segments | None) -> list[int]:
    """Token ids of the joined `segments` with the messages' special-token texts as ordinary text (see the notes above)."""
    if segments is None:
        raise _special_text_error(tokenizer, messages, "the chat template changes the message text")
    stretches = _stretches(tokenizer, segments)
    if _stretch_ids(tokenizer, stretches, plain=False) != _tokens(tokenizer, "".join(piece for piece, _ in segments)):
        raise _special_text_error(tokenizer, messages, "it tokenizes across special tokens")
    return _stretch_ids(tokenizer, stretches, plain=True)


def _slice_segments(segments: Segments, start: int, end: int) -> Segments:
    """The characters `start:end` of the joined `segments`, still cut into (piece, is_message_text) pieces."""
    kept: Segments = []
    position = 0
    for piece, is_message in segments:
        part = piece[max(start - position, 0):max(end - position, 0)]
        if part:
            kept.append((part, is_message))
        position += len(piece)
    return kept


def _render_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool
                ) -> tuple[str, list[int], Segments | None]:
    """The rendering of `messages`, its token ids (message text always as text), and its pieces when they were needed.

    The pieces are None when no message contains special-token text (then the
    ids are the ordinary tokenization of the rendering).
    """
    text = _apply_template(tokenizer, messages, add_generation_prompt)
    if not _has_special_text(tokenizer, messages):
        return text, _tokens(tokenizer, text), None
    segments = _content_segments(tokenizer, messages, add_generation_prompt, text)
    return text, _plain_message_ids(tokenizer, messages, segments), segments


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `render_prompt(messages)`, the messages' text tokenized as text (a quoted `<|im_end|>` stays text)."""
    return _render_ids(tokenizer, messages, add_generation_prompt=True)[1]


TRAIN_ON = ("all", "last")


def _check_train_on(train_on: str) -> None:
    """Refuse a `train_on` other than "all" (every assistant turn is a response) or "last" (only the final one)."""
    if train_on not in TRAIN_ON:
        raise InvalidSetting("train_on", f"train_on must be one of {TRAIN_ON}, got {train_on!r}")


def _turn_bounds(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], full_text: str, turns: list[int]
                 ) -> list[tuple[int, int]]:
    """For each assistant message index in `turns`, the characters of `full_text` where its answer starts and its turn ends.

    The answer starts where the template's rendering of the messages before it,
    with the generation prompt, ends; the turn ends where the rendering up to
    and including it ends. Both renderings must be prefixes of the whole one.
    """
    bounds = []
    for turn in turns:
        start = _apply_template(tokenizer, messages[:turn], add_generation_prompt=True)
        end = _apply_template(tokenizer, messages[:turn + 1], add_generation_prompt=False)
        if not (full_text.startswith(start) and full_text.startswith(end) and len(start) <= len(end)):
            raise DataError(f"the chat template renders the conversation before the assistant message messages[{turn}] "
                            "differently when more messages follow; cannot locate that response (use --train-on last)")
        bounds.append((len(start), len(end)))
    return bounds


def _piece_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], text: str, segments: Segments | None,
               start: int, end: int) -> list[int]:
    """Token ids of `text[start:end]` alone, message text read as text (see "Special-token text inside messages")."""
    if segments is None:
        return _tokens(tokenizer, text[start:end])
    return _plain_message_ids(tokenizer, messages, _slice_segments(segments, start, end))


def _ids_with_cuts(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], text: str, full_ids: list[int],
                   segments: Segments | None, cuts: list[int]) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the token index of each character cut in `cuts` (ascending).

    The whole rendering's tokenization is kept when every cut falls between
    two of its tokens (the tokenization of the text before the cut is a prefix
    of it); otherwise the text is tokenized piece by piece between the cuts, so
    no token straddles where a response starts or a turn ends.
    """
    prefixes = [_piece_ids(tokenizer, messages, text, segments, 0, cut) for cut in cuts]
    if all(full_ids[:len(prefix)] == prefix for prefix in prefixes):
        return full_ids, [len(prefix) for prefix in prefixes]
    ids: list[int] = []
    indices = []
    for begin, cut in zip([0, *cuts], [*cuts, len(text)]):
        indices.append(len(ids))
        ids += _piece_ids(tokenizer, messages, text, segments, begin, cut)
    return ids, indices[1:]


def _span_end(tokenizer: PreTrainedTokenizerBase, ids: list[int], start: int, turn_end: int, special: set[int]) -> int:
    """Where the response starting at `start` ends: after the first special token (end of turn) before `turn_end`,
    else after its last token that is not whitespace."""
    end = next((i + 1 for i in range(start, turn_end) if ids[i] in special), None)
    if end is None:
        end = turn_end
        while end > start and not tokenizer.decode(ids[end - 1:end]).strip():
            end -= 1
    return end


def _truncate(ids: list[int], spans: list[tuple[int, int]], max_length: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Cut `ids` to `max_length` from the right: the prompt before the first response stays whole, spans are clipped
    and those left empty dropped; a prompt that leaves no room for one response token is a `DataError`."""
    prompt = spans[0][0]
    if max_length - prompt < 1:
        raise DataError(f"the prompt has {prompt} tokens, leaving no room for the response within --max-length {max_length}")
    clipped = [(start, min(end, max_length)) for start, end in spans if start < max_length]
    return ids[:max_length], clipped


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, max_length: int | None = None, train_on: str = "all"
) -> EncodedExample:
    """Tokenize a conversation and locate its response spans, one per assistant turn trained on.

    `train_on="all"` (TRL's default) makes every assistant message a response,
    `"last"` only the final one (the others are context). A response is the
    assistant message up to and including the first special token the template
    adds after it (the end-of-turn token); anything the template appends after
    that (e.g. a newline) is not part of it. An earlier assistant message that
    renders to no token but special ones (an empty turn) is context, not a
    response; the final one must have text. Special-token text inside the
    messages is tokenized as ordinary text.
    """
    _check_train_on(train_on)
    messages = conversation.messages
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    turns = turns if train_on == "all" else turns[-1:]
    full_text, full_ids, segments = _render_ids(tokenizer, messages, add_generation_prompt=False)
    bounds = _turn_bounds(tokenizer, messages, full_text, turns)
    cuts = sorted({cut for bound in bounds for cut in bound})
    ids, indices = _ids_with_cuts(tokenizer, messages, full_text, full_ids, segments, cuts)
    token_at = dict(zip(cuts, indices))
    special = _special_ids(tokenizer)
    spans = []
    for turn, (start, turn_end) in zip(turns, bounds):
        begin = token_at[start]
        end = _span_end(tokenizer, ids, begin, token_at[turn_end], special)
        if all(token in special for token in ids[begin:end]):
            if turn == turns[-1]:
                raise DataError(f"the response (messages[{turn}]) renders to zero tokens")
            continue
        spans.append((begin, end))
    ids = ids[:spans[-1][1]]
    if max_length is not None:
        ids, spans = _truncate(ids, spans, max_length)
    return EncodedExample(conversation.example_id, ids, spans[0][0], spans)


def encode_conversations(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    max_length: int | None = None,
    skip_invalid: bool = False,
    source: str = "data",
    train_on: str = "all",
) -> tuple[list[EncodedExample], list[str]]:
    """Encode many conversations; errors name `source` and the row, or are collected with `skip_invalid`."""
    _check_train_on(train_on)
    encoded, errors = [], []
    for conversation in conversations:
        try:
            encoded.append(encode_conversation(tokenizer, conversation, max_length, train_on))
        except DataError as err:
            message = f"{source}, row {conversation.example_id}: {err}"
            if not skip_invalid:
                raise DataError(message) from None
            errors.append(message)
    if not encoded:
        raise DataError(f"{source}: no row could be encoded ({errors[0] if errors else 'no rows'})")
    return encoded, errors


def load_examples(
    source,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
    train_on: str = "all",
    *,
    data_format: str | None = None,
    dataset_split: str = DEFAULT_SPLIT,
    dataset_config: str | None = None,
) -> tuple[list[EncodedExample], LoadReport]:
    """Read, validate and tokenize data in one call (the usual entry point): `source` and the data settings as in
    `load_conversations`, `train_on` as in `encode_conversation`."""
    _check_train_on(train_on)
    conversations, report = load_conversations(source, skip_invalid=skip_invalid, limit=limit, data_format=data_format,
                                               dataset_split=dataset_split, dataset_config=dataset_config)
    encoded, errors = encode_conversations(tokenizer, conversations, max_length, skip_invalid, report.path, train_on)
    report.errors.extend(errors)
    return encoded, LoadReport(report.path, len(encoded), report.skipped + len(errors), report.errors, report.fingerprint)
