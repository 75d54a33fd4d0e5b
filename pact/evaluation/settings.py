"""What `pact eval refusal|task|drift` measure, declared once: the model (and adapter) measured, each measurement's own
settings, and where the result goes; the commands' flags are generated from these fields, and construction refuses a
value no measurement can use (`InvalidSetting` naming the field)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pact.checks import check_device, check_setting
from pact.devices import DTYPES
from pact.errors import InvalidSetting
from pact.models.loading import EMBEDDED_MODEL


def _require(name: str, value, what: str) -> None:
    """`InvalidSetting` naming `name` when it has no value."""
    if not value:
        raise InvalidSetting(name, f"{name} is required: {what}")


def _check_counts(settings, names: tuple[str, ...]) -> None:
    """Each named count is an integer >= 1 (an optional one may be None)."""
    for name in names:
        value = getattr(settings, name)
        if value is not None:
            check_setting(name, value, 1, integer=True)


@dataclass
class EvalModelArguments:
    """The model a measurement evaluates: a model, optionally a PEFT adapter on it, where and in which dtype."""

    model: str | None = field(default=None, metadata={
        "help": f"model to evaluate: local directory, hub id, .gguf file or {EMBEDDED_MODEL!r} (default: with --adapter, "
                "the base model the adapter was trained on; else the embedded model, or for `eval drift` the cache's "
                "reference model)"})
    adapter: str | None = field(default=None, metadata={
        "help": "PEFT adapter directory to apply on top of its base model (e.g. a `pact train --output_dir` directory; "
                "the base is read from its pact_config.json, else adapter_config.json; a --model other than that base "
                "is used with a warning)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    dtype: str = field(default="auto", metadata={
        "help": "weight dtype of the model (and of --judge): auto (bfloat16 on a GPU that supports it, float16 on an older "
                "one, float32 on CPU), bfloat16, float16 or float32; logits are float32 whatever it is"})

    def __post_init__(self) -> None:
        """Refuse a device or dtype no model can be loaded with."""
        check_device("device", self.device)
        if self.dtype not in DTYPES:
            raise InvalidSetting("dtype", f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class EvalOutputArguments:
    """Where a measurement's result goes besides the printed summary."""

    json: bool = field(default=False, metadata={"help": "print one JSON object instead of the summary"})
    save_to: str | None = field(default=None, metadata={
        "help": "also merge the JSON result into RUN_DIR/eval.json (read by `pact report`)"})


@dataclass
class RefusalEvalArguments:
    """`pact eval refusal`: the prompts, generation, the judges, and the per-prompt file."""

    prompts: str | None = field(default=None, metadata={
        "help": "requests: a data file, a save_to_disk folder or a hub dataset (owner/name, or hub:ID), rows in any "
                "--format ('instruction' or 'prompt' alone will do); answers, if present, are ignored (required)"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest answer generated"})
    batch_size: int = field(default=8, metadata={"help": "prompts generated together"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N rows of --prompts"})
    skip_invalid: bool = field(default=False, metadata={"help": "skip malformed rows (counted and reported) instead of stopping"})
    judge: str | None = field(default=None, metadata={
        "help": "guard model (any chat LM, loaded like --model) asked whether each answer refused; adds judge_refused / "
                "judge_refusal_rate"})
    benign: bool = field(default=False, metadata={
        "help": "the prompts are harmless: the rate is the over-refusal rate (lower is better), labelled and saved as over_refusal"})
    out: str | None = field(default=None, metadata={
        "help": "write each prompt, answer and verdict as JSON lines to this file"})

    def __post_init__(self) -> None:
        """Refuse a missing prompt source or a count below 1."""
        _require("prompts", self.prompts, "the requests to answer (a data file, a save_to_disk folder or a hub dataset: "
                                          "owner/name or hub:ID)")
        _check_counts(self, ("max_new_tokens", "batch_size", "limit"))


@dataclass
class TaskEvalArguments:
    """`pact eval task`: the labelled data and how it is scored."""

    data: str | None = field(default=None, metadata={
        "help": "labelled rows: a data file, a save_to_disk folder or a hub dataset (owner/name, or hub:ID), rows in any "
                "--format (required)"})
    batch_size: int = field(default=16, metadata={"help": "(row, label) sequences per forward pass"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N rows of --data"})
    skip_invalid: bool = field(default=False, metadata={"help": "skip malformed rows (counted and reported) instead of stopping"})

    def __post_init__(self) -> None:
        """Refuse missing data or a count below 1."""
        _require("data", self.data, "the labelled rows to score (a data file, a save_to_disk folder or a hub dataset: "
                                    "owner/name or hub:ID)")
        _check_counts(self, ("batch_size", "limit"))


@dataclass
class DriftEvalArguments:
    """`pact eval drift`: the cache measured against."""

    cache: str | None = field(default=None, metadata={"help": "cache directory built by `pact-cache build` (required)"})
    batch_size: int = field(default=8, metadata={"help": "cache rows per forward pass"})

    def __post_init__(self) -> None:
        """Refuse a missing cache or a batch size below 1."""
        _require("cache", self.cache, "the cache directory built by `pact-cache build`")
        _check_counts(self, ("batch_size",))
