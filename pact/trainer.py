"""`PactTrainer`: the one training loop, a `transformers.Trainer` whose loss is
CE + lambda * safety-token KL against cached reference targets (or a token-wise
objective, docs/objective.md section 4).

It overrides only what PACT needs: the constructor (the cache/model/tokenizer
and objective checks), the train data loader (a seeded shard-aware shuffle,
length-bucketed, cut into global micro-batches, each process taking its
contiguous part, collated in a worker process and pinned), the loss (the exact
response-token mean over the whole optimizer step across accumulation and
processes), evaluation on an eval cache, logging of `ce`, `kl` and `tokenwise`
(`LOGGED_PARTS`), a stop before applying a non-finite step, and atomic
checkpoints.

The hot path makes no host synchronisation: the micro-batches arrive
collated and pinned and are copied with `non_blocking=True`, the logged
numbers and the non-finite guard stay on the device (`StepGuard`), and the one
host read of an optimizer step happens when the step is logged, saved or the
last (`_maybe_log_save_evaluate`): none on other steps. `pact.sync_counter`
counts it (tests/test_hotpath.py).

Multi-process (torchrun, `accelerate launch`, data-parallel): a step's global
batch is `per_device_train_batch_size x gradient_accumulation_steps x world
size` rows, cut into the same global micro-batches one process with a batch of
`per_device_train_batch_size x world size` would use, so N processes compute
the loss, gradient and metrics of one process on that global batch. The same
holds under FSDP (`--fsdp` or an accelerate FSDP config; transformers applies
FSDP2): the loss's projections onto the LM head run inside the model's forward
(`pact.projection`), where FSDP has gathered the head's weight. A run that asks
for FSDP where accelerate does not set it up (on CPU processes) is refused
rather than trained unsharded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch.utils.data import DataLoader, get_worker_info
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from pact.arguments import DEFAULT_BUCKET_WINDOW
from pact.cache_tools import CacheReader
from pact.cache_tools.batch import CacheBatch, collate_rows
from pact.cache_tools.reader import CacheDataset, ShardShuffleSampler
from pact.cache_tools.writer import atomic_write
from pact.distributed import contiguous_part
from pact.errors import CheckFailed, PactError, os_error_reason
from pact.loss import PactOutput, pact_batch_loss
from pact.models import model_fingerprint, pad_token_id, tokenizer_fingerprint
from pact.objective import PactArguments
from pact.step_guard import Fetched, StepGuard
from pact.targets import check_columns

CHECKPOINT_PREFIX = "checkpoint-"
METRICS_FILE = "metrics.jsonl"
LOGGED_PARTS = ("loss", "ce", "kl", "tokenwise")  # the `PactOutput` parts logged per step, token-mean over the step


def check_compatibility(manifest: dict, fingerprints: tuple[str, str], cfg: PactArguments, force: bool) -> list[str]:
    """Refuse a model, tokenizer or objective setting the cache was not built for.

    `fingerprints` are the model's and the tokenizer's. Returns warnings
    (fingerprint mismatches overridden by `force`); raises `PactError`
    otherwise. The gate's p0 and Tg and the top-k temperature are baked into
    the cache and never overridable.
    """
    gate = manifest.get("gate", {})
    for key, value in (("p0", cfg.p0), ("gate_temperature", cfg.gate_temperature)):
        if key in gate and not math.isclose(float(gate[key]), float(value)):
            raise PactError(f"the cache was built with gate {key}={gate[key]} but training asks for {value}; rebuild the cache")
    if manifest.get("objective_temperature") is not None and manifest.get("top_k") and not math.isclose(float(manifest["objective_temperature"]), cfg.temperature):
        raise PactError(f"the cache's top-k columns were chosen for T={manifest['objective_temperature']}, training asks for T={cfg.temperature}")
    expected = manifest.get("fingerprints", {})
    problems = [
        f"{what} fingerprint differs from the cache's ({have} vs {want})"
        for what, have, want in zip(("model", "tokenizer"), fingerprints, (expected.get("model"), expected.get("tokenizer")))
        if want is not None and have != want
    ]
    if problems and not force:
        raise PactError("; ".join(problems) + " (pass --force to train anyway)")
    return problems


def _base_model(model):
    """The model under a PEFT wrapper (or `model` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fingerprint_of(model) -> str:
    """The fingerprint the cache compares with: of the weight files the model was loaded from, else of its weights."""
    base = _base_model(model)
    source = Path(str(getattr(base.config, "_name_or_path", "") or "")).expanduser()
    return model_fingerprint(base, source if source.is_dir() else None)


class _Filler(list):
    """A process's part of a global micro-batch when it has no rows: one row is run with weight zero, so every
    process runs the same forwards and backwards (the collectives of DDP stay in step)."""


class GlobalMicroBatches:
    """A batch sampler: the rows of `order_of(epoch)` cut into global micro-batches of `batch_size x world_size` rows,
    this process's contiguous part of each (a `_Filler` of the first row when its part is empty).

    `set_epoch` picks the pass; the Trainer calls it (also when resuming).
    """

    def __init__(self, order_of, batch_size: int, world_size: int, rank: int):
        self.order_of, self.batch_size, self.world_size, self.rank, self.epoch = order_of, batch_size, world_size, rank, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the order of the next pass."""
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        """This epoch's rows cut into global micro-batches (the last may be short)."""
        order = list(self.order_of(self.epoch))
        size = self.batch_size * self.world_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def __len__(self) -> int:
        """Micro-batches per epoch (the same on every process)."""
        return math.ceil(len(self.order_of(self.epoch)) / (self.batch_size * self.world_size))

    def __iter__(self):
        """This process's part of each global micro-batch, in order."""
        for batch in self._global_batches():
            part = list(contiguous_part(batch, self.world_size, self.rank))
            yield part if part else _Filler(batch[:1])


class CacheRows(CacheDataset):
    """A cache's rows for a `DataLoader` fed by `GlobalMicroBatches`: a batch of rows is collated where it is loaded
    (in a `DataLoader` worker when there are workers) into `{"batch": CacheBatch, "tokens": N}`, `tokens` its response
    tokens (0 for a `_Filler`), its columns checked against the cache's safety tokens there too.

    A `PactError` met in a worker (a damaged shard) travels to the main
    process as the batch's `error` and is raised there unchanged by
    `raise_batch_error`; the `DataLoader`'s own re-raise would bury the message
    in the worker's traceback.
    """

    def __init__(self, reader: CacheReader, pad_id: int):
        super().__init__(reader)
        self.pad_id = pad_id
        self.safety_ids = reader.safety_ids

    def __getitems__(self, indices: list[int]) -> dict:
        """A micro-batch, collated: what `DataLoader` fetches per batch."""
        try:
            batch = collate_rows([self.reader[i] for i in indices], self.pad_id)
            check_columns(batch, self.safety_ids)
        except PactError as err:
            if get_worker_info() is None:
                raise
            return {"error": err}
        return {"batch": batch, "tokens": 0 if isinstance(indices, _Filler) else batch.tokens}


def raise_batch_error(batch: dict) -> None:
    """Raise the error a `DataLoader` worker met while loading `batch` (see `CacheRows`), if any."""
    if "error" in batch:
        raise batch["error"]


def keep_batch(batch: dict) -> dict:
    """The collator: a batch from `CacheRows.__getitems__` is already what the loss takes."""
    return batch


class PactTrainer(Trainer):
    """A `Trainer` for the PACT loss on a reference cache.

    `cache` (a directory or a `CacheReader`) is the training set;
    `objective` the loss's constants; `eval_cache` an optional cache that
    `evaluate()` reports `eval_loss`, `eval_ce`, `eval_kl` and `eval_tokenwise` on. The
    constructor refuses a model or tokenizer the cache was not built for
    (`force=True` overrides fingerprints only, with warnings in
    `self.warnings`) and gate settings other than the cache's. Pass the
    tokenizer as `processing_class`: it is checked and saved with the weights.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, model, args, *, cache, processing_class, objective: PactArguments | None = None, eval_cache=None,
                 force: bool = False, model_fingerprint: str | None = None, ce_chunk_size: int = 1024, **kwargs):
        self.cache = cache if isinstance(cache, CacheReader) else CacheReader(cache)
        self.eval_cache = eval_cache if eval_cache is None or isinstance(eval_cache, CacheReader) else CacheReader(eval_cache)
        self.objective = objective if objective is not None else PactArguments()
        fingerprints = (model_fingerprint or fingerprint_of(model), tokenizer_fingerprint(processing_class))
        self.warnings = check_compatibility(self.cache.manifest, fingerprints, self.objective, force)
        if self.eval_cache is not None:
            check_compatibility(self.eval_cache.manifest, fingerprints, self.objective, force)
            _check_same_safety_tokens(self.cache, self.eval_cache)
        self.safety_ids, self.safety_weights = self.cache.safety_ids, self.cache.safety_weights
        self.pad_id = pad_token_id(processing_class)
        self.ce_chunk_size = ce_chunk_size
        kwargs.setdefault("data_collator", keep_batch)
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

    # --- data ---

    def _batch_sampler(self, order_of) -> GlobalMicroBatches:
        """`order_of(epoch)`'s rows as this process's parts of global micro-batches of the per-device batch size."""
        return GlobalMicroBatches(order_of, self.args.per_device_train_batch_size, self.args.world_size, self.args.process_index)

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

        return self._loader(self.train_dataset, self._batch_sampler(_cached(order_of)))

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

    def _sum_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        """`values` (on the device) summed over the processes of the run."""
        if self.args.world_size == 1:
            return values
        return self.accelerator.reduce(values, reduction="sum")

    def _safety(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The safety-token ids and weights on `device`, copied there once."""
        if self._safety_on_device is None or self._safety_on_device[0].device != torch.device(device):
            self._safety_on_device = (self.safety_ids.to(device), self.safety_weights.to(device))
        return self._safety_on_device

    # --- loss ---

    def batch_loss(self, model, batch: CacheBatch) -> PactOutput:
        """The `PactOutput` of one collated micro-batch against its cached targets, the batch copied to the device without
        blocking the host (it comes pinned on a GPU). A subclass may take the targets from elsewhere, e.g. a live reference
        model, as `benchmarks/reproduce_small.py`'s online control does; `batch` is still on the host when it is called."""
        batch = batch.to(self.args.device, non_blocking=True)
        safety_ids, weights = self._safety(batch.input_ids.device)
        return pact_batch_loss(model, batch, safety_ids, weights, self.objective, self.ce_chunk_size)

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

    # --- evaluation ---

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Mean `LOGGED_PARTS` over the eval cache's response tokens (every process runs its part, then they are summed)."""
        if self.eval_cache is None:
            raise PactError("evaluate() needs an eval cache: pass eval_cache= to PactTrainer (--eval_cache on the command line)")
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

    # --- checkpoints ---

    def _get_output_dir(self, trial) -> str:
        """Where the Trainer writes a checkpoint: the staging folder while `_save_checkpoint` runs, else the run folder."""
        return self._checkpoint_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into `.checkpoint-N.tmp/` and rename it into place once complete, so a kill or a full
        disk never leaves a `checkpoint-N` that resuming would pick up half written."""
        self._stop_if_not_finite()
        out = Path(super()._get_output_dir(trial))
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        staging = out / f".{name}.tmp"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._checkpoint_root = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError, SafetensorError) as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise PactError(f"cannot write checkpoint {out / name}: {os_error_reason(err)}; nothing was replaced, earlier checkpoints "
                            "are intact (free space or fix the folder's permissions, then rerun with --resume)") from err
        finally:
            self._checkpoint_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            shutil.rmtree(out / name, ignore_errors=True)  # a leftover the resumed run did not start from
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


def _parts(result: PactOutput) -> torch.Tensor:
    """The `LOGGED_PARTS` of a `PactOutput`, a float64 tensor on its device (no gradient, no host read)."""
    return torch.stack([getattr(result, key).detach().double() for key in LOGGED_PARTS])


def _cached(order_of):
    """`order_of` remembering its last epoch's order (the Trainer asks for the length and then the rows)."""
    memo: dict = {}

    def cached(epoch: int) -> list[int]:
        """The rows of `epoch` in order, computed once per epoch."""
        if memo.get("epoch") != epoch:
            memo.update(epoch=epoch, order=order_of(epoch))
        return memo["order"]

    return cached


def _check_same_safety_tokens(train: CacheReader, evaluation: CacheReader) -> None:
    """Refuse an eval cache whose safety tokens differ from the training cache's (its KL would measure another set)."""
    key = lambda r: (r.manifest["safety_tokens"].get("ids"), r.manifest["safety_tokens"].get("weights"))  # noqa: E731
    if key(train) != key(evaluation):
        raise PactError(f"the eval cache {evaluation.directory} has other safety tokens than the training cache {train.directory}; "
                        "build both with the same --safety-tokens file")


class MetricsCallback(TrainerCallback):
    """Writes `metrics.jsonl` (one object per logging step: step, epoch, loss, ce, kl, tokenwise, lr, grad_norm, tokens, seconds)
    and `curves.png` at the end, in the run folder, from the main process.

    On resume the file is cut back to the steps the checkpoint holds (later
    lines belong to steps that will be run again).
    """

    def __init__(self, out: Path, curves_at_end: bool = True):
        self.path = Path(out) / METRICS_FILE
        self.out = Path(out)
        self.curves_at_end = curves_at_end  # False when the caller saves `curves.png` with the final weights (`pact.train`)
        self.records: list[dict] = []
        self._started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        """Start `metrics.jsonl` afresh, or cut it back to the resumed checkpoint's steps."""
        if state.is_world_process_zero:
            self.records = _first_records(self.path, state.global_step)
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())
        self._started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Append a training log (one with `loss`, `ce` and `kl`) as a line of `metrics.jsonl`."""
        if not state.is_world_process_zero or not logs or "loss" not in logs or "ce" not in logs:
            return
        now = time.perf_counter()
        record = {"step": state.global_step, "epoch": state.epoch, "loss": logs["loss"], "ce": logs["ce"], "kl": logs["kl"],
                  "tokenwise": logs.get("tokenwise"), "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                  "tokens": logs.get("tokens"), "seconds": now - self._started}
        self._started = now
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        """Plot `curves.png` (unless the caller saves it with the final weights)."""
        if state.is_world_process_zero and self.records and self.curves_at_end:
            plot_curves(self.records, self.out / "curves.png")


def _first_records(path: Path, steps: int) -> list[dict]:
    """The records of an earlier run's first `steps` steps in `path` (none for a fresh run). Reading stops at the first
    record past `steps` or the first torn line (a kill while it was written): those steps are run again."""
    if not steps or not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not isinstance(record, dict) or record.get("step", steps + 1) > steps:
            break
        records.append(record)
    return records


def plot_curves(metrics: list[dict], path: Path) -> None:
    """Plot CE and KL against optimizer steps into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, key, title in ((axes[0], "ce", "cross-entropy"), (axes[1], "kl", "safety-token KL")):
        axis.plot(steps, [m[key] for m in metrics], marker="." if len(steps) < 50 else None)
        axis.set_xlabel("optimizer step")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
