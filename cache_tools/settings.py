"""What `pact-cache build` builds (`BuildArguments`): the reference model, the data, the safety tokens, the stored
layout and how the work is split, declared once; the command's flags are generated from these fields, and the
objective constants the cache bakes in (p0, Tg, T) come from `ObjectiveArguments`, where they are declared."""

from __future__ import annotations

from dataclasses import dataclass, field

from pact.cache_tools.codec import DEFAULT_DTYPE, DTYPES
from pact.cache_tools.writer import DEFAULT_ZSTD_LEVEL
from pact.checks import check_device, check_setting
from pact.data.chat import TRAIN_ON
from pact.devices import DTYPES as MODEL_DTYPES
from pact.errors import InvalidSetting

DEFAULT_ROWS_PER_SHARD = 1024
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 512
OBJECTIVE_FIELDS = ("p0", "gate_temperature", "temperature")  # the `ObjectiveArguments` a cache bakes in
MAX_THREADS = 1024  # intra-op threads a build may ask for: more than any machine has cores, far fewer than would exhaust it


def check_build_numbers(batch_size: int, rows_per_shard: int, threads: int | None, top_k: int | None, zstd_level: int,
                        kd_top_k: int | None = None) -> None:
    """Refuse numbers no build can use (`InvalidSetting` naming the field), before any work is done: the one check of
    `BuildArguments` and of `build_cache` called from Python."""
    for name, value in (("batch_size", batch_size), ("rows_per_shard", rows_per_shard), ("top_k", top_k), ("kd_top_k", kd_top_k)):
        if value is not None:
            check_setting(name, value, 1, integer=True)
    if threads is not None:
        check_setting("threads", threads, 1, MAX_THREADS, integer=True)
    check_setting("zstd_level", zstd_level, 1, 22, integer=True)


@dataclass
class ExampleArguments:
    """What a cache built from data holds besides the data itself: the safety tokens, and how rows become examples
    (their length, which turns are responses). Shared by `pact-cache build` and `pact train --data`."""

    safety_tokens: str | None = field(default=None, metadata={
        "help": "safety-token file from `pact safety-tokens` (default: computed from the bundled refusals and stored with "
                "the cache)"})
    max_length: int = field(default=DEFAULT_MAX_LENGTH, metadata={"help": "truncate sequences to L tokens, cutting the response"})
    train_on: str = field(default="all", metadata={
        "help": "which assistant turns of a conversation are responses (CE and the KL on each): all (as TRL) or only the last"})

    def check_example_settings(self) -> None:
        """Refuse a length or `train_on` no build can use, naming the field."""
        check_setting("max_length", self.max_length, 1, integer=True)
        if self.train_on not in TRAIN_ON:
            raise InvalidSetting("train_on", f"train_on must be one of {', '.join(TRAIN_ON)}, got {self.train_on!r}")


