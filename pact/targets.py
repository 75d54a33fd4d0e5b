"""Reference targets for a batch, from a live reference model (online mode) or
from cache rows (cached mode), in the one form the objective consumes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from pact.data import EncodedExample
from pact.errors import PactError
from pact.objective import PactConfig
from pact.reference import ReferenceTargets, reference_targets


@dataclass
class TargetBatch:
    """The reference side of the objective for a batch's N response positions.

    full_logits/post_logits [N, k] are logits on the target columns, which
    `columns` maps to positions in S ([k] or [N, k]; `None` = all of S);
    post_count [N] is the gate's post-only top-p count over all of S.
    """

    full_logits: torch.Tensor
    post_logits: torch.Tensor
    post_count: torch.Tensor
    columns: torch.Tensor | None = None

    def to(self, device: torch.device) -> "TargetBatch":
        """Move every tensor to `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TargetBatch(move(self.full_logits), move(self.post_logits), move(self.post_count), move(self.columns))


def targets_from_reference(refs: list[ReferenceTargets]) -> TargetBatch:
    """Concatenate per-example reference values (all of S) into a batch."""
    return TargetBatch(
        full_logits=torch.cat([r.full_logits for r in refs]),
        post_logits=torch.cat([r.post_logits for r in refs]),
        post_count=torch.cat([r.post_count for r in refs]),
    )


def examples_from_cache_rows(rows: list[dict]) -> list[EncodedExample]:
    """The tokenized examples a batch of cache rows holds (the cache is the training set)."""
    return [
        EncodedExample(int(row["example_id"]), [int(t) for t in row["input_ids"]], int(row["response_start"]))
        for row in rows
    ]


def targets_from_cache_rows(rows: list[dict], safety_ids: torch.Tensor) -> TargetBatch:
    """Assemble cached targets: each row's `safety_ids` ([k] or per step [n, k]) are located in S."""
    columns = []
    for row in rows:
        ids = torch.as_tensor(row["safety_ids"], dtype=torch.long)
        ids = ids.to(safety_ids.device)
        position = torch.searchsorted(safety_ids, ids)
        if (position >= len(safety_ids)).any() or not torch.equal(safety_ids[position.clamp(max=len(safety_ids) - 1)], ids):
            raise PactError(f"cache row {row['example_id']}: stored ids are not all safety tokens of this run")
        steps = len(row["post_count"])
        columns.append(position.expand(steps, -1) if position.dim() == 1 else position)
    return TargetBatch(
        full_logits=torch.cat([torch.as_tensor(r["full_logits"], dtype=torch.float32) for r in rows]),
        post_logits=torch.cat([torch.as_tensor(r["post_logits"], dtype=torch.float32) for r in rows]),
        post_count=torch.cat([torch.as_tensor(r["post_count"], dtype=torch.long) for r in rows]),
        columns=torch.cat(columns),
    )


class OnlineReference:
    """A live reference model for the online objective.

    Either a separate model, or (`model` is the PEFT student itself) the same
    weights with the adapters disabled, so no second copy is held.
    """

    def __init__(self, model: PreTrainedModel, safety_ids: torch.Tensor, header_ids: list[int], cfg: PactConfig, pad_id: int):
        self.model = model
        self.safety_ids = safety_ids
        self.header_ids = header_ids
        self.cfg = cfg
        self.pad_id = pad_id

    def targets(self, examples: list[EncodedExample]) -> TargetBatch:
        """Run the reference on the batch's full and post-only contexts."""
        adapters_off = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
        was_training = self.model.training
        self.model.eval()
        try:
            with adapters_off:
                refs = reference_targets(
                    self.model, examples, self.safety_ids, self.header_ids,
                    self.cfg.p0, self.cfg.gate_temperature, self.pad_id,
                )
        finally:
            self.model.train(was_training)
        return TargetBatch(*(t.clone() for t in (
            torch.cat([r.full_logits for r in refs]),
            torch.cat([r.post_logits for r in refs]),
            torch.cat([r.post_count for r in refs]),
        )))
