"""`train(args, objective)`: a PACT run from a reference cache, LoRA (via peft) or
full fine-tuning, with no reference model in memory; the Python entry point
behind `pact train`. It prepares the run folder, loads the student, builds a
`PactTrainer` (the one training loop) and writes the outputs the ecosystem
expects: the adapter (or full model) and tokenizer in `save_pretrained` layout,
loadable by `AutoPeftModelForCausalLM` / `AutoModelForCausalLM`, plus the
project's `pact_config.json`, `metrics.jsonl` and `curves.png`.

`args.resume` continues from the run folder's last checkpoint, refusing
settings that would change the result and folders that are not runs of ours.
Under torchrun or `accelerate launch` every process calls `train`; the main
process alone writes the shared files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from pact.arguments import PactTrainingArguments
from pact.cache_tools import CacheReader
from pact.cache_tools.writer import atomic_write
from pact.distributed import current_ranks, run_on_main
from pact.errors import InvalidSetting, PactError, os_error_reason
from pact.models import LoadedModel, load_model
from pact.objective import PactArguments
from pact.plan import parse_bytes, plan_checkpointing
from pact.trainer import CHECKPOINT_PREFIX, MetricsCallback, PactTrainer, plot_curves

RUN_CONFIG = "pact_config.json"
STATE_FILE = "trainer_state.json"
FINAL_STAGING = ".final.tmp"
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")  # the Trainer's optimizer state; accelerate's under FSDP (a full state dict)
# The recorded settings a resumed run must share with the run that wrote the checkpoint: they change the result.
# Progress, save_steps, device, gradient checkpointing and the CE chunk size only change how it is computed.
RESULT_SETTINGS = ("full", "load_in_4bit", "load_in_8bit", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                   "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
                   "weight_decay", "max_grad_norm", "seed", "bf16", "fp16", "dtype", "bucket_window", "total_steps",
                   "model_fingerprint", "cache_identity")


@dataclass
class TrainResult:
    """Where the run wrote its outputs, how far it got, its per-step metrics and (with an eval cache) its eval metrics."""

    out: Path
    steps: int
    metrics: list[dict]
    eval_metrics: dict | None = None
    is_main: bool = True  # whether this process is the one that wrote the outputs (and holds the metrics)


def cache_identity(manifest: dict) -> str:
    """A sha256 of what makes a cache's training targets what they are: its fingerprints, safety tokens, gate,
    objective temperature and every shard's sha256 (paths and build times left out, so a copied cache is the same)."""
    content = {key: manifest.get(key) for key in ("fingerprints", "gate", "objective_temperature", "top_k", "dtype")}
    content["safety_tokens"] = {key: manifest["safety_tokens"].get(key) for key in ("ids", "weights")}
    content["shards"] = [shard["sha256"] for shard in manifest["shards"]]
    return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _adaptable_modules(model) -> list[str]:
    """Qualified names of the modules of `model` LoRA can adapt (linear, embedding and convolution layers)."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def check_lora_targets(model, targets: list[str]) -> None:
    """Refuse `lora_target_modules` that name no adaptable module of `model` (peft matches a target against a module's
    name or its dotted suffix), naming the unknown ones and the names that would work."""
    names = _adaptable_modules(model)
    unknown = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if unknown:
        candidates = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise InvalidSetting("lora_target_modules", f"lora_target_modules names no module of the model: {', '.join(map(repr, unknown))} "
                                                    f"(modules LoRA can adapt there: {', '.join(candidates[:12])})")


def _choose_checkpointing(args: PactTrainingArguments, model_config, reader: CacheReader) -> None:
    """Turn gradient checkpointing on when the run's step would not fit in the device's memory without it and does with
    it (`pact.plan.plan_checkpointing`), unless the user asked for it already or switched the automatic choice off.

    Planned against `plan_memory` when set (on any device), else the GPU's
    total memory; a CPU run without `plan_memory` is left as it is, and so is
    an FSDP run (each device holds a shard of the model, which the plan does
    not model). When neither fits, the run goes ahead as set and a warning
    suggests `pact plan`.
    """
    if args.gradient_checkpointing or not args.auto_gradient_checkpointing or args.fsdp:
        return
    if args.plan_memory is not None:
        memory = parse_bytes(args.plan_memory, "plan_memory")
    elif args.device.type == "cuda":
        memory = torch.cuda.get_device_properties(args.device).total_memory
    else:
        return
    choice = plan_checkpointing(args, model_config, memory, reader)
    main = current_ranks().is_main
    if choice.needed:
        _turn_on_checkpointing(args)
        if main:
            print(f"gradient checkpointing on: the step would not fit otherwise ({choice.explain()}; "
                  "--auto_gradient_checkpointing false to keep it off)")
    elif not choice.without.fits and main:
        print(f"warning: the step may not fit even with gradient checkpointing ({choice.explain()}); run `pact plan` "
              "for the settings that fit (smaller micro-batches, 4-bit weights)")


def _turn_on_checkpointing(args: PactTrainingArguments) -> None:
    """Gradient checkpointing on, non-reentrant unless the user gave other kwargs, under both of transformers' names:
    `activation_checkpointing*` (what the Trainer reads where it exists) and their older aliases `gradient_checkpointing*`,
    which `TrainingArguments` resolves only at construction."""
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {"use_reentrant": False}
    for name in ("gradient_checkpointing", "activation_checkpointing"):
        if hasattr(args, name):
            setattr(args, name, True)
            setattr(args, f"{name}_kwargs", kwargs)


def _student(loaded: LoadedModel, args: PactTrainingArguments):
    """The model to train, set up by `adapt_for_training` from the run's settings (seeded first)."""
    from transformers import set_seed

    set_seed(args.seed)
    if args.gradient_checkpointing:
        _turn_on_checkpointing(args)
    return adapt_for_training(loaded.model, full=args.full, quantization=args.quantization, lora_r=args.lora_r,
                              lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                              lora_target_modules=args.lora_target_modules, gradient_checkpointing=args.gradient_checkpointing,
                              checkpointing_kwargs=args.gradient_checkpointing_kwargs)


