"""Storage codec for knowledge-distillation targets: per response step, the
teacher's top-K token ids, their log-probs (temperature 1, log_softmax of the
full logits, not renormalised) and the exact log of the tail mass
`tail = logsumexp(logits outside the top-K) - logsumexp(all logits)`.

Layout (per step, fixed width; B = bytes of `vocab_size - 1`, 2 below 65537):

* `kd_gap_b0 .. kd_gap_b{B-1}`: `uint8[K]` each, byte planes of the gaps
  between the step's dictionary ranks sorted ascending (`rank[0]`,
  `rank[j] - rank[j-1] - 1`). The ranks index a per-shard dictionary (the
  `shard_extra` array) listing the shard's ids by frequency class
  (`floor(log2(count))`, most frequent first, ids ascending within a class),
  so frequent tokens have small ranks and the gaps of a set are small.
* `kd_height_b0, kd_height_b1`: `uint8[K]` each, byte planes of
  `floor - code` for each entry in the same (rank) order, where `code` is the
  entry's quantised log-prob and `floor` the step's largest code (its lowest
  log-prob): most top-K entries sit near the K-th value, so heights are small.
* `kd_floor` (`uint16`): the step's largest code. `kd_tail` (`uint16`): the
  code of the tail.

The entries of a step are a set (sorted by rank), which costs about
log2(K!) bits less than naming the ids in log-prob order; the decoder puts them
back in the canonical order (descending log-prob, ties by ascending id) using
the decoded values. Nothing depends on the previous step, so a shard decodes
with whole-array numpy and rows need no reset.

`shard_extra` is a 1-D `uint8` array: B byte planes (each the whole
dictionary, plane 0 first) of the dictionary's successive id differences
modulo 2^(8B) (small within a frequency class). Store it once per shard.

Quantisation (`code` in 0..65535, monotone in the log-prob `lp`; `p = e^lp`),
with `s = 1/512` and `h = 1/4`:

* `sqrt(p) >= 2s/h = 1/64` (`lp >= -8.32`): `code = (1 - sqrt(p)) / s`,
  uniform in sqrt(p), so every entry adds about the same KL error whatever its
  probability, and each probability is off by at most about s * sqrt(p) <= s;
* `-64 <= lp < -8.32`: uniform in `lp` with step `h` (continuous with the
  sqrt step at the boundary): low-probability entries need less precision;
* `lp < -64`: uniform in `log(-lp)`, relative step h/64 (covers all of
  float32);
* code 65535: `lp = -inf` (a zero probability, e.g. a masked logit), exact.

Error bound of a decoded value (`tolerance`): half a grid step on its deeper
side plus float32 rounding: 0.002 nats at `lp = 0`, about `s / sqrt(p)`
above `lp = -8.32` (0.0195 nats at p = 0.01), `h/2 = 0.125` nats from there
to -64, 0.2% of |lp| below. `kl_bound` turns it into a bound on the KL over
the K + 1 categories (`0.5 * sum_c p_c t_c^2 e^{2 t_c}`). Measured on the
embedded model's outputs over the demo data at K = 50 (bench_kd_storage.py):
about 85 bytes per token with zstd, mean KL about 3e-5 nats.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch
from pact.cache_tools.errors import CacheError

PREFIX = "kd_"
NEG_INF_CODE = 65535
_F32_MAX = float(np.finfo(np.float32).max)
LOGPROB_SLACK = 1e-3  # log-probs up to this above 0 are float rounding and stored as 0
MASS_SLACK = 0.05  # the K + 1 probabilities of a step must sum to within 5% of 1


class _Grid:
    """The piecewise code <-> log-prob map (see the module docstring)."""

    def __init__(self, s: float, h: float, deep: float):
        self.s, self.h, self.deep = s, h, -abs(deep)
        self.a = min(2.0 * s / h, 1.0)  # sqrt(p) where the sqrt-domain step in lp reaches h
        self.lp_a = 2.0 * math.log(self.a)
        self.c_a = (1.0 - self.a) / s
        self.c_b = self.c_a + (self.lp_a - self.deep) / h
        self.r = h / abs(self.deep)  # relative step below `deep`, continuous with h there
        self.max_code = int(np.rint(self.code_of(np.array([-_F32_MAX]))[0]))
        if self.max_code >= NEG_INF_CODE:
            raise AssertionError("top-K codec grid does not fit 16 bits")

    def code_of(self, lp: np.ndarray) -> np.ndarray:
        """Continuous code of log-probs (finite, <= 0), float64; each branch is computed only where it applies."""
        lp = np.asarray(lp, dtype=np.float64)
        code = self.c_a + (self.lp_a - lp) / self.h
        shallow = lp >= self.lp_a
        code[shallow] = (1.0 - np.exp(lp[shallow] * 0.5)) / self.s
        if lp.size and lp.min() < self.deep:
            deep = lp < self.deep
            code[deep] = self.c_b + np.log(lp[deep] / self.deep) / self.r
        return code

    def value_of(self, code: np.ndarray) -> np.ndarray:
        """Log-probs (float64) of (possibly fractional) codes in 0..max_code + 1/2."""
        code = np.asarray(code, dtype=np.float64)
        lp = self.lp_a - (code - self.c_a) * self.h
        shallow = code <= self.c_a
        lp[shallow] = 2.0 * np.log(np.maximum(1.0 - code[shallow] * self.s, 1e-300))
        if code.size and code.max() > self.c_b:
            deep = code > self.c_b
            lp[deep] = self.deep * np.exp((code[deep] - self.c_b) * self.r)
        return lp


_GRID = _Grid(s=1.0 / 512, h=1.0 / 4, deep=64.0)


# --- layout ----------------------------------------------------------------------------------------


def _id_bytes(vocab_size: int) -> int:
    """Bytes per id plane count: enough for ids (and dictionary ranks) below `vocab_size`."""
    return max(1, (int(vocab_size - 1).bit_length() + 7) // 8)


def _check_sizes(top_k: int, vocab_size: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise CacheError(f"top-K codec: top_k must be a positive integer, got {top_k!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or not 2 <= vocab_size <= 2**31:
        raise CacheError(f"top-K codec: vocab_size must be an integer in 2..2^31, got {vocab_size!r}")
    if top_k >= vocab_size:
        raise CacheError(f"top-K codec: top_k {top_k} must be below the vocabulary size {vocab_size} (the tail must be a category)")


def _entry_fields(top_k: int, vocab_size: int) -> list[str]:
    return [f"{PREFIX}gap_b{i}" for i in range(_id_bytes(vocab_size))] + [f"{PREFIX}height_b0", f"{PREFIX}height_b1"]


SCALAR_FIELDS = (f"{PREFIX}floor", f"{PREFIX}tail")


def step_fields(top_k: int, vocab_size: int) -> list[tuple[str, pa.DataType, int]]:
    """The KD fields of a step as (name, Arrow value type, values per step).

    Fields of width `top_k` are `pa.list_(type, top_k)` (fixed-size lists,
    also when top_k is 1); the two in `SCALAR_FIELDS` are scalars. `arrow_fields`
    gives the Arrow fields themselves.
    """
    _check_sizes(top_k, vocab_size)
    return [(name, pa.uint8(), int(top_k)) for name in _entry_fields(top_k, vocab_size)] + \
        [(name, pa.uint16(), 1) for name in SCALAR_FIELDS]


def arrow_fields(top_k: int, vocab_size: int) -> list[pa.Field]:
    """The KD fields of the step struct, as non-nullable Arrow fields."""
    return [pa.field(name, kind if name in SCALAR_FIELDS else pa.list_(kind, width), nullable=False)
            for name, kind, width in step_fields(top_k, vocab_size)]


def _planes(x: np.ndarray, count: int) -> list[np.ndarray]:
    """Little-endian byte planes of non-negative int64 values below 2^(8 count)."""
    return [((x >> (8 * i)) & 255).astype(np.uint8) for i in range(count)]


def _unplane(planes: list[np.ndarray]) -> np.ndarray:
    out = planes[0].astype(np.int64)
    for i, plane in enumerate(planes[1:], start=1):
        out |= plane.astype(np.int64) << (8 * i)
    return out


# --- validation helpers ----------------------------------------------------------------------------


def _numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise CacheError(f"top-K codec: {name} is not an array ({err})") from None


def _first_bad(bad: np.ndarray, name: str, problem: str) -> None:
    """Raise naming the first step flagged in `bad` ([n] or [n, K])."""
    if bad.ndim > 1:
        bad = bad.any(axis=tuple(range(1, bad.ndim)))
    if bad.any():
        raise CacheError(f"top-K codec: {name}, step {int(np.argmax(bad))}: {problem}")


def _check_offsets(row_offsets, n: int) -> np.ndarray:
    offsets = _numpy(row_offsets, "row_offsets")
    if offsets.ndim != 1 or len(offsets) < 1 or offsets.dtype.kind not in "iu":
        raise CacheError(f"top-K codec: row_offsets must be a 1-D integer array [rows + 1], got shape {offsets.shape} "
                         f"of {offsets.dtype}")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
        raise CacheError(f"top-K codec: row_offsets must ascend from 0 to the number of steps {n} "
                         f"(got {offsets[0]} .. {offsets[-1]})")
    return offsets


def _check_logprobs(values: np.ndarray, name: str) -> np.ndarray:
    """Log-probs checked (no NaN or +inf, <= LOGPROB_SLACK) and clipped to <= 0 (-inf kept), as float32 (float64 if
    given so)."""
    if values.dtype.kind not in "fiu":
        raise CacheError(f"top-K codec: {name} must be floating point, got {values.dtype}")
    values = values.astype(np.float64 if values.dtype == np.float64 else np.float32, copy=False)
    _first_bad(np.isnan(values) | (values > LOGPROB_SLACK), name,
               f"not a log-probability (NaN, or above 0 by more than {LOGPROB_SLACK})")
    return np.minimum(values, 0.0)


def _codes(lp: np.ndarray) -> np.ndarray:
    """uint16-range int64 codes of checked log-probs (<= 0, -inf allowed)."""
    finite = np.isfinite(lp)
    codes = np.rint(_GRID.code_of(np.where(finite, lp, -1.0))).astype(np.int64)
    return np.where(finite, np.clip(codes, 0, _GRID.max_code), NEG_INF_CODE)


def _values(codes: np.ndarray) -> np.ndarray:
    """float32 log-probs of codes (NEG_INF_CODE -> -inf)."""
    finite = codes != NEG_INF_CODE
    values = np.maximum(_GRID.value_of(np.where(finite, codes, 0)), -_F32_MAX)
    return np.where(finite, values, -np.inf).astype(np.float32)


# --- encode / decode -------------------------------------------------------------------------------


def encode_topk(ids, logprobs, tail, row_offsets, vocab_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Encode a shard's top-K targets: ids `[n, K]` (distinct per step, in any order), their log-probs `[n, K]` and
    the tail log-probs `[n]`; `row_offsets` `[rows + 1]` are the rows' first steps (checked only: no field depends on
    another step). Returns (the step fields as in `step_fields`: `[n, K]` uint8 arrays and `[n]` uint16 arrays,
    `shard_extra`, the per-shard dictionary as a 1-D uint8 array). The whole shard is encoded in one call, since the
    dictionary covers it.

    A log-prob of -inf (zero probability, e.g. a masked logit) is stored exactly; NaN, +inf, a log-prob above 0
    (beyond `LOGPROB_SLACK` of rounding), ids outside the vocabulary or repeated within a step, mismatched shapes or
    offsets, and steps whose K + 1 probabilities do not sum to 1 within `MASS_SLACK` raise `CacheError` naming the
    first bad step.
    """
    ids, lp, tail_lp = _numpy(ids, "ids"), _numpy(logprobs, "logprobs"), _numpy(tail, "tail")
    if ids.ndim != 2:
        raise CacheError(f"top-K codec: ids must be [steps, K], got shape {ids.shape}")
    n, top_k = ids.shape
    _check_sizes(top_k, vocab_size)
    if lp.shape != ids.shape or tail_lp.shape != (n,):
        raise CacheError(f"top-K codec: shapes differ: ids {ids.shape}, logprobs {lp.shape}, tail {tail_lp.shape} "
                         f"(expected [n, K], [n, K], [n])")
    if ids.dtype.kind not in "iu":
        raise CacheError(f"top-K codec: ids must be integers, got {ids.dtype}")
    _check_offsets(row_offsets, n)
    ids = ids.astype(np.int64)
    _first_bad((ids < 0) | (ids >= vocab_size), "ids", f"id outside the vocabulary 0..{vocab_size - 1}")
    lp, tail_lp = _check_logprobs(lp, "logprobs"), _check_logprobs(tail_lp, "tail")
    with np.errstate(under="ignore"):
        mass = np.exp(lp).sum(axis=1) + np.exp(tail_lp)
    _first_bad(np.abs(mass - 1.0) > MASS_SLACK, "logprobs",
               f"the top-K and tail probabilities sum to far from 1 (not log-probs of one distribution, off by > {MASS_SLACK})")

    # Dictionary: the shard's ids by frequency class, ids ascending within a class.
    counts = np.bincount(ids.reshape(-1), minlength=vocab_size)
    present = np.flatnonzero(counts)
    klass = np.log2(counts[present]).astype(np.int64)  # floor(log2(count)); exact for the integer counts here
    dictionary = present[np.lexsort((present, -klass))]
    rank_of = np.zeros(vocab_size, dtype=np.int64)
    rank_of[dictionary] = np.arange(len(dictionary))
    keys = np.sort((rank_of[ids] << 16) | _codes(lp), axis=1)  # entries by rank, each carrying its code
    ranks, codes = keys >> 16, keys & 0xFFFF
    gaps = np.diff(ranks, axis=1, prepend=-1) - 1
    _first_bad(gaps < 0, "ids", "an id appears twice in the step")
    floor = codes.max(axis=1)
    heights = floor[:, None] - codes
    nb = _id_bytes(vocab_size)
    out = {f"{PREFIX}gap_b{i}": plane for i, plane in enumerate(_planes(gaps, nb))}
    low, high = _planes(heights, 2)
    out[f"{PREFIX}height_b0"], out[f"{PREFIX}height_b1"] = low, high
    out[f"{PREFIX}floor"] = floor.astype(np.uint16)
    out[f"{PREFIX}tail"] = _codes(tail_lp).astype(np.uint16)
    mask = (1 << (8 * nb)) - 1
    deltas = np.diff(dictionary, prepend=0) & mask
    shard_extra = np.concatenate(_planes(deltas, nb)) if len(dictionary) else np.zeros(0, np.uint8)
    return out, shard_extra


