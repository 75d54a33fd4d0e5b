"""Will it fit? The peak device memory of one optimizer step, planned from a model's architecture alone.

`plan(PlanArguments(model=..., ...)) -> Plan` runs the project's real
training step for plain SFT (the same pipeline with the cross-entropy only),
cached PACT (`cached_pact_loss`, what `PactTrainer` runs) and online PACT (a
second, frozen reference model filling the batch's targets through
`OnlineReference`, then `pact_batch_loss`) on meta tensors: the model is built
from its config on the meta device (no weights are read), LoRA by peft,
gradient checkpointing by transformers, the optimizer the Trainer builds
(fused AdamW), one forward, backward and optimizer step. `pact.memory`
counts the bytes of every live tensor after every operator and keeps the
peak, by category; `pact.meta_run` lets the code run on meta tensors as on a
device. Quantised weights are bitsandbytes' packed tensors (`pact.packed_weights`).

The same `measure_step` on real tensors measures a real step: the tests
check the plan against it. What no tensor holds is not counted (the CUDA
context, cuBLAS and attention workspaces, the caching allocator's free
blocks and fragmentation): a run fits when its peak plus `MARGIN_BYTES` plus
`MARGIN_FRACTION` of the peak fits in the GPU's memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pact.cache_tools.batch import collate_spans
from pact.errors import InvalidSetting, PactError
from pact.memory import CATEGORIES, LiveTensorBytes, Peak, tensors_in
from pact.meta_run import HostShadows, fused_attention, fused_optimizers
from pact.objective import PactConfig, check_setting
from pact.packed_weights import pack_linear_layers

MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"  # shipped architectures: `--model NAME` for NAME.json
VARIANTS = {"sft": "plain SFT", "cached_pact": "cached PACT", "online_pact": "online PACT"}
PLAN_DTYPES = ("bfloat16", "float16", "float32")
MARGIN_BYTES = 1 << 30  # CUDA context (~0.3-0.6 GiB) and cuBLAS/cuBLASLt and attention workspaces (tens of MiB)
MARGIN_FRACTION = 0.10  # the caching allocator's rounding to blocks and its fragmentation (reserved over allocated)
HEADER_TOKENS = 4  # the assistant header that opens online PACT's post-only contexts (3 to 5 tokens in chat templates)
_UNITS = {"": 2**30, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str, name: str = "gpu_memory") -> int:
    """Bytes of a memory size such as `24GiB`, `80GB`, `16000MiB` or `24` (GiB); `InvalidSetting` naming the setting
    `name` otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise InvalidSetting(name, f"{name} must be a memory size such as 24GiB, 80GB or 16000MiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def gib(value: int) -> float:
    """Bytes in GiB."""
    return value / 2**30


@dataclass
class PlanArguments:
    """What `pact plan` plans: the model's architecture and the training settings that change the step's memory."""

    model: str | None = field(default=None, metadata={
        "help": "the model: a shipped architecture name (llama-2-7b-chat, qwen2.5-7b-instruct, smollm2-135m-instruct), "
                "a model directory, a hub id, or a config.json file; only the architecture is read, never weights (required)"})
    per_device_train_batch_size: int = field(default=8, metadata={"aliases": ["--batch-size"], "help": "rows per micro-batch"})
    max_length: int = field(default=512, metadata={"help": "tokens per row (every row is planned at this length)"})
    prompt_length: int = field(default=1, metadata={
        "help": "tokens of each row before its response; every later token is a response token the loss covers "
                "(1 plans the most a row of --max_length tokens can cost)"})
    full: bool = field(default=False, metadata={"help": "full fine-tuning instead of LoRA"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "aliases": ["--lora-targets"], "help": "module names LoRA adapts (space- or comma-separated)"})
    dtype: str = field(default="bfloat16", metadata={"help": f"weight dtype: {', '.join(PLAN_DTYPES)}; with 4/8-bit weights, "
                                                             "the compute dtype and the dtype of the layers left unquantised"})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: the base's linear layers in bitsandbytes NF4 with double quantisation, counted at their packed size"})
    load_in_8bit: bool = field(default=False, metadata={"help": "the base's linear layers in bitsandbytes LLM.int8()"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each decoder layer in the backward instead of keeping its activations"})
    gpu_memory: str = field(default="24GiB", metadata={"help": "the GPU's memory, e.g. 24GiB, 80GB, 16000MiB"})
    safety_tokens: int = field(default=50, metadata={"help": "|S|, the number of safety tokens (pact safety-tokens --top)"})
    ce_chunk_size: int = field(default=1024, metadata={"help": "response positions per chunk of the cross-entropy (as pact train)"})

    def __post_init__(self) -> None:
        """Refuse a value the plan cannot use (`InvalidSetting` naming the field)."""
        if not self.model:
            raise InvalidSetting("model", "model is required: a shipped architecture name, a model directory, a hub id "
                                          "or a config.json file")
        self.lora_target_modules = [t.strip() for item in self.lora_target_modules or [] for t in str(item).split(",") if t.strip()]
        for name, low in (("per_device_train_batch_size", 1), ("max_length", 2), ("prompt_length", 1), ("lora_r", 1),
                          ("safety_tokens", 1), ("ce_chunk_size", 1)):
            check_setting(name, getattr(self, name), low, integer=True)
        if self.prompt_length >= self.max_length:
            raise InvalidSetting("prompt_length", f"prompt_length must be below max_length ({self.max_length}) so a response "
                                                  f"token is left, got {self.prompt_length}")
        if self.dtype not in PLAN_DTYPES:
            raise InvalidSetting("dtype", f"dtype must be one of {', '.join(PLAN_DTYPES)}, got {self.dtype!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise InvalidSetting("load_in_8bit", "load_in_4bit and load_in_8bit exclude each other; choose one")
        if self.quantization and self.full:
            name = f"load_in_{self.quantization}"
            raise InvalidSetting(name, f"{name} trains LoRA adapters on a frozen quantised base (QLoRA), and full fine-tuning "
                                       f"cannot update quantised weights; drop --full, or drop {name} to plan full fine-tuning")
        if self.dtype == "float16" and self.full:
            raise InvalidSetting("dtype", "dtype float16 trains LoRA adapters only (as pact train); use bfloat16 or float32 with --full")
        if not self.full and not self.lora_target_modules:
            raise InvalidSetting("lora_target_modules", "lora_target_modules must name at least one module (e.g. q_proj v_proj)")
        parse_bytes(self.gpu_memory)

    @property
    def quantization(self) -> str | None:
        """`4bit`, `8bit` or None."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a torch dtype."""
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        """The settings in a few words, e.g. `LoRA r=8 on q_proj, v_proj, 4-bit NF4 weights, checkpointing, batch 8 x 512`."""
        method = "full fine-tuning" if self.full else f"LoRA r={self.lora_r} on {', '.join(self.lora_target_modules)}"
        weights = {"4bit": "4-bit NF4 weights", "8bit": "8-bit weights", None: f"{self.dtype} weights"}[self.quantization]
        parts = [method, weights, *(["gradient checkpointing"] if self.gradient_checkpointing else []),
                 f"batch {self.per_device_train_batch_size} x {self.max_length} tokens"]
        return ", ".join(parts)


# --- The architecture --------------------------------------------------------------------------

def shipped_models() -> list[str]:
    """The architecture names shipped with the project (`--model NAME`)."""
    return sorted(p.stem for p in MODEL_CONFIGS.glob("*.json"))


def load_architecture(model: str):
    """The transformers config of `model`: a shipped name, a config.json file, a model directory, a `.gguf` file, the
    embedded model's name or a hub id (read from the hub or its local cache). No weights are read. `InvalidSetting`
    naming `model` when it is none of these."""
    from transformers import AutoConfig

    from pact.models import resolve_model_path

    shipped = MODEL_CONFIGS / f"{model}.json"
    path = shipped if shipped.is_file() else Path(model).expanduser()
    if path.suffix == ".json":
        return _config_file(model, path)
    if path.is_file() and path.suffix != ".gguf":
        raise InvalidSetting("model", f"model {model!r}: a file, but neither a config.json nor a .gguf model")
    try:
        _, location = resolve_model_path(model)
        return AutoConfig.from_pretrained(location)
    except (OSError, ValueError, PactError) as err:
        raise InvalidSetting("model", f"model {model!r}: no architecture could be read from it ({err}); give a model "
                                      f"directory, a config.json file, a hub id or one of {', '.join(shipped_models())}") from err


def _config_file(model: str, path: Path):
    """The transformers config held by the JSON file `path` (`InvalidSetting` naming `model` otherwise)."""
    from transformers import AutoConfig

    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InvalidSetting("model", f"model {model!r}: cannot read it ({err.strerror or err})") from err
    except ValueError as err:
        raise InvalidSetting("model", f"model {model!r}: not valid JSON ({err})") from err
    if not isinstance(values, dict) or "model_type" not in values:
        raise InvalidSetting("model", f"model {model!r}: not a transformers config.json (no model_type field)")
    try:
        return AutoConfig.for_model(**values)
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidSetting("model", f"model {model!r}: transformers cannot build a config from it ({err})") from err


def meta_model(config, args: PlanArguments):
    """The causal LM of `config` on the meta device, in `args.dtype`, its linear layers packed for a quantisation."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=args.torch_dtype)
    if args.quantization:
        pack_linear_layers(model, args.quantization, args.torch_dtype)
    return model


def trainable_model(model, args: PlanArguments):
    """`model` set up for training as `pact train` sets it up (`pact.train.adapt_for_training`, then the Trainer's
    non-reentrant gradient checkpointing). LoRA's alpha and dropout change no memory; the defaults are used."""
    from pact.train import adapt_for_training

    checkpointing = {"use_reentrant": False}
    model = adapt_for_training(model, full=args.full, quantization=args.quantization, lora_r=args.lora_r, lora_alpha=32,
                               lora_dropout=0.0, lora_target_modules=args.lora_target_modules,
                               gradient_checkpointing=args.gradient_checkpointing, checkpointing_kwargs=checkpointing)
    if args.gradient_checkpointing:
        enable_checkpointing(model, checkpointing)
    return model


def enable_checkpointing(model, kwargs: dict) -> None:
    """Turn on gradient checkpointing as the Trainer does (`activation_checkpointing_enable` where transformers has it)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def frozen_reference(model):
    """`model` as online PACT's reference: every parameter frozen, in eval mode."""
    model.requires_grad_(False)
    return model.eval()


# --- One measured step -------------------------------------------------------------------------

def synthetic_rows(batch_size: int, max_length: int, prompt_length: int, vocab_size: int, num_safety: int) -> list[dict]:
    """A micro-batch of cache rows (`CacheReader` items) of the planned shape: `max_length` tokens each, the response
    after the first `prompt_length`, targets on `num_safety` safety tokens. The values are arbitrary but valid."""
    generator = torch.Generator().manual_seed(0)
    steps = max_length - prompt_length
    safety = torch.arange(num_safety)
    return [{
        "example_id": index,
        "input_ids": torch.randint(0, vocab_size, (max_length,), generator=generator),
        "response_start": prompt_length,
        "response_spans": torch.tensor([[prompt_length, max_length]]),
        "safety_ids": safety,
        "columns": safety,
        "full_logits": torch.randn(steps, num_safety, generator=generator),
        "post_logits": torch.randn(steps, num_safety, generator=generator),
        "post_count": torch.randint(1, num_safety + 1, (steps,), generator=generator),
        "target_logprob": -torch.rand(steps, generator=generator),
        "logsumexp": torch.zeros(steps),
    } for index in range(batch_size)]


class DecoderScope:
    """Whether execution is inside the decoder stacks of some models: their forward, or their backward (from the moment
    the gradient of a decoder's output is computed until `end_backward`). Everything else a step makes is the loss's."""

    def __init__(self, models):
        from pact.reference import decoder_stack

        self.depth = 0
        self.in_backward = False
        self._handles = []
        for model in models:
            decoder = decoder_stack(model)
            self._handles.append(decoder.register_forward_pre_hook(self._enter))
            self._handles.append(decoder.register_forward_hook(self._leave))

    def _enter(self, module, args) -> None:
        """A decoder's forward starts."""
        self.depth += 1

    def _leave(self, module, args, output) -> None:
        """A decoder's forward ends; its backward starts when the first gradient of its outputs is computed."""
        from torch.autograd.graph import register_multi_grad_hook

        self.depth -= 1
        outputs = [t for t in tensors_in(output) if t.requires_grad]
        if outputs:
            register_multi_grad_hook(outputs, self._start_backward, mode="any")

    def _start_backward(self, grad) -> None:
        """The backward has reached a decoder's output."""
        self.in_backward = True

    def end_backward(self) -> None:
        """The backward pass is over."""
        self.in_backward = False

    def category(self) -> str:
        """`activations` inside a decoder, `logits_loss` outside (`pact.memory.CATEGORIES`)."""
        return "activations" if self.depth or self.in_backward else "logits_loss"

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


def trainer_optimizer(model, learning_rate: float = 3e-5) -> torch.optim.Optimizer:
    """The optimizer `pact train` builds by default (the Trainer's `adamw_torch_fused`) over the trainable parameters."""
    from transformers import Trainer, TrainingArguments

    kind, kwargs = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(learning_rate=learning_rate, report_to="none"))
    return kind([p for p in model.parameters() if p.requires_grad], **kwargs)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's state tensors, created by one step on zero gradients (as after any first step)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def measure_step(student, rows: list[dict], variant: str, reference=None, ce_chunk_size: int = 1024) -> Peak:
    """The peak of live tensor bytes on the student's device during one optimizer step of `variant` on `rows`, after
    one step has made the optimizer's state (steady state), by category (`pact.memory.CATEGORIES`).

    `sft`: the cross-entropy of the response tokens alone (`student_outputs`
    without safety tokens); `cached_pact`: `cached_pact_loss` on the rows,
    as `PactTrainer` computes it; `online_pact`: `reference` fills the
    batch's targets (`OnlineReference`), then `pact_batch_loss`. The same
    code measures real tensors and, under `plan`, meta tensors.
    """
    from pact.loss import cached_pact_loss, pact_batch_loss, student_outputs
    from pact.reference import head_device
    from pact.targets import OnlineReference

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    safety_ids = rows[0]["safety_ids"]
    weights = torch.full((len(safety_ids),), 1.0 / len(safety_ids))
    cfg = PactConfig()
    models = [student] + ([reference] if variant == "online_pact" else [])
    device = head_device(student)
    student.train()
    optimizer = trainer_optimizer(student)
    state = _optimizer_state(optimizer)
    scope = DecoderScope(models)
    tracker = LiveTensorBytes(device.type, scope.category)
    params = [p for p in student.parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.track([p.grad], "trainable_state")) for p in params]
    try:
        with tracker:
            for model in models:
                tracker.track([*model.parameters(), *model.buffers()], "weights")
            tracker.track(state, "trainable_state")
            tracker.reset_peak("forward")
            if variant == "sft":
                loss = student_outputs(student, collate_spans(*_token_side(rows)), None, ce_chunk_size=ce_chunk_size).ce
            elif variant == "cached_pact":
                loss = cached_pact_loss(student, rows, safety_ids, weights, cfg, 0, ce_chunk_size).loss
            else:
                tracker.phase = "reference forward"
                batch = OnlineReference(reference, safety_ids, [0] * HEADER_TOKENS, cfg, 0).fill(collate_spans(*_token_side(rows)))
                tracker.phase = "forward"
                loss = pact_batch_loss(student, batch, safety_ids, weights, cfg, ce_chunk_size).loss
            tracker.phase = "backward"
            loss.backward()
            scope.end_backward()
            del loss
            tracker.phase = "optimizer step"
            with tracker.region("trainable_state"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        scope.close()
        for hook in hooks:
            hook.remove()
    return tracker.peak


def _token_side(rows: list[dict]) -> tuple:
    """`collate_spans`' arguments for cache rows (their tokens and response spans, no targets)."""
    return [r["input_ids"] for r in rows], [r["response_spans"] for r in rows], [r["example_id"] for r in rows], 0


# --- The plan ----------------------------------------------------------------------------------

@dataclass
class VariantPlan:
    """One variant's step: its peak (bytes, by category, and the phase it happens in) and whether it fits."""

    peak_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    required_bytes: int
    fits: bool

    def to_dict(self) -> dict:
        """JSON-ready, with GiB figures beside the bytes."""
        return {**dataclasses.asdict(self), "peak_gib": round(gib(self.peak_bytes), 3),
                "required_gib": round(gib(self.required_bytes), 3)}


@dataclass
class Plan:
    """The planned peak of each variant for `arguments`, and for a variant that does not fit, the first change of the
    settings that makes it fit (`suggestions`; None where none does)."""

    arguments: PlanArguments
    architecture: dict
    gpu_memory_bytes: int
    variants: dict[str, VariantPlan]
    suggestions: dict[str, dict | None]

    def to_dict(self) -> dict:
        """JSON-ready: `{"variants": {"sft": {...}, "cached_pact": {...}, "online_pact": {...}}, ...}`."""
        return {"model": self.arguments.model, "architecture": self.architecture, "settings": dataclasses.asdict(self.arguments),
                "gpu_memory_bytes": self.gpu_memory_bytes, "margin": {"bytes": MARGIN_BYTES, "fraction_of_peak": MARGIN_FRACTION},
                "variants": {name: variant.to_dict() for name, variant in self.variants.items()},
                "suggestions": self.suggestions}

    def render(self) -> str:
        """The plan as a table with a line of advice per variant."""
        arch = self.architecture
        lines = [f"{self.arguments.model}: {arch['class']}, {arch['parameters'] / 1e9:.2f}B parameters, {arch['layers']} layers, "
                 f"hidden {arch['hidden_size']}, vocabulary {arch['vocab_size']}",
                 f"{self.arguments.describe()}, |S| = {self.arguments.safety_tokens}",
                 f"fits in {gib(self.gpu_memory_bytes):.1f} GiB when peak + {gib(MARGIN_BYTES):.0f} GiB + "
                 f"{MARGIN_FRACTION:.0%} of peak does (CUDA context, workspaces, fragmentation)", ""]
        header = ["variant", "peak GiB", *(c.replace("_", " ") for c in CATEGORIES), "peak during", "fits"]
        table = [header] + [[VARIANTS[name], f"{gib(v.peak_bytes):.2f}", *(f"{gib(v.breakdown[c]):.2f}" for c in CATEGORIES),
                             v.peak_phase, "yes" if v.fits else "no"] for name, v in self.variants.items()]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines += ["  ".join(cell.ljust(w) if i in (0, len(header) - 2) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                  for row in table]
        lines.append("")
        for name, suggestion in self.suggestions.items():
            if suggestion is None:
                lines.append(f"{VARIANTS[name]}: nothing tried fits (checkpointing, micro-batches down to 1, 4-bit weights)")
            else:
                lines.append(f"{VARIANTS[name]}: fits with {suggestion['change']} (peak {suggestion['peak_gib']:.2f} GiB)")
        if not self.suggestions:
            lines.append("every variant fits as set")
        return "\n".join(lines)


def architecture_summary(config) -> dict:
    """The model's class, parameter count (unquantised) and main sizes."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), _quiet():
        model = AutoModelForCausalLM.from_config(config)
    return {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "layers": getattr(config, "num_hidden_layers", None), "hidden_size": getattr(config, "hidden_size", None),
            "vocab_size": getattr(config, "vocab_size", None)}


# The settings that change the models a step runs (the batch's shape does not): models are built once per combination.
MODEL_SETTINGS = ("full", "lora_r", "lora_target_modules", "dtype", "load_in_4bit", "load_in_8bit", "gradient_checkpointing")


def measure_variants(config, args: PlanArguments, variants=tuple(VARIANTS), built: dict | None = None) -> dict[str, Peak]:
    """`measure_step` of each variant on meta tensors built from `config` under `args`; `built` keeps the models
    between calls (keyed by `MODEL_SETTINGS`)."""
    built = {} if built is None else built
    key = tuple(repr(getattr(args, name)) for name in MODEL_SETTINGS)
    with _quiet():
        if key not in built:
            built[key] = [trainable_model(meta_model(config, args), args), None]
        if "online_pact" in variants and built[key][1] is None:
            built[key][1] = frozen_reference(meta_model(config, args))
    student, reference = built[key]
    rows = synthetic_rows(args.per_device_train_batch_size, args.max_length, args.prompt_length, config.vocab_size,
                          args.safety_tokens)
    with HostShadows(), fused_attention(), fused_optimizers(), _quiet():
        return {name: measure_step(student, rows, name, reference, args.ce_chunk_size) for name in variants}


def _fitting(peak: Peak, budget: int) -> VariantPlan:
    """A variant's plan: its peak and whether peak plus the margin fits in `budget` bytes."""
    required = peak.total + MARGIN_BYTES + math.ceil(MARGIN_FRACTION * peak.total)
    return VariantPlan(peak.total, dict(peak.by_category), peak.phase, required, required <= budget)


def candidate_changes(args: PlanArguments) -> list[tuple[str, dict]]:
    """Settings to try, cheapest first, for a run that does not fit: first those that leave the result unchanged
    (gradient checkpointing; smaller micro-batches, with gradient accumulation keeping the global batch), then 4-bit
    weights (LoRA only), again with micro-batches down to 1."""
    batches = [args.per_device_train_batch_size // 2**i for i in range(1, args.per_device_train_batch_size.bit_length())]
    changes = [] if args.gradient_checkpointing else [("gradient checkpointing", {"gradient_checkpointing": True})]
    checkpointed = {"gradient_checkpointing": True}
    changes += [(f"gradient checkpointing, micro-batch {b} with gradient accumulation {args.per_device_train_batch_size // b}",
                 {**checkpointed, "per_device_train_batch_size": b}) for b in batches]
    if not args.full and args.quantization != "4bit":
        quantized = {**checkpointed, "load_in_4bit": True, "load_in_8bit": False}
        changes.append(("4-bit weights and gradient checkpointing", quantized))
        changes += [(f"4-bit weights, gradient checkpointing, micro-batch {b} with gradient accumulation "
                     f"{args.per_device_train_batch_size // b}", {**quantized, "per_device_train_batch_size": b}) for b in batches]
    return changes


def plan(args: PlanArguments) -> Plan:
    """The peak memory of one optimizer step of each variant (`VARIANTS`) under `args`, whether it fits in
    `args.gpu_memory`, and for each that does not, the cheapest change tried that fits (`candidate_changes`)."""
    config = load_architecture(args.model)
    if args.safety_tokens > config.vocab_size:
        raise InvalidSetting("safety_tokens", f"safety_tokens ({args.safety_tokens}) exceeds the vocabulary ({config.vocab_size})")
    budget = parse_bytes(args.gpu_memory)
    built: dict = {}
    try:
        variants = {name: _fitting(peak, budget) for name, peak in measure_variants(config, args, built=built).items()}
    except NotImplementedError as err:
        raise PactError(f"--model {args.model}: pact train cannot train this architecture: {err}") from err
    suggestions = {}
    for name, variant in variants.items():
        if not variant.fits:
            suggestions[name] = _first_fitting(config, args, name, budget, built)
    return Plan(args, architecture_summary(config), budget, variants, suggestions)


def _first_fitting(config, args: PlanArguments, variant: str, budget: int, built: dict) -> dict | None:
    """The first of `candidate_changes(args)` under which `variant` fits in `budget` bytes, with its peak; None if none."""
    for change, values in candidate_changes(args):
        trial = _fitting(measure_variants(config, dataclasses.replace(args, **values), (variant,), built)[variant], budget)
        if trial.fits:
            return {"change": change, "settings": values, "peak_bytes": trial.peak_bytes,
                    "peak_gib": round(gib(trial.peak_bytes), 3), "required_bytes": trial.required_bytes}
    return None


@dataclass
class CheckpointingChoice:
    """Whether a `pact train` run needs gradient checkpointing to fit in `memory_bytes`: the plan of its cached-PACT step
    without checkpointing, and with it (None when the step fits without)."""

    memory_bytes: int
    without: VariantPlan
    checkpointed: VariantPlan | None

    @property
    def needed(self) -> bool:
        """True when the step does not fit without checkpointing and does with it."""
        return not self.without.fits and self.checkpointed is not None and self.checkpointed.fits

    def explain(self) -> str:
        """The planned peaks (with the margin) against the memory, in one clause."""
        with_checkpointing = f", {gib(self.checkpointed.required_bytes):.2f} GiB with it" if self.checkpointed else ""
        return (f"planned peak plus margin {gib(self.without.required_bytes):.2f} GiB without gradient checkpointing"
                f"{with_checkpointing}, device memory {gib(self.memory_bytes):.2f} GiB")


def plan_checkpointing(args, model_config, memory_bytes: int, reader) -> CheckpointingChoice:
    """Plan the cached-PACT step of the run `args` (`PactTrainingArguments`) on the student `model_config` with the cache
    `reader`, without and then with gradient checkpointing, against `memory_bytes`.

    Rows are planned at the cache's longest row (a micro-batch is padded to
    its longest), with the response after the first token (the most such a
    row can cost) and the cache's safety tokens; the run's batch size, LoRA or
    full fine-tuning, dtype and quantisation as set.
    """
    base = PlanArguments(model=str(args.model or reader.manifest["model_source"]),
                         per_device_train_batch_size=args.per_device_train_batch_size,
                         max_length=max(int(reader.row_lengths().max(initial=0)), 2), full=args.full, lora_r=args.lora_r,
                         lora_target_modules=list(args.lora_target_modules), dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                         load_in_8bit=args.load_in_8bit, safety_tokens=len(reader.safety_ids), ce_chunk_size=args.ce_chunk_size)
    built: dict = {}
    without = _fitting(measure_variants(model_config, base, ("cached_pact",), built)["cached_pact"], memory_bytes)
    if without.fits:
        return CheckpointingChoice(memory_bytes, without, None)
    checkpointed_args = dataclasses.replace(base, gradient_checkpointing=True)
    checkpointed = _fitting(measure_variants(model_config, checkpointed_args, ("cached_pact",), built)["cached_pact"], memory_bytes)
    return CheckpointingChoice(memory_bytes, without, checkpointed)


@contextlib.contextmanager
def _quiet():
    """Silence transformers' and peft's advice meant for real training (checkpointing and cache notices) while planning."""
    import warnings

    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)
