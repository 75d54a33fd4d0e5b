"""Counting the host synchronisations and device copies of training steps.

`SyncCounter` is a torch dispatch mode (with a function mode for the reads
that dispatch no operator) that counts, on the tensors of one device type:

* host reads: `aten._local_scalar_dense` (what `.item()`, `bool()`, `int()`
  and `float()` on a tensor call, also inside C++ composites such as
  `allclose`) and `Tensor.tolist()` / `Tensor.numpy()`;
* data-dependent operators, whose result the host must wait for: output
  sizes that depend on the values (`nonzero`, `masked_select`, `unique`,
  boolean indexing, `bincount`, `repeat_interleave` without `output_size`) or
  a host bool (`equal`);
* copies between devices: blocking ones (device to host, or host to device
  without `non_blocking` or from pageable memory) and asynchronous ones (host
  to device with `non_blocking=True` from pinned memory, or device to host
  with `non_blocking=True`), counted apart.

`syncs` is host reads + data-dependent operators + blocking copies.

On CPU the watched device is the CPU itself: there a read costs nothing,
but it stands for the sync the same code makes on a GPU, so the counter is a
CPU proxy of the GPU's syncs. What only a GPU shows is a sync made inside an
operator's C++ code (a `cudaMemcpy` or stream synchronisation that dispatches
nothing): `torch.cuda.set_sync_debug_mode`, which `StepSyncs` can turn on
within each step (`cuda_sync_debug="error"`), reports those.

`StepSyncs` is a `TrainerCallback` that cuts the counts into optimizer steps
(see its docstring); `benchmarks/gpu_check.py` and tests/test_hotpath.py use it.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

aten = torch.ops.aten

SCALAR_READS = (aten._local_scalar_dense.default,)
DATA_DEPENDENT = frozenset({
    aten.nonzero.default, aten.masked_select.default, aten.equal.default, aten.bincount.default,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor,
})
INDEXING = frozenset({aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default})
TENSOR_READS = frozenset({torch.Tensor.tolist, torch.Tensor.numpy})
KINDS = ("host_reads", "data_dependent", "blocking_copies", "async_copies")


@dataclass
class SyncEvent:
    """One counted event: its kind (one of `KINDS`), the operator and where in the caller's code it happened."""

    kind: str
    op: str
    where: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.op} at {self.where}"


@dataclass
class SyncCounts:
    """Counts of each kind of event (see the module docstring) and the events themselves, in order."""

    host_reads: int = 0
    data_dependent: int = 0
    blocking_copies: int = 0
    async_copies: int = 0
    events: list[SyncEvent] = field(default_factory=list)

    @property
    def syncs(self) -> int:
        """Host synchronisations: host reads, data-dependent operators and blocking copies."""
        return self.host_reads + self.data_dependent + self.blocking_copies

    def since(self, earlier: "SyncCounts") -> "SyncCounts":
        """The events counted after the snapshot `earlier` of the same counter."""
        return SyncCounts(*(getattr(self, k) - getattr(earlier, k) for k in KINDS), self.events[len(earlier.events):])

    def snapshot(self) -> "SyncCounts":
        """A copy of the counts so far (the events list copied, not shared)."""
        return SyncCounts(*(getattr(self, k) for k in KINDS), list(self.events))

    def describe(self) -> str:
        """The counts and each event on its own line (for assertion messages and reports)."""
        head = ", ".join(f"{k} {getattr(self, k)}" for k in KINDS)
        return "\n".join([head, *(f"  {event}" for event in self.events)])


def _caller() -> str:
    """The innermost frames outside torch and this module, as `file:line function` (which code made the event)."""
    frames = [f for f in traceback.extract_stack()[:-3] if "/torch/" not in f.filename and not f.filename.endswith("sync_counter.py")]
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in an operator's argument (a tensor, or a list or tuple of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


