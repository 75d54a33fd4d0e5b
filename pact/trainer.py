"""`PactTrainer`: the cached PACT loss inside `transformers.Trainer`, so
`TrainingArguments` (logging, `report_to`, save strategy, gradient
accumulation, DDP through accelerate) work as users expect.
"""

from __future__ import annotations

from transformers import Trainer

from pact.cache_tools import CacheReader
from pact.loss import cached_pact_loss
from pact.objective import PactConfig


def collate_cache_rows(rows: list[dict]) -> dict:
    """Keep cache rows as they are: the loss assembles examples and targets itself."""
    return {"rows": rows}


class PactTrainer(Trainer):
    """A `Trainer` whose loss is CE + lambda * safety-token KL against cached reference targets.

    Pass `cache=` (a `CacheReader` or a cache directory) and optionally
    `objective=PactConfig(...)`; the training set defaults to the cache.
    Logs `ce` and `kl` next to `loss`.
    """

    def __init__(self, *args, cache, objective: PactConfig = PactConfig(), pad_id: int = 0, **kwargs):
        self.cache = cache if isinstance(cache, CacheReader) else CacheReader(cache)
        self.objective = objective
        self.pad_id = pad_id
        self.safety_ids = self.cache.safety_ids
        self.safety_weights = self.cache.safety_weights
        kwargs.setdefault("train_dataset", self.cache.torch_dataset())
        kwargs.setdefault("data_collator", collate_cache_rows)
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False
        self._parts = {"ce": 0.0, "kl": 0.0, "n": 0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The PACT loss of one micro-batch of cache rows."""
        rows = inputs["rows"]
        result = cached_pact_loss(model, rows, self.safety_ids, self.safety_weights, self.objective, self.pad_id)
        self._parts["ce"] += result.ce.item()
        self._parts["kl"] += result.kl.item()
        self._parts["n"] += 1
        return (result.loss, {"ce": result.ce, "kl": result.kl}) if return_outputs else result.loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Add the mean CE and KL since the last log to the training logs."""
        if self._parts["n"] and "loss" in logs:
            logs["ce"] = self._parts["ce"] / self._parts["n"]
            logs["kl"] = self._parts["kl"] / self._parts["n"]
            self._parts = {"ce": 0.0, "kl": 0.0, "n": 0}
        super().log(logs, *args, **kwargs)
