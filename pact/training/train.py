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

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from pact.cache_tools import CacheReader
from pact.checks import parse_bytes
from pact.data.chat import assistant_header_ids
from pact.distributed import current_ranks, run_on_main
from pact.errors import InvalidSetting, PactError, os_error_reason
from pact.models.adapters import adapt_for_training, share_base_model
from pact.models.loading import LoadedModel, load_model, pad_token_id
from pact.objective.settings import ObjectiveArguments
from pact.objective.targets import OnlineTargets
from pact.planning.plan import plan_checkpointing
from pact.training.arguments import PactTrainingArguments
from pact.training.callbacks import KlExplanation, MetricsCallback, plot_curves
from pact.training.data_cache import cache_from_data
from pact.training.model_card import write_model_card
from pact.training.run_folder import (
    STAGING_MARKER, check_resume_settings, new_staging, prepare_output, run_record, save_run_record,
)
from pact.training.trainer import PactTrainer


@dataclass
class TrainResult:
    """Where the run wrote its outputs, how far it got, its per-step metrics and (with an eval cache) its eval metrics."""

    out: Path
    steps: int
    metrics: list[dict]
    eval_metrics: dict | None = None
    is_main: bool = True  # whether this process is the one that wrote the outputs (and holds the metrics)


def _choose_checkpointing(args: PactTrainingArguments, model_config, reader: CacheReader) -> None:
    """Turn gradient checkpointing on when the run's step would not fit in the device's memory without it and does with
    it (`pact.planning.plan.plan_checkpointing`), unless the user asked for it already or switched the automatic choice off.

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
    return adapt_for_training(loaded.model, args, args.gradient_checkpointing, args.gradient_checkpointing_kwargs)


def total_steps(args: PactTrainingArguments, rows: int, world_size: int) -> int:
    """Optimizer steps of the run: `max_steps`, else the epochs' steps (as the Trainer counts them)."""
    if args.max_steps > 0:
        return args.max_steps
    micro_batches = math.ceil(rows / (args.per_device_train_batch_size * world_size))
    return math.ceil(args.num_train_epochs * math.ceil(micro_batches / args.gradient_accumulation_steps))


