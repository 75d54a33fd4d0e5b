"""`PactTrainingArguments`: `transformers.TrainingArguments` plus the run's own fields (cache, LoRA, `force`, ...),
validated in `__post_init__` so every front end (a command, the Python API, a YAML file) gets the same refusal: an
`InvalidSetting` naming the field and the bad value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

from pact.checks import check_setting, parse_bytes
from pact.devices import DTYPES, dtype_name, resolve_device, resolve_dtype
from pact.distributed import launcher_ranks, rank_device
from pact.errors import InvalidSetting, PactError
from pact.models.adapters import AdapterArguments
from pact.models.quantization import require_bitsandbytes

SEED_LIMIT = 2**32 - 1  # what numpy, and so transformers' set_seed, accept
SCHEDULERS = tuple(s.value for s in SchedulerType)
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_BUCKET_WINDOW = 64  # global micro-batches per length-sorted window of the train order


MAX_WORKERS = 256  # data loader processes a run may ask for: more than any machine has cores, far fewer than would exhaust it


@dataclass
class PactTrainingArguments(TrainingArguments, AdapterArguments):
    """`TrainingArguments` with the cache, the student and the LoRA settings (`AdapterArguments`) of a PACT run.

    Defaults follow the paper's released configuration (LoRA r=8, alpha 32 on
    q_proj and v_proj, lr 3e-5); a run logs every step and saves checkpoints
    only when `save_steps` > 0. Construction refuses a value the run cannot use.
    """

    output_dir: str | None = field(default=None, metadata={
        "aliases": ["--out"], "help": "run folder: adapter (or full model), tokenizer, pact_config.json, metrics.jsonl, curves.png "
                                      "(required by `pact train`)"})
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
    cache: str | None = field(default=None, metadata={"help": "cache directory built by `pact-cache build` (required)"})
    eval_cache: str | None = field(default=None, metadata={
        "help": "a second cache to evaluate on (eval loss, ce, kl), at the end and at every --eval_steps with --eval_strategy steps"})
    model: str | None = field(default=None, metadata={"help": "student starting point (default: the cache's reference model)"})
    force: bool = field(default=False, metadata={"help": "train even if the model or tokenizer fingerprint differs from the cache's"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in --output_dir"})
    train_device: str = field(default="auto", metadata={
        "aliases": ["--device"], "help": "auto, cpu or cuda (under a launcher each process uses its own GPU)"})
    dtype: str = field(default="auto", metadata={
        "help": "the student's weight dtype: auto (bfloat16 on a GPU that supports it, float16 on an older one, float32 on CPU), "
                "bfloat16, float16 (GPU and LoRA only; implies --fp16, the Trainer's loss scaling) or float32; "
                "logits are float32 whatever it is"})
    ce_chunk_size: int = field(default=1024, metadata={"help": "response positions per chunk of the cross-entropy (memory only)"})
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
