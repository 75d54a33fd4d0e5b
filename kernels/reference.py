"""Plain-PyTorch masked KL on the safety-token columns: the CPU path and the kernel's oracle.

Same math, same edge-case semantics and the same float32 arithmetic as the
Triton kernel in `masked_kl.py`; gradients come from autograd. See
`masked_kl_reference` for the formula and the edge cases.
"""

from __future__ import annotations

import torch

from ._checks import check_masked_kl_inputs

_NEG_INF = float("-inf")


def target_log_probs(
    target_logits: torch.Tensor, weights: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Return `log q` for `q = normalize(softmax(target_logits / T) * weights)`, float32, `[N, S]`.

    Computed stably as `log q_s = r_s/T + log w_s - logsumexp_{t: w_t>0}(r_t/T + log w_t)`,
    shifting by the maximum over the positive-weight columns only, so a huge
    logit on a zero-weight column cannot underflow the columns that matter.
    Rows with no target mass on any positive-weight column (all `-inf` there)
    get `-inf` everywhere (q = 0); the caller treats them as inactive.
    No gradient (the target is a constant of the objective).
    """
    r = target_logits.detach().float()
    w = weights.detach().float()
    pos = w > 0
    # Scaling w does not change q; dividing by max(w) keeps the sums in range.
    logw = torch.where(pos, torch.log(w / w.amax().clamp_min(torch.finfo(torch.float32).tiny)), _NEG_INF)
    rr = torch.where(pos, r, _NEG_INF)
    m_r = rr.amax(dim=-1, keepdim=True)
    m_r = torch.where(m_r == _NEG_INF, 0.0, m_r)
    tb = (rr - m_r) * (1.0 / temperature) + logw
    s_r = tb.exp().sum(dim=-1, keepdim=True)
    has_mass = s_r != 0
    return torch.where(has_mass, tb - torch.where(has_mass, s_r, 1.0).log(), _NEG_INF)


def masked_kl_reference(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 2.0,
    *,
    student_rest: torch.Tensor | None = None,
    target_rest: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position PACT KL on the safety tokens, in plain PyTorch (the CPU path).

    For each position `i` (a row of the `[..., S]` logits restricted to the
    safety-token columns `S`):

        q_i    = normalize(softmax(target_i / T) * weights)          # no gradient
        loss_i = T^2 * sum_s q_is * (log q_is - log_softmax(student_i / T)_s)

    with `0 * log 0 := 0`, so zero-weight columns enter only through the
    student's normaliser, and `loss_i = 0` where `mask_i` is false.
    Why: this is the KL term of the PACT objective (docs/objective.md section 2); the
    Triton kernel computes the same thing without materialising float32 `[N, S]`
    intermediates, and is tested against this function.

    Arithmetic is float32 whatever the input dtype (float32/float16/bfloat16);
    the result is float32 with the logits' leading shape. Differentiable with
    respect to `student_logits` (gradient `T * (softmax(student/T) - q)` times
    the upstream gradient); `target_logits` and `weights` are treated as
    constants.

    Edge cases (shared with the kernel):
      * masked rows: loss 0 and gradient exactly 0, whatever they contain
        (NaN/inf included);
      * rows whose target has no mass on any positive-weight column (all
        `-inf` there): loss 0, gradient 0;
      * `-inf` target logits: zero target probability, fine;
      * very large finite logits (up to float32 max): handled by max-shifting,
        no NaN; a difference `student_s - max(student)` beyond the float32
        range saturates to `-inf` (see next item);
      * a student logit of `-inf` on a column with `q > 0`: the KL is
        genuinely infinite, the loss is `+inf`; the gradient stays finite,
        `T * (softmax(student/T) - q)` with softmax 0 on that column (for a
        student row that is `-inf` everywhere softmax is taken as 0, so the
        gradient is `-T * q`);
      * `+inf` or NaN in the logits of an active row propagate NaN.

    With `student_rest` and `target_rest` (`[...]`, both or neither), each row
    gains one more category, the rest of the vocabulary, whose logits they are
    and whose weight is 1: the same formula over S+1 columns (the rest logit
    gets a gradient too).
    """
    check_masked_kl_inputs(student_logits, target_logits, weights, mask, temperature, student_rest, target_rest)
    if student_rest is not None:
        student_logits = torch.cat([student_logits, student_rest[..., None].to(student_logits.dtype)], dim=-1)
        target_logits = torch.cat([target_logits, target_rest[..., None].to(target_logits.dtype)], dim=-1)
        weights = torch.cat([weights, weights.new_ones(1)])
    return masked_kl_reference_unchecked(student_logits, target_logits, weights, mask, temperature)


def masked_kl_reference_unchecked(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 2.0,
) -> torch.Tensor:
    """`masked_kl_reference` without input validation.

    Why: the CPU value check on `weights` reads data, which `torch.compile`
    would turn into a graph break; benchmarks compile this function after
    validating once. Callers must pass inputs `check_masked_kl_inputs` accepts.
    """
    T = float(temperature)
    S = student_logits.shape[-1]
    lead = student_logits.shape[:-1]

    logq = target_log_probs(target_logits.reshape(-1, S), weights, T)
    q = logq.exp()
    has_mass = logq.amax(dim=-1) != _NEG_INF  # NaN rows count as active: NaN propagates
    active = (mask.reshape(-1) != 0) & has_mass

    # Inactive rows are replaced by zeros *before* any arithmetic, so NaN/inf
    # there can reach neither the loss nor (through 0 * NaN) the gradient.
    z = torch.where(active[:, None], student_logits.reshape(-1, S).float(), 0.0)
    with torch.no_grad():
        m_z = z.amax(dim=-1, keepdim=True)
        m_z = torch.where(m_z == _NEG_INF, 0.0, m_z)
    zb = (z - m_z) * (1.0 / T)
    s_z = zb.exp().sum(dim=-1, keepdim=True)
    # A student row that is -inf everywhere has s_z = 0: use log(1) so the
    # gradient path through the normaliser is 0 instead of 0 * inf = NaN.
    logp = zb - torch.where(s_z != 0, s_z, 1.0).log()

    term = torch.where(q != 0, q * (logq - logp), 0.0)  # 0*log0 := 0; NaN propagates
    kl = term.sum(dim=-1) * (T * T)
    kl = torch.where(active, kl, 0.0)
    return kl.reshape(lead)
