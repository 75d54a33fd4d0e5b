"""`PactTrainer`: the one training loop, a `transformers.Trainer` whose loss is
CE + lambda * safety-token KL against cached reference targets (or a token-wise
objective, docs/objective.md section 4).

It overrides only what PACT needs: the constructor (the cache/model/tokenizer
and objective checks), the train data loader (a seeded shard-aware shuffle,
length-bucketed, cut into global micro-batches, each process taking its
contiguous part), the loss (the exact response-token mean over the whole
optimizer step across accumulation and processes), evaluation on an eval
cache, logging of `ce`, `kl` and `tokenwise` (`LOGGED_PARTS`), a stop before
applying a non-finite step, and atomic checkpoints.

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
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from pact.arguments import DEFAULT_BUCKET_WINDOW
from pact.cache_tools import CacheReader
from pact.cache_tools.reader import CacheDataset, ShardShuffleSampler
from pact.cache_tools.writer import atomic_write
from pact.distributed import contiguous_part
from pact.errors import CheckFailed, PactError, os_error_reason
from pact.loss import cached_pact_loss
from pact.models import model_fingerprint, pad_token_id, tokenizer_fingerprint
from pact.objective import PactArguments

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
    """A cache's rows for a `DataLoader` fed by `GlobalMicroBatches`; a batch of rows becomes `{"rows", "tokens"}`,
    `tokens` its response tokens (0 for a `_Filler`)."""

    def __getitems__(self, indices: list[int]) -> dict:
        """A micro-batch: its rows and their response-token count (what `DataLoader` fetches per batch)."""
        rows = [self.reader[i] for i in indices]
        return {"rows": rows, "tokens": 0 if isinstance(indices, _Filler) else sum(len(r["post_count"]) for r in rows)}


def keep_batch(batch: dict) -> dict:
    """The collator: a batch from `CacheRows.__getitems__` is already what the loss takes (rows stay rows)."""
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
        super().__init__(model=model, args=args, train_dataset=CacheRows(self.cache), processing_class=processing_class,
                         eval_dataset=CacheRows(self.eval_cache) if self.eval_cache is not None else None, **kwargs)
        _check_fsdp_set_up(self)
        self.args.remove_unused_columns = False
        if self.args.disable_tqdm:
            self.remove_callback(PrinterCallback)
        self._step = torch.zeros(len(LOGGED_PARTS), dtype=torch.float64)  # LOGGED_PARTS of this optimizer step, this process's share
        self._logged = _no_logs()
        self._step_tokens = 0
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

        return DataLoader(self.train_dataset, batch_sampler=self._batch_sampler(_cached(order_of)), collate_fn=self.data_collator,
                          num_workers=self.args.dataloader_num_workers)

    def _eval_loader(self) -> DataLoader:
        """The eval cache's rows in order, split among the processes as training splits its batches."""
        rows = list(range(len(self.eval_cache)))
        return DataLoader(self.eval_dataset, batch_sampler=self._batch_sampler(lambda epoch: rows), collate_fn=self.data_collator)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> int:
        """The optimizer step's response tokens over every micro-batch and process: the loss's denominator."""
        local = sum(batch["tokens"] for batch in batch_samples)
        self._step_tokens = int(self._sum_over_processes(torch.tensor([float(local)]))[0])
        return self._step_tokens

    def _sum_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        """`values` (float64) summed over the processes of the run."""
        if self.args.world_size == 1:
            return values.double()
        return self.accelerator.reduce(values.double().to(self.args.device), reduction="sum").cpu()

    # --- loss ---

    def batch_loss(self, model, rows: list[dict]):
        """The `PactOutput` of one micro-batch of cache rows against their cached targets (a subclass may take the
        targets from elsewhere, e.g. a live reference model, as `benchmarks/reproduce_small.py`'s online control does)."""
        return cached_pact_loss(model, rows, self.safety_ids, self.safety_weights, self.objective, self.pad_id, self.ce_chunk_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """This micro-batch's part of the step's loss: its token sum over the step's tokens `num_items_in_batch`
        (times the process count, which DDP divides the summed gradients by)."""
        result = self.batch_loss(model, inputs["rows"])
        total = num_items_in_batch or max(inputs["tokens"], 1)
        share = inputs["tokens"] / total
        self._step += _parts(result) * share
        loss = result.loss * (share * self.args.world_size)
        return (loss, {"ce": result.ce, "kl": result.kl}) if return_outputs else loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The step's gradient norm, after checking the step is finite: a non-finite loss or norm stops the run with
        `CheckFailed` before the optimizer applies it (nothing is written; the last checkpoint stays intact)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        step = self._sum_over_processes(self._step)
        self._step = torch.zeros(len(LOGGED_PARTS), dtype=torch.float64)
        norm = float(grad_norm) if grad_norm is not None else 0.0
        parts = dict(zip(LOGGED_PARTS, step.tolist()))
        if not all(math.isfinite(v) for v in (*parts.values(), norm)):
            number = self.state.global_step + 1
            saved = [p for p in Path(self.args.output_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()]
            last = max(saved, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)
            kept = f"the last checkpoint, {last.name}, is intact" if last else "no checkpoint was written yet"
            raise CheckFailed(f"step {number}: the loss is {parts['loss']} (ce {parts['ce']}, kl {parts['kl']}, tokenwise "
                              f"{parts['tokenwise']}) and the gradient norm {norm}, not finite; "
                              f"training stopped before applying this step and {kept}; check the cache with `pact-cache verify`, "
                              "or lower --learning_rate or --lambda")
        for key, value in {**parts, "tokens": self._step_tokens, "steps": 1}.items():
            self._logged[key] += value
        return grad_norm

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Training logs get the token-mean `LOGGED_PARTS` of the steps since the last log (exact over processes and
        accumulation) and their response `tokens`."""
        if "loss" in logs and self._logged["steps"]:
            steps = self._logged["steps"]
            logs.update({key: self._logged[key] / steps for key in LOGGED_PARTS}, tokens=self._logged["tokens"])
            self._logged = _no_logs()
        super().log(logs, *args, **kwargs)

    # --- evaluation ---

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Mean `LOGGED_PARTS` over the eval cache's response tokens (every process runs its part, then they are summed)."""
        if self.eval_cache is None:
            raise PactError("evaluate() needs an eval cache: pass eval_cache= to PactTrainer (--eval_cache on the command line)")
        model = self.model_wrapped if self.is_in_train else self.model
        was_training = model.training
        model.eval()
        sums = torch.zeros(len(LOGGED_PARTS) + 1, dtype=torch.float64)
        with torch.no_grad():
            for batch in self._eval_loader():
                result = self.batch_loss(model, batch["rows"])
                sums += torch.cat([_parts(result), torch.ones(1, dtype=torch.float64)]) * batch["tokens"]
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


def _parts(result) -> torch.Tensor:
    """The `LOGGED_PARTS` of a `PactOutput`, as float64 numbers."""
    return torch.tensor([getattr(result, key).item() for key in LOGGED_PARTS], dtype=torch.float64)


def _no_logs() -> dict:
    """The running sums of the steps since the last log, empty."""
    return {**dict.fromkeys(LOGGED_PARTS, 0.0), "tokens": 0, "steps": 0}


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
