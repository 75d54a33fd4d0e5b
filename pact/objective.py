"""The PACT objective on tensors (docs/objective.md section 2), shared by the online
and the cached modes so both run one code path for the math.

Shapes: the response positions of a batch are flattened to `N` rows; `S` is
the safety-token set. Inputs on the reference side are logits restricted to
`S` (columns whose weight is zero may hold any finite value: the target puts
no mass there), plus the post-only top-p count that the gate needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from pact.errors import InvalidSetting
from pact.kernels import masked_kl


def check_setting(field: str, value, low: float | None = None, high: float | None = None, *,
                  low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Raise `InvalidSetting` naming `field` unless `value` is a finite number (an int with `integer`) within the bounds.

    `low`/`high` are inclusive unless `low_open`/`high_open`. One check for
    every numeric setting, so the messages read alike: `lr must be a finite
    number > 0, got nan`.
    """
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")
    expected = " ".join(filter(None, ["an integer" if integer else "a finite number", " and ".join(bounds)]))
    number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    valid = number and math.isfinite(value) and (
        low is None or (value > low if low_open else value >= low)) and (
        high is None or (value < high if high_open else value <= high))
    if not valid:
        raise InvalidSetting(field, f"{field} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class PactArguments:
    """Every constant of the objective (docs/objective.md section 2), with the paper's defaults.

    The command lines' objective flags are generated from these fields (their
    `help` and `aliases` metadata); `PactConfig` is the same class.
    """

    temperature: float = field(default=2.0, metadata={"help": "KL temperature T"})
    lam: float = field(default=1.0, metadata={"aliases": ["--lambda"], "help": "weight lambda of the safety-token KL; 0 is plain SFT"})
    p0: float = field(default=0.9, metadata={"help": "top-p mass of the gate's count (baked into the cache)"})
    alpha: float = field(default=2.0, metadata={"help": "gate slope"})
    b: float = field(default=0.0, metadata={"aliases": ["--gate_offset", "--gate-offset"], "help": "gate offset b"})
    gate_temperature: float = field(default=1.0, metadata={"help": "gate temperature Tg (baked into the cache)"})
    n_free: int = field(default=8, metadata={"aliases": ["--free_steps", "--free-steps"],
                                             "help": "response steps N before the gate decays"})
    tau: float = field(default=8.0, metadata={"help": "gate decay time constant"})
    boost: float = field(default=1.0, metadata={"help": "gate scale"})

    def __post_init__(self) -> None:
        """Refuse a constant the objective cannot use (a NaN lambda would train a NaN adapter without any error)."""
        check_setting("temperature", self.temperature, 0, low_open=True)
        check_setting("lam", self.lam, 0)
        check_setting("p0", self.p0, 0, 1, low_open=True)
        check_setting("alpha", self.alpha, 0, low_open=True)
        check_setting("b", self.b)
        check_setting("gate_temperature", self.gate_temperature, 0, low_open=True)
        check_setting("n_free", self.n_free, 0, integer=True)
        check_setting("tau", self.tau, 0, low_open=True)
        check_setting("boost", self.boost, 0)

    def to_dict(self) -> dict:
        """Plain-dict form for manifests, configs and logs."""
        return asdict(self)


PactConfig = PactArguments  # the Python API's name for the objective's settings


def topp_count(logits: torch.Tensor, p0: float, temperature: float = 1.0) -> torch.Tensor:
    """Smallest k such that the k largest entries of softmax(logits / temperature) sum to at least p0.

    Computed in float32 over the last dimension; returns int64 of the leading shape.
    """
    probs = torch.softmax(logits.detach().float() / temperature, dim=-1)
    sorted_probs = torch.sort(probs, dim=-1, descending=True).values
    below = torch.cumsum(sorted_probs, dim=-1) < p0
    return (below.sum(dim=-1) + 1).clamp(max=logits.shape[-1])


def gate(student_count: torch.Tensor, post_count: torch.Tensor, steps: torch.Tensor, num_safety: int, cfg: PactConfig) -> torch.Tensor:
    """The mixing weight c_t: how much of the post-only reference enters the target (no gradient)."""
    spread = (student_count.float() - post_count.float()) / num_safety
    decay = torch.exp(-torch.clamp(steps.float() - cfg.n_free, min=0.0) / cfg.tau)
    return torch.sigmoid(cfg.alpha * (spread - cfg.b)) * decay * cfg.boost


def mixed_target(full_logits: torch.Tensor, post_logits: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """r_t = (1 - c_t) f_t + c_t p_t, mixed in logit space, in float32."""
    c = c.float().unsqueeze(-1)
    return (1.0 - c) * full_logits.float() + c * post_logits.float()


def pact_kl(
    student_logits: torch.Tensor,
    full_logits: torch.Tensor,
    post_logits: torch.Tensor,
    post_count: torch.Tensor,
    steps: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    cfg: PactConfig,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position KL_t (already times T^2) of section 1.2; zero where `mask` is False.

    student_logits [N, |S|] carries the gradient; steps [N] is each row's
    response step t. The reference side (live or cached) gives full/post
    logits on the target columns and post_count [N], the top-p count of the
    post-only distribution over all of S. `columns` maps target columns to
    positions in S ([k] or per row [N, k]); `None` means all of S. Columns of
    S outside `columns` get zero target mass, which is exact for zero-weight
    tokens and the documented top-k approximation otherwise.
    """
    num_safety = student_logits.shape[-1]
    student_count = topp_count(student_logits, cfg.p0, cfg.gate_temperature)
    c = gate(student_count, post_count, steps, num_safety, cfg)
    target = mixed_target(full_logits, post_logits, c)
    if columns is not None:
        index = columns.expand_as(target) if columns.dim() == 1 else columns
        target = torch.full(student_logits.shape, float("-inf"), device=target.device).scatter(1, index, target)
    return masked_kl(student_logits, target, weights, mask, cfg.temperature)


def pact_loss(ce: torch.Tensor, kl_per_position: torch.Tensor, mask: torch.Tensor, cfg: PactConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """L = CE + lambda * mean KL_t over the batch's response tokens; returns (loss, mean KL)."""
    tokens = mask.sum().clamp(min=1)
    kl = kl_per_position.sum() / tokens
    return ce + cfg.lam * kl, kl


def chunked_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden @ W.T` against `targets` without keeping [N, V] logits.

    Each chunk's logits are recomputed in backward (activation checkpointing),
    so peak memory holds one chunk of full-vocabulary logits, not all of them.
    """
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        total = total + checkpoint(_ce_sum, hidden[chunk], lm_head_weight, targets[chunk], use_reentrant=False)
    return total / max(hidden.shape[0], 1)


def _ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
