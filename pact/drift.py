"""Safety-token drift: how far a model's safety-token distribution has moved
from the reference, measured as the PACT KL term over a cache's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pact.loss import student_outputs
from pact.objective import PactConfig, pact_kl
from pact.targets import examples_from_cache_rows, targets_from_cache_rows


@dataclass
class DriftResult:
    """Mean KL_t over all response tokens, and its mean at each response position."""

    kl_mean: float
    tokens: int
    by_position: list[float]
    tokens_by_position: list[int]

    def to_dict(self) -> dict:
        """JSON-ready form (what `pact eval drift --json` prints)."""
        return {"kl_mean": self.kl_mean, "tokens": self.tokens, "kl_by_position": self.by_position,
                "tokens_by_position": self.tokens_by_position}


def load_student(model_source: str, adapter: str | None = None, device: str = "auto"):
    """Load a model (float32) and optionally apply a PEFT adapter directory on top."""
    from pact.models import load_model

    loaded = load_model(model_source, device=device, dtype="float32")
    if adapter:
        from peft import PeftModel

        loaded.model = PeftModel.from_pretrained(loaded.model, adapter).eval()
    return loaded


@torch.no_grad()
def safety_drift(model: PreTrainedModel, reader, pad_id: int, cfg: PactConfig = PactConfig(), batch_size: int = 8, progress: bool = True) -> DriftResult:
    """Mean of KL_t (default objective parameters) over every response token of the cache `reader`.

    For the unmodified reference model this is not zero: the gate mixes in the
    post-only context's logits.
    """
    safety_ids, weights = reader.safety_ids, reader.safety_weights
    sums: list[float] = []
    counts: list[int] = []
    was_training = model.training
    model.eval()
    indices = list(range(len(reader)))
    for start in tqdm(range(0, len(indices), batch_size), desc="drift", unit="batch", disable=not progress):
        rows = [reader[i] for i in indices[start : start + batch_size]]
        examples = examples_from_cache_rows(rows)
        student = student_outputs(model, examples, safety_ids, pad_id, with_ce=False)
        device = student.safety_logits.device
        targets = targets_from_cache_rows(rows, safety_ids).to(device)
        mask = torch.ones(student.steps.shape, dtype=torch.bool, device=device)
        kl = pact_kl(student.safety_logits.float(), targets.full_logits, targets.post_logits, targets.post_count,
                     student.steps, mask, weights.to(device), cfg, targets.columns).double().cpu()
        steps = student.steps.cpu()
        longest = int(steps.max()) + 1
        if longest > len(sums):
            sums.extend([0.0] * (longest - len(sums)))
            counts.extend([0] * (longest - len(counts)))
        by_step = torch.zeros(longest, dtype=torch.float64).index_add_(0, steps, kl)
        n_by_step = torch.bincount(steps, minlength=longest)
        for t in range(longest):
            sums[t] += float(by_step[t])
            counts[t] += int(n_by_step[t])
    model.train(was_training)
    tokens = sum(counts)
    return DriftResult(
        kl_mean=sum(sums) / max(tokens, 1),
        tokens=tokens,
        by_position=[s / c if c else 0.0 for s, c in zip(sums, counts)],
        tokens_by_position=counts,
    )