def _field(arrays: dict, name: str, shape: tuple[int, ...], limit: int) -> np.ndarray:
    """Field `name` of `arrays` as int64 of `shape` (a flat [n * K] list field is reshaped), values in 0..limit."""
    if name not in arrays:
        raise CacheError(f"top-K codec: field {name} is missing")
    values = _numpy(arrays[name], name)
    if values.size != math.prod(shape) or (values.ndim > 1 and values.shape != shape):
        raise CacheError(f"top-K codec: field {name} has shape {values.shape}, expected {shape}")
    if values.dtype.kind not in "iu":
        raise CacheError(f"top-K codec: field {name} must hold integers, got {values.dtype}")
    values = values.reshape(shape).astype(np.int64)
    _first_bad((values < 0) | (values > limit), name, f"value outside 0..{limit}")
    return values


def decode_dictionary(shard_extra, vocab_size: int) -> np.ndarray:
    """The shard's dictionary (rank -> token id, int64) from `shard_extra`."""
    extra = _numpy(shard_extra, "shard_extra")
    nb = _id_bytes(vocab_size)
    if extra.ndim != 1 or extra.dtype != np.uint8 or len(extra) % nb:
        raise CacheError(f"top-K codec: shard_extra must be a 1-D uint8 array of a multiple of {nb} bytes, "
                         f"got shape {extra.shape} of {extra.dtype}")
    deltas = _unplane(list(extra.reshape(nb, -1))).astype(np.uint64)
    dictionary = (np.cumsum(deltas, dtype=np.uint64) & np.uint64((1 << (8 * nb)) - 1)).astype(np.int64)
    if (dictionary >= vocab_size).any():
        raise CacheError(f"top-K codec: shard_extra, dictionary entry {int(np.argmax(dictionary >= vocab_size))}: "
                         f"id outside the vocabulary 0..{vocab_size - 1}")
    if len(np.unique(dictionary)) != len(dictionary):
        raise CacheError("top-K codec: shard_extra: the dictionary names an id twice")
    return dictionary


