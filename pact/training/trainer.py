"""`PactTrainer`: the one training loop, a `transformers.Trainer` whose loss is
CE + lambda * safety-token KL against cached reference targets (or a token-wise
objective, docs/objective.md section 4).

It overrides only what PACT needs: the constructor (the cache/model/tokenizer
and objective checks), the train data loader (a seeded shard-aware shuffle,
length-bucketed, cut into global micro-batches, each process taking its
contiguous part, collated in a worker process and pinned), the loss (the exact
response-token mean over the whole optimizer step across accumulation and
processes), evaluation on an eval cache, logging of `ce`, `kl`, `tokenwise` and `kd`
(`LOGGED_PARTS`), a stop before applying a non-finite step, and atomic
checkpoints.

The hot path makes no host synchronisation: the micro-batches arrive
collated and pinned and are copied with `non_blocking=True`, the logged
numbers and the non-finite guard stay on the device (`StepGuard`), and the one
host read of an optimizer step happens when the step is logged, saved or the
last (`_maybe_log_save_evaluate`): none on other steps. `tests/sync_counter.py`
counts it (tests/test_hotpath.py).

Multi-process (torchrun, `accelerate launch`, data-parallel): a step's global
batch is `per_device_train_batch_size x gradient_accumulation_steps x world
size` rows, cut into the same global micro-batches one process with a batch of
`per_device_train_batch_size x world size` would use, so N processes compute
the loss, gradient and metrics of one process on that global batch. The same
holds under FSDP (`--fsdp` or an accelerate FSDP config; transformers applies
FSDP2): the loss's projections onto the LM head run inside the model's forward
(`pact.models.projection`), where FSDP has gathered the head's weight. A run that asks
for FSDP where accelerate does not set it up (on CPU processes) is refused
rather than trained unsharded.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback

from pact.cache_tools import CacheReader
from pact.cache_tools.reader import ShardShuffleSampler
from pact.data.batch import CacheBatch
from pact.distributed import run_on_main
from pact.errors import CheckFailed, PactError, os_error_reason
from pact.models.loading import pad_token_id
from pact.objective.loss import PactOutput, pact_batch_loss
from pact.objective.settings import ObjectiveArguments
from pact.objective.targets import CachedTargets, TargetSource
from pact.training.arguments import DEFAULT_BUCKET_WINDOW, DEFAULT_CE_CHUNK, PactTrainingArguments, ignored_trainer_fields
from pact.training.compatibility import StudentIdentity, check_cache_serves, check_compatibility
from pact.training.inputs import check_taken, default_output_dir, resolve_inputs
from pact.training.batches import CacheRows, GlobalMicroBatches, cached_order, keep_batch, raise_batch_error
from pact.training.run_folder import CHECKPOINT_PREFIX, new_checkpoint_staging
from pact.training.step_guard import Fetched, StepGuard

LOGGED_PARTS = ("loss", "ce", "kl", "tokenwise", "kd")  # the `PactOutput` parts logged per step, token-mean over the step


class PactTrainer(Trainer):
    """A `Trainer` for the PACT loss on a reference cache, taking what TRL's `SFTTrainer` takes.

    `model` is a model or a name (folder, hub id, `.gguf`, the embedded default); `args` `PactTrainingArguments` (or
    plain `TrainingArguments`; none: a run folder named after the model); `train_dataset` the training data: a cache
    (folder or `CacheReader`), or data (a `datasets.Dataset`, data file or hub dataset in any supported row format),
    whose reference cache is built with `model` as the reference on first use and reused after (it says where);
    `eval_dataset` likewise (`evaluate()` reports `eval_loss`, `eval_ce`, `eval_kl`, `eval_tokenwise` and `eval_kd` on it);
    `processing_class` the tokenizer (default: the model's), checked and saved with the weights; `peft_config` a
    `peft.PeftConfig` to wrap the model with. `cache` / `eval_cache` name caches explicitly; `objective` holds the
    loss's constants; `targets` where a batch's targets come from (`pact.objective.targets`: the cache's by default,
    `OnlineTargets` for a live reference). The constructor refuses a model or tokenizer the cache was not built for
    (`force=True` overrides fingerprints only, with warnings in `self.warnings`) and gate settings other than the cache's.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, model, args=None, *, train_dataset=None, eval_dataset=None, processing_class=None, peft_config=None,
                 cache=None, objective: ObjectiveArguments | None = None, eval_cache=None, force: bool = False,
                 model_fingerprint: str | None = None, ce_chunk_size: int | None = None, targets: TargetSource | None = None,
                 **kwargs):
        args = args if args is not None else PactTrainingArguments(output_dir=default_output_dir(model))
        check_taken(kwargs, args)
        if not isinstance(args, PactTrainingArguments):  # made by another tool (TRL's SFTConfig, axolotl): said, not refused
            for _, message in ignored_trainer_fields(args):
                warnings.warn(message, stacklevel=2)
        self.objective = objective if objective is not None else ObjectiveArguments()
        inputs = resolve_inputs(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset, cache=cache,
                                eval_cache=eval_cache, processing_class=processing_class, peft_config=peft_config,
                                objective=self.objective, model_fingerprint_=model_fingerprint)
        model, processing_class = inputs.model, inputs.tokenizer
        self.cache, self.eval_cache = inputs.cache, inputs.eval_cache
        self.student_identity = StudentIdentity(model, processing_class, inputs.fingerprint)
        self.warnings = check_compatibility(self.cache.manifest, self.student_identity, self.objective, force)
        if self.eval_cache is not None:
            check_compatibility(self.eval_cache.manifest, self.student_identity, self.objective, force)
            _check_same_safety_tokens(self.cache, self.eval_cache)
        self.safety_ids, self.safety_weights = self.cache.safety_ids, self.cache.safety_weights
        self.targets = targets if targets is not None else CachedTargets(self.safety_ids)
        for reader in (self.cache, self.eval_cache) if targets is None else ():
            if reader is not None:
                check_cache_serves(reader, self.objective)
        self.pad_id = pad_token_id(processing_class)
        self.ce_chunk_size = ce_chunk_size if ce_chunk_size is not None else getattr(args, "ce_chunk_size", DEFAULT_CE_CHUNK)
        kwargs["data_collator"] = keep_batch
        eval_rows = CacheRows(self.eval_cache, self.pad_id) if self.eval_cache is not None else None
        super().__init__(model=model, args=args, train_dataset=CacheRows(self.cache, self.pad_id), processing_class=processing_class,
                         eval_dataset=eval_rows, **kwargs)
        _check_fsdp_set_up(self)
        self.args.remove_unused_columns = False
        self.args.logging_nan_inf_filter = False  # a host read of every micro-batch's loss; a non-finite step stops the run anyway
        if self.args.disable_tqdm:
            self.remove_callback(PrinterCallback)
        self._step: torch.Tensor | None = None  # LOGGED_PARTS of this optimizer step so far, this process's share, on the device
        self._step_tokens: torch.Tensor | int = 0
        self._guard = StepGuard(LOGGED_PARTS)
        self._safety_on_device: tuple[torch.Tensor, torch.Tensor] | None = None
        self._safety(self.args.device)  # copied now, not inside the first step
        self._checkpoint_root: str | None = None

    def get_train_dataloader(self) -> DataLoader:
        """Shuffled shard by shard (each shard decoded once per epoch), seeded by `args.seed` and the epoch, global
        micro-batches length-bucketed within windows of `args.bucket_window` of them (plain `TrainingArguments` get the
        default; see `ShardShuffleSampler`), then split among processes here, not by accelerate (which would pad an
        uneven last batch with repeats)."""
        window = getattr(self.args, "bucket_window", DEFAULT_BUCKET_WINDOW)
        global_batch = self.args.per_device_train_batch_size * self.args.world_size
        sampler = ShardShuffleSampler(self.cache, self.args.seed, batch_size=global_batch, bucket_window=window)

        def order_of(epoch: int) -> list[int]:
            """Every row once, shard by shard, shuffled (and length-bucketed) for `epoch`."""
            sampler.set_epoch(epoch)
            return list(sampler)

        return self._loader(self.train_dataset, self._batch_sampler(cached_order(order_of)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """This micro-batch's part of the step's loss: its token sum over the step's tokens `num_items_in_batch`
        (times the process count, which DDP divides the summed gradients by). Its `LOGGED_PARTS` are added to the
        step's on the device."""
        result = self.batch_loss(model, inputs["batch"])
        total = num_items_in_batch if num_items_in_batch is not None else inputs["tokens"]
        share = inputs["tokens"] / (total.clamp(min=1) if torch.is_tensor(total) else max(total, 1))
        parts = _parts(result) * share
        self._step = parts if self._step is None else self._step + parts
        weight = share * self.args.world_size
        loss = result.loss * (weight.to(result.loss.dtype) if torch.is_tensor(weight) else weight)
        return (loss, {"ce": result.ce, "kl": result.kl}) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Mean `LOGGED_PARTS` over the response tokens of `eval_dataset` (a cache directory or `CacheReader`), else of
        the eval cache (every process runs its part, then they are summed)."""
        if eval_dataset is not None:
            self._use_eval_cache(eval_dataset)
        if self.eval_cache is None:
            raise PactError("evaluate() needs an eval cache: pass eval_cache= to PactTrainer (--eval_cache on the command "
                            "line) or a cache to evaluate()")
        model = self.model_wrapped if self.is_in_train else self.model
        was_training = model.training
        model.eval()
        sums = torch.zeros(len(LOGGED_PARTS) + 1, dtype=torch.float64, device=self.args.device)
        with torch.no_grad():
            for inputs in self._eval_loader():
                raise_batch_error(inputs)
                parts = _parts(self.batch_loss(model, inputs["batch"]))
                sums = sums + torch.cat([parts, parts.new_ones(1)]) * inputs["tokens"]
        model.train(was_training)
        *parts, tokens = self._sum_over_processes(sums).tolist()
        metrics = {f"{metric_key_prefix}_{key}": value / max(tokens, 1) for key, value in zip(LOGGED_PARTS, parts)}
        metrics[f"{metric_key_prefix}_tokens"] = int(tokens)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def batch_loss(self, model, batch: CacheBatch) -> PactOutput:
        """The `PactOutput` of one collated micro-batch: copied to the device without blocking the host (it comes pinned
        on a GPU), its targets filled by `self.targets` (the cache's, or a live reference's), then the objective."""
        batch = self.targets.fill(batch.to(self.args.device, non_blocking=True))
        safety_ids, weights = self._safety(batch.input_ids.device)
        return pact_batch_loss(model, batch, safety_ids, weights, self.objective, self.ce_chunk_size)

    # --- its own helpers ---

    def _use_eval_cache(self, cache) -> None:
        """Evaluate on `cache` (a directory or `CacheReader`) from now on, once it is checked against the training cache."""
        reader = cache if isinstance(cache, CacheReader) else CacheReader(cache)
        if reader is not self.eval_cache:
            check_compatibility(reader.manifest, self.student_identity, self.objective, force=True)
            _check_same_safety_tokens(self.cache, reader)
            if isinstance(self.targets, CachedTargets):
                check_cache_serves(reader, self.objective)
            self.eval_cache, self.eval_dataset = reader, CacheRows(reader, self.pad_id)

    def _safety(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The safety-token ids and weights on `device`, copied there once."""
        if self._safety_on_device is None or self._safety_on_device[0].device != torch.device(device):
            self._safety_on_device = (self.safety_ids.to(device), self.safety_weights.to(device))
        return self._safety_on_device

    def _batch_sampler(self, order_of) -> GlobalMicroBatches:
        """`order_of(epoch)`'s rows as this process's parts of global micro-batches of the per-device batch size."""
        return GlobalMicroBatches(order_of, self.args.per_device_train_batch_size, self.args.world_size, self.args.process_index)

    def _eval_loader(self) -> DataLoader:
        """The eval cache's rows in order, split among the processes as training splits its batches."""
        rows = list(range(len(self.eval_cache)))
        return self._loader(self.eval_dataset, self._batch_sampler(lambda epoch: rows))

    def _loader(self, rows: CacheRows, batch_sampler: GlobalMicroBatches) -> DataLoader:
        """A `DataLoader` of collated micro-batches: collated in `args.dataloader_num_workers` worker processes (0: in
        this one), which each decode the shards their batches come from (one worker decodes each shard once per epoch);
        pinned when training on a GPU (`args.dataloader_pin_memory`), so `compute_loss` copies them without blocking."""
        workers = self.args.dataloader_num_workers
        return DataLoader(rows, batch_sampler=batch_sampler, collate_fn=self.data_collator, num_workers=workers,
                          pin_memory=self.args.dataloader_pin_memory and self.args.device.type == "cuda",
                          prefetch_factor=self.args.dataloader_prefetch_factor if workers else None,
                          persistent_workers=self.args.dataloader_persistent_workers if workers else False)

    def _sum_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        """`values` (on the device) summed over the processes of the run."""
        if self.args.world_size == 1:
            return values
        return self.accelerator.reduce(values, reduction="sum")

    def _stop_if_not_finite(self) -> Fetched | None:
        """The steps recorded so far, read to the host (the step's one sync, made once however often it is asked for);
        `CheckFailed` naming the first step that was not finite, if one was (nothing is written; the last checkpoint stays
        intact)."""
        fetched = self._guard.fetch()
        if fetched is None or not fetched.bad_step:
            return fetched
        parts = dict(zip(LOGGED_PARTS, fetched.bad_parts))
        saved = [p for p in Path(self.args.output_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()]
        last = max(saved, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)
        kept = f"the last checkpoint, {last.name}, is intact" if last else "no checkpoint was written yet"
        raise CheckFailed(f"step {fetched.bad_step}: the loss is {parts['loss']} (ce {parts['ce']}, kl {parts['kl']}, tokenwise "
                          f"{parts['tokenwise']}) and the gradient norm {fetched.bad_norm}, not finite; training stopped without "
                          f"applying this step or any later one and {kept}; check the cache with `pact-cache verify`, "
                          "or lower --learning_rate or --lambda")

    def _log_steps(self, fetched: Fetched, tr_loss: torch.Tensor, learning_rate: float | None, start_time: float) -> None:
        """Log the token-mean `LOGGED_PARTS` of the steps since the last log (exact over processes and accumulation), the
        last step's gradient norm, the learning rate and the steps' response `tokens`, as the Trainer's own log would."""
        means = {key: value / fetched.steps for key, value in zip(LOGGED_PARTS, fetched.parts)}
        logs = {"loss": means["loss"], "grad_norm": fetched.grad_norm,
                "learning_rate": learning_rate if learning_rate is not None else self._get_learning_rate(),
                **means, "tokens": int(round(fetched.tokens))}
        self._total_loss_scalar += fetched.parts[0]
        tr_loss.zero_()
        self._globalstep_last_logged = self.state.global_step
        self._guard.start_log()
        self.log(logs, start_time)

    # --- Trainer internals it must override --------------------------------------------------------------------------
    # Private `transformers.Trainer` methods, overridden only where no public hook exists for what PACT needs: one host
    # synchronisation per optimizer step (the step's token count stays on the device, `_get_num_items_in_batch`; a
    # non-finite step is caught before the optimizer applies it, `_get_grad_norm`; the one host read happens at a log,
    # save or the end, `_maybe_log_save_evaluate`), checkpoints that are never half written (`_get_output_dir`,
    # `_save_checkpoint`) and no step past `max_steps` when a finished run is resumed (`_run_epoch`). A new transformers
    # release is checked against these first (tests/test_hotpath.py).

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int:
        """The optimizer step's response tokens over every micro-batch and process: the loss's denominator (a number
        with one process; with several, their sum on the device, which no host waits for)."""
        for batch in batch_samples:
            raise_batch_error(batch)
        local = sum(batch["tokens"] for batch in batch_samples)
        if self.args.world_size == 1:
            self._step_tokens = local
        else:
            self._step_tokens = self._sum_over_processes(torch.full((), local, dtype=torch.float64, device=device))
        return self._step_tokens

    def _get_grad_norm(self, model, grad_norm=None):
        """The step's gradient norm (the Trainer's), the step recorded in the `StepGuard` before the optimizer runs.

        A step whose loss or norm is not finite is never applied: a fused
        optimizer (the Trainer's default `adamw_torch_fused`) is handed the
        guard's `skip` as `found_inf` and leaves the weights and its state as
        they are for this and every later step, on the device, and the run
        stops with `CheckFailed` at the next log, checkpoint or its end; any
        other optimizer (or a loss scaler, which sets `found_inf` itself) gets
        the check here, on the host, at every step.
        """
        grad_norm = super()._get_grad_norm(model, grad_norm)
        skip = self._guard.end_step(self._sum_over_processes(self._step), self._step_tokens, grad_norm, self.state.global_step + 1)
        self._step = None
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        if getattr(optimizer, "_step_supports_amp_scaling", False) and self.accelerator.scaler is None:
            optimizer.found_inf = skip
        else:
            self._stop_if_not_finite()
        return grad_norm

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                 learning_rate=None):
        """At a step the Trainer logs, saves or ends the run on: first the step's one host read, which stops a run that
        went non-finite, and the training log made from it; then the Trainer's evaluation and checkpoint (its own log,
        which would read the loss and the norm again, finds the step logged)."""
        control = self.control
        if control.should_log or control.should_save or control.should_training_stop:
            fetched = self._stop_if_not_finite()
            if control.should_log and self.state.global_step > self._globalstep_last_logged and fetched is not None:
                self._log_steps(fetched, tr_loss, learning_rate, start_time)
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                         learning_rate=learning_rate)

    def _run_epoch(self, *args, **kwargs):
        """The Trainer's epoch, unless every step of the run is done already: resuming a finished run (its last checkpoint
        at `max_steps`) in the middle of an epoch would otherwise train one step past `max_steps` before stopping."""
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_output_dir(self, trial) -> str:
        """Where the Trainer writes a checkpoint: the staging folder while `_save_checkpoint` runs, else the run folder."""
        return self._checkpoint_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into a new staging folder of the run (`new_checkpoint_staging`:
        `.checkpoint-N.<random>.tmp/`) and rename it into place once complete, so a kill or a full disk never leaves a
        `checkpoint-N` that resuming would pick up half written (nor replaces a `checkpoint-N` that is not a checkpoint)."""
        self._stop_if_not_finite()
        out = Path(super()._get_output_dir(trial))
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        try:
            staging = Path(run_on_main(lambda: str(new_checkpoint_staging(out, name))))
        except OSError as err:
            raise _checkpoint_not_written(out / name, err) from err
        self._checkpoint_root = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError, SafetensorError) as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise _checkpoint_not_written(out / name, err) from err
        finally:
            self._checkpoint_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            shutil.rmtree(out / name, ignore_errors=True)  # a later checkpoint the resumed run did not start from (checked)
            (staging / name).rename(out / name)
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()


def _check_fsdp_set_up(trainer: Trainer) -> None:
    """Refuse a run that asks for FSDP (`--fsdp`, or `accelerate launch` with an FSDP config) which accelerate did not
    set up: accelerate turns FSDP on only where the processes compute on GPUs (or other accelerators) and otherwise
    trains unsharded, as plain data parallel, without a word."""
    asked = bool(trainer.args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and not (trainer.is_fsdp_enabled or getattr(trainer, "is_fsdp_xla_enabled", False)):
        kind = getattr(trainer.accelerator.distributed_type, "value", trainer.accelerator.distributed_type)
        raise PactError(f"--fsdp (or an accelerate FSDP config) asks for sharded training, but accelerate set up no FSDP "
                        f"(distributed type {kind}): it runs FSDP only on GPUs; run on GPUs, or drop --fsdp and the accelerate "
                        "FSDP config to train unsharded")


def _checkpoint_not_written(checkpoint: Path, err: BaseException) -> PactError:
    """The error of a checkpoint that could not be written: the cause, and that nothing already there was touched."""
    return PactError(f"cannot write checkpoint {checkpoint}: {os_error_reason(err)}; nothing was replaced, earlier checkpoints "
                     "are intact (free space or fix the folder's permissions, then rerun with --resume)")


def _parts(result: PactOutput) -> torch.Tensor:
    """The `LOGGED_PARTS` of a `PactOutput`, a float64 tensor on its device (no gradient, no host read)."""
    return torch.stack([getattr(result, key).detach().double() for key in LOGGED_PARTS])


def _check_same_safety_tokens(train: CacheReader, evaluation: CacheReader) -> None:
    """Refuse an eval cache whose safety tokens differ from the training cache's (its KL would measure another set)."""
    key = lambda r: (r.safety_ids.tolist(), r.safety_weights.tolist())  # noqa: E731
    if key(train) != key(evaluation):
        raise PactError(f"the eval cache {evaluation.directory} has other safety tokens than the training cache {train.directory}; "
                        "build both with the same --safety-tokens file")
