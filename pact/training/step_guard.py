"""`StepGuard`: what `PactTrainer` logs of each optimizer step, kept on the device between logs, and the guard that
keeps a non-finite step from being applied, neither needing the host until the run logs, saves or ends.

Per optimizer step the trainer hands over the step's logged parts (summed
over processes), its response tokens and its gradient norm, all tensors on
the device. The guard adds them to running sums and remembers the first step
whose parts or norm are not finite, with its values, all by device
operations. `skip` is 1.0 from that step on: a fused torch optimizer (AdamW,
Adam, SGD with `fused=True`, the Trainer's default `adamw_torch_fused`) given
it as `found_inf` leaves the parameters and its state untouched, on the
device, so the step is never applied. `fetch()` copies everything to the
host in one read, the step's single sync, which the trainer makes when it
logs, saves a checkpoint or ends, raising there if a step went non-finite;
the log reuses the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Fetched:
    """The host copy of a `StepGuard`: the running sums since the last log (`parts` over `steps` steps and `tokens`),
    the last step's gradient norm, and the first non-finite step (0 for none) with its parts and norm."""

    parts: list[float]
    tokens: float
    steps: int
    grad_norm: float
    bad_step: int
    bad_parts: list[float]
    bad_norm: float


class StepGuard:
    """Running sums of `parts` (names of the numbers logged per step) and the first non-finite step, on the device."""

    def __init__(self, parts: tuple[str, ...]):
        self.names = parts
        self._sums: torch.Tensor | None = None  # [parts..., tokens, steps] since the last log
        self._norm: torch.Tensor | None = None  # [1]: the last step's gradient norm
        self._bad: torch.Tensor | None = None  # [step, parts..., norm] of the first non-finite step; step 0: none yet
        self._fetched: Fetched | None = None

    def end_step(self, parts: torch.Tensor, tokens: torch.Tensor | int, grad_norm: torch.Tensor | float | None, number: int) -> torch.Tensor:
        """Record optimizer step `number`: `parts` [len(names)] float64, its response `tokens` and `grad_norm` (None: 0).

        Returns `skip`, a float32 scalar on the device: 1.0 once this or an
        earlier step was not finite, else 0.0 (a fused optimizer's `found_inf`).
        Only device operations: no sync.
        """
        parts = parts.detach().double()
        norm = _column(grad_norm if grad_norm is not None else 0.0, parts)
        values = torch.cat([parts, norm])
        if self._bad is None:
            self._bad = torch.zeros(len(values) + 1, dtype=torch.float64, device=parts.device)
            self._sums = torch.zeros(len(parts) + 2, dtype=torch.float64, device=parts.device)
        newly_bad = ~torch.isfinite(values).all() & (self._bad[0] == 0)
        self._bad = torch.where(newly_bad, torch.cat([values.new_full((1,), float(number)), values]), self._bad)
        self._sums = self._sums + torch.cat([parts, _column(tokens, parts), values.new_ones(1)])
        self._norm = norm
        self._fetched = None
        return (self._bad[0] != 0).float()

    def fetch(self) -> Fetched | None:
        """Everything recorded, on the host: one device-to-host read, made at most once between two steps (None before
        the first step)."""
        if self._bad is None:
            return None
        if self._fetched is None:
            values = torch.cat([self._sums, self._norm, self._bad]).tolist()
            count = len(self.names)
            sums, norm, bad = values[:count + 2], values[count + 2], values[count + 3:]
            self._fetched = Fetched(parts=sums[:count], tokens=sums[count], steps=int(sums[count + 1]), grad_norm=norm,
                                    bad_step=int(bad[0]), bad_parts=bad[1:count + 1], bad_norm=bad[count + 1])
        return self._fetched

    def start_log(self) -> None:
        """Zero the running sums (after a log), on the device and in the host copy alike (no new read)."""
        if self._sums is not None:
            self._sums.zero_()
        if self._fetched is not None:
            self._fetched.parts, self._fetched.tokens, self._fetched.steps = [0.0] * len(self.names), 0.0, 0


def _column(value: torch.Tensor | float | int, like: torch.Tensor) -> torch.Tensor:
    """`value` (a tensor or a number) as a float64 tensor [1] on `like`'s device; a number is written by a fill, not
    copied from the host."""
    if isinstance(value, torch.Tensor):
        return value.detach().double().reshape(1).to(like.device)
    return like.new_full((1,), float(value))