class _TensorReads(TorchFunctionMode):
    """The function-mode half of `SyncCounter`: `tolist()` and `numpy()`, which read a whole tensor without dispatching
    an operator the dispatch mode could see."""

    def __init__(self, counter: "SyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in TENSOR_READS and args and self.counter.watches(args[0]):
            self.counter.record("host_reads", f"Tensor.{func.__name__}")
            with self.counter.reading():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class SyncCounter(TorchDispatchMode):
    """Counts the syncs and device copies (see the module docstring) of the code run inside `with counter:`.

    `device_type` is the type of the training device ("cuda", or "cpu" for
    the CPU proxy); reads and data-dependent operators of tensors on it are
    counted. `counts` holds the running totals; `counts.snapshot()` and
    `.since()` cut them into windows. The mode is per thread (DataLoader
    workers and the pin-memory thread are not counted; autograd's backward
    threads are, as the dispatch mode travels with the autograd state).
    """

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = torch.device(device_type).type
        self.counts = SyncCounts()
        self._function_mode = _TensorReads(self)
        self._inside_read = False

    def watches(self, tensor: torch.Tensor) -> bool:
        """Whether reads of `tensor` count: it lives on the watched device type."""
        return isinstance(tensor, torch.Tensor) and tensor.device.type == self.device_type

    def record(self, kind: str, op: str) -> None:
        """Count one event of `kind` made by `op`."""
        setattr(self.counts, kind, getattr(self.counts, kind) + 1)
        self.counts.events.append(SyncEvent(kind, op, _caller()))

    @contextlib.contextmanager
    def reading(self):
        """While a counted whole-tensor read runs: its own device-to-host copy is part of that read, not counted again."""
        self._inside_read, before = True, self._inside_read
        try:
            yield
        finally:
            self._inside_read = before

    def __enter__(self):
        result = super().__enter__()
        self._function_mode.__enter__()
        return result

    def __exit__(self, *exc):
        self._function_mode.__exit__(*exc)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._inside_read:
            self._classify(func, args, kwargs)
        return func(*args, **kwargs)

    def _classify(self, func, args, kwargs) -> None:
        """Count `func(*args, **kwargs)` if it is a host read, a data-dependent operator or a copy between devices."""
        first = args[0] if args else None
        if func in SCALAR_READS and self.watches(first):
            self.record("host_reads", str(func))
        elif func in DATA_DEPENDENT and self.watches(first) and not (func in (aten.repeat_interleave.Tensor,
                                                                              aten.repeat_interleave.self_Tensor)
                                                                     and kwargs.get("output_size") is not None):
            self.record("data_dependent", str(func))
        elif func in INDEXING and any(t.dtype == torch.bool and self.watches(t) for t in _tensors(args[1:2])):
            self.record("data_dependent", f"{func} (boolean index)")
        elif func is aten._to_copy.default and isinstance(first, torch.Tensor):
            target = kwargs.get("device")
            if target is not None and torch.device(target).type != first.device.type:
                self._copy(first, torch.device(target), bool(kwargs.get("non_blocking")), str(func))
        elif func is aten.copy_.default and len(args) > 1 and isinstance(args[1], torch.Tensor):
            if args[0].device.type != args[1].device.type:
                self._copy(args[1], args[0].device, bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking")), str(func))

    def _copy(self, source: torch.Tensor, target: torch.device, non_blocking: bool, op: str) -> None:
        """Count a copy from `source` to device `target`: asynchronous only with `non_blocking` and, from the host,
        from pinned memory (a pageable source makes the host wait for the copy)."""
        to_host = target.type == "cpu"
        pinned = source.device.type != "cpu" or source.is_pinned()
        direction = "device to host" if to_host else "host to device" if source.device.type == "cpu" else "device to device"
        kind = "async_copies" if non_blocking and pinned else "blocking_copies"
        self.record(kind, f"{op} {direction}{'' if pinned else ' (pageable)'}")


@dataclass
class StepRecord:
    """What `StepSyncs` counted for one optimizer step (numbered as `state.global_step` after it)."""

    step: int
    logged: bool
    saved: bool
    inner: SyncCounts
    whole: SyncCounts | None = None


class StepSyncs(TrainerCallback):
    """A `TrainerCallback` that cuts a `SyncCounter`'s counts into optimizer steps (run the training inside
    `with counter:`).

    For each step it records `inner`, from the step's first micro-batch to
    `on_step_end` (forward and backward passes, gradient clipping, the
    optimizer), and `whole`, from the step's first micro-batch to the next
    step's (or to the end of the epoch): `inner`, plus the step's logging and
    checkpoint, plus fetching the next step's micro-batches. Every per-step
    cost lands in exactly one `whole`; the once-per-epoch work (starting the
    data loader) and the run's set-up and end are left out. `logged` and
    `saved` say whether the Trainer logged or saved at that step.

    `cuda_sync_debug` ("warn" or "error") turns `torch.cuda.set_sync_debug_mode`
    on within each step's `inner` window, so a sync inside an operator that
    the dispatch mode cannot see is reported too.
    """

    def __init__(self, counter: SyncCounter, cuda_sync_debug: str | None = None):
        self.counter = counter
        self.cuda_sync_debug = cuda_sync_debug
        self.steps: list[StepRecord] = []
        self._begin: SyncCounts | None = None

    def _close_whole(self) -> None:
        """End the current step's `whole` window (if one is open)."""
        if self._begin is not None and self.steps and self.steps[-1].whole is None:
            self.steps[-1].whole = self.counter.counts.snapshot().since(self._begin)
        self._begin = None

    def on_step_begin(self, args, state, control, **kwargs):
        """Open the step's windows (closing the previous step's `whole`)."""
        self._close_whole()
        self._begin = self.counter.counts.snapshot()
        if self.cuda_sync_debug:
            torch.cuda.set_sync_debug_mode(self.cuda_sync_debug)

    def on_step_end(self, args, state, control, **kwargs):
        """Close the step's `inner` window and note whether the step logs and saves."""
        if self.cuda_sync_debug:
            torch.cuda.set_sync_debug_mode("default")
        if self._begin is not None:
            self.steps.append(StepRecord(state.global_step, bool(control.should_log), bool(control.should_save),
                                         self.counter.counts.snapshot().since(self._begin)))

    def on_epoch_end(self, args, state, control, **kwargs):
        """Close the last step's `whole` window of the epoch."""
        self._close_whole()

    def on_train_end(self, args, state, control, **kwargs):
        """Close any window left open."""
        self._close_whole()
