"""The PACT objective on tensors (docs/objective.md section 2), and the token-wise
constrained objective of Qi et al. 2024 (section 4), shared by the online and
the cached modes so both run one code path for the math.

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


OBJECTIVES = ("pact", "tokenwise", "pact+tokenwise")
# Qi et al. 2024 (arXiv 2406.05946), Table 3 with Eqn 3: beta_1 = 0.5, beta_t = 2 for 2 <= t <= 5, beta_t = 0.1 for t > 5.
PAPER_BETA_SCHEDULE = "0.5,2,2,2,2,0.1"


def parse_beta_schedule(value) -> tuple[float, ...]:
    """The betas of a `beta_schedule`: comma-separated text, a number, or a list of either (a config file's or the
    API's form); `InvalidSetting` naming `beta_schedule` unless every value is a finite number > 0 and there is one."""
    values = value if isinstance(value, (list, tuple)) else [value]
    items = [part for item in values for part in ([t.strip() for t in item.split(",")] if isinstance(item, str) else [item])]
    if not items or any(item == "" for item in items):
        raise InvalidSetting("beta_schedule", f"beta_schedule must be comma-separated numbers > 0, one per response position "
                                              f"(e.g. {PAPER_BETA_SCHEDULE}), got {value!r}")
    betas = []
    for item in items:
        try:
            number = float(item) if isinstance(item, str) else item
        except ValueError:
            number = item
        check_setting("beta_schedule", number, 0, low_open=True)
        betas.append(float(number))
    return tuple(betas)


@dataclass(frozen=True)
class PactArguments:
    """Every constant of the objective (docs/objective.md sections 2 and 4), with the papers' defaults.

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
    objective: str = field(default="pact", metadata={
        "help": "the loss: pact (CE + lambda * KL), tokenwise (token-wise constrained SFT, Qi et al. 2024) or pact+tokenwise "
                "(the token-wise loss in place of the CE, + lambda * KL); docs/objective.md section 4"})
    beta_schedule: str = field(default=PAPER_BETA_SCHEDULE, metadata={
        "help": "token-wise beta_t for response positions 1..k, comma-separated; the last holds for every later position"})

    def __post_init__(self) -> None:
        """Refuse a constant the objective cannot use (a NaN lambda would train a NaN adapter without any error), and
        write `beta_schedule` in one canonical form (so `1` and `1.0` record, and compare on resume, alike)."""
        check_setting("temperature", self.temperature, 0, low_open=True)
        check_setting("lam", self.lam, 0)
        check_setting("p0", self.p0, 0, 1, low_open=True)
        check_setting("alpha", self.alpha, 0, low_open=True)
        check_setting("b", self.b)
        check_setting("gate_temperature", self.gate_temperature, 0, low_open=True)
        check_setting("n_free", self.n_free, 0, integer=True)
        check_setting("tau", self.tau, 0, low_open=True)
        check_setting("boost", self.boost, 0)
        if self.objective not in OBJECTIVES:
            raise InvalidSetting("objective", f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        object.__setattr__(self, "beta_schedule", ",".join(map(repr, parse_beta_schedule(self.beta_schedule))))

    @property
    def betas(self) -> tuple[float, ...]:
        """beta_t for response positions 1..k (the last for every later position), as numbers."""
        return parse_beta_schedule(self.beta_schedule)

    @property
    def uses_kl(self) -> bool:
        """Whether lambda times the safety-token KL is part of the loss (objectives pact and pact+tokenwise)."""
        return self.objective != "tokenwise"

    @property
    def uses_tokenwise(self) -> bool:
        """Whether the token-wise constrained loss replaces the cross-entropy (objectives tokenwise and pact+tokenwise)."""
        return self.objective != "pact"

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


def pact_loss(fit: torch.Tensor, kl_per_position: torch.Tensor, mask: torch.Tensor, cfg: PactConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch loss and the mean KL_t over its response tokens: L = fit + lambda * mean KL (objectives pact and
    pact+tokenwise), or `fit` alone (tokenwise). `fit` is the mean CE (pact) or the mean token-wise loss (the others)."""
    tokens = mask.sum().clamp(min=1)
    kl = kl_per_position.sum() / tokens
    return (fit + cfg.lam * kl if cfg.uses_kl else fit), kl


def betas_at(steps: torch.Tensor, betas: tuple[float, ...]) -> torch.Tensor:
    """beta_t of each response token: `betas[t]` for step t (t = 0 is response position 1), the last one past the end.

    Built on the device from the numbers themselves (a schedule tensor made on
    the host would be a pageable copy to the GPU at every step).
    """
    beta = torch.full(steps.shape, betas[-1], dtype=torch.float32, device=steps.device)
    for step, value in enumerate(betas[:-1]):
        beta = torch.where(steps == step, value, beta)
    return beta


def tokenwise_terms(student_logprob: torch.Tensor, reference_logprob: torch.Tensor, steps: torch.Tensor,
                    betas: tuple[float, ...]) -> torch.Tensor:
    """Per response token, Qi et al.'s Eqn 3 term -(2 / beta_t) * log sigmoid(beta_t * (log pi_theta - log pi_ref)) [N].

    Written as (2 / beta_t) * softplus(-beta_t * ratio), which is the same
    number without overflow; its gradient is -2 * sigmoid(-beta_t * ratio) times
    that of log pi_theta, the weight the paper's appendix and code use.
    """
    beta = betas_at(steps, betas)
    ratio = student_logprob.float() - reference_logprob.float().to(student_logprob.device)
    return 2.0 / beta * F.softplus(-beta * ratio)


def chunked_target_logprob(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                           chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(hidden @ W.T)[target] of each row [N] (float32) without keeping [N, V] logits.

    Each chunk's logits are recomputed in backward (activation checkpointing),
    so peak memory holds one chunk of full-vocabulary logits, not all of them.
    """
    from torch.utils.checkpoint import checkpoint

    parts = [checkpoint(_target_logprob, hidden[start:start + chunk_size], lm_head_weight, targets[start:start + chunk_size],
                        use_reentrant=False) for start in range(0, hidden.shape[0], chunk_size)]
    return torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)


def mean_cross_entropy(logprob: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy of response tokens whose log-probs are `logprob` (0 for none)."""
    return -logprob.sum() / max(logprob.shape[0], 1)


def float32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`hidden @ weight.T` computed in float32 whatever the model's dtype (a no-op cast for float32 models).

    Logits feed softmaxes, log-softmaxes, top-p counts and the cache's stored
    values; projected in bfloat16 they would be off by ~0.1 (~10% in
    probability), so hidden states and head rows are cast before the matmul.
    """
    return F.linear(hidden.float(), weight.float())


def _target_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One chunk of `chunked_target_logprob`: the full-vocabulary logits projected in the weights' dtype, then
    the log-softmax in float32.

    Unlike the safety rows, the whole LM head would have to be copied to
    float32 for this projection, in the forward and again in the checkpointed
    backward (V x H x 4 bytes: 2.2 GB for Qwen2.5-7B): the training step's
    largest transient. Upcasting the logits keeps the softmax in float32 at
    no memory cost, as transformers' own loss does.
    """
    return -F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
