"""Live tensor bytes over a computation, by category, and their peak.

`LiveTensorBytes` is a `TorchDispatchMode`: it sees every tensor each aten
operator returns, keeps a weak reference to its storage, and so knows after
every operator the bytes of all storages still alive on one device type, which
is what a device's memory holds at that moment (`torch.cuda.memory_allocated`
counts the same thing, each block rounded up to the caching allocator's 512
bytes). It measures real tensors and meta tensors (which hold no data) alike,
so a training step run on meta tensors is measured as that step would be on a
device (`pact.planning`), and the same code measures a real step to check it.

Storages alive before the mode starts are invisible unless given to `track`
(a model's weights, an optimizer's state). Memory that never becomes a tensor
(the CUDA context, kernels' workspaces, the allocator's cached free blocks) is
not counted here; `pact.planning` adds a margin for it.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# What the bytes at the peak are: the models' weights; gradients and optimizer state of the trained parameters;
# tensors made inside the decoder stacks (their forward and backward); everything else the loss makes (logits, CE,
# KL, their gradients); the micro-batch copied to the device (token ids, masks, the cache's targets).
CATEGORIES = ("weights", "trainable_state", "activations", "logits_loss", "batch")
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of this many bytes
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


def tensors_in(value) -> Iterator[torch.Tensor]:
    """The tensors in an operator's arguments or results (nested in lists, tuples and dicts); faster than a pytree walk,
    which matters when it runs for every operator."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


@dataclass
class Peak:
    """The most bytes alive at once: in total, by category (`CATEGORIES`), and the phase of the step it happened in."""

    total: int = 0
    by_category: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    phase: str = ""


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the storages alive on `device_type` after every operator, and keeps their peak.

    A new storage is filed under the innermost `region` in effect, else
    `batch` for a copy from another device, else `default_category()` (a
    caller's rule, e.g. inside a decoder or not); `track` files existing
    tensors, or moves a tracked one to another category. `block` rounds each
    storage up as the CUDA caching allocator does.
    """

    def __init__(self, device_type: str, default_category: Callable[[], str] = lambda: "activations", block: int = CUDA_BLOCK):
        super().__init__()
        self.device_type = device_type
        self.default_category = default_category
        self.block = block
        self.phase = ""
        self.peak = Peak()
        self._live: dict[int, tuple[weakref.ref, int, str]] = {}
        self._totals = dict.fromkeys(CATEGORIES, 0)
        self._regions: list[str] = []

    @property
    def current(self) -> int:
        """Bytes alive now."""
        return sum(self._totals.values())

    def by_category(self) -> dict[str, int]:
        """Bytes alive now, by category."""
        return dict(self._totals)

    def track(self, tensors: Iterable[torch.Tensor | None], category: str) -> None:
        """File the storages of `tensors` on this device under `category` (moving them there if already tracked)."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == self.device_type:
                self._add(tensor.untyped_storage(), category, move=True)
        self._note_peak()

    @contextlib.contextmanager
    def region(self, category: str) -> Iterator[None]:
        """Storages made inside the block are filed under `category`."""
        self._regions.append(category)
        try:
            yield
        finally:
            self._regions.pop()

    def reset_peak(self, phase: str = "") -> None:
        """Start a new peak from what is alive now (e.g. after setting up, before the measured step)."""
        self.phase = phase
        self.peak = Peak(self.current, self.by_category(), phase)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        category = self._category(func, args)
        for tensor in tensors_in(out):
            if tensor.device.type == self.device_type:
                self._add(tensor.untyped_storage(), category, move=False)
        self._note_peak()
        return out

    def _category(self, func, args) -> str:
        """Where a storage made by `func(*args)` belongs."""
        if self._regions:
            return self._regions[-1]
        source = args[-1] if func is torch.ops.aten.copy_.default else args[0] if args else None
        if func in _COPIES and isinstance(source, torch.Tensor) and source.device.type != self.device_type:
            return "batch"
        return self.default_category()

    def _size(self, storage: torch.UntypedStorage) -> int:
        """The bytes the device's allocator hands out for `storage`."""
        return -(-storage.nbytes() // self.block) * self.block

    def _add(self, storage: torch.UntypedStorage, category: str, move: bool) -> None:
        """Count `storage` (once, however many tensors view it); a tracked one is resized and, with `move`, refiled."""
        key = id(storage)
        size = self._size(storage)
        known = self._live.get(key)
        if known is not None and known[0]() is storage:
            ref, old_size, old_category = known
            new_category = category if move else old_category
            self._totals[old_category] -= old_size
            self._totals[new_category] += size
            self._live[key] = (ref, size, new_category)
            return
        ref = weakref.ref(storage, functools.partial(self._forget, key))
        self._live[key] = (ref, size, category)
        self._totals[category] += size

    def _forget(self, key: int, ref: weakref.ref) -> None:
        """The storage tracked under `key` by `ref` was freed: stop counting it."""
        known = self._live.get(key)
        if known is not None and known[0] is ref:
            del self._live[key]
            self._totals[known[2]] -= known[1]

    def _note_peak(self) -> None:
        """Remember the bytes alive now if they are the most so far."""
        total = self.current
        if total > self.peak.total:
            self.peak = Peak(total, self.by_category(), self.phase)
