"""Safety-token drift: how far a model's safety-token distribution has moved
from the reference, measured as the PACT KL term over a cache's tokens, and
how much likelier or less likely the model finds the cached responses than the
reference did, per response position (on a cache of refusals: whether a
fine-tuned model lost the refusal at its first tokens or later).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pact.errors import PactError
from pact.cache_tools.batch import collate_rows
from pact.loss import student_outputs
from pact.objective import PactConfig, pact_kl
from pact.targets import check_columns

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class DriftResult:
    """Mean KL_t over all response tokens and at each response position; likewise the log-prob shift of the cached
    response tokens, log p_model(y_t) - log p_reference(y_t) (negative: the model finds the response less likely)."""

    kl_mean: float
    tokens: int
    by_position: list[float]
    tokens_by_position: list[int]
    logprob_shift_mean: float
    logprob_shift_by_position: list[float]

    def to_dict(self) -> dict:
        """JSON-ready form (what `pact eval drift --json` prints)."""
        return {"kl_mean": self.kl_mean, "tokens": self.tokens, "kl_by_position": self.by_position,
                "tokens_by_position": self.tokens_by_position, "logprob_shift_mean": self.logprob_shift_mean,
                "logprob_shift_by_position": self.logprob_shift_by_position}


def full_model_weights(folder: Path) -> list[Path]:
    """The weight files of a full Hugging Face model in `folder` (model*.safetensors, pytorch_model*.bin), not an adapter's."""
    return sorted(p for pattern in ("model*.safetensors", "pytorch_model*.bin") for p in folder.glob(pattern) if p.is_file())


def _adapter_config_problem(config_file: Path) -> str | None:
    """What is wrong with an adapter's adapter_config.json (not a JSON object, no known `peft_type`), or None."""
    from peft import PeftType

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"not valid JSON ({err})"
    if not isinstance(config, dict):
        return "not a JSON object"
    if config.get("peft_type") not in {t.value for t in PeftType}:
        return f"field 'peft_type' is {config.get('peft_type')!r}, expected the name of a PEFT method such as 'LORA'"
    return None


def check_adapter_dir(adapter: str | Path) -> list[Path]:
    """Refuse an adapter folder peft cannot load from disk, without touching the network; returns the files it reads.

    Without this, peft takes a folder missing a file for a hub id and tries
    the hub. A full fine-tuned model folder (model weights, no
    adapter_config.json) is pointed to `--model`.
    """
    folder = Path(adapter).expanduser()
    if not folder.exists():
        raise PactError(f"--adapter {adapter}: no such directory")
    if not folder.is_dir():
        raise PactError(f"--adapter {adapter}: a file, not an adapter directory (one holding {ADAPTER_CONFIG} and "
                        f"{ADAPTER_WEIGHTS[0]}, e.g. a `pact train --out` directory)")
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        model_weights = full_model_weights(folder)
        if model_weights:
            raise PactError(f"--adapter {adapter}: no {ADAPTER_CONFIG} but {model_weights[0].name}, so this "
                            "folder holds a full model (e.g. `pact train --full`), not a PEFT adapter; pass it as --model instead")
        raise PactError(f"--adapter {adapter}: no {ADAPTER_CONFIG} in this folder, so it is not a PEFT adapter")
    problem = _adapter_config_problem(config_file)
    if problem:
        raise PactError(f"{config_file}: {problem}; this adapter folder (--adapter {adapter}) cannot be loaded")
    weights = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
    if not weights:
        raise PactError(f"--adapter {adapter}: no {ADAPTER_WEIGHTS[0]} (or {ADAPTER_WEIGHTS[1]}) in this folder; "
                        "the adapter's weights are missing")
    return [config_file, *weights]


