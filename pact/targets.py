"""Reference targets for a batch from a live reference model (online mode), in
the one form the objective consumes: the target fields of a
`pact.cache_tools.batch.CacheBatch`, exactly as cached targets fill them
(`collate_rows`), so the loss has one interface for both modes.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import PreTrainedModel

from pact.cache_tools.batch import CacheBatch
from pact.data import EncodedExample
from pact.errors import PactError
from pact.objective import PactConfig
from pact.reference import collate_examples, reference_batch


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
        return batch.with_targets(*(t.clone() for t in (values.full_logits, values.post_logits, values.post_count)),
                                  target_logprob=values.target_logprob.clone())

    def batch(self, examples: list[EncodedExample]) -> CacheBatch:
        """The collated batch of `examples` with its online targets."""
        return self.fill(collate_examples(examples, self.pad_id))
