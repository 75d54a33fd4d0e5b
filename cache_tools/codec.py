"""How the per-step logits are stored as numbers: float32, bfloat16, float16,
or 8-bit square-root-companded codes with a per-row maximum and range; and,
for logits that only ever enter a softmax over the whole vocabulary, 8-bit
square-root-companded log-probabilities with a floor (`encode_logprob`).

Encoding and decoding are vectorised numpy over `[rows, k]` arrays (one row
per response step), so a whole batch or shard is converted at once.
"""

from __future__ import annotations

import numpy as np

from pact.errors import PactError

DTYPES = ("float32", "bfloat16", "float16", "int8")
DEFAULT_DTYPE = "int8"
INT8_LEVELS = 255
INT8_PARTS = ("max", "range")
_F16_MAX = float(np.finfo(np.float16).max)
#: Log-probabilities below -LOGPROB_FLOOR are stored at the floor: a probability error of at most exp(-20) = 2.1e-9.
LOGPROB_FLOOR = 20.0


def check_dtype(dtype: str) -> str:
    """Return `dtype` if it is a storage dtype, else raise a `PactError` listing the choices."""
    if dtype not in DTYPES:
        raise PactError(f"unknown cache dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


def extras_dtype(dtype: str) -> str:
    """Storage type of target_logprob and logsumexp: float32 for the exact layout, float16 otherwise."""
    return "float32" if dtype == "float32" else "float16"


def to_float16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16, clipped to float16's finite range (log-probs below -65504 become -65504)."""
    return np.clip(x, -_F16_MAX, _F16_MAX).astype(np.float16)


def _float16_toward(x: np.ndarray, direction: float) -> np.ndarray:
    """Round float32 `x` to float16, toward -inf (`direction < 0`) or +inf (`direction > 0`)."""
    half = x.astype(np.float16)
    wrong = half.astype(np.float32) > x if direction < 0 else half.astype(np.float32) < x
    half[wrong] = np.nextafter(half[wrong], np.float16(np.inf if direction > 0 else -np.inf))
    return half


def side_parts(dtype: str) -> tuple[str, ...]:
    """Per-row values stored next to the codes of `dtype` (int8: the row's maximum and range)."""
    return INT8_PARTS if dtype == "int8" else ()


def encode(x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """Encode float32 logits `[rows, k]` for storage: `{"values": [rows, k]}` plus, for int8, `max` and `range` [rows].

    bfloat16 is returned as its uint16 bit pattern (round to nearest even),
    since Arrow has no bfloat16 type. int8 stores codes c in 0..255 with
    value = max - range * (c / 255)^2: square-root companding, so the grid is
    finest at the row's maximum, where the target distribution has its mass.
    `max` and `range` are float16 rounded up, so every value is on the grid.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float32":
        return {"values": x}
    if dtype == "float16":
        return {"values": x.astype(np.float16)}
    if dtype == "bfloat16":
        bits = x.view(np.uint32)
        return {"values": ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)}
    check_dtype(dtype)
    if np.abs(x).max(initial=0.0) > _F16_MAX / 2:
        raise PactError("reference logits exceed the float16 range of the int8 layout's row maximum; use --dtype float32")
    if x.shape[1] == 0:
        return {"values": x.astype(np.uint8), "max": np.zeros(len(x), np.float16), "range": np.ones(len(x), np.float16)}
    top = _float16_toward(x.max(axis=1), 1.0)
    span = _float16_toward(top.astype(np.float32) - x.min(axis=1), 1.0)
    span[span == 0] = 1.0
    depth = (top.astype(np.float32)[:, None] - x) / span.astype(np.float32)[:, None]
    codes = np.rint(np.sqrt(np.clip(depth, 0.0, 1.0)) * INT8_LEVELS)
    return {"values": codes.astype(np.uint8), "max": top, "range": span}


_SQUARES = (np.arange(INT8_LEVELS + 1, dtype=np.float32) / INT8_LEVELS) ** 2


def decode(parts: dict[str, np.ndarray], dtype: str) -> np.ndarray:
    """Inverse of `encode`: stored parts (as `encode` returns them) -> a new float32 array."""
    values = parts["values"]
    if dtype == "float32":
        return np.array(values, dtype=np.float32)
    if dtype == "float16":
        return values.astype(np.float32)
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    top, span = parts["max"].astype(np.float32)[:, None], parts["range"].astype(np.float32)[:, None]
    return top - span * _SQUARES[values]


def tolerance(parts: dict[str, np.ndarray], dtype: str) -> np.ndarray:
    """Largest storage error of each decoded value: what `verify --recompute` allows on top of recompute noise."""
    decoded = decode(parts, dtype)
    magnitude = np.abs(decoded)
    if dtype == "float32":
        return magnitude * np.finfo(np.float32).eps
    if dtype == "float16":
        return magnitude * 2.0**-11 + 2.0**-25
    if dtype == "bfloat16":
        return magnitude * 2.0**-8 + 2.0**-133
    # half the grid step around code c: range * (2c + 1) / (2 * 255^2), plus float32 rounding
    step = parts["range"].astype(np.float32)[:, None] * (2.0 * parts["values"] + 1.0) / (2 * INT8_LEVELS**2)
    return step + magnitude * np.finfo(np.float32).eps


def encode_logprob(x: np.ndarray, logsumexp: np.ndarray) -> np.ndarray:
    """Encode float32 logits `[rows, k]` as 8-bit codes of their log-probabilities `x - logsumexp` (`logsumexp` [rows]).

    Code c stands for the log-probability -LOGPROB_FLOOR * (c / 255)^2:
    square-root companding, finest near probability 1, and every value at or
    below the floor gets code 255. No per-row side parts: the row's
    logsumexp, stored anyway, is the reference point. Meant for logits whose
    only use is their probability at temperature 1, where an error of d nats
    moves a probability p by about p * d, and a floored one by at most
    exp(-LOGPROB_FLOOR).
    """
    depth = (np.asarray(logsumexp, dtype=np.float32)[:, None] - np.asarray(x, dtype=np.float32)) / LOGPROB_FLOOR
    return np.rint(np.sqrt(np.clip(depth, 0.0, 1.0)) * INT8_LEVELS).astype(np.uint8)


def decode_logprob(codes: np.ndarray, logsumexp: np.ndarray) -> np.ndarray:
    """Inverse of `encode_logprob`: codes `[rows, k]` and the rows' logsumexp -> float32 logits (a floored value
    decodes to the floor)."""
    return np.asarray(logsumexp, dtype=np.float32)[:, None] - LOGPROB_FLOOR * _SQUARES[codes]


def floor_logprob(x: np.ndarray, logsumexp: np.ndarray) -> np.ndarray:
    """Logits `x` [rows, k] raised to the floor `logsumexp - LOGPROB_FLOOR` where below it: what `decode_logprob`
    of their codes approximates, so a recomputation is compared with the stored form."""
    return np.maximum(np.asarray(x, dtype=np.float32), np.asarray(logsumexp, dtype=np.float32)[:, None] - LOGPROB_FLOOR)


def logprob_tolerance(codes: np.ndarray, logsumexp: np.ndarray) -> np.ndarray:
    """Largest storage error of each value `decode_logprob` returns against `floor_logprob` of the encoded logits,
    given the float16 logsumexp the codes were made against: half the grid step around code c, float16's rounding of
    that logsumexp (a logit above it is stored at log-probability 0), and float32 rounding."""
    decoded = decode_logprob(codes, logsumexp)
    half_step = LOGPROB_FLOOR * (2.0 * codes + 1.0) / (2 * INT8_LEVELS**2)
    return half_step + np.abs(logsumexp.astype(np.float32))[:, None] * 2.0**-11 + np.abs(decoded) * np.finfo(np.float32).eps
