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
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from pact.cache_tools import CacheReader
from pact.cache_tools.reader import ShardShuffleSampler
from pact.distributed import Ranks, all_reduce_sum, contiguous_part, current_ranks, distributed_session, run_on_main
from pact.errors import PactError
from pact.loss import cached_pact_loss
from pact.models import LoadedModel, load_model, pad_token_id
from pact.objective import PactConfig

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainConfig:
    """Every setting of a training run (defaults follow the paper's released configuration)."""

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

    def to_dict(self) -> dict:
        """JSON-ready form, written to `config.json`."""
        data = asdict(self)
        data["objective"] = self.objective.to_dict()
        return data


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


def _lora_wrap(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

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
    """Create `out`, refusing a non-empty one unless resuming; returns the checkpoint to resume from, if any.

    A checkpoint written by a run with another number of processes is refused:
    its global batches, and so the data order, were different.
    """
    if out.exists() and any(out.iterdir()) and not resume:
        raise PactError(f"output directory {out} is not empty; pass --resume to continue a run there or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = _latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        saved = json.loads((checkpoint / STATE_FILE).read_text()).get("world_size", 1)
        if saved != world_size:
            raise PactError(f"{checkpoint} was written by a run of {saved} process(es), this one has {world_size}; "
                            "resume with the same number of processes (the global batch depends on it)")
    return checkpoint


def _start_metrics(path: Path, steps: int) -> list[dict]:
    """The metrics of an earlier run's first `steps` steps (none for a fresh run); `path` is rewritten to hold just those."""
    metrics = [json.loads(line) for line in path.read_text().splitlines()][:steps] if steps and path.exists() else []
    path.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return metrics


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
    found = [p for p in out.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).exists()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def _save_weights(model, directory: Path, full: bool, tokenizer) -> None:
    model.save_pretrained(directory)
    if full:
        tokenizer.save_pretrained(directory)


def _save_checkpoint(out: Path, step: int, model, optimizer, scheduler, state: dict, config: TrainConfig, tokenizer) -> None:
    """Write a checkpoint under a temporary name, then rename it into place."""
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    staging = out / f".{final.name}.tmp"
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    _save_weights(model, staging / "model", config.full, tokenizer)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
               staging / "optimizer.pt")
    (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
    staging.rename(final)


def _load_checkpoint(path: Path, model, optimizer, scheduler, full: bool) -> dict:
    from safetensors.torch import load_file

    weights_dir = path / "model"
    if full:
        files = sorted(weights_dir.glob("*.safetensors"))
        state = {}
        for file in files:
            state.update(load_file(file))
        model.load_state_dict(state, strict=False)
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(weights_dir / "adapter_model.safetensors"))
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    return json.loads((path / STATE_FILE).read_text())


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
    model = loaded.model
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not config.full:
        model = _lora_wrap(model, config)
    model.train()
    safety_ids, weights = reader.safety_ids, reader.safety_weights
    pad_id = pad_token_id(loaded.tokenizer)

    global_micro_batch = config.batch_size * ranks.world_size
    steps_per_epoch = math.ceil(math.ceil(len(reader) / global_micro_batch) / config.grad_accum)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "world_size": ranks.world_size}
    metrics_path = out / "metrics.jsonl"
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, model, optimizer, scheduler, config.full)
    metrics = run_on_main(lambda: _start_metrics(metrics_path, state["step"]))
    if ranks.is_main:
        (out / "config.json").write_text(json.dumps({
            **config.to_dict(), "model_source": loaded.source, "total_steps": total_steps, "cache_rows": len(reader),
            "safety_tokens": len(safety_ids), "world_size": ranks.world_size,
            "global_batch_size": global_micro_batch * config.grad_accum}, indent=2))

    forward_model = _distributed_model(model, ranks, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", disable=not (config.progress and ranks.is_main))
    with open(metrics_path, "a") if ranks.is_main else contextlib.nullcontext() as log:
        while state["step"] < total_steps:
            batches = _batches_for_epoch(reader, global_micro_batch, config.seed, state["epoch"])
            groups = [batches[i : i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]
            for group in groups[state["batch_in_epoch"]:]:
                started = time.perf_counter()
                sums, total_tokens = _accumulate_step(forward_model, reader, group, ranks, config, safety_ids, weights, pad_id, autocast)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
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
                if config.save_steps and state["step"] % config.save_steps == 0 and ranks.is_main:
                    _save_checkpoint(out, state["step"], model, optimizer, scheduler, state, config, loaded.tokenizer)
                if state["step"] >= total_steps:
                    break
            else:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
    bar.close()
    if ranks.is_main:
        _save_weights(model, out, config.full, loaded.tokenizer)
        plot_curves(metrics, out / "curves.png")
    return TrainResult(out=out, steps=state["step"], metrics=metrics)