@dataclass
class BuildArguments(ExampleArguments):
    """Every setting of `pact-cache build` but how the data is read (`DataSourceArguments`) and the objective's
    constants (`ObjectiveArguments`: p0, gate_temperature, temperature). Construction refuses a value no build can use
    (`InvalidSetting` naming the field)."""

    out: str | None = field(default=None, metadata={"help": "cache directory to create (required)"})
    model: str | None = field(default=None, metadata={
        "help": "reference model: directory, hub id, .gguf file (default: the embedded SmolLM2-135M-Instruct)"})
    data: str | None = field(default=None, metadata={
        "help": "training data: a file (.jsonl/.json/.csv/.tsv/.parquet/.arrow, optionally compressed), a save_to_disk "
                "folder or a hub dataset (owner/name, or hub:ID); rows in any --format (default: the bundled demo benign set)"})
    top_k: int | None = field(default=None, metadata={
        "help": "store only the K safety tokens with the largest w*exp(logit/T) per step (approximate; default: all with "
                "weight > 0, exact)"})
    kd_top_k: int | None = field(default=None, metadata={
        "help": "also store, per response token, a teacher's top-K token ids, their log-probs and the exact log of its "
                "remaining mass, for distillation (--objective kd or pact+kd; docs/distillation.md). K = 50 adds about "
                "85 bytes per response token"})
    safety_targets: bool = field(default=True, metadata={
        "help": "store PACT's targets (the reference's logits on the safety tokens, full and post-only contexts). false, "
                "with --kd_top_k: a distillation-only cache of --model's top-K, one forward pass per batch and no safety "
                "tokens (trains --objective kd only)"})
    teacher: str | None = field(default=None, metadata={
        "help": "with --kd_top_k: the teacher (directory, hub id, .gguf), a model with the same tokenizer as --model, "
                "e.g. a larger one of its family (default: --model itself)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N rows of the data"})
    skip_invalid: bool = field(default=False, metadata={"help": "skip rows that cannot be read or encoded instead of stopping"})
    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata={"help": "examples per forward pass"})
    rows_per_shard: int = field(default=DEFAULT_ROWS_PER_SHARD, metadata={
        "help": "examples per shard file, the unit of resuming and of reader memory"})
    dtype: str = field(default=DEFAULT_DTYPE, metadata={
        "help": "storage of the logits: float32 (exact), bfloat16, float16, or int8 (8-bit per-step codes)"})
    zstd_level: int = field(default=DEFAULT_ZSTD_LEVEL, metadata={"help": "zstd compression level 1..22"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda[:N] (auto: CUDA when available)"})
    threads: int | None = field(default=None, metadata={
        "help": "intra-op CPU threads of the reference pass (default: torch's default). CPU sums depend on it: give every "
                "process and part of a build the same N (and the same torch) for byte-identical shards"})
    model_dtype: str = field(default="auto", metadata={
        "help": "dtype of the reference model's weights (auto: bfloat16 on CUDA, float32 on CPU)"})
    num_shards: int = field(default=1, metadata={
        "help": "split the build into K parts, one job each (e.g. a Slurm job array; 1: the whole data). Each part is a "
                "cache of its own; join them with `pact-cache merge`. Counts parts, not shard files"})
    shard_index: int = field(default=0, metadata={"help": "which part, 0..K-1, this job builds into --out"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted build in --out (refused if any setting differs)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the cache in --out (deletes only pact-cache's own files; refused if it holds others)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        """Refuse a value no build can use, naming the field."""
        if not self.out:
            raise InvalidSetting("out", "out is required: the cache directory to create")
        check_build_numbers(self.batch_size, self.rows_per_shard, self.threads, self.top_k, self.zstd_level, self.kd_top_k)
        if self.teacher and self.kd_top_k is None:
            raise InvalidSetting("teacher", "teacher needs kd_top_k: how many of the teacher's top tokens to store per step")
        if not self.safety_targets:
            self._check_distillation_only()
        self.check_example_settings()
        if self.limit is not None:
            check_setting("limit", self.limit, 1, integer=True)
        check_setting("num_shards", self.num_shards, 1, integer=True)
        check_setting("shard_index", self.shard_index, 0, integer=True)
        for name, value, choices in (("dtype", self.dtype, DTYPES), ("model_dtype", self.model_dtype, MODEL_DTYPES)):
            if value not in choices:
                raise InvalidSetting(name, f"{name} must be one of {', '.join(choices)}, got {value!r}")
        check_device("device", self.device)
        if self.resume and self.overwrite:
            raise InvalidSetting("overwrite", "resume and overwrite exclude each other: continue the build in --out, or replace it")

    def _check_distillation_only(self) -> None:
        """Refuse what a cache without safety targets cannot use: no --kd_top_k (it would store nothing), a separate
        teacher (its one model, --model, is the teacher), safety tokens or their top_k."""
        if self.kd_top_k is None:
            raise InvalidSetting("safety_targets", "safety_targets false needs kd_top_k: without safety targets the cache "
                                                   "holds only a teacher's top-K")
        if self.teacher:
            raise InvalidSetting("teacher", "with safety_targets false the cache runs one model, the teacher: give "
                                            f"{self.teacher} as --model rather than --teacher")
        for name in ("safety_tokens", "top_k"):
            if getattr(self, name) is not None:
                raise InvalidSetting(name, f"{name} chooses safety tokens, which a cache with safety_targets false does not "
                                           "store")
