"""Safety tokens (docs/objective.md section 1): the vocabulary entries on which the
aligned model's refusals differ most from its base model, with their weights.

They are computed once per aligned model from harmful prompts paired with
refusals, saved as JSON, and restrict the PACT objective (and the cache) to a
small set of columns.

Choices the design leaves open, made here:

* "the first K examples (skipping any whose response is empty)" means the
  first `max_examples` conversations given; those among them whose stripped
  response is empty are skipped, so fewer than K may be used
  (`params["examples_used"]` records how many were).
* The aligned model's prompt is the chat template's text (generation prompt
  on) tokenized without special tokens, since the template writes its own.
  The base model's plain prompt is ordinary text and is tokenized the way its
  tokenizer encodes text by default (with special tokens: a BOS where the
  tokenizer adds one). The refusal is tokenized on its own, without special
  tokens, and appended to both token lists unchanged, so both models are
  scored on the same response ids.
* The rows' own text is always tokenized as text: a prompt or refusal that
  quotes a special token (`<|im_end|>`) keeps those characters as ordinary
  tokens (`pact.data.chat.prompt_token_ids`, `split_special_tokens`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pact.data.chat import prompt_token_ids
from pact.data.rows import Conversation
from pact.data.sources import DataError
from pact.checks import check_device, check_setting
from pact.devices import DTYPES
from pact.errors import InvalidSetting, PactError
from pact.models.loading import LoadedModel, pad_token_id, tokenizer_fingerprint, tokenizer_matches
from pact.models.parts import causal_lm_parts, float32_logits
from pact.objective.reference import response_hidden_states

DIFF_MODES = ("p_diff", "pref_logratio")
PLAIN_TEMPLATE = "User: {prompt}\n\nAssistant: "
FILE_FORMAT = "pact-safety-tokens"
FILE_VERSION = 1
_NONZERO = 1e-9
_EPS = 1e-6


class SafetyTokensFileError(PactError):
    """A safety-token file is missing, not JSON, or has a malformed field; the message names both."""


@dataclass
class SafetyTokens:
    """The safety-token set S: sorted ids, their weights max(v, 0), and how they were made.

    ids: sorted token ids; weights: one float >= 0 per id; tokens: each id
    decoded on its own; params: every input of the computation (see
    `compute_safety_tokens`); fingerprints: `aligned_model`, `base_model` and
    `tokenizer` (the aligned tokenizer, chat template included), so a cache or
    trainer can refuse a set made for another model.
    """

    ids: list[int]
    weights: list[float]
    tokens: list[str]
    params: dict = field(default_factory=dict)
    fingerprints: dict = field(default_factory=dict)

    def __len__(self) -> int:
        """|S|, the number of safety tokens."""
        return len(self.ids)

    def id_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ids as a long tensor, for indexing logit columns."""
        return torch.tensor(self.ids, dtype=torch.long, device=device)

    def weight_tensor(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights as a tensor aligned with `id_tensor` (the objective's `w`)."""
        return torch.tensor(self.weights, dtype=dtype, device=device)

    def to_dict(self) -> dict:
        """Plain JSON-ready form, tagged with the file format and version."""
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "ids": list(self.ids),
            "weights": list(self.weights),
            "tokens": list(self.tokens),
            "params": dict(self.params),
            "fingerprints": dict(self.fingerprints),
        }

    def save(self, path: str | Path) -> Path:
        """Write the set as JSON (never a pickle), atomically, creating parent folders."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(self.to_dict(), out, indent=2, ensure_ascii=False)
                out.write("\n")
            os.replace(staging, path)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SafetyTokens":
        """Read and validate a file written by `save`; any problem raises `SafetyTokensFileError` naming the file and field."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise SafetyTokensFileError(f"{path} is a directory, not a safety-token file (give the .json file inside it)")
        if not path.is_file():
            raise SafetyTokensFileError(f"safety-token file not found: {path}")
        try:
            data = json.loads(path.read_bytes().decode("utf-8-sig"))
        except json.JSONDecodeError as err:
            raise SafetyTokensFileError(f"{path}: not a JSON safety-token file (invalid JSON at line {err.lineno} "
                                        f"column {err.colno}: {err.msg}; truncated?)") from err
        except (UnicodeDecodeError, RecursionError) as err:
            raise SafetyTokensFileError(f"{path}: not a JSON safety-token file ({type(err).__name__}: {err})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: object, source: str = "safety tokens") -> "SafetyTokens":
        """Validate the output of `to_dict` (e.g. read back from JSON); `source` names it in errors.

        Checks what the file alone can show (types, lengths, sorted unique ids,
        finite non-negative weights with one positive); whether it fits a
        tokenizer is `check_tokenizer`'s part.
        """
        if not isinstance(data, dict):
            raise SafetyTokensFileError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FILE_FORMAT:
            raise _field_error(source, "format", f"must be {FILE_FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") != FILE_VERSION:
            raise _field_error(source, "version", f"must be {FILE_VERSION}, got {data.get('version')!r} (written by another pact version?)")
        for name, kind in (("ids", list), ("weights", list), ("tokens", list), ("params", dict), ("fingerprints", dict)):
            if name not in data:
                raise _field_error(source, name, "is missing")
            if not isinstance(data[name], kind):
                raise _field_error(source, name, f"must be a JSON {'array' if kind is list else 'object'}, got {type(data[name]).__name__}")
        ids, weights, tokens = data["ids"], data["weights"], data["tokens"]
        if not ids:
            raise _field_error(source, "ids", "is empty")
        _check_entries(source, "ids", ids, lambda i: not isinstance(i, bool) and isinstance(i, int) and i >= 0,
                       "must be a non-negative integer (a token id)")
        unsorted = next((k for k in range(1, len(ids)) if ids[k] <= ids[k - 1]), None)
        if unsorted is not None:
            raise _field_error(source, "ids", f"must be sorted in increasing order without duplicates, but entry {unsorted} "
                                              f"({ids[unsorted]}) follows {ids[unsorted - 1]}")
        for name, values in (("weights", weights), ("tokens", tokens)):
            if len(values) != len(ids):
                raise _field_error(source, name, f"has {len(values)} entries but 'ids' has {len(ids)}")
        _check_entries(source, "weights", weights,
                       lambda w: not isinstance(w, bool) and isinstance(w, (int, float)) and abs(w) <= sys.float_info.max,
                       "must be a finite number")
        _check_entries(source, "weights", weights, lambda w: w >= 0, "must be >= 0 (weights are max(v, 0))")
        if not any(w > 0 for w in weights):
            raise _field_error(source, "weights", "has no positive weight, so the objective would have no target")
        _check_entries(source, "tokens", tokens, lambda t: isinstance(t, str), "must be a string (the token's text)")
        for key in ("aligned_model", "base_model", "tokenizer"):
            if not isinstance(data["fingerprints"].get(key), str):
                raise _field_error(source, f"fingerprints.{key}", "is missing or not a string")
        return cls(
            ids=list(ids),
            weights=[float(w) for w in weights],
            tokens=list(tokens),
            params=dict(data["params"]),
            fingerprints=dict(data["fingerprints"]),
        )

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase, source: str = "safety tokens") -> None:
        """Refuse a set made for another tokenizer, before any model is loaded; `source` names the set in errors.

        The set's tokenizer fingerprint (when recorded) must be the tokenizer's,
        every id must be inside its vocabulary, and every token text must be
        what it decodes the id to.
        """
        made_for = self.fingerprints.get("tokenizer")
        if made_for and not tokenizer_matches(tokenizer, made_for):
            raise _field_error(source, "fingerprints.tokenizer",
                               f"is {made_for} but this model's tokenizer is {tokenizer_fingerprint(tokenizer)}: the safety tokens were computed "
                               "for another tokenizer; compute them for this model with `pact safety-tokens --aligned MODEL`")
        size = len(tokenizer)
        outside = next((k for k, i in enumerate(self.ids) if i >= size), None)
        if outside is not None:
            raise _field_error(source, "ids", f"entry {outside} ({self.ids[outside]}) is outside the tokenizer's vocabulary "
                                              f"of {size} tokens")
        for k, (i, text) in enumerate(zip(self.ids, self.tokens)):
            decoded = tokenizer.decode([i])
            if text != decoded:
                raise _field_error(source, "tokens", f"entry {k} is {text!r} but the tokenizer decodes id {i} to {decoded!r}: "
                                                     "the file does not belong to this tokenizer")


def _field_error(source: str, field_name: str, problem: str) -> SafetyTokensFileError:
    """The error for a bad field of a safety-token file: `<source>: field '<name>' <problem>`."""
    return SafetyTokensFileError(f"{source}: field '{field_name}' {problem}")


def _check_entries(source: str, field_name: str, values: list, valid: Callable[[object], bool], rule: str) -> None:
    """Refuse the first entry of `values` that is not `valid`, naming the field, its index and its value."""
    bad = next((k for k, value in enumerate(values) if not valid(value)), None)
    if bad is not None:
        raise _field_error(source, field_name, f"entry {bad} ({json.dumps(values[bad])}) {rule}")


def check_procedure(top: int, max_examples: int, max_resp_len: int, diff_mode: str, temperature: float, batch_size: int) -> None:
    """Refuse parameters the procedure cannot use (`InvalidSetting` naming each): the one check of
    `SafetyTokenArguments` and of `compute_safety_tokens` called from Python."""
    if diff_mode not in DIFF_MODES:
        raise InvalidSetting("diff_mode", f"diff_mode must be one of {', '.join(DIFF_MODES)}, got {diff_mode!r}")
    for name, value in (("top", top), ("max_examples", max_examples), ("max_resp_len", max_resp_len), ("batch_size", batch_size)):
        check_setting(name, value, 1, integer=True)
    check_setting("temperature", temperature, 0, low_open=True)


@dataclass
class SafetyTokenArguments:
    """What `pact safety-tokens` computes (docs/objective.md section 1): the models, the refusal data, the procedure's
    parameters and where the file goes, declared once; the command's flags are generated from these fields.
    Construction refuses a value the procedure cannot use (`InvalidSetting` naming the field)."""

    aligned: str | None = field(default=None, metadata={
        "help": "aligned chat model: local directory, hub id, .gguf file, or 'smollm2-135m-instruct' (default: the embedded model)"})
    base: str | None = field(default=None, metadata={
        "help": "its base model, same tokenizer required (default: the aligned model itself, contrasting its chat template "
                "with the plain 'User: ... Assistant: ' template)"})
    data: str | None = field(default=None, metadata={
        "help": "harmful prompts paired with refusals: a file (.jsonl/.json/.csv/.tsv/.parquet/.arrow, optionally "
                "compressed), a save_to_disk folder or a hub dataset id; rows in any --format (default: the bundled demo refusals)"})
    top: int = field(default=50, metadata={"help": "keep the tokens the aligned model puts most mass on (the largest mean p_A)"})
    max_examples: int = field(default=512, metadata={
        "help": "use the first K rows of the data; rows with an empty response among them are skipped"})
    max_resp_len: int = field(default=64, metadata={"help": "score only the first N tokens of each refusal"})
    diff_mode: str = field(default="p_diff", metadata={
        "help": "per-step difference: p_diff = p_A - p_B; pref_logratio = p_A * (log p_B - log p_A)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature applied to both models' logits"})
    batch_size: int = field(default=8, metadata={
        "help": "examples per forward pass (speed/memory only; results do not depend on it)"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA if available), cpu, cuda or cuda:N"})
    dtype: str = field(default="auto", metadata={
        "help": "model weights dtype: auto (bfloat16 on a GPU that supports it, float16 on an older one, float32 on CPU), "
                "float32, bfloat16, float16; probabilities are always computed in float32"})
    skip_invalid: bool = field(default=False, metadata={
        "help": "skip malformed data rows (counted and reported) instead of stopping at the first one"})
    out: str | None = field(default=None, metadata={
        "help": "where to write the safety-token JSON file (required unless 'show' is used)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        """Refuse settings `compute_safety_tokens` cannot use, naming each field."""
        check_procedure(self.top, self.max_examples, self.max_resp_len, self.diff_mode, self.temperature, self.batch_size)
        check_device("device", self.device)
        if self.dtype not in DTYPES:
            raise InvalidSetting("dtype", f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def check_same_tokenizer(aligned: PreTrainedTokenizerBase, base: PreTrainedTokenizerBase, aligned_source: str, base_source: str) -> None:
    """Both models must share a vocabulary, or their distributions cannot be compared token by token."""
    if aligned.get_vocab() != base.get_vocab():
        raise PactError(
            f"the aligned model ({aligned_source}) and the base model ({base_source}) have different tokenizer "
            "vocabularies; safety tokens compare both models token by token, so the base must be the aligned "
            "model's own base (same tokenizer)"
        )


def _check_same_vocabulary(aligned: LoadedModel, base: LoadedModel) -> int:
    """Both models must share a vocabulary and an output size; returns that size."""
    check_same_tokenizer(aligned.tokenizer, base.tokenizer, aligned.source, base.source)
    sizes = {causal_lm_parts(m.model)[1].shape[0] for m in (aligned, base)}
    if len(sizes) != 1:
        raise PactError(f"the aligned and base models have different output vocabulary sizes {sorted(sizes)}")
    return sizes.pop()


def _encode(aligned: PreTrainedTokenizerBase, base: PreTrainedTokenizerBase, conversation: Conversation,
            max_resp_len: int) -> tuple[list[int], list[int], list[int]]:
    """Token ids of (aligned prompt, base prompt, response) for one example; see the module notes.

    The rows' text is tokenized as text: a refusal quoting `<|im_end|>` keeps
    those characters instead of getting the end-of-turn token.
    """
    response = aligned(conversation.response.strip(), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    aligned_prompt = prompt_token_ids(aligned, conversation.messages[:-1])
    base_prompt = base(PLAIN_TEMPLATE.format(prompt=conversation.prompt), split_special_tokens=True)["input_ids"]
    return list(aligned_prompt), list(base_prompt), list(response)[:max_resp_len]


def encode_refusals(aligned: PreTrainedTokenizerBase, base: PreTrainedTokenizerBase, conversations: Sequence[Conversation],
                    max_resp_len: int, skip_invalid: bool = False, source: str = "data"
                    ) -> tuple[list[Conversation], list[tuple[list[int], list[int], list[int]]], list[str]]:
    """Encode examples as `compute_safety_tokens` scores them (see the module notes): (those kept, their ids, errors).

    Needs only the tokenizers, so `pact safety-tokens` checks the data this
    way before loading a model. A row the chat template cannot render raises
    `DataError` naming `source` and the row, or with `skip_invalid` is left
    out and described in the errors.
    """
    kept, encoded, errors = [], [], []
    for conversation in conversations:
        try:
            encoded.append(_encode(aligned, base, conversation, max_resp_len))
            kept.append(conversation)
        except DataError as err:
            message = f"{source}, row {conversation.example_id}: {err}"
            if not skip_invalid:
                raise DataError(message) from None
            errors.append(message)
    return kept, encoded, errors


def _response_logprobs(loaded: LoadedModel, prompts: list[list[int]], responses: list[list[int]], temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) over the full vocabulary at every response step, as [sum n_resp, V] float32.

    Only the positions that predict response tokens are projected to the
    vocabulary, and the projection runs in float32 even for half-precision
    models (bfloat16 logits would be off by ~0.1, i.e. ~10% in probability).
    """
    _, head = causal_lm_parts(loaded.model)
    sequences = [p + r for p, r in zip(prompts, responses)]
    starts = [len(p) for p in prompts]
    hidden = response_hidden_states(loaded.model, sequences, starts, pad_token_id(loaded.tokenizer), head.device)
    return torch.log_softmax(float32_logits(hidden, head) / temperature, dim=-1)


@torch.inference_mode()
def compute_safety_tokens(
    aligned: LoadedModel,
    base: LoadedModel | None,
    conversations: Sequence[Conversation],
    top: int = 50,
    max_examples: int = 512,
    max_resp_len: int = 64,
    diff_mode: str = "p_diff",
    temperature: float = 1.0,
    batch_size: int = 8,
    progress: bool = True,
    data_path: str | None = None,
) -> SafetyTokens:
    """Compute the safety-token set S and its weights exactly as docs/objective.md section 1 specifies.

    Scores the refusals of the first `max_examples` conversations under the
    aligned model (chat template) and the base model (plain "User: ...
    Assistant: " template), averages the per-step difference `d_t` (`p_diff`:
    p_A - p_B; `pref_logratio`: p_A * (log p_B - log p_A)) per example and then
    over examples, keeps the `top` tokens the aligned model puts most mass on,
    standardises and L2-normalises their values, and returns the tokens with a
    non-zero value, weighted by max(value, 0).

    `base=None` (or the aligned model itself) contrasts the aligned model with
    itself under the plain template. `batch_size` only changes speed (results
    agree with one-at-a-time up to float rounding). `data_path` is recorded in
    `params` so a file says which data it came from.
    """
    check_procedure(top, max_examples, max_resp_len, diff_mode, temperature, batch_size)
    base = base or aligned
    vocab_size = _check_same_vocabulary(aligned, base)
    window = list(conversations)[:max_examples]
    chosen = [c for c in window if c.response.strip()]
    if not chosen:
        raise PactError(f"none of the first {len(window)} examples has a non-empty response")
    _, encoded_all, _ = encode_refusals(aligned.tokenizer, base.tokenizer, chosen, max_resp_len, source=data_path or "data")

    # Longest first: batches of similar lengths waste little padding, and running out of memory shows at once.
    encoded_all.sort(key=lambda e: max(len(e[0]), len(e[1])) + len(e[2]), reverse=True)
    d_sum = torch.zeros(vocab_size, dtype=torch.float64)
    m_sum = torch.zeros(vocab_size, dtype=torch.float64)
    steps = 0
    with tqdm(total=len(chosen), desc="safety tokens", unit="ex", disable=not progress) as bar:
        for begin in range(0, len(encoded_all), batch_size):
            encoded = encoded_all[begin:begin + batch_size]
            aligned_prompts, base_prompts, responses = (list(column) for column in zip(*encoded))
            logp_a = _response_logprobs(aligned, aligned_prompts, responses, temperature)
            logp_b = _response_logprobs(base, base_prompts, responses, temperature).to(logp_a.device)
            p_a = logp_a.exp()
            d = p_a - logp_b.exp() if diff_mode == "p_diff" else p_a * (logp_b - logp_a)
            del logp_a, logp_b
            sizes = [len(r) for r in responses]
            for d_example, p_example in zip(d.split(sizes), p_a.split(sizes)):
                d_sum += d_example.double().mean(dim=0).cpu()
                m_sum += p_example.double().mean(dim=0).cpu()
            steps += sum(sizes)
            del d, p_a
            bar.update(len(encoded))

    d_mean, m_mean = d_sum / len(chosen), m_sum / len(chosen)
    top_ids = torch.topk(m_mean, min(top, vocab_size)).indices
    v = torch.zeros(vocab_size, dtype=torch.float64)
    v[top_ids] = d_mean[top_ids]
    v = _standardise(v)
    ids = torch.nonzero(v).flatten().tolist()
    weights = [max(float(v[i]), 0.0) for i in ids]
    if not any(w > 0 for w in weights):
        raise PactError("no safety token got a positive weight: the aligned and base distributions do not differ on these examples")
    return SafetyTokens(
        ids=ids,
        weights=weights,
        tokens=[aligned.tokenizer.decode([i]) for i in ids],
        params={
            "top": top,
            "max_examples": max_examples,
            "max_resp_len": max_resp_len,
            "diff_mode": diff_mode,
            "temperature": temperature,
            "data": data_path,
            "examples_used": len(chosen),
            "examples_skipped_empty": len(window) - len(chosen),
            "response_steps": steps,
            "aligned": aligned.source,
            "base": base.source,
            "plain_template": PLAIN_TEMPLATE,
        },
        fingerprints={
            "aligned_model": aligned.fingerprint,
            "base_model": base.fingerprint,
            "tokenizer": aligned.tokenizer_fingerprint,
        },
    )


def _standardise(v: torch.Tensor) -> torch.Tensor:
    """Standardise the entries with |v| > 1e-9 (sample std + 1e-6), then divide everything by the L2 norm + 1e-6.

    With fewer than two such entries the sample std is undefined; it is taken
    as 0, so a single entry standardises to 0.
    """
    v = v.clone()
    mask = v.abs() > _NONZERO
    kept = v[mask]
    if kept.numel():
        std = kept.std(unbiased=True) if kept.numel() > 1 else kept.new_zeros(())
        v[mask] = (kept - kept.mean()) / (std + _EPS)
    return v / (v.norm() + _EPS)


def default_safety_tokens(aligned: LoadedModel, progress: bool = True) -> SafetyTokens:
    """The safety tokens a cache gets when it is given none: computed from the bundled refusals with the aligned model
    against itself under a plain template (for a base model, `pact safety-tokens --base`)."""
    from pact.data.rows import load_conversations
    from pact.data.sources import DEMO_REFUSALS, demo_data_path

    refusals = demo_data_path(DEMO_REFUSALS)
    conversations, _ = load_conversations(refusals)
    return compute_safety_tokens(aligned, None, conversations, progress=progress, data_path=str(refusals))
