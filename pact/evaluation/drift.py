"""Safety-token drift: how far a model's safety-token distribution has moved from the reference, measured as the PACT
KL term over a cache's tokens, and how much likelier or less likely the model finds the cached responses than the
reference did, per response position (on a cache of refusals: whether a fine-tuned model lost the refusal at its
first tokens or later).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pact.cache_tools.errors import CacheError
from pact.cache_tools.writer import MANIFEST_NAME
from pact.data.batch import collate_rows
from pact.errors import PactError
from pact.models.loading import tokenizer_fingerprint, tokenizer_matches
from pact.objective.kl import pact_kl
from pact.objective.settings import ObjectiveArguments
from pact.objective.student import student_outputs
from pact.objective.targets import check_columns


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


def check_cache_files(reader) -> list[Path]:
    """Refuse a cache whose manifest or shard files are missing or of the wrong size, before any model is loaded.

    A cheap pre-flight (sizes only; contents are checked against their sha256
    as each shard is read). Returns the cache's files. A damaged cache is a
    `CacheError` (exit 2: an unusable input) naming the shard.
    """
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


def check_tokenizer(manifest: dict, tokenizer, model_source: str, cache: str | Path) -> None:
    """Refuse a model whose tokenizer differs from the one the cache was built with (its token ids mean other tokens)."""
    expected = manifest.get("fingerprints", {}).get("tokenizer")
    if expected is not None and not tokenizer_matches(tokenizer, expected):
        have = tokenizer_fingerprint(tokenizer)
        raise PactError(f"--model {model_source}: its tokenizer differs from the one the cache {cache} was built with "
                        f"(by {manifest.get('model_source')!r}; {have[:19]}... vs {expected[:19]}...); "
                        "drift compares token ids, so measure a model sharing the cache's tokenizer")


@torch.no_grad()
def safety_drift(model: PreTrainedModel, reader, pad_id: int, cfg: ObjectiveArguments = ObjectiveArguments(), batch_size: int = 8, progress: bool = True) -> DriftResult:
    """Mean of KL_t (default objective parameters) over every response token of the cache `reader`, and the mean shift
    of the response tokens' log-probs from the reference's (the cache's `target_logprob`), both also per position.

    For the unmodified reference model the KL is not zero (the gate mixes in the
    post-only context's logits); the log-prob shift is, within the cache's precision.
    """
    if not reader.layout.stores_safety:
        raise PactError(f"the cache {reader.directory} is distillation-only (built with --safety_targets false): it holds no "
                        "safety targets to measure the drift from; give a cache built with them")
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
