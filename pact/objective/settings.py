"""Every constant of the objectives, declared once (`ObjectiveArguments`, with the papers' defaults), and the
choice of objective. The command lines' objective flags are generated from these fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pact.checks import check_setting
from pact.errors import InvalidSetting

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
class ObjectiveArguments:
    """Every constant of the objective (docs/objective.md sections 2 and 4), with the papers' defaults.

    The command lines' objective flags are generated from these fields (their
    `help` and `aliases` metadata).
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