def _first_reason(err: Exception) -> str:
    """The telling line of a loading error: the first size mismatch torch reports, else its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return next((line for line in lines if line.startswith("size mismatch")), lines[0])


def _apply_adapter(loaded, adapter: str) -> None:
    """Put the PEFT adapter folder `adapter` on `loaded.model`; unreadable weights, or an adapter made for another
    model, are a `PactError`."""
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        loaded.model = PeftModel.from_pretrained(loaded.model, str(Path(adapter).expanduser())).eval()
    except SafetensorError as err:
        raise PactError(f"--adapter {adapter}: {ADAPTER_WEIGHTS[0]} is not a readable safetensors file ({err}); "
                        "save the adapter again") from err
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError) as err:
        raise PactError(f"--adapter {adapter} cannot be applied to --model {loaded.source}: {_first_reason(err)} "
                        "(an adapter fits only the base model it was trained on: pass that one as --model)") from err


def load_student(model_source: str, adapter: str | None = None, device: str = "auto", dtype: str = "auto"):
    """Load a model with weights in `dtype` (see `pact.models.resolve_dtype`) and optionally apply a PEFT adapter directory
    on top (checked first: see `check_adapter_dir`)."""
    from pact.models import load_model

    if adapter:
        check_adapter_dir(adapter)
    loaded = load_model(model_source, device=device, dtype=dtype)
    if adapter:
        _apply_adapter(loaded, adapter)
    return loaded


def check_cache_files(reader) -> list[Path]:
    """Refuse a cache whose manifest or shard files are missing or of the wrong size, before any model is loaded.

    A cheap pre-flight (sizes only; contents are checked against their sha256
    as each shard is read). Returns the cache's files. A damaged cache is a
    `CacheError` (exit 2: an unusable input) naming the shard.
    """
    from pact.cache_tools.errors import CacheError
    from pact.cache_tools.writer import MANIFEST_NAME

    files = [reader.directory / MANIFEST_NAME]
    for entry in reader.shards:
        path = reader.directory / entry["file"]
        if not path.is_file():
            raise CacheError(f"{entry['file']}: missing from the cache {reader.directory}; rebuild the cache")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CacheError(f"{entry['file']}: {size} bytes, the manifest of {reader.directory} says {entry['bytes']} "
                             f"(truncated or replaced?); check it with `pact-cache verify {reader.directory}`")
        files.append(path)
    return files


def check_tokenizer(manifest: dict, tokenizer_fingerprint: str, model_source: str, cache: str | Path) -> None:
    """Refuse a model whose tokenizer differs from the one the cache was built with (its token ids mean other tokens)."""
    expected = manifest.get("fingerprints", {}).get("tokenizer")
    if expected is not None and tokenizer_fingerprint != expected:
        raise PactError(f"--model {model_source}: its tokenizer differs from the one the cache {cache} was built with "
                        f"(by {manifest.get('model_source')!r}; {tokenizer_fingerprint[:19]}... vs {expected[:19]}...); "
                        "drift compares token ids, so measure a model sharing the cache's tokenizer")


@torch.no_grad()
def safety_drift(model: PreTrainedModel, reader, pad_id: int, cfg: PactConfig = PactConfig(), batch_size: int = 8, progress: bool = True) -> DriftResult:
    """Mean of KL_t (default objective parameters) over every response token of the cache `reader`, and the mean shift
    of the response tokens' log-probs from the reference's (the cache's `target_logprob`), both also per position.

    For the unmodified reference model the KL is not zero (the gate mixes in the
    post-only context's logits); the log-prob shift is, within the cache's precision.
    """
    safety_ids, weights = reader.safety_ids, reader.safety_weights
    kl_sums = PositionSums()
    shift_sums = PositionSums()
    was_training = model.training
    model.eval()
    indices = list(range(len(reader)))
    for start in tqdm(range(0, len(indices), batch_size), desc="drift", unit="batch", disable=not progress):
        rows = [reader[i] for i in indices[start : start + batch_size]]
        batch = collate_rows(rows, pad_id)
        check_columns(batch, safety_ids)
        student = student_outputs(model, batch, safety_ids)
        device = student.safety_logits.device
        targets = batch.to(device)
        mask = torch.ones(student.steps.shape, dtype=torch.bool, device=device)
        kl = pact_kl(student.safety_logits.float(), targets.full_logits, targets.post_logits, targets.post_count,
                     student.steps, mask, weights.to(device), cfg, targets.columns)
        steps = student.steps.cpu()
        kl_sums.add(kl.double().cpu(), steps)
        shift_sums.add((student.logprob.double() - targets.target_logprob.double()).cpu(), steps)
    model.train(was_training)
    return DriftResult(
        kl_mean=kl_sums.mean(),
        tokens=kl_sums.tokens,
        by_position=kl_sums.by_position(),
        tokens_by_position=kl_sums.counts,
        logprob_shift_mean=shift_sums.mean(),
        logprob_shift_by_position=shift_sums.by_position(),
    )


class PositionSums:
    """Running float64 sums of a per-token value, by response position, over batches."""

    def __init__(self) -> None:
        self.sums: list[float] = []
        self.counts: list[int] = []

    def add(self, values: torch.Tensor, steps: torch.Tensor) -> None:
        """Add `values` [N] of tokens at response positions `steps` [N]."""
        longest = int(steps.max()) + 1
        if longest > len(self.sums):
            self.sums.extend([0.0] * (longest - len(self.sums)))
            self.counts.extend([0] * (longest - len(self.counts)))
        by_step = torch.zeros(longest, dtype=torch.float64).index_add_(0, steps, values)
        n_by_step = torch.bincount(steps, minlength=longest)
        for t in range(longest):
            self.sums[t] += float(by_step[t])
            self.counts[t] += int(n_by_step[t])

    @property
    def tokens(self) -> int:
        """Tokens added so far."""
        return sum(self.counts)

    def mean(self) -> float:
        """Mean over every token."""
        return sum(self.sums) / max(self.tokens, 1)

    def by_position(self) -> list[float]:
        """Mean at each response position (0 where no token)."""
        return [s / c if c else 0.0 for s, c in zip(self.sums, self.counts)]
