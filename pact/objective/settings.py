"""Every constant of the objectives, declared once (`ObjectiveArguments`, with the papers' defaults), and the
choice of objective. The command lines' objective flags are generated from these fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pact.checks import check_setting
from pact.errors import InvalidSetting

OBJECTIVES = ("pact", "tokenwise", "pact+tokenwise", "refkl", "refkl+tokenwise", "kd", "pact+kd")
REFKL_OBJECTIVES = ("refkl", "refkl+tokenwise")  # the KL to the reference over S and the rest (docs/objective.md section 5)
KD_OBJECTIVES = ("kd", "pact+kd")  # distillation from the teacher's top-K and tail (docs/distillation.md)
KD_LOSSES = ("forward", "reverse", "jsd")
# Qi et al. 2024 (arXiv 2406.05946), Table 3 with Eqn 3: beta_1 = 0.5, beta_t = 2 for 2 <= t <= 5, beta_t = 0.1 for t > 5.
PAPER_BETA_SCHEDULE = "0.5,2,2,2,2,0.1"


def parse_schedule(value, name: str, example: str, positive: bool) -> tuple[float, ...]:
    """The numbers of a per-position schedule setting `name`: comma-separated text, a number, or a list of either (a
    config file's or the API's form); `InvalidSetting` naming `name` unless there is one and every value is a finite
    number > 0 (`positive`) or >= 0."""
    values = value if isinstance(value, (list, tuple)) else [value]
    items = [part for item in values for part in ([t.strip() for t in item.split(",")] if isinstance(item, str) else [item])]
    if not items or any(item == "" for item in items):
        raise InvalidSetting(name, f"{name} must be comma-separated numbers {'>' if positive else '>='} 0, one per response "
                                   f"position (e.g. {example}), got {value!r}")
    numbers = []
    for item in items:
        try:
            number = float(item) if isinstance(item, str) else item
        except ValueError:
            number = item
        check_setting(name, number, 0, low_open=positive)
        numbers.append(float(number))
    return tuple(numbers)


def parse_beta_schedule(value) -> tuple[float, ...]:
    """The betas of a `beta_schedule` (see `parse_schedule`): every one a finite number > 0."""
    return parse_schedule(value, "beta_schedule", PAPER_BETA_SCHEDULE, positive=True)


def parse_position_weights(value) -> tuple[float, ...]:
    """The weights of `kl_position_weights` (see `parse_schedule`): every one a finite number >= 0."""
    return parse_schedule(value, "kl_position_weights", "8,4,2,1", positive=False)


@dataclass(frozen=True)
class ObjectiveArguments:
    """Every constant of the objectives (docs/objective.md sections 2, 4 and 5), with the papers' defaults.

    The command lines' objective flags are generated from these fields (their
    `help` and `aliases` metadata).
    """

    temperature: float = field(default=2.0, metadata={"help": "temperature T of PACT's KL (the reference KL is at T = 1)"})
    lam: float = field(default=1.0, metadata={"aliases": ["--lambda"], "help": "weight lambda of the KL; 0 is plain SFT"})
    p0: float = field(default=0.9, metadata={"help": "top-p mass of the gate's count (baked into the cache)"})
    alpha: float = field(default=2.0, metadata={"help": "gate slope"})
    b: float = field(default=0.0, metadata={"aliases": ["--gate_offset", "--gate-offset"], "help": "gate offset b"})
    gate_temperature: float = field(default=1.0, metadata={"help": "gate temperature Tg (baked into the cache)"})
    n_free: int = field(default=8, metadata={"aliases": ["--free_steps", "--free-steps"],
                                             "help": "response steps N before the gate decays"})
    tau: float = field(default=8.0, metadata={"help": "gate decay time constant"})
    boost: float = field(default=1.0, metadata={"help": "gate scale"})
    objective: str = field(default="pact", metadata={
        "help": "the loss: pact (the paper's), tokenwise, pact+tokenwise, refkl or refkl+tokenwise (docs/objective.md; "
                "the README's 'Which objective?'), or distillation from a --kd_top_k cache: kd, or pact+kd with PACT's KL "
                "beside it (docs/distillation.md)"})
    beta_schedule: str = field(default=PAPER_BETA_SCHEDULE, metadata={
        "help": "token-wise beta_t for response positions 1..k, comma-separated; the last holds for every later position"})
    kl_position_weights: str = field(default="1", metadata={
        "help": "weight a_t of KL_t for response positions 1..k, comma-separated, the last for every later position; "
                "1 weighs every position alike, as the paper does"})

    kd_loss: str = field(default="forward", metadata={
        "help": "kd, pact+kd: the divergence to the teacher over its top-K and one tail category: forward (KL(teacher || "
                "student)), reverse (KL(student || teacher)) or jsd (generalised Jensen-Shannon, --kd_jsd_beta)"})
    kd_temperature: float = field(default=1.0, metadata={
        "help": "kd, pact+kd: temperature of both distributions over the top-K and the tail (the loss is scaled by its square)"})
    kd_alpha: float = field(default=0.5, metadata={
        "help": "kd, pact+kd: the distillation loss's share: (1 - alpha) * CE + alpha * KD; 1 drops the CE"})
    kd_jsd_beta: float = field(default=0.5, metadata={
        "help": "kd_loss jsd: the teacher's share beta of the mixture m = beta * teacher + (1 - beta) * student"})

    def __post_init__(self) -> None:
        """Refuse a constant the objective cannot use (a NaN lambda would train a NaN adapter without any error), and
        write the schedules in one canonical form (so `1` and `1.0` record, and compare on resume, alike)."""
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
        if self.kd_loss not in KD_LOSSES:
            raise InvalidSetting("kd_loss", f"kd_loss must be one of {', '.join(KD_LOSSES)}, got {self.kd_loss!r}")
        check_setting("kd_temperature", self.kd_temperature, 0, low_open=True)
        check_setting("kd_alpha", self.kd_alpha, 0, 1)
        check_setting("kd_jsd_beta", self.kd_jsd_beta, 0, 1, low_open=True, high_open=True)
        object.__setattr__(self, "beta_schedule", ",".join(map(repr, parse_beta_schedule(self.beta_schedule))))
        object.__setattr__(self, "kl_position_weights", ",".join(map(repr, parse_position_weights(self.kl_position_weights))))

    @property
    def betas(self) -> tuple[float, ...]:
        """beta_t for response positions 1..k (the last for every later position), as numbers."""
        return parse_beta_schedule(self.beta_schedule)

    @property
    def position_weights(self) -> tuple[float, ...]:
        """a_t, the weight of KL_t for response positions 1..k (the last for every later position), as numbers."""
        return parse_position_weights(self.kl_position_weights)

    @property
    def uses_kl(self) -> bool:
        """Whether lambda times a KL to the reference is part of the loss (every objective but tokenwise and kd)."""
        return self.objective not in ("tokenwise", "kd")

    @property
    def uses_kd(self) -> bool:
        """Whether the loss distils the teacher's top-K and tail (kd, pact+kd)."""
        return self.objective in KD_OBJECTIVES

    @property
    def uses_reference_kl(self) -> bool:
        """Whether the KL is the one to the reference over S and the rest (refkl, refkl+tokenwise), not PACT's."""
        return self.objective in REFKL_OBJECTIVES

    @property
    def uses_tokenwise(self) -> bool:
        """Whether the token-wise constrained loss replaces the cross-entropy (the objectives naming tokenwise)."""
        return self.objective.endswith("tokenwise")

    def to_dict(self) -> dict:
        """Plain-dict form for manifests, configs and logs."""
        return asdict(self)

