"""The one batch contract between the reference side (cache rows, or a live
reference model) and the PACT objective: `CacheBatch`.

A batch is collated once, with tensor operations only: the padded token ids,
the response spans, and for every one of the N response tokens its batch row,
the position that predicts it, its id and its step t within its turn (t
restarts at 0 at each span: the gate's step is the step within the turn).
The reference side fills the target fields: logits on the stored columns
(full and post-only context), the gate's post-only count, and the columns'
positions in S, which the reader precomputes per layout (no per-batch id
search). This module depends on torch and the encoded-example type only, never on
models or trainers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from pact.data.chat import EncodedExample


@dataclass
class CacheBatch:
    """A collated batch of B sequences with M response spans and N response tokens.

    input_ids/attention_mask [B, L] (right-padded); lengths, example_ids [B];
    span_rows, span_starts, span_ends [M] (token ranges, end exclusive);
    rows, positions, labels, steps [N]: batch row, predicting position (token
    index - 1), token id and step within the turn of each response token.
    Targets (None until filled): full_logits/post_logits [N, k] float32 on the
    target columns; post_count [N]; columns: positions in S of the target
    columns ([k], or [N, k] for top-k caches; None = all of S in order);
    stored_ids: the vocabulary ids of those columns (same shape as columns);
    target_logprob [N] (reference log-prob of the response token, if known);
    reference_logits [N, |S|] (the full-context reference logits on all of S,
    in S's order) and rest_logprob [N] (the log of the reference's
    probability outside S), where known: what the reference KL needs;
    kd_ids [N, K] (int64), kd_logprobs [N, K] and kd_tail [N] (float32): a
    teacher's top-K ids, their log-probs and the log of its remaining mass,
    where known: what distillation needs.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor
    example_ids: torch.Tensor
    span_rows: torch.Tensor
    span_starts: torch.Tensor
    span_ends: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    steps: torch.Tensor
    full_logits: torch.Tensor | None = None
    post_logits: torch.Tensor | None = None
    post_count: torch.Tensor | None = None
    columns: torch.Tensor | None = None
    stored_ids: torch.Tensor | None = None
    target_logprob: torch.Tensor | None = None
    reference_logits: torch.Tensor | None = None
    rest_logprob: torch.Tensor | None = None
    kd_ids: torch.Tensor | None = None
    kd_logprobs: torch.Tensor | None = None
    kd_tail: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        """N, the number of response tokens (the positions the loss averages over)."""
        return int(self.labels.shape[0])

    @property
    def span_lengths(self) -> torch.Tensor:
        """Tokens per span [M]."""
        return self.span_ends - self.span_starts

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The fields that hold a tensor, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "CacheBatch":
        """Every tensor moved to `device` (with `non_blocking`, asynchronously where the batch is in pinned memory)."""
        return dataclasses.replace(self, **{name: t.to(device, non_blocking=non_blocking) for name, t in self._tensors().items()})

    def pin_memory(self) -> "CacheBatch":
        """This batch in page-locked memory, so `to(device, non_blocking=True)` copies without blocking the host; a
        `DataLoader` with `pin_memory=True` calls it on each batch in its pinning thread."""
        return dataclasses.replace(self, **{name: t.pin_memory() for name, t in self._tensors().items()})

    def with_targets(self, full_logits: torch.Tensor, post_logits: torch.Tensor, post_count: torch.Tensor,
                     columns: torch.Tensor | None = None, stored_ids: torch.Tensor | None = None,
                     target_logprob: torch.Tensor | None = None, reference_logits: torch.Tensor | None = None,
                     rest_logprob: torch.Tensor | None = None) -> "CacheBatch":
        """This batch with its reference targets (one row per response token, in the batch's order)."""
        if not full_logits.shape[0] == post_logits.shape[0] == post_count.shape[0] == self.tokens:
            raise ValueError(f"targets for {full_logits.shape[0]} response tokens given to a batch of {self.tokens}")
        return dataclasses.replace(self, full_logits=full_logits, post_logits=post_logits, post_count=post_count,
                                   columns=columns, stored_ids=stored_ids, target_logprob=target_logprob,
                                   reference_logits=reference_logits, rest_logprob=rest_logprob)

    def with_distillation(self, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor) -> "CacheBatch":
        """This batch with a teacher's top-K targets (one row per response token, in the batch's order)."""
        if not ids.shape[0] == logprobs.shape[0] == tail.shape[0] == self.tokens or ids.shape != logprobs.shape:
            raise ValueError(f"teacher targets of shapes {tuple(ids.shape)}, {tuple(logprobs.shape)}, {tuple(tail.shape)} "
                             f"given to a batch of {self.tokens} response tokens")
        return dataclasses.replace(self, kd_ids=ids, kd_logprobs=logprobs, kd_tail=tail)


