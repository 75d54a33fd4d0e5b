"""Plain-PyTorch distillation loss over the teacher's top-K columns plus a tail: the CPU path and the kernel's oracle.

Same math, same edge-case semantics and the same float32 arithmetic as the
Triton kernels in `kd_loss.py`; gradients come from autograd. See
`kd_loss_reference` for the formulas.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_kd_loss_inputs

_NEG_INF = float("-inf")


def _log_softmax(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """`log_softmax(x / T)` over the last dim, shifted by the (constant) row maximum first.

    The shift keeps `x / T` finite for float32-max-sized logits and T < 1.
    """
    m = x.detach().amax(dim=-1, keepdim=True)
    m = torch.where(m == _NEG_INF, 0.0, m)
    return torch.log_softmax((x - m) * (1.0 / temperature), dim=-1)


def _kl_terms(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """`sum_c a_c (log a_c - log b_c)` over the last dim with `0 log 0 := 0`.

    Where `a_c == 0` both logs are replaced by 0 before the product, so a
    `-inf` there reaches neither the value nor (through `0 * inf`) the gradient.
    """
    nz = a != 0  # NaN compares unequal to 0: NaN propagates
    return torch.where(nz, a * (torch.where(nz, log_a, 0.0) - torch.where(nz, log_b, 0.0)), 0.0).sum(dim=-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """`log(beta * p + (1 - beta) * q)`, stably.

    Categories where both p and q are 0 weigh nothing in the loss; they get
    the finite placeholder `log 2`, because the gradient of `logaddexp` at
    (-inf, -inf) is NaN even when multiplied by 0.
    """
    both_zero = (log_p == _NEG_INF) & (log_q == _NEG_INF)
    u = torch.where(both_zero, 0.0, log_p + math.log(beta))
    v = torch.where(both_zero, 0.0, log_q + math.log1p(-beta))
    return torch.logaddexp(u, v)


def kd_loss_reference(
    student_logits: torch.Tensor,
    student_tail: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    *,
    loss: str = "forward",
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-row distillation loss on the teacher's top-K columns and one tail category, in plain PyTorch.

    Each row `i` (a response position) is a distribution over K + 1
    categories: the teacher's top-K token ids and the rest of the vocabulary.
    The student's logits on them are `[student_logits_i, student_tail_i]`
    (the tail being the student's logsumexp over the other ids), the
    teacher's `[teacher_logprobs_i, teacher_tail_i]`. With temperature T:

        p = softmax(teacher / T)                         # no gradient
        q = softmax(student / T)
        forward: loss_i = T^2 * KL(p || q)
        reverse: loss_i = T^2 * KL(q || p)
        jsd:     loss_i = T^2 * (beta KL(p || m) + (1 - beta) KL(q || m)),  m = beta p + (1 - beta) q

    with `0 log 0 := 0` and `loss_i = 0` where `mask_i` is false. Why: this
    distils a teacher from a cache that stores only its top-K log-probs and
    its remaining mass; the tail category keeps the student's mass outside
    the top K in the objective. The Triton kernel (`kd_loss.py`) computes the
    same thing without float32 `[N, K]` intermediates and is tested against
    this function.

    Shapes `[..., K]` and `[...]`; the student in float32, float16 or
    bfloat16, the teacher float32; arithmetic is float32 and the result is
    float32 with the leading shape. Differentiable with respect to
    `student_logits` and `student_tail`; the teacher is a constant.

    Edge cases (shared with the kernel): masked rows give loss 0 and gradient
    exactly 0 whatever they hold (NaN/inf included); logits are shifted by the
    row maximum, so spreads of float32-sized logits give no NaN; NaN or +inf
    in an unmasked row propagates NaN. The teacher must be finite on unmasked
    rows (checked on CPU).
    """
    check_kd_loss_inputs(student_logits, student_tail, teacher_logprobs, teacher_tail, mask, temperature, loss, beta)
    return kd_loss_reference_unchecked(
        student_logits, student_tail, teacher_logprobs, teacher_tail, mask, temperature, loss=loss, beta=beta
    )


def kd_loss_reference_unchecked(
    student_logits: torch.Tensor,
    student_tail: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    *,
    loss: str = "forward",
    beta: float = 0.5,
) -> torch.Tensor:
    """`kd_loss_reference` without input validation.

    Why: the CPU check on the teacher reads data, which `torch.compile` would
    turn into a graph break; benchmarks compile this function after
    validating once. Callers must pass inputs `check_kd_loss_inputs` accepts.
    """
    T = float(temperature)
    K = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    active = mask.reshape(-1) != 0
    student = torch.cat([student_logits.reshape(-1, K).float(), student_tail.reshape(-1, 1).float()], dim=1)
    teacher = torch.cat([teacher_logprobs.detach().reshape(-1, K), teacher_tail.detach().reshape(-1, 1)], dim=1)
    # Masked rows are replaced by zeros *before* any arithmetic, so NaN/inf
    # there can reach neither the loss nor (through 0 * NaN) the gradient.
    log_q = _log_softmax(torch.where(active[:, None], student, 0.0), T)
    log_p = _log_softmax(torch.where(active[:, None], teacher.float(), 0.0), T)
    p, q = log_p.exp(), log_q.exp()
    if loss == "forward":
        row = _kl_terms(p, log_p, log_q)
    elif loss == "reverse":
        row = _kl_terms(q, log_q, log_p)
    else:
        log_m = _log_mixture(log_p, log_q, beta)
        row = beta * _kl_terms(p, log_p, log_m) + (1.0 - beta) * _kl_terms(q, log_q, log_m)
    return torch.where(active, row * (T * T), 0.0).reshape(lead)
