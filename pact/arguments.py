"""Settings declared once, as dataclasses, and the command lines generated from them.

`PactTrainingArguments` is `transformers.TrainingArguments` plus the run's own
fields (cache, LoRA, `force`, ...), validated in `__post_init__` so every front
end (a command, the Python API, a YAML file) gets the same refusal: an
`InvalidSetting` naming the field and the bad value. `add_dataclass_flags` and
`dataclasses_from_flags` turn any such dataclasses into a command's flags (the
Hugging Face names, plus the project's older short names as aliases) and back,
with `--config FILE.yaml|json` underneath the flags. Only the command line maps
fields to flags (`flag_for`); the library names fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import SchedulerType

from pact.errors import InvalidSetting, PactError
from pact.models import DTYPES, dtype_name, resolve_device, resolve_dtype
from pact.objective import check_setting
from pact.plan import parse_bytes

SEED_LIMIT = 2**32 - 1  # what numpy, and so transformers' set_seed, accept
SCHEDULERS = tuple(s.value for s in SchedulerType)
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_BUCKET_WINDOW = 64  # global micro-batches per length-sorted window of the train order
RESERVED_FIELDS = ("debug",)  # TrainingArguments' `debug`: `--debug` is every command's show-the-traceback flag


@dataclass
class PactTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the cache, the student and LoRA settings of a PACT run.

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
    cache: str | None = field(default=None, metadata={"help": "cache directory built by `pact-cache build` (required)"})
    eval_cache: str | None = field(default=None, metadata={
        "help": "a second cache to evaluate on (eval loss, ce, kl), at the end and at every --eval_steps with --eval_strategy steps"})
    model: str | None = field(default=None, metadata={"help": "student starting point (default: the cache's reference model)"})
    full: bool = field(default=False, metadata={"help": "full fine-tuning instead of LoRA"})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the student's linear layers quantised to 4-bit NF4 (double quantisation, computing in --dtype, "
                "bfloat16 under auto) by bitsandbytes and train LoRA adapters on them; the LM head and embeddings stay "
                "unquantised. LoRA only; needs bitsandbytes (the qlora extra) on a CUDA GPU or its CPU backend"})
    load_in_8bit: bool = field(default=False, metadata={
        "help": "like --load_in_4bit with LLM.int8() 8-bit linear layers"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "aliases": ["--lora-targets"], "help": "module names LoRA adapts (space- or comma-separated)"})
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
        self.lora_target_modules = [t.strip() for item in self.lora_target_modules or [] for t in str(item).split(",") if t.strip()]
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
        for name, low, integer in (("lora_r", 1, True), ("per_device_train_batch_size", 1, True), ("gradient_accumulation_steps", 1, True),
                                   ("save_steps", 0, True), ("ce_chunk_size", 1, True), ("bucket_window", 0, True),
                                   ("dataloader_num_workers", 0, True),
                                   ("weight_decay", 0, False), ("warmup_steps", 0, False)):
            check_setting(name, getattr(self, name), low, integer=integer)
        for name in ("lora_alpha", "learning_rate", "max_grad_norm", "num_train_epochs"):
            check_setting(name, getattr(self, name), 0, low_open=True)
        check_setting("lora_dropout", self.lora_dropout, 0, 1, high_open=True)
        check_setting("seed", self.seed, 0, SEED_LIMIT, integer=True)
        if self.max_steps != -1:
            check_setting("max_steps", self.max_steps, 1, integer=True)
        if not self.full and not self.lora_target_modules:
            raise InvalidSetting("lora_target_modules", "lora_target_modules must name at least one module (e.g. q_proj v_proj)")
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

    @property
    def quantization(self) -> str | None:
        """`4bit` or `8bit` for a quantised (QLoRA) student, None for a plain one."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None

    def _check_quantization(self) -> None:
        """A quantised student trains LoRA adapters only, in one format, and needs bitsandbytes working on the device."""
        if self.load_in_4bit and self.load_in_8bit:
            raise InvalidSetting("load_in_8bit", "load_in_4bit and load_in_8bit exclude each other; choose one")
        if self.quantization is None:
            return
        field_name = f"load_in_{self.quantization}"
        if self.full:
            raise InvalidSetting(field_name, f"{field_name} trains LoRA adapters on a frozen quantised base (QLoRA), and full "
                                             "fine-tuning cannot update quantised weights; drop --full, or drop "
                                             f"{field_name} to fine-tune every weight")
        from pact.distributed import launcher_ranks, rank_device
        from pact.quantization import require_bitsandbytes

        device = rank_device("cpu" if self.use_cpu else "auto", launcher_ranks().local_rank)  # this process's GPU under a launcher
        require_bitsandbytes(self.quantization, device, field_name)

    def run_settings(self) -> dict:
        """The project's fields and the Trainer settings a PACT run records in `pact_config.json` (JSON-ready)."""
        return json.loads(json.dumps({name: getattr(self, name) for name in (*PROJECT_FIELDS, *RECORDED_TRAINER_FIELDS)}, default=str))


PROJECT_FIELDS = ("cache", "eval_cache", "model", "full", "load_in_4bit", "load_in_8bit", "lora_r", "lora_alpha", "lora_dropout",
                  "lora_target_modules", "force", "resume", "train_device", "dtype", "ce_chunk_size", "bucket_window", "auto_gradient_checkpointing", "plan_memory")
