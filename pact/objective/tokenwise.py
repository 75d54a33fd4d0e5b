"""The token-wise constrained objective of Qi et al. 2024 (arXiv 2406.05946, Eqn 3; docs/objective.md section 4):
per response token, a soft constraint on the student's log-prob of the target token against the reference's,
strongest at the first tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def schedule_at(steps: torch.Tensor, values: tuple[float, ...]) -> torch.Tensor:
    """A per-position schedule's value at each response token: `values[t]` for step t (t = 0 is response position 1),
    the last one past the end (beta_t of the token-wise loss, a_t of the KL).

    Built on the device from the numbers themselves (a schedule tensor made on
    the host would be a pageable copy to the GPU at every step).
    """
    result = torch.full(steps.shape, values[-1], dtype=torch.float32, device=steps.device)
    for step, value in enumerate(values[:-1]):
        result = torch.where(steps == step, value, result)
    return result


def tokenwise_terms(student_logprob: torch.Tensor, reference_logprob: torch.Tensor, steps: torch.Tensor,
                    betas: tuple[float, ...]) -> torch.Tensor:
    """Per response token, Qi et al.'s Eqn 3 term -(2 / beta_t) * log sigmoid(beta_t * (log pi_theta - log pi_ref)) [N].

    Written as (2 / beta_t) * softplus(-beta_t * ratio), which is the same
    number without overflow; its gradient is -2 * sigmoid(-beta_t * ratio) times
    that of log pi_theta, the weight the paper's appendix and code use.
    """
    beta = schedule_at(steps, betas)
    ratio = student_logprob.float() - reference_logprob.float().to(student_logprob.device)
    return 2.0 / beta * F.softplus(-beta * ratio)
