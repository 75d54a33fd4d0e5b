"""The run folder: preparing it (refusing a folder that is not ours), finding the checkpoint to resume from, the
record of a run's settings (`pact_config.json`, sealed with checksums) and the refusal to resume under settings that
change the result or from a record edited by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from pact.cache_tools import CacheReader
from pact.errors import PactError, os_error_reason
from pact.files import CHECKSUMS, atomic_write, edited_fields, field_checksums
from pact.models.adapters import RUN_RECORD
from pact.models.loading import LoadedModel
from pact.objective.settings import ObjectiveArguments
from pact.training.arguments import PactTrainingArguments

CHECKPOINT_PREFIX = "checkpoint-"
RUN_CONFIG = RUN_RECORD
STATE_FILE = "trainer_state.json"
STAGING_MARKER = ".pact-train-staging"  # the first file of every staging folder `pact train` creates: its proof of ownership
STAGING_SUFFIX = ".tmp"
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")  # the Trainer's optimizer state; accelerate's under FSDP (a full state dict)
# The recorded settings a resumed run must share with the run that wrote the checkpoint: they change the result.
# Progress, save_steps, device, gradient checkpointing and the CE chunk size only change how it is computed.
RESULT_SETTINGS = ("full", "load_in_4bit", "load_in_8bit", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                   "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
                   "weight_decay", "max_grad_norm", "seed", "bf16", "fp16", "dtype", "bucket_window", "total_steps",
                   "model_fingerprint", "cache_identity")


def cache_identity(manifest: dict) -> str:
    """A sha256 of what makes a cache's training targets what they are: its fingerprints, safety tokens, gate,
    objective temperature and every shard's sha256 (paths and build times left out, so a copied cache is the same)."""
    content = {key: manifest.get(key) for key in ("fingerprints", "gate", "objective_temperature", "top_k", "dtype")}
    content["safety_tokens"] = {key: (manifest["safety_tokens"] or {}).get(key) for key in ("ids", "weights")}
    content["shards"] = [shard["sha256"] for shard in manifest["shards"]]
    return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


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


def new_staging(out: Path, name: str) -> Path:
    """A new folder in the run folder `out` to write `name` (`final`, `checkpoint-N`) into before it is moved into place.

    Its name is made unique on creation (`.<name>.<random>.tmp`), so it is
    never a folder of the user's, and `STAGING_MARKER` inside marks it as
    `pact train`'s own: a later run may remove it if this one is killed.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=STAGING_SUFFIX, dir=out))
    (staging / STAGING_MARKER).touch()
    return staging


def new_checkpoint_staging(out: Path, name: str) -> Path:
    """`new_staging` for the checkpoint `name` of the run folder `out`, once `out/name`, which the finished checkpoint
    replaces, is checked to be none or a checkpoint a Trainer wrote (a later one of this run that the resumed run did not
    start from): a file or folder of the user's under that name is refused, never removed."""
    if (out / name).exists() and not (out / name / STATE_FILE).is_file():
        raise PactError(f"cannot write checkpoint {out / name}: something of that name is there that is not a checkpoint "
                        f"(no {STATE_FILE}); move it away, then rerun with --resume")
    return new_staging(out, name)


def is_own_staging(path: Path) -> bool:
    """Whether `path` is a staging folder `new_staging` created (hidden, `.tmp`, holding the marker): the only
    folders of a run folder `pact train` removes without having created them in the same process."""
    return (path.name.startswith(".") and path.name.endswith(STAGING_SUFFIX) and path.is_dir()
            and (path / STAGING_MARKER).is_file())