RECORDED_TRAINER_FIELDS = ("output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
                           "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "seed", "bf16",
                           "fp16", "gradient_checkpointing", "save_steps", "optim", "adam_beta1", "adam_beta2", "adam_epsilon")


# --- Command lines generated from the dataclasses ---------------------------------------------

def add_dataclass_flags(parser: argparse.ArgumentParser, dataclass_types: tuple) -> dict:
    """Add a flag per field of `dataclass_types` (HfArgumentParser's names and aliases) and `--config`; returns the defaults.

    The flags' own defaults are suppressed so `dataclasses_from_flags` can
    tell a flag given on the command line from a value of the config file;
    each help text states the default instead.
    """
    generated = HfArgumentParser(dataclass_types, add_help=False)
    flagged = [a for a in generated._actions if a.option_strings and a.dest not in RESERVED_FIELDS]
    defaults = {}
    for action in flagged:
        defaults.setdefault(action.dest, action.default)
    for action in flagged:
        if defaults[action.dest] is not None and action.help != argparse.SUPPRESS:
            action.help = f"{action.help or ''} (default: {defaults[action.dest]})".strip()
        action.default = argparse.SUPPRESS
        action.__class__ = _recording(type(action))
        parser._add_action(action)
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (field names or flag names as keys); "
                                                        "flags on the command line override it")
    return defaults


TYPED = "typed_flags"  # the namespace attribute mapping each field given on the command line to the flag typed for it


def _recording(kind: type) -> type:
    """A subclass of argparse action class `kind` that also notes which of its option strings was typed (so an error
    names `--lr` when the user wrote `--lr`, `--learning_rate` when they wrote that)."""
    def __call__(self, parser, namespace, values, option_string=None):
        """Store the value as `kind` does, and note `option_string` under the field in `namespace.typed_flags`."""
        kind.__call__(self, parser, namespace, values, option_string)
        typed = getattr(namespace, TYPED, None) or {}
        setattr(namespace, TYPED, {**typed, self.dest: option_string})

    return type(f"Recording{kind.__name__}", (kind,), {"__call__": __call__})


def _read_config(path: str) -> dict:
    """The settings in a YAML or JSON file, as a dict (`PactError` naming the file otherwise)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as err:
        raise PactError(f"--config {path}: cannot read it ({err.strerror or err})") from err
    try:
        if Path(path).suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - yaml's and json's parse errors have no common base
        raise PactError(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({err})") from err
    if not isinstance(data, dict):
        raise PactError(f"--config {path}: expected a mapping of setting names to values, got {type(data).__name__}")
    return data


def _config_values(parser: argparse.ArgumentParser, path: str) -> dict:
    """The config file's values keyed by field, each converted as its flag converts text; unknown keys are refused by name."""
    actions = {}
    for action in parser._actions:
        for option in action.option_strings:
            actions[option.lstrip("-").replace("-", "_")] = action
    values = {}
    for key, value in _read_config(path).items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None or action.dest in ("config", "help", "debug"):
            raise PactError(f"--config {path}: unknown setting {key!r}; see `--help` for the settings (flag names without --)")
        values[action.dest] = _convert(action, value, path, key)
    return values


def _convert(action: argparse.Action, value, path: str, key) -> object:
    """A config file's `value` for `action`: text converted by the flag's type, each item of a list for list flags."""
    convert = action.type if callable(action.type) else None
    if isinstance(action, argparse._StoreFalseAction):
        return not value
    if action.nargs == "+" and not isinstance(value, list):
        value = [value]
    try:
        if isinstance(value, list):
            return [convert(v) if convert and isinstance(v, str) else v for v in value]
        return convert(value) if convert and isinstance(value, str) else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise PactError(f"--config {path}: {key}: {value!r} is not a valid value ({err})") from err


def dataclasses_from_flags(args: argparse.Namespace, dataclass_types: tuple, defaults: dict) -> tuple:
    """Instances of `dataclass_types` from the defaults, the `--config` file and the flags given (in that order of priority).

    An `InvalidSetting` gains the name of the flag (or of the config file) that holds the bad value.
    """
    given = vars(args)
    from_file = _config_values(_parser_of(args), given["config"]) if given.get("config") else {}
    values = {**defaults, **from_file, **{k: v for k, v in given.items() if k in defaults}}
    try:
        return tuple(kind(**{f.name: values[f.name] for f in dataclasses.fields(kind) if f.init and f.name in values})
                     for kind in dataclass_types)
    except InvalidSetting as err:
        raise with_flag(err, args, from_file) from err


def with_flag(err: InvalidSetting, args: argparse.Namespace, from_file: dict | None = None) -> InvalidSetting:
    """`err` with its message prefixed by where the value came from: the flag, or `FILE (field)` for a config file's value."""
    typed = vars(args).get(TYPED) or {}
    if from_file and err.field in from_file and err.field not in typed:
        where = f"{vars(args)['config']} ({err.field})"
    else:
        where = typed.get(err.field) or flag_for(_parser_of(args), err.field) or err.field
    return InvalidSetting(err.field, f"{where}: {err}")


def flag_for(parser: argparse.ArgumentParser | None, name: str) -> str | None:
    """The Hugging Face flag of field `name` (its first option string), or None when the parser has none."""
    for action in (parser._actions if parser else []):
        if action.dest == name and action.option_strings:
            return action.option_strings[0]
    return None


def _parser_of(args: argparse.Namespace) -> argparse.ArgumentParser | None:
    """The parser a command registered itself with (`set_defaults(parser=...)`), to look flags up."""
    return vars(args).get("parser")
