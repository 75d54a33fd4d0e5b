"""Fine-tuning from a reference cache: the PACT loss with cached targets, LoRA
(via peft) or full fine-tuning, and no reference model in memory.

`train(TrainConfig)` is the plain loop behind `pact train`; it checkpoints
every `save_steps` optimizer steps and resumes to the same result.
`PactTrainer` offers the same loss inside `transformers.Trainer`.

Under torchrun (WORLD_SIZE > 1) the loop runs data-parallel: the model is
wrapped in DistributedDataParallel, `batch_size` counts rows per process, so
an optimizer step's global batch is batch_size x grad_accum x world size rows,
cut into the same global micro-batches (batch_size x world size rows) a single
process with that batch size would use; each rank takes its contiguous part
of every micro-batch. Losses are weighted by the step's response tokens over
all ranks, so the gradient, loss and metrics equal those of one process on
the same global batch. Rank 0 alone writes the outputs and checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import get_scheduler

from pact.cache_tools import CacheReader
from pact.cache_tools.reader import ShardShuffleSampler
from pact.cache_tools.writer import atomic_write
from pact.distributed import Ranks, all_reduce_sum, contiguous_part, current_ranks, distributed_session, run_on_main
from pact.errors import CheckFailed, InvalidSetting, PactError
from pact.loss import cached_pact_loss
from pact.models import LoadedModel, load_model, pad_token_id
from pact.objective import PactConfig, check_setting

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
FINAL_STAGING = ".final.tmp"
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# The recorded settings a resumed run must share with the run that wrote the checkpoint: they change the result.
# Progress, save_steps, device, gradient checkpointing and the CE chunk size only change how it is computed.
RESULT_SETTINGS = ("full", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "batch_size", "grad_accum", "lr",
                   "scheduler", "warmup_steps", "weight_decay", "max_grad_norm", "seed", "bf16", "total_steps",
                   "model_fingerprint", "cache_identity")
SEED_LIMIT = 2**32 - 1  # what numpy, and so transformers' set_seed, accept


@dataclass
class TrainConfig:
    """Every setting of a training run (defaults follow the paper's released configuration).

    Construction refuses a value the run cannot use (`InvalidSetting` naming the field).
    """

    cache: str
    out: str
    model: str | None = None
    full: bool = False
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-5
    scheduler: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    gradient_checkpointing: bool = False
    bf16: bool = False
    save_steps: int = 0
    resume: bool = False
    force: bool = False
    device: str = "auto"
    objective: PactConfig = field(default_factory=PactConfig)
    ce_chunk_size: int = 1024
    progress: bool = True

    def __post_init__(self) -> None:
        """Check every setting here, where any front end (the CLI, the Python API, a Trainer) passes through."""
        check_setting("lora_r", self.lora_r, 1, integer=True)
        check_setting("lora_alpha", self.lora_alpha, 0, low_open=True)
        check_setting("lora_dropout", self.lora_dropout, 0, 1, high_open=True)
        if not self.full and not (self.lora_targets and all(isinstance(t, str) and t for t in self.lora_targets)):
            raise InvalidSetting("lora_targets", f"lora_targets must name at least one module (e.g. q_proj,v_proj), got {self.lora_targets!r}")
        check_setting("epochs", self.epochs, 1, integer=True)
        if self.max_steps is not None:
            check_setting("max_steps", self.max_steps, 1, integer=True)
        check_setting("batch_size", self.batch_size, 1, integer=True)
        check_setting("grad_accum", self.grad_accum, 1, integer=True)
        check_setting("lr", self.lr, 0, low_open=True)
        if self.scheduler not in SCHEDULERS:
            raise InvalidSetting("scheduler", f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        check_setting("warmup_steps", self.warmup_steps, 0, integer=True)
        check_setting("weight_decay", self.weight_decay, 0)
        check_setting("max_grad_norm", self.max_grad_norm, 0, low_open=True)
        check_setting("seed", self.seed, 0, SEED_LIMIT, integer=True)
        check_setting("save_steps", self.save_steps, 0, integer=True)
        check_setting("ce_chunk_size", self.ce_chunk_size, 1, integer=True)
        if not isinstance(self.objective, PactConfig):
            raise InvalidSetting("objective", f"objective must be a PactConfig, got {type(self.objective).__name__}")
        _check_device(self.device)

    def to_dict(self) -> dict:
        """JSON-ready form, written to `config.json`."""
        data = asdict(self)
        data["objective"] = self.objective.to_dict()
        return data


def _check_device(device: str) -> None:
    """Refuse a device other than auto, cpu and cuda[:N] (the ones the loop supports; `auto` is resolved later)."""
    try:
        kind = "auto" if device == "auto" else torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("auto", "cpu", "cuda"):
        raise InvalidSetting("device", f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


@dataclass
class TrainResult:
    """Where the run wrote its outputs and how far it got."""

    out: Path
    steps: int
    metrics: list[dict]


def check_compatibility(manifest: dict, loaded: LoadedModel, cfg: PactConfig, force: bool) -> list[str]:
    """Refuse a model, tokenizer or objective setting the cache was not built for.

    Returns warnings (mismatches overridden by `force`); raises `PactError` otherwise.
    Objective parameters baked into the cache (the gate's p0 and Tg) are never overridable.
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
        for what, have, want in (("model", loaded.fingerprint, expected.get("model")), ("tokenizer", loaded.tokenizer_fingerprint, expected.get("tokenizer")))
        if want is not None and have != want
    ]
    if problems and not force:
        raise PactError("; ".join(problems) + " (pass --force to train anyway)")
    return problems


def cache_identity(manifest: dict) -> str:
    """A sha256 of what makes a cache's training targets what they are: its fingerprints, safety tokens, gate,
    objective temperature and every shard's sha256 (paths and build times left out, so a copied cache is the same)."""
    content = {key: manifest.get(key) for key in ("fingerprints", "gate", "objective_temperature", "top_k", "dtype")}
    content["safety_tokens"] = {key: manifest["safety_tokens"].get(key) for key in ("ids", "weights")}
    content["shards"] = [shard["sha256"] for shard in manifest["shards"]]
    return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _os_reason(err: Exception) -> str:
    """`No space left on device (ENOSPC)` for an `OSError`, the message otherwise."""
    if isinstance(err, OSError) and err.strerror:
        name = errno.errorcode.get(err.errno, "") if err.errno else ""
        return f"{err.strerror}{f' ({name})' if name else ''}"
    return str(err)


def _adaptable_modules(model) -> list[str]:
    """Qualified names of the modules of `model` LoRA can adapt (linear, embedding and convolution layers)."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def check_lora_targets(model, targets: list[str]) -> None:
    """Refuse `lora_targets` that name no adaptable module of `model` (peft matches a target against a module's name
    or its dotted suffix), naming the unknown ones and the names that would work."""
    names = _adaptable_modules(model)
    unknown = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if unknown:
        candidates = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise InvalidSetting("lora_targets", f"lora_targets names no module of the model: {', '.join(map(repr, unknown))} "
                                             f"(modules LoRA can adapt there: {', '.join(candidates[:12])})")


def _lora_wrap(model, config: TrainConfig):
    """`model` with LoRA adapters on `config.lora_targets` (checked against the model's modules first)."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, config.lora_targets)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_targets), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _batches_for_epoch(reader: CacheReader, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Deterministic shuffled row indices for an epoch, cut into batches (the last may be short).

    Shards are visited one at a time (shuffled, and rows within each), so a
    cache larger than the reader's buffer is decoded once per epoch.
    """
    sampler = ShardShuffleSampler(reader, seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _prepare_output(out: Path, resume: bool, world_size: int) -> Path | None:
    """Create `out`, refusing a file or a non-empty folder unless resuming; returns the checkpoint to resume from, if any.

    A checkpoint written by a run with another number of processes is refused:
    its global batches, and so the data order, were different.
    """
    if out.exists() and not out.is_dir():
        raise PactError(f"--out {out} is a file, not a directory; choose a directory for the run's outputs")
    try:
        if out.exists() and any(out.iterdir()) and not resume:
            raise PactError(f"output directory {out} is not empty; pass --resume to continue a run there or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PactError(f"cannot create the output directory {out} (--out): {_os_reason(err)}") from err
    checkpoint = _latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        _refuse_foreign_run_folder(out)
    if checkpoint is not None:
        saved = _read_state(checkpoint).get("world_size", 1)
        if saved != world_size:
            raise PactError(f"{checkpoint} was written by a run of {saved} process(es), this one has {world_size}; "
                            "resume with the same number of processes (the global batch depends on it)")
    return checkpoint


def _refuse_foreign_run_folder(out: Path) -> None:
    """`--resume` found no checkpoint: starting over may rewrite `out`'s files, so `out` must be empty or a run of ours.

    A run killed before its first checkpoint left its `config.json`; any other
    non-empty folder might hold files of the user's, and is refused.
    """
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    try:
        ours = isinstance(json.loads((out / CONFIG_FILE).read_text(encoding="utf-8")).get("cache_identity"), str)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise PactError(f"--resume: {out} holds no checkpoint to resume from and is not a pact train run folder "
                        f"(it holds {', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''}); "
                        "choose an empty --out, or drop --resume")


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


def _read_state(checkpoint: Path) -> dict:
    """A checkpoint's training state (step, epoch, position in the epoch, world size)."""
    return _read_json(checkpoint / STATE_FILE, "checkpoint state",
                      "delete that checkpoint folder to resume from an earlier one, or start a new run in another --out")


def _start_metrics(path: Path, steps: int) -> list[dict]:
    """The metrics of an earlier run's first `steps` steps (none for a fresh run); `path` is rewritten (atomically) to hold
    just those. Lines past `steps` (a step that was not checkpointed, perhaps torn by a kill) are dropped unread."""
    lines = path.read_text(encoding="utf-8").splitlines()[:steps] if steps and path.exists() else []
    try:
        metrics = [json.loads(line) for line in lines]
    except ValueError as err:
        raise PactError(f"{path}: a line of the first {steps} steps is not JSON ({err}); start a new run in another --out") from err
    atomic_write(path, "".join(json.dumps(m) + "\n" for m in metrics).encode())
    return metrics


def _run_record(config: TrainConfig, loaded: LoadedModel, reader: CacheReader, total_steps: int, ranks: Ranks,
                global_micro_batch: int) -> dict:
    """What `config.json` records: every setting, plus the identities of the model and cache and the derived sizes."""
    return {**config.to_dict(), "model_source": loaded.source, "model_fingerprint": loaded.fingerprint,
            "cache_identity": cache_identity(reader.manifest), "total_steps": total_steps, "cache_rows": len(reader),
            "safety_tokens": len(reader.safety_ids), "world_size": ranks.world_size,
            "global_batch_size": global_micro_batch * config.grad_accum}


def _result_settings(record: dict) -> dict:
    """The settings of a run record that change the result (see `RESULT_SETTINGS`), the objective's constants one by one."""
    settings = {key: record.get(key) for key in RESULT_SETTINGS}
    settings.update({f"objective.{key}": value for key, value in (record.get("objective") or {}).items()})
    return settings


def check_resume_settings(out: Path, checkpoint: Path, record: dict) -> None:
    """Refuse to resume `checkpoint` under settings that change the result, naming each one with its old and new value.

    The old values come from `out/config.json`, written before the run's first
    checkpoint; resuming under other values would mix two runs into one result.
    """
    recorded = _read_json(out / CONFIG_FILE, "run's recorded settings",
                          "without them the resumed run cannot be checked against the first; start a new run in another --out")
    old, new = _result_settings(recorded), _result_settings(json.loads(json.dumps(record)))
    differing = [key for key in new if old.get(key) != new[key]]
    changed = [f"{key} {old.get(key)!r} -> {new[key]!r}" for key in differing]
    if "cache_identity" in differing:
        changed.append(f"cache {recorded.get('cache')} -> {record['cache']}")
    if changed:
        raise PactError(f"cannot resume {checkpoint}: these settings differ from {out / CONFIG_FILE}: {'; '.join(changed)}; "
                        "resume with the recorded settings, or start a new run in another --out")


def _distributed_model(model, ranks: Ranks, device: torch.device):
    """`model` wrapped in DistributedDataParallel when this process is one of several (gradients all-reduced in backward)."""
    if ranks.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _accumulate_step(model, reader: CacheReader, group: list[list[int]], ranks: Ranks, config: TrainConfig,
                     safety_ids: torch.Tensor, weights: torch.Tensor, pad_id: int, autocast) -> tuple[dict, int]:
    """Forward and backward of this process's rows of one optimizer step; returns the step's loss, ce and kl and its
    response-token count, all over every rank.

    `group` holds the step's global micro-batches; this rank takes its
    contiguous part of each. A micro-batch's loss is weighted by its share of
    the step's response tokens over all ranks, times the world size because
    DDP averages gradients over ranks, so the summed gradient is that of one
    process on the whole global batch. A rank whose part of a micro-batch is
    empty (an epoch's last, short batch) runs one row of it with weight 0, so
    DDP's collectives stay in step. Gradients are synchronised once, in the
    last micro-batch's backward.
    """
    row_groups = [[reader[i] for i in contiguous_part(batch, ranks.world_size, ranks.rank)] for batch in group]
    local_tokens = sum(len(row["post_count"]) for rows in row_groups for row in rows)
    total_tokens = int(all_reduce_sum([local_tokens])[0])
    sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0}
    for position, (batch, rows) in enumerate(zip(group, row_groups)):
        defer_sync = ranks.world_size > 1 and position < len(group) - 1
        with model.no_sync() if defer_sync else contextlib.nullcontext():
            with autocast:
                result = cached_pact_loss(model, rows or [reader[batch[0]]], safety_ids, weights, config.objective, pad_id,
                                          config.ce_chunk_size)
            share = result.tokens / total_tokens if rows else 0.0
            (result.loss * (share * ranks.world_size)).backward()
        for key in sums:
            sums[key] += getattr(result, key).item() * share
    return dict(zip(sums, all_reduce_sum(list(sums.values())))), total_tokens


def _latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint of the highest step in `out` (a folder is complete once its state file is in it)."""
    found = [p for p in out.glob(f"{CHECKPOINT_PREFIX}*")
             if p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def _save_weights(model, directory: Path, full: bool, tokenizer) -> None:
    """The adapter (or, with `full`, the whole model and its tokenizer) in `save_pretrained` layout."""
    model.save_pretrained(directory)
    if full:
        tokenizer.save_pretrained(directory)


def _write_staged(staging: Path, write, what: str) -> None:
    """Run `write(staging)` in a fresh folder `staging`; if writing fails, remove the folder and raise `PactError`
    naming `what`, so a failed write never leaves half a checkpoint or half an adapter where a run would read it."""
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        write(staging)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, (OSError, RuntimeError, SafetensorError)):
            raise PactError(f"cannot write {what}: {_os_reason(err)}; nothing was replaced, earlier checkpoints are intact "
                            "(free space or fix the folder's permissions, then rerun with --resume)") from err
        raise


def _save_checkpoint(out: Path, step: int, model, optimizer, scheduler, state: dict, config: TrainConfig, tokenizer) -> None:
    """Write a checkpoint under a temporary name, then rename it into place."""
    final = out / f"{CHECKPOINT_PREFIX}{step}"

    def write(staging: Path) -> None:
        _save_weights(model, staging / "model", config.full, tokenizer)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
                   staging / "optimizer.pt")
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2))

    staging = out / f".{final.name}.tmp"
    _write_staged(staging, write, f"checkpoint {final}")
    shutil.rmtree(final, ignore_errors=True)  # a leftover without a state file: the one resumed from is older
    staging.rename(final)


def _save_outputs(out: Path, model, full: bool, tokenizer, metrics: list[dict]) -> None:
    """Write the final weights and `curves.png` to a staging folder inside `out`, then move each file into place
    (one atomic rename per file), so a crash or a full disk never leaves a torn adapter in `out`."""
    staging = out / FINAL_STAGING

    def write(folder: Path) -> None:
        _save_weights(model, folder, full, tokenizer)
        plot_curves(metrics, folder / "curves.png")

    _write_staged(staging, write, f"the trained {'model' if full else 'adapter'} to {out}")
    for item in sorted(staging.iterdir()):
        os.replace(item, out / item.name)
    staging.rmdir()


def _load_checkpoint(path: Path, model, optimizer, scheduler, full: bool) -> dict:
    """Restore weights, optimizer, scheduler and RNG from checkpoint `path`; returns its training state.

    A damaged checkpoint (a missing, truncated or foreign file) is refused by name.
    """
    from safetensors.torch import load_file

    weights_dir = path / "model"
    try:
        if full:
            state = {}
            for file in sorted(weights_dir.glob("*.safetensors")):
                state.update(load_file(file))
            model.load_state_dict(state, strict=False)
        else:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(weights_dir / "adapter_model.safetensors"))
        saved = torch.load(path / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise PactError(f"{path}: cannot resume from this checkpoint ({type(err).__name__}: {err}); delete it to resume "
                        "from an earlier one, or start a new run in another --out") from err
    return _read_state(path)


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


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune the cache's reference model (or `config.model`) on the cache with the PACT loss.

    Writes to `config.out`: the adapter (or full model with `full`),
    `metrics.jsonl` (one object per optimizer step), `curves.png` and
    `config.json` with every effective setting. Under torchrun it joins the
    job (see the module notes) and every rank returns the same result.
    """
    with distributed_session(config.device) as device:
        return _train(config, device)


def _train(config: TrainConfig, device: torch.device) -> TrainResult:
    """`train` in the process group (if any) `train` joined, computing on `device`."""
    ranks = current_ranks()
    out = Path(config.out)
    reader = CacheReader(config.cache)
    manifest = reader.manifest
    checkpoint = run_on_main(lambda: _prepare_output(out, config.resume, ranks.world_size))
    torch.manual_seed(config.seed)
    loaded = load_model(config.model or manifest["model_source"], device=str(device), dtype="float32")
    for warning in check_compatibility(manifest, loaded, config.objective, config.force):
        if ranks.is_main:
            print(f"warning: {warning} (--force)")
    global_micro_batch = config.batch_size * ranks.world_size
    steps_per_epoch = math.ceil(math.ceil(len(reader) / global_micro_batch) / config.grad_accum)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    run_record = _run_record(config, loaded, reader, total_steps, ranks, global_micro_batch)
    if checkpoint is not None:
        check_resume_settings(out, checkpoint, run_record)
    model = _student(loaded, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "world_size": ranks.world_size}
    metrics_path = out / "metrics.jsonl"
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, model, optimizer, scheduler, config.full)
    metrics = run_on_main(lambda: _start_metrics(metrics_path, state["step"]))
    run_on_main(lambda: atomic_write(out / CONFIG_FILE, json.dumps(run_record, indent=2).encode()))

    forward_model = _distributed_model(model, ranks, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    safety_ids, weights = reader.safety_ids, reader.safety_weights
    pad_id = pad_token_id(loaded.tokenizer)
    saved_step = state["step"] if checkpoint is not None else None
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", disable=not (config.progress and ranks.is_main))
    with bar, open(metrics_path, "a") if ranks.is_main else contextlib.nullcontext() as log:
        while state["step"] < total_steps:
            batches = _batches_for_epoch(reader, global_micro_batch, config.seed, state["epoch"])
            groups = [batches[i : i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]
            for group in groups[state["batch_in_epoch"]:]:
                started = time.perf_counter()
                sums, total_tokens = _accumulate_step(forward_model, reader, group, ranks, config, safety_ids, weights, pad_id, autocast)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
                _check_finite(state["step"] + 1, sums, grad_norm, saved_step)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["batch_in_epoch"] += 1
                seconds = time.perf_counter() - started
                record = {"step": state["step"], "epoch": state["epoch"], **sums, "lr": lr, "tokens": total_tokens,
                          "grad_norm": grad_norm, "seconds": seconds}
                metrics.append(record)
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss']:.4f}", ce=f"{sums['ce']:.4f}", kl=f"{sums['kl']:.4f}", tok_s=f"{total_tokens / seconds:.0f}")
                if config.save_steps and state["step"] % config.save_steps == 0:
                    run_on_main(lambda: _save_checkpoint(out, state["step"], model, optimizer, scheduler, state, config, loaded.tokenizer))
                    saved_step = state["step"]
                if state["step"] >= total_steps:
                    break
            else:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
    run_on_main(lambda: _save_outputs(out, model, config.full, loaded.tokenizer, metrics))
    return TrainResult(out=out, steps=state["step"], metrics=metrics)


def _student(loaded: LoadedModel, config: TrainConfig):
    """The model to train, in train mode: the loaded model itself (`full`) or wrapped with LoRA adapters, with
    activation checkpointing if asked for."""
    model = loaded.model
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not config.full:
        model = _lora_wrap(model, config)
    return model.train()


def _check_finite(step: int, sums: dict, grad_norm: float, saved_step: int | None) -> None:
    """Stop the run before it applies a non-finite loss or gradient (`CheckFailed` naming the step): the update is
    not made and nothing is written, so the outputs and the last checkpoint stay as they were."""
    if all(math.isfinite(value) for value in (*sums.values(), grad_norm)):
        return
    kept = f"the last checkpoint, {CHECKPOINT_PREFIX}{saved_step}, is intact" if saved_step else "no checkpoint was written yet"
    raise CheckFailed(f"step {step}: the loss is {sums['loss']} (ce {sums['ce']}, kl {sums['kl']}) and the gradient norm "
                      f"{grad_norm}, not finite; training stopped before applying this step and {kept}; check the cache "
                      "with `pact-cache verify`, or lower --lr or --lambda")
