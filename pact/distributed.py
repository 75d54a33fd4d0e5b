"""Multi-process runs launched by `torchrun` (or `accelerate launch`): which
process this is, joining the process group, the partition of work among
processes, and the few collectives the cache build and the training loop need.

Every helper also works in a plain single process, where it does the trivial
thing (no process group is created), so callers keep one code path. The
backend is NCCL when the process computes on a GPU (each rank on
`cuda:LOCAL_RANK`) and gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from pact.devices import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a job: `rank` of `world_size` processes, `local_rank` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes shared outputs."""
        return self.rank == 0


def launcher_ranks() -> Ranks:
    """The ranks a launcher (torchrun, accelerate, Slurm's srun via torchrun) put in the environment; one process without."""
    return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def current_ranks() -> Ranks:
    """The ranks of the initialized default process group, or a single process when there is none."""
    if not dist.is_available() or not dist.is_initialized():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), launcher_ranks().local_rank)


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device of the process with `local_rank`: `auto` or `cuda` mean `cuda:LOCAL_RANK` when CUDA is there."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return resolve_device(device)


@contextlib.contextmanager
def distributed_session(device: str = "auto", timeout: timedelta | None = None) -> Iterator[torch.device]:
    """Join the launcher's job for the duration of the block; yields the device this process computes on.

    With `WORLD_SIZE` > 1 and no process group yet, the default group is
    initialized (NCCL on `cuda:LOCAL_RANK`, else gloo; `timeout` bounds how
    long a collective waits for the slowest rank) and destroyed on exit. A
    group that already exists (the caller's, accelerate's) is used as it is.
    """
    launched = launcher_ranks()
    torch_device = rank_device(device, launched.local_rank)
    if launched.world_size == 1 or dist.is_initialized():
        yield torch_device
        return
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    options = {"timeout": timeout} if timeout is not None else {}
    if torch_device.type == "cuda":
        dist.init_process_group("nccl", device_id=torch_device, **options)
    else:
        dist.init_process_group("gloo", **options)
    try:
        yield torch_device
    finally:
        dist.destroy_process_group()


def contiguous_part(items: Sequence[T], parts: int, index: int) -> Sequence[T]:
    """Part `index` of `items` cut into `parts` contiguous blocks in order, sizes differing by at most one (longer first).

    The one partition of work in the project: shards of a cache build among
    `--num-shards` jobs and among ranks, rows of a global batch among ranks.
    Joining the parts in index order gives `items` back.
    """
    if not 0 <= index < parts:
        raise ValueError(f"part index {index} is not in 0..{parts - 1}")
    size, extra = divmod(len(items), parts)
    begin = index * size + min(index, extra)
    return items[begin:begin + size + (index < extra)]


def _collective_device() -> torch.device:
    """Where tensors of a collective live: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def run_on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give every rank its result, or raise its exception on every rank.

    For work on shared state that must happen once (preparing a directory,
    reading a file another rank may rewrite) while the other ranks wait.
    """
    ranks = current_ranks()
    if ranks.world_size == 1:
        return fn()
    outcome: list = [None, None]
    if ranks.is_main:
        try:
            outcome = [fn(), None]
        except Exception as err:  # noqa: BLE001 - handed to every rank, raised there
            outcome = [None, err]
    dist.broadcast_object_list(outcome, src=0, device=_collective_device())
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def all_gather(value: T) -> list[T]:
    """Every rank's `value` (any picklable object), in rank order, on every rank; also a barrier."""
    ranks = current_ranks()
    if ranks.world_size == 1:
        return [value]
    gathered: list = [None] * ranks.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over the ranks (float64), on every rank."""
    if current_ranks().world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()