def _off_grid(codes: np.ndarray) -> np.ndarray:
    """Codes no log-prob encodes to (negative, or past the largest finite code but not the -inf code)."""
    return (codes < 0) | ((codes > _GRID.max_code) & (codes != NEG_INF_CODE))


def decode_topk(arrays: dict, shard_extra, row_offsets, top_k: int, vocab_size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a whole shard: (ids int64 `[n, K]`, log-probs float32 `[n, K]`, tail float32 `[n]`), each step's entries
    in descending log-prob order, ties by ascending id. `arrays` maps the `step_fields` names to `[n, K]` (or flat)
    and `[n]` arrays as stored; raises `CacheError` naming the field and step on corrupt input."""
    _check_sizes(top_k, vocab_size)
    if f"{PREFIX}floor" not in arrays:
        raise CacheError(f"top-K codec: field {PREFIX}floor is missing")
    n = len(_numpy(arrays[f"{PREFIX}floor"], f"{PREFIX}floor"))
    _check_offsets(row_offsets, n)
    dictionary = decode_dictionary(shard_extra, vocab_size)
    nb = _id_bytes(vocab_size)
    gaps = _unplane([_field(arrays, f"{PREFIX}gap_b{i}", (n, top_k), 255) for i in range(nb)])
    heights = _unplane([_field(arrays, f"{PREFIX}height_b{i}", (n, top_k), 255) for i in range(2)])
    floor = _field(arrays, f"{PREFIX}floor", (n,), NEG_INF_CODE)
    tail_codes = _field(arrays, f"{PREFIX}tail", (n,), NEG_INF_CODE)
    ranks = np.cumsum(gaps + 1, axis=1) - 1
    _first_bad(ranks >= len(dictionary), f"{PREFIX}gap", f"rank outside the shard's dictionary of {len(dictionary)} ids")
    codes = floor[:, None] - heights
    _first_bad(_off_grid(codes) | (heights.min(axis=1, initial=NEG_INF_CODE) != 0)[:, None], f"{PREFIX}height",
               "code outside the grid, or no entry at the step's floor")
    _first_bad(_off_grid(tail_codes), f"{PREFIX}tail", "code outside the grid")
    keys = np.sort((codes << 32) | dictionary[ranks], axis=1)  # code ascending = log-prob descending, then id
    return keys & 0xFFFFFFFF, _values(keys >> 32), _values(tail_codes)


# --- error bounds ----------------------------------------------------------------------------------


def tolerance(logprobs) -> np.ndarray:
    """Largest storage error of each decoded log-prob or tail (any shape, float32 out): half a grid step on the
    deeper side of its code plus float32 rounding; 0 for -inf (stored exactly). `|decoded - exact| <= tolerance(decoded)`.
    """
    values = _numpy(logprobs, "logprobs").astype(np.float64)
    finite = np.isfinite(values)
    codes = np.rint(_GRID.code_of(np.where(finite, np.minimum(values, 0.0), -1.0)))
    centre = _GRID.value_of(codes)
    step = centre - _GRID.value_of(codes + 0.5)
    bound = (step + np.abs(values) * 2.0**-23 + np.abs(values - centre)) * (1 + 2.0**-20) + 1e-12  # the margin
    return np.where(finite, bound, 0.0).astype(np.float32)  # keeps the float32 rounding of the bound from cutting it


def kl_bound(logprobs, tail) -> np.ndarray:
    """Upper bound, per step, of KL(p_exact || p_decoded renormalised) over the K + 1 categories, from the decoded
    values alone: with |delta_c| <= t_c, KL = E_p[delta] + log E_p[e^-delta] <= 0.5 * sum_c p_c t_c^2 e^{t_c}, and
    p_c <= p_decoded_c e^{t_c}."""
    values = np.concatenate([_numpy(logprobs, "logprobs").astype(np.float64), _numpy(tail, "tail").astype(np.float64)[:, None]], axis=1)
    t = tolerance(values).astype(np.float64)
    with np.errstate(under="ignore"):
        return 0.5 * (np.exp(values + 2 * t) * t * t).sum(axis=1)
