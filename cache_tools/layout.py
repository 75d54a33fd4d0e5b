"""What a cache stores per response step: which safety-token columns, how
many, and the size the objective's raw float32 values would take.

The objective's target q_t = normalize(softmax(r_t / T) * w) puts mass only on
safety tokens with weight > 0 (S+), and the softmax normaliser cancels, so the
reference logits on S+ are all it needs from them (exact). With `top_k` only
the K columns of S+ with the largest w * exp(full_logit / T) are kept per step
(an approximation: the target is renormalised over the kept columns).

Format version 3 also stores, without `top_k`, what the reference-KL
objectives need: the full-context logits on the other safety tokens (weight
zero, `other_logits`), so all of S is stored, and the log of the reference's
probability outside S (`rest_logprob`). Version 4 stores, in the int8 layout,
those other logits as 8-bit log-probabilities against the step's logsumexp
(`codec.encode_logprob`): they only enter the reference KL, at temperature 1,
where a log-probability below -20 is worth nothing, and the bytes they cost
fall by about a third.

A distillation-only layout (`pact-cache build --kd_top_k K --safety_targets false`) has no safety tokens (|S| = 0): its
steps hold the teacher's top-K and the two scalars of the full-context pass only, and no post-only pass is run.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from pact.cache_tools.codec import check_dtype

# Version 4 stores the int8 layout's other logits as log-probabilities; version 3 adds the reference's logits on all of S and its log-probability outside S; version 2 stores each row's
# response spans (multi-turn); versions 1 (one response to the end) and 2 are still read.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)


def positive_positions(weights: list[float]) -> tuple[int, ...]:
    """The positions in S of the tokens with weight > 0 (S+, the stored columns), in S's order."""
    return tuple(i for i, w in enumerate(weights) if w > 0)


def other_positions(weights: list[float]) -> tuple[int, ...]:
    """The positions in S of the tokens with weight 0 (S \\ S+, the `other_logits` columns), in S's order."""
    return tuple(i for i, w in enumerate(weights) if not w > 0)


@dataclass(frozen=True)
class Layout:
    """The shape and types of a cache's per-step columns.

    dtype: storage of the logits (see `codec`); stored_ids: S+ (ascending
    vocabulary ids, the columns stored); num_safety: |S|; vocab_size: the
    model's vocabulary; top_k: K columns of S+ kept per step, or None for all;
    stored_positions: the positions of S+ within S (what the objective's
    columns index, precomputed once per layout); format_version: of the shards;
    other_positions: the positions within S of the zero-weight tokens;
    kd_top_k: K of a distillation cache (the teacher's top-K ids, log-probs and
    tail per step, `topk_codec`), or None.
    """

    dtype: str
    stored_ids: tuple[int, ...]
    num_safety: int
    vocab_size: int
    top_k: int | None = None
    stored_positions: tuple[int, ...] = ()
    format_version: int = FORMAT_VERSION
    other_positions: tuple[int, ...] = ()
    kd_top_k: int | None = None

    @classmethod
    def create(cls, dtype: str, ids: list[int], weights: list[float], vocab_size: int, top_k: int | None,
               kd_top_k: int | None = None) -> "Layout":
        """The layout for safety tokens `ids`/`weights` (none: a distillation-only layout, which needs `kd_top_k`); a
        `top_k` >= |S+| means all of S+ (exact); `kd_top_k` K adds a teacher's top-K per step."""
        stored = tuple(int(i) for i, w in zip(ids, weights) if w > 0)
        return cls(dtype, stored, len(ids), int(vocab_size), top_k if top_k is not None and top_k < len(stored) else None,
                   positive_positions(weights), other_positions=other_positions(weights), kd_top_k=kd_top_k)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Layout":
        """The layout a manifest describes (of the manifest's format version)."""
        weights = (manifest["safety_tokens"] or {"weights": []})["weights"]
        return cls(manifest["dtype"], tuple(manifest["stored_ids"]), len(weights), manifest["vocab_size"], manifest["top_k"],
                   positive_positions(weights), manifest["format_version"], other_positions(weights), manifest.get("kd_top_k"))

    def __post_init__(self):
        check_dtype(self.dtype)
        if not self.stores_safety and self.kd_top_k is None:
            raise ValueError("a layout without safety tokens stores nothing: give it kd_top_k")

    @property
    def stores_safety(self) -> bool:
        """Whether the shards hold the PACT targets (the reference's logits on the safety tokens in both contexts and
        the gate's post-only count); a distillation-only layout does not."""
        return self.num_safety > 0

    @property
    def stores_reference(self) -> bool:
        """Whether the shards hold the reference's logits on all of S and its log-probability outside S (format 3
        without top-k): what the reference-KL objectives need."""
        return self.stores_safety and self.format_version >= 3 and self.top_k is None

    @property
    def other_as_logprob(self) -> bool:
        """Whether `other_logits` is stored as 8-bit log-probabilities against the step's logsumexp, with no side parts
        (format 4, int8 layout), rather than in the layout's logit dtype."""
        return self.stores_reference and self.format_version >= 4 and self.dtype == "int8"

    @property
    def width(self) -> int:
        """Logit columns stored per step (K or |S+|)."""
        return self.top_k or len(self.stored_ids)

    @property
    def token_type(self) -> pa.DataType:
        """Arrow type of token ids: uint16 when the vocabulary fits, else int32."""
        return pa.uint16() if self.vocab_size <= 1 << 16 else pa.int32()

    @property
    def count_type(self) -> pa.DataType:
        """Arrow type of post_count (1..|S|)."""
        return pa.uint8() if self.num_safety <= 255 else pa.uint16()

    @property
    def index_type(self) -> pa.DataType:
        """Arrow type of the top-k column indices into S+."""
        return pa.uint8() if len(self.stored_ids) <= 256 else pa.uint16()

    @property
    def raw_float32_bytes_per_token(self) -> int:
        """Bytes per response token of the plain float32 values: logits on all of S in both contexts, two scalars, and a
        distillation layout's K int32 ids, K log-probs and tail."""
        return 4 * (2 * self.num_safety + 2 + (2 * self.kd_top_k + 1 if self.kd_top_k else 0))


def select_columns(
    full_logits: torch.Tensor,
    post_logits: torch.Tensor,
    weights: list[float],
    layout: Layout,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reduce reference logits on all of S ([n, |S|]) to the stored columns ([n, width]).

    Returns (full, post, index): index is None (columns = S+) or, with top_k,
    the ascending positions in S+ of each step's kept columns [n, K], chosen by
    the largest w * exp(full / T).
    """
    plus = torch.tensor([i for i, w in enumerate(weights) if w > 0], device=full_logits.device)
    full, post = full_logits[:, plus], post_logits[:, plus]
    if layout.top_k is None:
        return full, post, None
    log_w = torch.tensor([w for w in weights if w > 0], device=full.device, dtype=torch.float32).log()
    index = (full.float() / temperature + log_w).topk(layout.top_k, dim=1).indices.sort(dim=1).values
    return full.gather(1, index), post.gather(1, index), index
