"""Will it fit? The peak device memory of one optimizer step, planned from a model's architecture alone.

`plan(PlanArguments(model=..., ...)) -> Plan` runs the project's real training step for plain SFT (the same pipeline
with the cross-entropy only), cached PACT and online PACT (a second, frozen reference model filling the batch's
targets), and cached and online distillation (a teacher's top-K from the cache, or from a teacher of the student's
architecture in memory) on meta tensors (`pact.planning.step`); `pact.planning.memory` counts the bytes of every live tensor after
every operator and keeps the peak, by category. What no tensor holds is not counted (the CUDA context, cuBLAS and
attention workspaces, the caching allocator's free blocks and fragmentation): a run fits when its peak plus
`MARGIN_BYTES` plus `MARGIN_FRACTION` of the peak fits in the GPU's memory. `plan_checkpointing` is the same plan for
a `pact train` run, which turns gradient checkpointing on when the step needs it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pact.checks import parse_bytes
from pact.errors import InvalidSetting, PactError
from pact.planning.architecture import (
    _quiet, architecture_summary, frozen_reference, load_architecture, meta_model, trainable_model,
)
from pact.planning.arguments import PlanArguments
from pact.planning.memory import CATEGORIES, Peak
from pact.planning.meta_run import HostShadows, fused_attention, fused_optimizers
from pact.planning.step import KD_VARIANTS, REFERENCE_VARIANTS, VARIANTS, measure_step, synthetic_rows

MARGIN_BYTES = 1 << 30  # CUDA context (~0.3-0.6 GiB) and cuBLAS/cuBLASLt and attention workspaces (tens of MiB)
MARGIN_FRACTION = 0.10  # the caching allocator's rounding to blocks and its fragmentation (reserved over allocated)


def gib(value: int) -> float:
    """Bytes in GiB."""
    return value / 2**30


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
        """JSON-ready: `{"variants": {"sft": {...}, "cached_pact": {...}, "online_pact": {...}, "cached_kd": {...},
        "online_kd": {...}}, ...}`."""
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
        if set(variants) & set(REFERENCE_VARIANTS) and built[key][1] is None:
            built[key][1] = frozen_reference(meta_model(config, args))
    student, reference = built[key]
    shape = (args.per_device_train_batch_size, args.max_length, args.prompt_length, config.vocab_size, args.safety_tokens)
    rows = synthetic_rows(*shape)
    kd_rows = synthetic_rows(*shape, kd_top_k=args.kd_top_k) if set(variants) & set(KD_VARIANTS) else None
    with HostShadows(), fused_attention(), fused_optimizers(), _quiet():
        return {name: measure_step(student, kd_rows if name in KD_VARIANTS else rows, name, reference, args.ce_chunk_size)
                for name in variants}


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
    if args.kd_top_k >= config.vocab_size:
        raise InvalidSetting("kd_top_k", f"kd_top_k ({args.kd_top_k}) must be below the vocabulary ({config.vocab_size})")
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
    row can cost) and the cache's safety tokens; the run's batch size (at most
    the cache's rows: no micro-batch holds more), LoRA or full fine-tuning,
    dtype and quantisation as set.
    """
    base = PlanArguments(model=str(args.model or reader.manifest["model_source"]),
                         per_device_train_batch_size=min(args.per_device_train_batch_size, max(len(reader), 1)),
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
