"""How much a cache layout changes the PACT objective: the KL computed with
cached reference values against the KL computed with exact ones.

The student is the reference itself (its full-context logits on all of S),
so the measured KL is the objective's value at the start of fine-tuning.
Used by the tests and the benchmark to hold compact layouts to their bounds.
"""

from __future__ import annotations

import torch

from pact.data.batch import collate_rows
from pact.objective.kl import pact_kl
from pact.objective.reference import ReferenceTargets
from pact.objective.settings import ObjectiveArguments
from pact.objective.targets import check_columns


def objective_error(rows: list[dict], exact: list[ReferenceTargets], safety_ids: torch.Tensor, weights: torch.Tensor,
                    cfg: ObjectiveArguments = ObjectiveArguments()) -> dict:
    """Compare the per-token KL_t from cache `rows` with the KL_t from `exact` reference values (same examples, same order).

    Returns the exact mean KL, the relative error of the mean KL
    (|mean_cached - mean_exact| / mean_exact) and the mean per-token relative
    error (mean |KL_cached - KL_exact| / mean_exact).
    """
    full = torch.cat([r.full_logits for r in exact]).float().cpu()
    cached = collate_rows(rows, pad_id=0)
    check_columns(cached, safety_ids)
    steps = cached.steps
    mask = torch.ones(len(steps), dtype=torch.bool)
    reference_kl = pact_kl(full, full, torch.cat([r.post_logits for r in exact]).float().cpu(),
                           torch.cat([r.post_count for r in exact]).cpu(), steps, mask, weights, cfg)
    cached_kl = pact_kl(full, cached.full_logits, cached.post_logits, cached.post_count, steps, mask, weights, cfg, cached.columns)
    mean = float(reference_kl.mean())
    return {
        "mean_kl": mean,
        "mean_kl_relative_error": abs(float(cached_kl.mean()) - mean) / mean,
        "token_relative_error": float((cached_kl - reference_kl).abs().mean()) / mean,
    }