def adapt_for_training(model, *, full: bool, quantization: str | None, lora_r: int, lora_alpha: int, lora_dropout: float,
                       lora_target_modules, gradient_checkpointing: bool, checkpointing_kwargs: dict | None):
    """`model` as `pact train` trains it (and `pact plan` measures it): itself (`full`) or wrapped with LoRA adapters
    (targets checked first), a quantised base prepared by peft for k-bit training first (frozen, norms and head in
    float32). Gradient checkpointing itself is turned on by the Trainer (or the planner)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if gradient_checkpointing:
        model.config.use_cache = False
    if full:
        return model
    check_lora_targets(model, lora_target_modules)
    if quantization:
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                        gradient_checkpointing_kwargs=checkpointing_kwargs)
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(lora_target_modules),
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


# --- The run folder --------------------------------------------------------------------------

def _read_json(path: Path, what: str, remedy: str) -> dict:
    """The JSON object in `path` (a run's own file); `PactError` naming it, and saying `remedy`, when it is missing,
    unreadable or torn."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PactError(f"{path}: cannot read the {what} ({err}); {remedy}") from err
    if not isinstance(data, dict):
        raise PactError(f"{path}: the {what} is not a JSON object; {remedy}")
    return data


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint of the highest step in `out` (checkpoints are renamed into place once complete)."""
    found = [p for p in out.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit() and p.is_dir()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def prepare_output(out: Path, resume: bool, checkpoint_path: str | None = None) -> Path | None:
    """Create `out`, refusing a file or a non-empty folder unless resuming; returns the checkpoint to resume from, if any:
    `checkpoint_path` when given, else with `resume` the last one in `out`.

    Staging folders a killed run left behind are removed; the checkpoint is
    checked readable here, so a torn one is named instead of failing deep in the Trainer.
    """
    resume = resume or bool(checkpoint_path)
    if out.exists() and not out.is_dir():
        raise PactError(f"--output_dir {out} is a file, not a directory; choose a directory for the run's outputs")
    try:
        if out.exists() and any(out.iterdir()) and not resume:
            raise PactError(f"output directory {out} is not empty; pass --resume to continue a run there or choose another --output_dir")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PactError(f"cannot create the output directory {out} (--output_dir): {os_error_reason(err)}") from err
    checkpoint = Path(checkpoint_path).expanduser() if checkpoint_path else latest_checkpoint(out) if resume else None
    if checkpoint is not None and not checkpoint.is_dir():
        raise PactError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint folder")
    if resume and checkpoint is None:
        _refuse_foreign_run_folder(out)
    for leftover in [*out.glob(f".{CHECKPOINT_PREFIX}*.tmp"), out / FINAL_STAGING]:
        shutil.rmtree(leftover, ignore_errors=True)
    if checkpoint is not None:
        _check_checkpoint_readable(checkpoint)
    return checkpoint


def _refuse_foreign_run_folder(out: Path) -> None:
    """`--resume` found no checkpoint: starting over may rewrite `out`'s files, so `out` must be empty or a run of ours.

    A run killed before its first checkpoint left its `pact_config.json`; any
    other non-empty folder might hold files of the user's, and is refused.
    """
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(f".{CHECKPOINT_PREFIX}"))
    if not entries:
        return
    try:
        ours = isinstance(json.loads((out / RUN_CONFIG).read_text(encoding="utf-8")).get("cache_identity"), str)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise PactError(f"--resume: {out} holds no checkpoint to resume from and is not a pact train run folder "
                        f"(it holds {', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''}); "
                        "choose an empty --output_dir, or drop --resume")


def _check_checkpoint_readable(checkpoint: Path) -> None:
    """Read a checkpoint's state, optimizer and scheduler files (safely: JSON and `weights_only` tensors) before the
    Trainer does, so a damaged file is named with what to do."""
    _read_json(checkpoint / STATE_FILE, "checkpoint state",
               "delete that checkpoint folder to resume from an earlier one, or start a new run in another --output_dir")
    optimizer = next((checkpoint / name for name in OPTIMIZER_FILES if (checkpoint / name).is_file()), checkpoint / OPTIMIZER_FILES[0])
    try:
        for path in (optimizer, checkpoint / "scheduler.pt"):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises unpickler errors of many types for a damaged file
        raise PactError(f"{checkpoint}: cannot resume from this checkpoint ({type(err).__name__}: {err}); delete it to resume "
                        "from an earlier one, or start a new run in another --output_dir") from err


def _run_record(args: PactTrainingArguments, objective: PactArguments, loaded: LoadedModel, reader: CacheReader,
                total_steps: int, world_size: int, fsdp: bool) -> dict:
    """What `pact_config.json` records: the settings, the identities of the model and cache, the derived sizes and
    whether the weights are sharded (`fsdp`)."""
    return {**args.run_settings(), "objective": objective.to_dict(), "model_source": loaded.source,
            "model_fingerprint": loaded.fingerprint, "cache_identity": cache_identity(reader.manifest), "total_steps": total_steps,
            "cache_rows": len(reader), "safety_tokens": len(reader.safety_ids), "world_size": world_size, "fsdp": fsdp,
            "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size}


def _result_settings(record: dict) -> dict:
    """The settings of a run record that change the result (see `RESULT_SETTINGS`), the objective's constants one by one."""
    settings = {key: record.get(key) for key in RESULT_SETTINGS}
    settings.update({f"objective.{key}": value for key, value in (record.get("objective") or {}).items()})
    return settings


def check_resume_settings(out: Path, checkpoint: Path, record: dict) -> None:
    """Refuse to resume `checkpoint` under settings that change the result, naming each one with its old and new value.

    The old values come from `out/pact_config.json`, written before the run's
    first step; resuming under other values would mix two runs into one result.
    """
    recorded = _read_json(out / RUN_CONFIG, "run's recorded settings",
                          "without them the resumed run cannot be checked against the first; start a new run in another --output_dir")
    if recorded.get("world_size", 1) != record["world_size"]:
        raise PactError(f"{checkpoint} was written by a run of {recorded.get('world_size', 1)} process(es), this one has "
                        f"{record['world_size']}; resume with the same number of processes (the global batch depends on it)")
    if recorded.get("fsdp", False) != record["fsdp"]:
        raise PactError(f"{checkpoint} was written by a run {'with' if recorded.get('fsdp') else 'without'} FSDP, this one runs "
                        f"{'with' if record['fsdp'] else 'without'}; resume it as it was written (the checkpoint's model and "
                        "optimizer files differ)")
    old, new = _result_settings(recorded), _result_settings(json.loads(json.dumps(record)))
    differing = [key for key in new if old.get(key) != new[key]]
    changed = [f"{key} {old.get(key)!r} -> {new[key]!r}" for key in differing]
    if "cache_identity" in differing:
        changed.append(f"cache {recorded.get('cache')} -> {record['cache']}")
    if changed:
        raise PactError(f"cannot resume {checkpoint}: these settings differ from {out / RUN_CONFIG}: {'; '.join(changed)}; "
                        "resume with the recorded settings, or start a new run in another --output_dir")


def total_steps(args: PactTrainingArguments, rows: int, world_size: int) -> int:
    """Optimizer steps of the run: `max_steps`, else the epochs' steps (as the Trainer counts them)."""
    if args.max_steps > 0:
        return args.max_steps
    micro_batches = math.ceil(rows / (args.per_device_train_batch_size * world_size))
    return math.ceil(args.num_train_epochs * math.ceil(micro_batches / args.gradient_accumulation_steps))


def _save_outputs(trainer: PactTrainer, out: Path, metrics: list[dict]) -> None:
    """Save the weights, tokenizer and `curves.png` into a staging folder inside `out`, then move each file into place
    (one atomic rename per file), so a crash or a full disk never leaves a torn adapter in `out`."""
    staging = out / FINAL_STAGING
    what = f"the trained {'model' if trainer.args.full else 'adapter'} to {out}"
    try:
        trainer.save_model(str(staging))
        if trainer.args.should_save and metrics:
            plot_curves(metrics, staging / "curves.png")
    except (OSError, RuntimeError, SafetensorError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise PactError(f"cannot write {what}: {os_error_reason(err)}; nothing was replaced, earlier checkpoints are intact "
                        "(free space or fix the folder's permissions, then rerun with --resume)") from err
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        for item in sorted(staging.iterdir()):
            os.replace(item, out / item.name)
        staging.rmdir()
    trainer.accelerator.wait_for_everyone()


def train(args: PactTrainingArguments, objective: PactArguments | None = None,
          trainer_class: type[PactTrainer] = PactTrainer) -> TrainResult:
    """Fine-tune the cache's reference model (or `args.model`) on `args.cache` with the PACT loss.

    Writes to `args.output_dir`: the adapter (or full model) and tokenizer,
    `pact_config.json` with every effective setting, `metrics.jsonl` (one
    object per logging step), `curves.png`, and checkpoints every `save_steps`.
    Refusals are `PactError`s (`InvalidSetting` naming the field). `trainer_class` may be a `PactTrainer` subclass.
    """
    objective = objective if objective is not None else PactArguments()
    if not args.cache:
        raise InvalidSetting("cache", "cache is required: the cache directory built by `pact-cache build`")
    _ = args.device  # joins the launcher's process group (accelerate), if any
    world_size = current_ranks().world_size
    out = Path(args.output_dir)
    reader = CacheReader(args.cache)
    checkpoint = run_on_main(lambda: prepare_output(out, args.resume, args.resume_from_checkpoint))
    # A quantised student is loaded straight onto its device (bitsandbytes quantises there); the Trainer moves any other.
    loaded = load_model(args.model or reader.manifest["model_source"], device=str(args.device) if args.quantization else "cpu",
                        dtype=args.dtype, quantization=args.quantization)
    _choose_checkpointing(args, loaded.model.config, reader)
    student = _student(loaded, args)
    metrics = MetricsCallback(out, curves_at_end=False)
    trainer = trainer_class(student, args, cache=reader, processing_class=loaded.tokenizer, objective=objective,
                          eval_cache=args.eval_cache, force=args.force, model_fingerprint=loaded.fingerprint,
                          ce_chunk_size=args.ce_chunk_size, callbacks=[metrics])
    if trainer.is_world_process_zero():
        for warning in trainer.warnings:
            print(f"warning: {warning} (--force)")
    record = _run_record(args, objective, loaded, reader, total_steps(args, len(reader), world_size), world_size,
                         trainer.is_fsdp_enabled)
    if checkpoint is not None:
        check_resume_settings(out, checkpoint, record)
    run_on_main(lambda: atomic_write(out / RUN_CONFIG, json.dumps(record, indent=2).encode()))
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    _save_outputs(trainer, out, metrics.records)
    eval_metrics = trainer.evaluate() if trainer.eval_cache is not None else None
    if args.push_to_hub:
        trainer.push_to_hub(commit_message=f"pact train: {trainer.state.global_step} steps")
    return TrainResult(out=out, steps=trainer.state.global_step, metrics=metrics.records, eval_metrics=eval_metrics,
                       is_main=trainer.is_world_process_zero())
