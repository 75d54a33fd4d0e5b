"""`PactTrainingArguments`: `transformers.TrainingArguments` plus the run's own fields (cache, LoRA, `force`, ...),
validated in `__post_init__` so every front end (a command, the Python API, a YAML file) gets the same refusal: an
`InvalidSetting` naming the field and the bad value.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

from pact.cache_tools.settings import ExampleArguments
from pact.checks import check_setting, parse_bytes
from pact.data.rows import DataSourceArguments, check_format
from pact.devices import DTYPES, dtype_name, resolve_device, resolve_dtype
from pact.distributed import launcher_ranks, rank_device
from pact.errors import InvalidSetting, PactError
from pact.models.adapters import AdapterArguments
from pact.models.quantization import require_bitsandbytes

SEED_LIMIT = 2**32 - 1  # what numpy, and so transformers' set_seed, accept
SCHEDULERS = tuple(s.value for s in SchedulerType)
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CE_CHUNK = 1024  # response positions per chunk of the cross-entropy
DEFAULT_BUCKET_WINDOW = 64  # global micro-batches per length-sorted window of the train order


MAX_WORKERS = 256  # data loader processes a run may ask for: more than any machine has cores, far fewer than would exhaust it

# Every field of `transformers.TrainingArguments`, in exactly one of three sets (tests/test_trainer_settings.py fails on a
# field of a new transformers release until it is placed here):
#
# * TRAINER_SUPPORTED: the Trainer honours it in a PACT run as in any other (optimizer, schedule, precision, logging,
#   checkpoints, hub, processes), or the run checks it itself;
# * TRAINER_REFUSED: PactTrainer's loop ignores or replaces what it configures (its own loss, loader, sampler,
#   evaluation and checkpoint writer); the value the loop behaves as is accepted, any other refused naming the field;
# * TRAINER_NOT_APPLICABLE: PactTrainer sets it itself, or it configures a part of the Trainer a PACT run never uses
#   (predictions and compute_metrics, a script's do_* switches, the launcher's rank).
TRAINER_SUPPORTED = frozenset((
    "output_dir", "per_device_train_batch_size", "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type",
    "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "optim_target_modules", "gradient_accumulation_steps", "max_grad_norm", "bf16", "fp16", "tf32", "activation_checkpointing",
    "activation_checkpointing_kwargs", "gradient_checkpointing", "gradient_checkpointing_kwargs", "torch_compile",
    "torch_compile_backend", "torch_compile_mode", "neftune_noise_alpha", "torch_empty_cache_steps", "logging_strategy",
    "logging_steps", "logging_first_step", "log_on_each_node", "log_level", "log_level_replica", "disable_tqdm", "report_to",
    "run_name", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "eval_strategy", "eval_steps",
    "eval_delay", "eval_on_start", "save_only_model", "save_strategy", "save_steps", "save_on_each_node", "save_total_limit",
    "enable_jit_checkpoint", "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push",
    "hub_revision", "metric_for_best_model", "greater_is_better", "ignore_data_skip", "restore_callback_states_from_checkpoint",
    "full_determinism", "seed", "use_cpu", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph",
    "ddp_backend", "ddp_timeout", "fsdp", "fsdp_config", "deepspeed",  # ZeRO-3 excepted (docs/scaling.md)
    "skip_memory_metrics", "resume_from_checkpoint",
))
_OWN_LOADER = "PactTrainer builds its own data loader over the cache (PactTrainer.get_train_dataloader)"
TRAINER_REFUSED = {  # field: (the value PACT's loop behaves as, why another is refused)
    "label_smoothing_factor": (0.0, "PACT's cross-entropy is computed by its objective (pact.objective.student), which has no "
                                    "label smoothing; only the Trainer's own compute_loss, which PactTrainer replaces, applies it"),
    "average_tokens_across_devices": (True, "PactTrainer always divides a step's loss by the response tokens of every process"),
    "train_sampling_strategy": ("random", "PACT's sampler shuffles the cache shard by shard and length-buckets it (--bucket_window); "
                                          "the Trainer's samplers are never built"),
    "data_seed": (None, "PACT's sampler is seeded by --seed"),
    "dataloader_drop_last": (False, f"{_OWN_LOADER}, which keeps every row"),
    "dataloader_multiprocessing_context": (None, _OWN_LOADER),
    "dataloader_in_order": (True, f"{_OWN_LOADER}, which yields batches in order"),
    "accelerator_config": (None, f"its batch settings act on loaders accelerate prepares; {_OWN_LOADER} and splits the "
                                 "batches among the processes itself"),
    "parallelism_config": (None, "PACT's loader gives each process its own micro-batches (data parallel: DDP or FSDP), so "
                                 "tensor, context or sequence parallel ranks would each train on other rows"),
    "per_device_eval_batch_size": (8, "PactTrainer.evaluate() batches the eval cache as training does "
                                      "(--per_device_train_batch_size)"),
    "bf16_full_eval": (False, "PactTrainer.evaluate() runs the model as it trains (--dtype, --bf16/--fp16); the Trainer's "
                              "evaluation loop that would cast it is never used"),
    "fp16_full_eval": (False, "PactTrainer.evaluate() runs the model as it trains (--dtype, --bf16/--fp16); the Trainer's "
                              "evaluation loop that would cast it is never used"),
    "auto_find_batch_size": (False, "PACT's loader takes --per_device_train_batch_size, not the smaller batch the Trainer "
                                    "retries with after running out of memory, so every retry would run out of memory again"),
    "include_num_input_tokens_seen": ("no", "PACT's batches hold no input_ids for the Trainer to count (metrics.jsonl "
                                            "records the response tokens of every step)"),
    "use_liger_kernel": (False, "Liger's fused linear cross-entropy replaces the model's own loss, which PACT never asks "
                                "for: it computes the CE and the KL from the hidden states itself"),
    "liger_kernel_config": (None, "it configures --use_liger_kernel, which a PACT run refuses"),
    "load_best_model_at_end": (False, "PactTrainer writes each checkpoint in a staging folder renamed into place, so the "
                                      "Trainer would record the best checkpoint under a path that no longer exists"),
}
TRAINER_NOT_APPLICABLE = {  # field: why it does not apply to a PACT run
    "remove_unused_columns": "PactTrainer sets it (False): its batches are collated from the cache, not a dataset's columns",
    "logging_nan_inf_filter": "PactTrainer sets it (False): a non-finite loss stops the run instead",
    "label_names": "a batch carries its response spans; there is no label column",
    "length_column_name": "only the Trainer's group_by_length sampler reads it (--train_sampling_strategy is refused)",
    "prediction_loss_only": "PactTrainer.evaluate() reports the loss parts; there is no prediction loop",
    "eval_do_concat_batches": "only the Trainer's prediction loop (compute_metrics) reads it",
    "eval_use_gather_object": "only the Trainer's prediction loop (compute_metrics) reads it",
    "eval_accumulation_steps": "only the Trainer's prediction loop (compute_metrics) reads it",
    "include_for_metrics": "only the Trainer's prediction loop (compute_metrics) reads it",
    "batch_eval_metrics": "only the Trainer's prediction loop (compute_metrics) reads it",
    "use_cache": "the generation key/value cache; training runs without it",
    "do_train": "a switch for example scripts; the Trainer does not read it",
    "do_eval": "a switch for example scripts; the Trainer does not read it",
    "do_predict": "a switch for example scripts; the Trainer does not read it",
    "debug": "`--debug` is every command's show-the-traceback flag (pact.cli.flags.RESERVED_FIELDS)",
    "local_rank": "set by the launcher (torchrun, accelerate launch)",
}


def ignored_trainer_fields(args) -> list[tuple[str, str]]:
    """The `TrainingArguments` values of `args` PACT's training loop would ignore (`TRAINER_REFUSED`), as `(field,
    sentence saying why)`. `args` may be constructed already (a TRL `SFTConfig`, axolotl's), where construction turned
    a default None into a default settings object (`accelerator_config`): that is the default still."""
    ignored = []
    for name, (expected, reason) in TRAINER_REFUSED.items():
        value = getattr(args, name, expected)
        if name == "include_num_input_tokens_seen" and value is False:
            value = "no"
        if expected is None and dataclasses.is_dataclass(value) and value == type(value)():
            continue
        if value != expected and not (isinstance(expected, float) and isinstance(value, (int, float)) and float(value) == expected):
            ignored.append((name, f"{name} {value!r} would be ignored by a PACT run: {reason}; leave it at {expected!r}"))
    return ignored


def check_trainer_fields(args) -> None:
    """Refuse, naming the field and why, the first `TrainingArguments` value PACT's training loop would ignore."""
    ignored = ignored_trainer_fields(args)
    if ignored:
        raise InvalidSetting(*ignored[0])


@dataclass
class PactTrainingArguments(TrainingArguments, AdapterArguments, ExampleArguments, DataSourceArguments):
    """`TrainingArguments` with the cache (or the data to make it from: `data`, `ExampleArguments`,
    `DataSourceArguments`), the student and the LoRA settings (`AdapterArguments`) of a PACT run.

    Defaults follow the paper's released configuration (LoRA r=8, alpha 32 on
    q_proj and v_proj, lr 3e-5); a run logs every step and saves checkpoints
    only when `save_steps` > 0. Construction refuses a value the run cannot use.
    """

    output_dir: str | None = field(default=None, metadata={
        "aliases": ["--out"], "help": "run folder: adapter (or full model), tokenizer, pact_config.json, metrics.jsonl, curves.png"})
    per_device_train_batch_size: int = field(default=8, metadata={
        "aliases": ["--batch-size"], "help": "cache rows per micro-batch and process; under N processes an optimizer step takes "
                                             "batch x grad-accum x N rows, the same global batch one process with batch x N takes"})
    num_train_epochs: float = field(default=3.0, metadata={"aliases": ["--epochs"], "help": "passes over the cache"})
    learning_rate: float = field(default=3e-5, metadata={"aliases": ["--lr"], "help": "peak learning rate"})
    lr_scheduler_type: str = field(default="linear", metadata={
        "aliases": ["--scheduler"], "help": f"learning-rate schedule: {', '.join(SCHEDULERS)}"})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "aliases": ["--grad-accum"], "help": "micro-batches per optimizer step"})
    logging_steps: float = field(default=1, metadata={"help": "log (and write metrics.jsonl) every N optimizer steps"})
    save_steps: int = field(default=0, metadata={"help": "write a resumable checkpoint every N optimizer steps (0: only at the end)"})
    dataloader_num_workers: int = field(default=1, metadata={
        "help": "worker processes that decode the cache and collate micro-batches while the model computes (0: in the "
                "training process); each decodes the shards its batches come from, so 1 decodes each shard once per epoch"})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "DDP: look for parameters the loss did not use (the PACT loss uses every trainable one)"})
    disable_tqdm: bool = field(default=False, metadata={"aliases": ["--no-progress"], "help": "no progress bar"})
    cache: str | None = field(default=None, metadata={
        "help": "cache directory built by `pact-cache build`; with --data, the folder to build it in (or reuse it from)"})
    data: str | None = field(default=None, metadata={
        "help": "train on this data instead of a cache built beforehand: a file (.jsonl/.json/.csv/.parquet/...), a "
                "save_to_disk folder or a hub dataset, rows in any --format; its reference cache is built on first use "
                "under $PACT_HOME/caches (or --cache) and reused by later runs on the same data and model"})
    eval_cache: str | None = field(default=None, metadata={
        "help": "a second cache to evaluate on (eval loss, ce, kl), at the end and at every --eval_steps with --eval_strategy steps"})
    model: str | None = field(default=None, metadata={
        "help": "student starting point (default: the cache's reference model); with --data also the reference the cache "
                "is built from (default: the embedded SmolLM2-135M-Instruct)"})
    force: bool = field(default=False, metadata={"help": "train even if the model or tokenizer fingerprint differs from the cache's"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in --output_dir"})
    train_device: str = field(default="auto", metadata={
        "aliases": ["--device"], "help": "auto, cpu or cuda (under a launcher each process uses its own GPU)"})
    dtype: str = field(default="auto", metadata={
        "help": "the student's weight dtype: auto (bfloat16 on a GPU that supports it, float16 on an older one, float32 on CPU), "
                "bfloat16, float16 (GPU and LoRA only; implies --fp16, the Trainer's loss scaling) or float32; "
                "logits are float32 whatever it is"})
    ce_chunk_size: int = field(default=DEFAULT_CE_CHUNK, metadata={"help": "response positions per chunk of the cross-entropy (memory only)"})
    bucket_window: int = field(default=DEFAULT_BUCKET_WINDOW, metadata={
        "help": "less padding: within each cache shard, windows of N global micro-batches are sorted by row length, cut into "
                "batches and the batches shuffled (seeded; each row once per epoch); 0: the plain shard-aware shuffle"})

    auto_gradient_checkpointing: bool = field(default=True, metadata={
        "help": "turn gradient checkpointing on when the planner (as `pact plan`) says the run's step would not fit in the "
                "GPU's memory (or --plan_memory) without it and does with it; an explicit --gradient_checkpointing is always honoured"})
    plan_memory: str | None = field(default=None, metadata={
        "help": "device memory the automatic gradient-checkpointing choice plans against, e.g. 24GiB (as `pact plan "
                "--gpu-memory`); default the GPU's, and no automatic choice on CPU unless this is set"})

    def __post_init__(self) -> None:
        """Refuse a value the run cannot use (`InvalidSetting` naming the field), then let `TrainingArguments` settle the rest."""
        # transformers names a folder when none is given (./trainer_output); `train()` refuses to write a run there unasked
        self.output_dir_given = self.output_dir is not None
        self.check_adapter_settings()
        self.check_example_settings()
        check_format(self.data_format)
        check_trainer_fields(self)
        self._check_values()
        if self.save_steps == 0:
            self.save_strategy = "no"
        self.use_cpu = self.use_cpu or self.train_device == "cpu"
        self._settle_dtype()
        self._check_quantization()
        try:
            super().__post_init__()
        except ValueError as err:
            raise PactError(f"invalid training arguments: {err}") from err

    def _check_values(self) -> None:
        """The project's checks of every numeric and named setting, before transformers sees them."""
        for name, low, integer in (("per_device_train_batch_size", 1, True), ("gradient_accumulation_steps", 1, True),
                                   ("save_steps", 0, True), ("ce_chunk_size", 1, True), ("bucket_window", 0, True),
                                   ("weight_decay", 0, False), ("warmup_steps", 0, False)):
            check_setting(name, getattr(self, name), low, integer=integer)
        check_setting("dataloader_num_workers", self.dataloader_num_workers, 0, MAX_WORKERS, integer=True)
        for name in ("learning_rate", "max_grad_norm", "num_train_epochs"):
            check_setting(name, getattr(self, name), 0, low_open=True)
        check_setting("seed", self.seed, 0, SEED_LIMIT, integer=True)
        if self.max_steps != -1:
            check_setting("max_steps", self.max_steps, 1, integer=True)
        if self.plan_memory is not None:
            parse_bytes(self.plan_memory, "plan_memory")
        scheduler = getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)
        if scheduler not in SCHEDULERS:
            raise InvalidSetting("lr_scheduler_type", f"lr_scheduler_type must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        if self.train_device not in DEVICES or (self.train_device == "cuda" and not torch.cuda.is_available()):
            raise InvalidSetting("train_device", f"train_device must be one of {', '.join(DEVICES)} (cuda only where a GPU is), "
                                                 f"got {self.train_device!r}")

    def _settle_dtype(self) -> None:
        """Resolve `dtype` to the weight dtype the run trains in (`auto` by device) and turn on the loss scaling float16 needs.

        float16 weights train only under LoRA and on a GPU: the adapters stay
        float32 (peft upcasts them) and the Trainer's GradScaler (`fp16`, which
        accelerate has only on CUDA) scales the loss; full fine-tuning would
        update float16 weights the scaler cannot unscale.
        """
        if self.dtype not in DTYPES:
            raise InvalidSetting("dtype", f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        device = resolve_device("cpu" if self.use_cpu else "auto")
        self.dtype = dtype_name(resolve_dtype(self.dtype, device, quantized=self.quantization is not None))
        if self.dtype != "float16":
            return
        if self.full:
            raise InvalidSetting("dtype", "dtype float16 trains LoRA adapters only (full fine-tuning needs float32 master "
                                          "weights the loss scaler can unscale); use --dtype bfloat16 or float32 with --full")
        if self.bf16:
            raise InvalidSetting("dtype", "dtype float16 uses float16 loss scaling (--fp16), which --bf16 autocast contradicts; "
                                          "drop --bf16 or use --dtype bfloat16")
        if device.type != "cuda":
            raise InvalidSetting("dtype", "dtype float16 trains under a GPU's loss scaler (--fp16), which the CPU lacks; "
                                          "use --dtype bfloat16 or float32 on CPU")
        self.fp16 = True

    def _check_quantization(self) -> None:
        """A quantised student needs bitsandbytes working on this process's device (its GPU under a launcher)."""
        if self.quantization is None:
            return
        field_name = f"load_in_{self.quantization}"
        device = rank_device("cpu" if self.use_cpu else "auto", launcher_ranks().local_rank)
        require_bitsandbytes(self.quantization, device, field_name)

    def run_settings(self) -> dict:
        """The project's fields and the Trainer settings a PACT run records in `pact_config.json` (JSON-ready)."""
        return json.loads(json.dumps({name: getattr(self, name) for name in (*PROJECT_FIELDS, *RECORDED_TRAINER_FIELDS)}, default=str))


PROJECT_FIELDS = ("cache", "eval_cache", "model", "full", "load_in_4bit", "load_in_8bit", "lora_r", "lora_alpha", "lora_dropout",
                  "lora_target_modules", "force", "resume", "train_device", "dtype", "ce_chunk_size", "bucket_window", "auto_gradient_checkpointing", "plan_memory")
RECORDED_TRAINER_FIELDS = ("output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
                           "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "seed", "bf16",
                           "fp16", "gradient_checkpointing", "save_steps", "optim", "adam_beta1", "adam_beta2", "adam_epsilon")