def collate_spans(sequences: list[torch.Tensor], spans: list[torch.Tensor], example_ids: list[int], pad_id: int) -> CacheBatch:
    """The token side of a batch: `sequences` (int64 [L_i]) right-padded with `pad_id`, `spans` (int64 [m_i, 2]) flattened.

    Every per-token index is computed with tensor operations over the whole
    batch (no loop over tokens).
    """
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    input_ids = pad_sequence([torch.as_tensor(s, dtype=torch.long) for s in sequences], batch_first=True, padding_value=pad_id)
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    table = torch.cat([torch.as_tensor(s, dtype=torch.long).reshape(-1, 2) for s in spans])
    span_rows = torch.repeat_interleave(torch.arange(len(spans)), torch.tensor([len(s) for s in spans]))
    starts, ends = table[:, 0], table[:, 1]
    span_lengths = ends - starts
    token_span = torch.repeat_interleave(torch.arange(len(starts)), span_lengths)
    first_token = torch.cumsum(span_lengths, 0) - span_lengths
    steps = torch.arange(len(token_span)) - first_token[token_span]
    rows = span_rows[token_span]
    positions = starts[token_span] + steps - 1
    return CacheBatch(
        input_ids=input_ids, attention_mask=attention_mask, lengths=lengths,
        example_ids=torch.tensor(example_ids, dtype=torch.long), span_rows=span_rows, span_starts=starts, span_ends=ends,
        rows=rows, positions=positions, labels=input_ids[rows, positions + 1], steps=steps,
    )


def _stacked(parts: list[torch.Tensor], steps: list[int]) -> torch.Tensor:
    """Per-row column tensors as one: the shared [k] when every row has the same one, else [N, k]."""
    if all(p.dim() == 1 for p in parts) and all(p is parts[0] or torch.equal(p, parts[0]) for p in parts):
        return parts[0]
    return torch.cat([p.expand(n, -1) if p.dim() == 1 else p for p, n in zip(parts, steps)])


def collate_rows(rows: list[dict], pad_id: int) -> CacheBatch:
    """A batch of cache rows (`CacheReader` items) with its cached targets (a distillation-only cache's rows: the
    teacher's top-K and log-probs of the tokens, no safety targets).

    The column positions come from the rows (`columns`, made from the layout
    by the reader); nothing is searched here.
    """
    batch = collate_spans([r["input_ids"] for r in rows], [r["response_spans"] for r in rows],
                          [int(r["example_id"]) for r in rows], pad_id)
    steps = [len(r["target_logprob"]) for r in rows]
    if all("kd_ids" in r for r in rows):
        batch = batch.with_distillation(torch.cat([r["kd_ids"] for r in rows]), torch.cat([r["kd_logprobs"] for r in rows]),
                                        torch.cat([r["kd_tail"] for r in rows]))
    if not all("full_logits" in r for r in rows):  # a distillation-only cache's rows: a teacher's top-K, no safety targets
        return dataclasses.replace(batch, target_logprob=torch.cat([r["target_logprob"] for r in rows]).float())
    return batch.with_targets(
        full_logits=torch.cat([r["full_logits"] for r in rows]).float(),
        post_logits=torch.cat([r["post_logits"] for r in rows]).float(),
        post_count=torch.cat([r["post_count"] for r in rows]).long(),
        columns=_stacked([r["columns"] for r in rows], steps),
        stored_ids=_stacked([r["safety_ids"] for r in rows], steps),
        target_logprob=torch.cat([r["target_logprob"] for r in rows]).float(),
        reference_logits=torch.cat([r["reference_logits"] for r in rows]) if all("reference_logits" in r for r in rows) else None,
        rest_logprob=torch.cat([r["rest_logprob"] for r in rows]) if all("rest_logprob" in r for r in rows) else None,
    )


def collate_examples(examples: list[EncodedExample], pad_id: int) -> CacheBatch:
    """The token side of a batch of encoded examples (`CacheBatch` without targets)."""
    return collate_spans([torch.tensor(ex.input_ids, dtype=torch.long) for ex in examples],
                         [torch.tensor(ex.spans, dtype=torch.long).reshape(-1, 2) for ex in examples],
                         [ex.example_id for ex in examples], pad_id)