def _save_outputs(trainer: PactTrainer, out: Path, metrics: list[dict], source: str) -> None:
    """Save the weights, tokenizer, `curves.png` and the model card (the adapter naming its base as others load it: a run
    of the model `source`) into a new staging folder inside `out` (`new_staging`), then move each file into place (one
    atomic rename per file), so a crash or a full disk never leaves a torn adapter in `out`."""
    what = f"the trained {'model' if trainer.args.full else 'adapter'} to {out}"
    try:
        staging = Path(run_on_main(lambda: str(new_staging(out, "final"))))
    except OSError as err:
        raise PactError(f"cannot write {what}: {os_error_reason(err)}; nothing was replaced (free space or fix the folder's "
                        "permissions, then rerun with --resume)") from err
    try:
        trainer.save_model(str(staging))
        if trainer.args.should_save and metrics:
            plot_curves(metrics, staging / "curves.png")
        if trainer.args.should_save:
            share_base_model(staging, source)
            write_model_card(staging, out, trainer.cache.manifest, metrics)
    except (OSError, RuntimeError, SafetensorError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise PactError(f"cannot write {what}: {os_error_reason(err)}; nothing was replaced, earlier checkpoints are intact "
                        "(free space or fix the folder's permissions, then rerun with --resume)") from err
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        for item in sorted(staging.iterdir()):
            if item.name != STAGING_MARKER:
                os.replace(item, out / item.name)
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()


def _online_targets(student, loaded: LoadedModel, reader: CacheReader, objective: ObjectiveArguments,
                    args: PactTrainingArguments) -> OnlineTargets:
    """The live reference of an online run: the LoRA student with its adapters disabled (the same weights, no copy)."""
    if args.full:
        raise InvalidSetting("full", "an online run takes the reference from the LoRA student with its adapters off; "
                                     "full fine-tuning changes the reference's own weights")
    return OnlineTargets(student, reader.safety_ids, assistant_header_ids(loaded.tokenizer), objective,
                         pad_token_id(loaded.tokenizer))


def _cache_of_run(args: PactTrainingArguments, objective: ObjectiveArguments) -> tuple[CacheReader, LoadedModel | None]:
    """The run's cache: `args.cache`, or the cache of `args.data` (`cache_from_data`: built with the reference model on
    the training device, or reused), then named in `args.cache` so the run's record says which. Returns the reference
    model too when the student starts from it (it is freed here for a quantised student, which is loaded anew)."""
    if not args.data:
        return CacheReader(args.cache), None
    reference = load_model(args.model, device=str(args.device), dtype=args.dtype)
    reader = cache_from_data(args.data, reference, args, args, objective, cache=args.cache, progress=not args.disable_tqdm)
    args.cache = str(reader.directory)
    return reader, None if args.quantization else reference


def train(args: PactTrainingArguments, objective: ObjectiveArguments | None = None,
          trainer_class: type[PactTrainer] = PactTrainer, online: bool = False) -> TrainResult:
    """Fine-tune the cache's reference model (or `args.model`) on `args.cache` with the PACT loss; given `args.data`
    instead, on the cache of that data (built on first use with `args.model` as the reference, reused after).

    Writes to `args.output_dir` (required; transformers' default folder is refused): the adapter (or full model) and tokenizer,
    `pact_config.json` with every effective setting, `metrics.jsonl` (one
    object per logging step), `curves.png`, `README.md` (the model card: `pact.training.model_card`), and
    checkpoints every `save_steps`.
    Refusals are `PactError`s (`InvalidSetting` naming the field). `trainer_class` may be a `PactTrainer` subclass.
    `online` computes the targets live instead (`OnlineTargets`: the student with its LoRA adapters off is the
    reference), on the cache's rows: the online objective, the control that shows the cache changes nothing.
    """
    objective = objective if objective is not None else ObjectiveArguments()
    if not args.cache and not args.data:
        raise InvalidSetting("cache", "cache or data is required: the cache directory built by `pact-cache build`, or the "
                                      "training data to build it from (data)")
    if not getattr(args, "output_dir_given", True):
        raise InvalidSetting("output_dir", "output_dir is required: the run folder the adapter (or full model), pact_config.json "
                                           "and metrics.jsonl are written to, e.g. --output_dir runs/first (nothing is written to "
                                           "a default folder)")
    _ = args.device  # joins the launcher's process group (accelerate), if any
    world_size = current_ranks().world_size
    out = Path(args.output_dir)
    checkpoint = run_on_main(lambda: prepare_output(out, args.resume, args.resume_from_checkpoint))
    reader, loaded = _cache_of_run(args, objective)
    if loaded is None:
        # A quantised student is loaded straight onto its device (bitsandbytes quantises there); the Trainer moves any other.
        loaded = load_model(args.model or reader.manifest["model_source"], device=str(args.device) if args.quantization else "cpu",
                            dtype=args.dtype, quantization=args.quantization)
    _choose_checkpointing(args, loaded.model.config, reader)
    student = _student(loaded, args)
    metrics = MetricsCallback(out, curves_at_end=False)
    trainer = trainer_class(student, args, cache=reader, processing_class=loaded.tokenizer, objective=objective,
                            eval_cache=args.eval_cache, force=args.force, model_fingerprint=loaded.fingerprint,
                            ce_chunk_size=args.ce_chunk_size, callbacks=[metrics, KlExplanation(objective)],
                            targets=_online_targets(student, loaded, reader, objective, args) if online else None)
    if trainer.is_world_process_zero():
        for warning in trainer.warnings:
            print(f"warning: {warning} (--force)")
    record = run_record(args, objective, loaded, reader, total_steps(args, len(reader), world_size), world_size,
                         trainer.is_fsdp_enabled)
    if checkpoint is not None:
        check_resume_settings(out, checkpoint, record)
    run_on_main(lambda: save_run_record(out, record))
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    _save_outputs(trainer, out, metrics.records, loaded.source)
    eval_metrics = trainer.evaluate() if trainer.eval_cache is not None else None
    if args.push_to_hub:
        trainer.push_to_hub(commit_message=f"pact train: {trainer.state.global_step} steps")
    return TrainResult(out=out, steps=trainer.state.global_step, metrics=metrics.records, eval_metrics=eval_metrics,
                       is_main=trainer.is_world_process_zero())