def prepare_output(out: Path, resume: bool, checkpoint_path: str | None = None) -> Path | None:
    """Create `out`, refusing a file or a non-empty folder unless resuming; returns the checkpoint to resume from, if any:
    `checkpoint_path` when given, else with `resume` the last one in `out`.

    Staging folders a killed run left behind (provably ours: `is_own_staging`) are removed; the checkpoint is
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
    for leftover in [p for p in out.iterdir() if is_own_staging(p)]:
        shutil.rmtree(leftover, ignore_errors=True)
    if checkpoint is not None:
        _check_checkpoint_readable(checkpoint)
    return checkpoint


def _refuse_foreign_run_folder(out: Path) -> None:
    """`--resume` found no checkpoint: starting over may rewrite `out`'s files, so `out` must be empty or a run of ours.

    A run killed before its first checkpoint left its `pact_config.json`; any
    other non-empty folder might hold files of the user's, and is refused.
    """
    entries = sorted(p.name for p in out.iterdir() if not is_own_staging(p))
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


CHECKPOINT_REMEDY = "delete that checkpoint folder to resume from an earlier one, or start a new run in another --output_dir"


# The checkpoint files holding the model's weights, whichever way the run trained: LoRA, full (maybe sharded), FSDP.
CHECKPOINT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model*.safetensors", "pytorch_model*.bin",
                      "pytorch_model_fsdp*")


# The counts of a Trainer state the Trainer computes with on resume, and whether each must be an integer.
STATE_COUNTS = {"global_step": True, "max_steps": True, "num_input_tokens_seen": True, "epoch": False, "logging_steps": False,
                "eval_steps": False, "save_steps": False, "num_train_epochs": False, "total_flos": False}


def _check_checkpoint_readable(checkpoint: Path) -> None:
    """Read a checkpoint's state, weights, optimizer, scheduler and random state (safely: JSON, safetensors headers and
    `weights_only` tensors) before the Trainer does, so a damaged or edited file is named with what to do."""
    state = _read_json(checkpoint / STATE_FILE, "checkpoint state", CHECKPOINT_REMEDY)
    problem = _state_problem(checkpoint, state)
    if problem:
        raise PactError(f"{checkpoint / STATE_FILE}: {problem}; {CHECKPOINT_REMEDY}")
    _check_weights(checkpoint)
    optimizer = next((checkpoint / name for name in OPTIMIZER_FILES if (checkpoint / name).is_file()), checkpoint / OPTIMIZER_FILES[0])
    for path, keys in ((optimizer, ("state", "param_groups")), (checkpoint / "scheduler.pt", ("last_epoch",))):
        try:
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - torch.load raises unpickler errors of many types for a damaged file
            raise PactError(f"{checkpoint}: cannot resume from this checkpoint ({type(err).__name__}: {err}); "
                            f"{CHECKPOINT_REMEDY}") from err
        if not (isinstance(content, dict) and all(key in content for key in keys)):
            raise PactError(f"{path}: not the state the Trainer saves there (no {', '.join(map(repr, keys))}); {CHECKPOINT_REMEDY}")
    if not any(checkpoint.glob("rng_state*.pth")):
        raise PactError(f"{checkpoint}: no rng_state.pth, so the run's random state cannot be restored and the resumed run "
                        f"would not continue the one that wrote it; {CHECKPOINT_REMEDY}")


def _state_problem(checkpoint: Path, state: dict) -> str | None:
    """What in a checkpoint's trainer_state.json the Trainer would misread on resume, or None: a field a Trainer state
    does not have, a count that is not a number >= 0, a log that is not a list of objects, or a `global_step` other than
    the step of the checkpoint folder (`checkpoint-N`)."""
    from transformers import TrainerState

    unknown = sorted(set(state) - {f.name for f in dataclasses.fields(TrainerState)})
    if unknown:
        return f"field(s) {', '.join(map(repr, unknown))} are not fields of a Trainer state"
    for name, integer in STATE_COUNTS.items():
        value = state.get(name, 0)
        if not (isinstance(value, int if integer else (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf):
            return f"field '{name}' must be {'an integer' if integer else 'a number'} >= 0, got {json.dumps(value)}"
    history = state.get("log_history", [])
    if not (isinstance(history, list) and all(isinstance(entry, dict) for entry in history)):
        return "field 'log_history' must be a list of objects (the logged steps)"
    if not isinstance(state.get("stateful_callbacks") or {}, dict):
        return "field 'stateful_callbacks' must be an object"
    step = checkpoint.name[len(CHECKPOINT_PREFIX):]
    if checkpoint.name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and state.get("global_step", 0) != int(step):
        return f"field 'global_step' is {state.get('global_step', 0)}, but the folder is the checkpoint of step {step}"
    return None


def _check_weights(checkpoint: Path) -> None:
    """Refuse a checkpoint without model weights (`CHECKPOINT_WEIGHTS`) or with a safetensors file whose header cannot be
    read (a truncated or foreign file)."""
    from safetensors import SafetensorError, safe_open

    found = [path for pattern in CHECKPOINT_WEIGHTS for path in checkpoint.glob(pattern)]
    if not found:
        raise PactError(f"{checkpoint}: no model weights in it ({', '.join(CHECKPOINT_WEIGHTS[:3])}, ...); {CHECKPOINT_REMEDY}")
    for path in (p for p in found if p.suffix == ".safetensors"):
        try:
            with safe_open(str(path), framework="pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as err:
            raise PactError(f"{path}: not a readable safetensors file ({err}); {CHECKPOINT_REMEDY}") from err


def run_record(args: PactTrainingArguments, objective: ObjectiveArguments, loaded: LoadedModel, reader: CacheReader,
                total_steps: int, world_size: int, fsdp: bool) -> dict:
    """What `pact_config.json` records: the settings, the identities of the model and cache, the derived sizes and
    whether the weights are sharded (`fsdp`)."""
    return {**args.run_settings(), "objective": objective.to_dict(), "model_source": loaded.source,
            "model_fingerprint": loaded.fingerprint, "cache_identity": cache_identity(reader.manifest), "total_steps": total_steps,
            "cache_rows": len(reader), "safety_tokens": len(reader.safety_ids), "world_size": world_size, "fsdp": fsdp,
            "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size}


def save_run_record(out: Path, record: dict) -> None:
    """Write `record` as `out/pact_config.json`, sealed with a checksum of each field (as a cache's manifest is), so
    `check_resume_settings` can name a field edited by hand."""
    sealed = {**record, CHECKSUMS: field_checksums(record)}
    atomic_write(out / RUN_CONFIG, json.dumps(sealed, indent=2).encode())


def _result_settings(record: dict) -> dict:
    """The settings of a run record that change the result (see `RESULT_SETTINGS`), the objective's constants one by one."""
    settings = {key: record.get(key) for key in RESULT_SETTINGS}
    objective = record.get("objective")
    settings.update({f"objective.{key}": value for key, value in (objective.items() if isinstance(objective, dict) else ())})
    return settings


def check_resume_settings(out: Path, checkpoint: Path, record: dict) -> None:
    """Refuse to resume `checkpoint` under settings that change the result, naming each one with its old and new value.

    The old values come from `out/pact_config.json`, written before the run's
    first step and sealed (`save_run_record`): a file edited by hand is
    refused naming the fields, so the values compared are the ones the
    checkpoint was written under. Resuming under other values would mix two
    runs into one result. (A file written before the seal is compared as it is.)
    """
    recorded = _read_json(out / RUN_CONFIG, "run's recorded settings",
                          "without them the resumed run cannot be checked against the first; start a new run in another --output_dir")
    edited = edited_fields(recorded)
    if edited:
        raise PactError(f"{out / RUN_CONFIG} was edited after pact train wrote it: field(s) {', '.join(edited)} do not match "
                        f"its checksums; {checkpoint} (its optimizer and learning-rate schedule) was written under the "
                        "recorded values, so the run cannot go on under others: restore the file, or start a new run in "
                        "another --output_dir")
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
