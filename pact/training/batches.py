"""The training data loader's parts: a cache's rows collated into micro-batches where they are loaded (in a
`DataLoader` worker), and the batch sampler that cuts an epoch's order into global micro-batches, each process taking
its contiguous part, so N processes compute what one process on the global batch computes.
"""

from __future__ import annotations

import math

from torch.utils.data import get_worker_info

from pact.cache_tools import CacheReader
from pact.cache_tools.reader import CacheDataset
from pact.distributed import contiguous_part
from pact.errors import PactError
from pact.objective.targets import CachedTargets


class _Filler(list):
    """A process's part of a global micro-batch when it has no rows: one row is run with weight zero, so every
    process runs the same forwards and backwards (the collectives of DDP stay in step)."""


class GlobalMicroBatches:
    """A batch sampler: the rows of `order_of(epoch)` cut into global micro-batches of `batch_size x world_size` rows,
    this process's contiguous part of each (a `_Filler` of the first row when its part is empty).

    `set_epoch` picks the pass; the Trainer calls it (also when resuming).
    """

    def __init__(self, order_of, batch_size: int, world_size: int, rank: int):
        self.order_of, self.batch_size, self.world_size, self.rank, self.epoch = order_of, batch_size, world_size, rank, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the order of the next pass."""
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        """This epoch's rows cut into global micro-batches (the last may be short)."""
        order = list(self.order_of(self.epoch))
        size = self.batch_size * self.world_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def __len__(self) -> int:
        """Micro-batches per epoch (the same on every process)."""
        return math.ceil(len(self.order_of(self.epoch)) / (self.batch_size * self.world_size))

    def __iter__(self):
        """This process's part of each global micro-batch, in order."""
        for batch in self._global_batches():
            part = list(contiguous_part(batch, self.world_size, self.rank))
            yield part if part else _Filler(batch[:1])


class CacheRows(CacheDataset):
    """A cache's rows for a `DataLoader` fed by `GlobalMicroBatches`: a batch of rows is collated where it is loaded
    (in a `DataLoader` worker when there are workers) into `{"batch": CacheBatch, "tokens": N}`, `tokens` its response
    tokens (0 for a `_Filler`), its columns checked against the cache's safety tokens there too.

    A `PactError` met in a worker (a damaged shard) travels to the main
    process as the batch's `error` and is raised there unchanged by
    `raise_batch_error`; the `DataLoader`'s own re-raise would bury the message
    in the worker's traceback.
    """

    def __init__(self, reader: CacheReader, pad_id: int):
        super().__init__(reader)
        self.pad_id = pad_id
        self.targets = CachedTargets(reader.safety_ids)

    def __getitems__(self, indices: list[int]) -> dict:
        """A micro-batch, collated: what `DataLoader` fetches per batch."""
        try:
            batch = self.targets.collate([self.reader[i] for i in indices], self.pad_id)
        except PactError as err:
            if get_worker_info() is None:
                raise
            return {"error": err}
        return {"batch": batch, "tokens": 0 if isinstance(indices, _Filler) else batch.tokens}


def raise_batch_error(batch: dict) -> None:
    """Raise the error a `DataLoader` worker met while loading `batch` (see `CacheRows`), if any."""
    if "error" in batch:
        raise batch["error"]


def keep_batch(batch: dict) -> dict:
    """The collator: a batch from `CacheRows.__getitems__` is already what the loss takes."""
    return batch


def cached_order(order_of):
    """`order_of` remembering its last epoch's order (the Trainer asks for the length and then the rows)."""
    memo: dict = {}

    def cached(epoch: int) -> list[int]:
        """The rows of `epoch` in order, computed once per epoch."""
        if memo.get("epoch") != epoch:
            memo.update(epoch=epoch, order=order_of(epoch))
        return memo["order"]

    return cached
