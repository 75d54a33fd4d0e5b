"""The one interface between the reference and the loss: a `TargetSource` fills a batch's target fields (the
reference's logits on the safety tokens, the gate's post-only count, the reference log-prob of each response token).

`CachedTargets` reads them from the cache: a batch collated from cache rows (`collate_rows`) already holds them, and
filling only checks that their columns are this run's safety tokens. `OnlineTargets` computes them live with the
reference model (`pact.objective.reference`), exactly as the cache build does. The trainer calls `fill` and knows
neither (the DistillKit shape: offline and online teachers behind one signal source).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from transformers import PreTrainedModel

from pact.data.batch import CacheBatch, collate_examples, collate_rows
from pact.data.chat import EncodedExample
from pact.errors import PactError
from pact.objective.reference import reference_batch
from pact.objective.settings import ObjectiveArguments


class TargetSource(Protocol):
    """Where a batch's targets come from."""

    def fill(self, batch: CacheBatch) -> CacheBatch:
        """`batch` with its target fields filled (one row per response token, in the batch's order)."""


def check_columns(batch: CacheBatch, safety_ids: torch.Tensor) -> None:
    """Refuse cached targets whose columns are not this run's safety tokens S (a cache built with other tokens).

    One gather and compare per batch: the positions come from the cache's layout, nothing is searched.
    """
    if batch.columns is None:
        return
    columns = batch.columns.to(safety_ids.device)
    inside = bool((columns < len(safety_ids)).all())
    if not inside or not torch.equal(safety_ids[columns], batch.stored_ids.to(safety_ids.device)):
        raise PactError(f"cache rows (example_id {batch.example_ids.tolist()}): their stored columns are not the safety "
                        "tokens of this run; train with the safety tokens the cache was built with")


class CachedTargets:
    """Targets read from a cache: a batch of cache rows holds them once collated (`collate`, which checks their
    columns against the run's safety tokens `safety_ids`, so a cache built with other tokens is refused), and `fill`
    passes it on.

    The check reads the columns, so it runs where the rows are collated, on
    the CPU (in `PactTrainer`'s loader workers); `fill` reads nothing back to
    the host, which keeps the training step free of host synchronisations.
    """

    def __init__(self, safety_ids: torch.Tensor):
        self.safety_ids = safety_ids.cpu()

    def collate(self, rows: list[dict], pad_id: int) -> CacheBatch:
        """The batch of cache rows (`CacheReader` items) with their cached targets, its columns checked."""
        batch = collate_rows(rows, pad_id)
        check_columns(batch, self.safety_ids)
        return batch

    def fill(self, batch: CacheBatch) -> CacheBatch:
        """`batch` as `collate` made it (a batch without cached targets is refused)."""
        if batch.full_logits is None and batch.kd_ids is None:
            raise PactError(f"batch of example_ids {batch.example_ids.tolist()}: no cached targets; collate cache rows "
                            "with `CachedTargets.collate`, or fill the batch with `OnlineTargets`")
        return batch


class OnlineTargets:
    """Targets computed live by a reference model: the online objective, with no cache.

    Either a separate model, or (`model` is the PEFT student itself) the same
    weights with the adapters disabled, so no second copy is held.
    """

    def __init__(self, model: PreTrainedModel, safety_ids: torch.Tensor, header_ids: list[int], cfg: ObjectiveArguments, pad_id: int):
        self.model = model
        self.safety_ids = safety_ids
        self.header_ids = header_ids
        self.cfg = cfg
        self.pad_id = pad_id

    def fill(self, batch: CacheBatch) -> CacheBatch:
        """`batch` with targets from the reference's full and post-only contexts (all of S, in S's order)."""
        adapters_off = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
        was_training = self.model.training
        self.model.eval()
        try:
            with adapters_off:
                values = reference_batch(self.model, batch, self.safety_ids, self.header_ids,
                                         self.cfg.p0, self.cfg.gate_temperature, self.pad_id)
        finally:
            self.model.train(was_training)
        full_logits = values.full_logits.clone()
        return batch.with_targets(full_logits, values.post_logits.clone(), values.post_count.clone(),
                                  target_logprob=values.target_logprob.clone(), reference_logits=full_logits,
                                  rest_logprob=values.rest_logprob.clone())

    def batch(self, examples: list[EncodedExample]) -> CacheBatch:
        """The collated batch of `examples` with its online targets."""
        return self.fill(collate_examples(examples, self.pad_id))
