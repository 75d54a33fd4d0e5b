"""Fused distillation loss on a teacher's top-K columns plus a tail: Triton kernels and autograd glue.

Math (per row i, over K + 1 categories c: the teacher's top-K token ids and
the tail, the rest of the vocabulary; temperature T):

    x_i = [student_logits_i, student_tail_i]      t_i = [teacher_logprobs_i, teacher_tail_i]
    q_i = softmax(x_i / T)                         p_i = softmax(t_i / T)      # teacher: no gradient
    forward: loss_i = T^2 * sum_c p_c (log p_c - log q_c)
             dloss_i / dx_ij = T (q_j - p_j)
    reverse: loss_i = T^2 * sum_c q_c (log q_c - log p_c)
             dloss_i / dx_ij = T q_j (a_j - A),  a = log q - log p,  A = sum_c q_c a_c = KL(q || p)
    jsd:     m = beta p + (1 - beta) q
             loss_i = T^2 * (beta KL(p || m) + (1 - beta) KL(q || m))
             dloss_i / dx_ij = T (1 - beta) q_j (g_j - G),  g = log q - log m,  G = sum_c q_c g_c = KL(q || m)
    loss_i = 0 and gradient 0 where mask_i is false; 0 log 0 := 0.

(The jsd gradient: d/dq_c of the bracket is (1 - beta) g_c, the p- and
q-terms of dm/dq cancelling; the softmax Jacobian then gives the form above.
tests/test_kernel_kd_loss.py checks all three against float64 autograd.)

Design (Liger-Kernel style, the same as `masked_kl.py`):

* Forward: one program per block of ``BLOCK_N`` rows. The tail is a per-row
  scalar that starts the running max and sum; the K columns are one tile
  when ``K <= BLOCK_K`` (loaded once), otherwise the kernel loops over them
  in ``BLOCK_K`` chunks twice (pass 1: online max / sum-exp of student and
  teacher, pass 2: the divergence terms), so any K works. Everything is
  float32 in registers whatever the input dtype. Masked rows are never read.
* It writes the per-row loss and five float32 statistics per row: student
  max and log-sum-exp, teacher max and log-sum-exp, and the row scalar the
  backward needs (A for reverse, G for jsd; KL(p || q) for forward, unused).
  The backward recomputes q, p (and m) from the saved inputs and those
  statistics in one streaming pass: nothing of size ``[N, K]`` in float32 is
  saved besides the teacher input itself.
* The gradients go into fresh buffers in the student tensors' dtypes; inputs
  are never modified. Arbitrary strides are supported (no copies). The CUDA
  path performs no host synchronisation.

`kd_loss` dispatches to Triton for CUDA tensors and to the PyTorch reference
(`kd_reference.kd_loss_reference`) on CPU. `kd_loss_triton` always runs the
kernel (on CPU tensors only under ``TRITON_INTERPRET=1``, which must be set
before Triton is first imported).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.autograd.function import once_differentiable

from ._checks import KD_LOSSES, check_kd_loss_inputs
from .kd_reference import kd_loss_reference
from .masked_kl import HAS_TRITON, _launch_config, _mask_u8, _require_triton_for

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["KDLossFunction", "kd_loss", "kd_loss_triton"]

#: The kernels' LOSS constexpr: 0 forward, 1 reverse, 2 jsd (the order of `KD_LOSSES`).
_LOSS_CODE = {name: code for code, name in enumerate(KD_LOSSES)}

#: Rows of the saved statistics: student max, student log-sum-exp, teacher max, teacher log-sum-exp, the row scalar.
_N_STATS = 5


if HAS_TRITON:

    @triton.jit
    def _load_tile(x_rows, t_rows, cols, K, live, stride_xk, stride_tk):
        """Student and teacher logits of `live` rows at columns `cols` as float32; -inf elsewhere."""
        NEG_INF: tl.constexpr = float("-inf")
        ld = live[:, None] & (cols < K)[None, :]
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=ld, other=NEG_INF).to(tl.float32)
        t = tl.load(t_rows + cols[None, :] * stride_tk, mask=ld, other=NEG_INF).to(tl.float32)
        return x, t

    @triton.jit
    def _safe_shift(m):
        """m, or 0 where m is -inf: a shift for exp((v - m) / T) that never forms -inf - -inf."""
        NEG_INF: tl.constexpr = float("-inf")
        return tl.where(m == NEG_INF, 0.0, m)

    @triton.jit
    def _fold_tile(m, s, v, inv_t):
        """Fold a [BLOCK_N, BLOCK_K] tile v into the running row max m and sum s of exp((v - m) / T)."""
        new_m = tl.maximum(m, tl.max(v, axis=1))
        shift = _safe_shift(new_m)
        s = s * tl.exp((m - shift) * inv_t) + tl.sum(tl.exp((v - shift[:, None]) * inv_t), axis=1)
        return new_m, s

    @triton.jit
    def _log_probs(x, t, m_x, lse_x, m_t, lse_t, inv_t):
        """(log q, log p) of categories with student logits x and teacher logits t, from the row statistics."""
        return (x - m_x) * inv_t - lse_x, (t - m_t) * inv_t - lse_t

    @triton.jit
    def _log_mixture(log_p, log_q, log_beta, log_1m_beta):
        """log(beta p + (1 - beta) q), shifted by the larger term; -inf where both are 0."""
        u = log_p + log_beta
        v = log_q + log_1m_beta
        shift = _safe_shift(tl.maximum(u, v))
        return shift + tl.log(tl.exp(u - shift) + tl.exp(v - shift))

    @triton.jit
    def _xlogratio(log_a, log_b):
        """a (log a - log b) with 0 log 0 := 0 (NaN propagates: it compares unequal to 0)."""
        a = tl.exp(log_a)
        return tl.where(a != 0.0, a * (log_a - log_b), 0.0)

    @triton.jit
    def _kd_terms(log_q, log_p, beta, log_beta, log_1m_beta, LOSS: tl.constexpr):
        """Per-category (loss term, row-scalar term) without the T^2: summed over a row they give loss / T^2 and the
        statistic the backward needs."""
        if LOSS == 0:  # forward
            term = _xlogratio(log_p, log_q)
            aux = term
        elif LOSS == 1:  # reverse
            term = _xlogratio(log_q, log_p)
            aux = term
        else:  # jsd
            log_m = _log_mixture(log_p, log_q, log_beta, log_1m_beta)
            aux = _xlogratio(log_q, log_m)
            term = beta * _xlogratio(log_p, log_m) + (1.0 - beta) * aux
        return term, aux

    @triton.jit
    def _kd_grad(log_q, log_p, aux, beta, log_beta, log_1m_beta, LOSS: tl.constexpr):
        """Per-category dloss / dx divided by T (aux broadcast to the categories' shape)."""
        q = tl.exp(log_q)
        if LOSS == 0:  # forward
            grad = q - tl.exp(log_p)
        elif LOSS == 1:  # reverse
            grad = tl.where(q != 0.0, q * (log_q - log_p - aux), 0.0)
        else:  # jsd
            log_m = _log_mixture(log_p, log_q, log_beta, log_1m_beta)
            grad = tl.where(q != 0.0, (1.0 - beta) * q * (log_q - log_m - aux), 0.0)
        return grad

    @triton.jit
    def _kd_fwd_kernel(
        x_ptr,
        xt_ptr,
        t_ptr,
        tt_ptr,
        mask_ptr,
        loss_ptr,
        stats_ptr,
        N,
        K,
        stride_xn,
        stride_xk,
        stride_xt,
        stride_tn,
        stride_tk,
        stride_tt,
        stride_mask,
        inv_t,
        t_sq,
        beta,
        log_beta,
        log_1m_beta,
        LOSS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SINGLE_TILE: tl.constexpr,
    ):
        """Per-row loss and the [5, N] float32 statistics the backward reuses (see `_N_STATS`)."""
        NEG_INF: tl.constexpr = float("-inf")
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        live = (tl.load(mask_ptr + rows64 * stride_mask, mask=row_ok, other=0) != 0) & row_ok
        x_rows = x_ptr + rows64[:, None] * stride_xn
        t_rows = t_ptr + rows64[:, None] * stride_tn
        cols0 = tl.arange(0, BLOCK_K)
        xt = tl.load(xt_ptr + rows64 * stride_xt, mask=live, other=NEG_INF).to(tl.float32)
        tt = tl.load(tt_ptr + rows64 * stride_tt, mask=live, other=NEG_INF).to(tl.float32)

        # Pass 1: the tail starts the running max and sum (0 for masked rows, whose tail reads as -inf).
        m_x = xt
        m_t = tt
        s_x = tl.exp((xt - _safe_shift(xt)) * inv_t)
        s_t = tl.exp((tt - _safe_shift(tt)) * inv_t)
        if SINGLE_TILE:
            x, t = _load_tile(x_rows, t_rows, cols0, K, live, stride_xk, stride_tk)
            m_x, s_x = _fold_tile(m_x, s_x, x, inv_t)
            m_t, s_t = _fold_tile(m_t, s_t, t, inv_t)
        else:
            for start in range(0, K, BLOCK_K):
                x, t = _load_tile(x_rows, t_rows, start + cols0, K, live, stride_xk, stride_tk)
                m_x, s_x = _fold_tile(m_x, s_x, x, inv_t)
                m_t, s_t = _fold_tile(m_t, s_t, t, inv_t)
        m_x = _safe_shift(m_x)
        m_t = _safe_shift(m_t)
        # s == 0 only on masked rows (every value -inf): log(1) keeps them finite.
        lse_x = tl.log(tl.where(s_x != 0.0, s_x, 1.0))
        lse_t = tl.log(tl.where(s_t != 0.0, s_t, 1.0))

        # Pass 2: the divergence terms, now that both normalisers are known; the tail first.
        log_q, log_p = _log_probs(xt, tt, m_x, lse_x, m_t, lse_t, inv_t)
        acc, acc_aux = _kd_terms(log_q, log_p, beta, log_beta, log_1m_beta, LOSS)
        if SINGLE_TILE:
            log_q, log_p = _log_probs(x, t, m_x[:, None], lse_x[:, None], m_t[:, None], lse_t[:, None], inv_t)
            term, aux = _kd_terms(log_q, log_p, beta, log_beta, log_1m_beta, LOSS)
            acc += tl.sum(term, axis=1)
            acc_aux += tl.sum(aux, axis=1)
        else:
            for start in range(0, K, BLOCK_K):
                x, t = _load_tile(x_rows, t_rows, start + cols0, K, live, stride_xk, stride_tk)
                log_q, log_p = _log_probs(x, t, m_x[:, None], lse_x[:, None], m_t[:, None], lse_t[:, None], inv_t)
                term, aux = _kd_terms(log_q, log_p, beta, log_beta, log_1m_beta, LOSS)
                acc += tl.sum(term, axis=1)
                acc_aux += tl.sum(aux, axis=1)

        tl.store(loss_ptr + rows, tl.where(live, acc * t_sq, 0.0), mask=row_ok)
        tl.store(stats_ptr + rows, m_x, mask=row_ok)
        tl.store(stats_ptr + N + rows, lse_x, mask=row_ok)
        tl.store(stats_ptr + 2 * N + rows, m_t, mask=row_ok)
        tl.store(stats_ptr + 3 * N + rows, lse_t, mask=row_ok)
        tl.store(stats_ptr + 4 * N + rows, tl.where(live, acc_aux, 0.0), mask=row_ok)

    @triton.jit
    def _kd_bwd_kernel(
        x_ptr,
        xt_ptr,
        t_ptr,
        tt_ptr,
        mask_ptr,
        stats_ptr,
        g_ptr,
        dx_ptr,
        dxt_ptr,
        N,
        K,
        stride_xn,
        stride_xk,
        stride_xt,
        stride_tn,
        stride_tk,
        stride_tt,
        stride_mask,
        stride_g,
        stride_dxn,
        stride_dxk,
        temp,
        inv_t,
        beta,
        log_beta,
        log_1m_beta,
        LOSS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """dx = g * T * (the loss's per-category gradient), recomputed from the inputs and the row statistics in one
        streaming pass; the tail's goes to dxt. 0 on masked rows."""
        NEG_INF: tl.constexpr = float("-inf")
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        live = (tl.load(mask_ptr + rows64 * stride_mask, mask=row_ok, other=0) != 0) & row_ok
        m_x = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
        lse_x = tl.load(stats_ptr + N + rows, mask=row_ok, other=0.0)
        m_t = tl.load(stats_ptr + 2 * N + rows, mask=row_ok, other=0.0)
        lse_t = tl.load(stats_ptr + 3 * N + rows, mask=row_ok, other=0.0)
        aux = tl.load(stats_ptr + 4 * N + rows, mask=row_ok, other=0.0)
        coef = tl.load(g_ptr + rows64 * stride_g, mask=live, other=0.0).to(tl.float32) * temp

        x_rows = x_ptr + rows64[:, None] * stride_xn
        t_rows = t_ptr + rows64[:, None] * stride_tn
        dx_rows = dx_ptr + rows64[:, None] * stride_dxn
        cols0 = tl.arange(0, BLOCK_K)
        for start in range(0, K, BLOCK_K):
            cols = start + cols0
            x, t = _load_tile(x_rows, t_rows, cols, K, live, stride_xk, stride_tk)
            log_q, log_p = _log_probs(x, t, m_x[:, None], lse_x[:, None], m_t[:, None], lse_t[:, None], inv_t)
            grad = _kd_grad(log_q, log_p, aux[:, None], beta, log_beta, log_1m_beta, LOSS)
            dx = tl.where(live[:, None], coef[:, None] * grad, 0.0)
            st = row_ok[:, None] & (cols < K)[None, :]
            tl.store(dx_rows + cols[None, :] * stride_dxk, dx.to(dx_ptr.dtype.element_ty), mask=st)
        xt = tl.load(xt_ptr + rows64 * stride_xt, mask=live, other=NEG_INF).to(tl.float32)
        tt = tl.load(tt_ptr + rows64 * stride_tt, mask=live, other=NEG_INF).to(tl.float32)
        log_q, log_p = _log_probs(xt, tt, m_x, lse_x, m_t, lse_t, inv_t)
        grad = _kd_grad(log_q, log_p, aux, beta, log_beta, log_1m_beta, LOSS)
        dxt = tl.where(live, coef * grad, 0.0)
        tl.store(dxt_ptr + rows, dxt.to(dxt_ptr.dtype.element_ty), mask=row_ok)


def _loss_constants(loss: str, beta: float) -> dict:
    """The kernels' loss selector and beta terms (log(beta), log(1 - beta) computed once, in float64, on the host)."""
    return {"beta": beta, "log_beta": math.log(beta), "log_1m_beta": math.log1p(-beta), "LOSS": _LOSS_CODE[loss]}


class KDLossFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton distillation kernels, on 2-D `[N, K]` columns and `[N]` tails.

    `forward(ctx, student_logits, student_tail, teacher_logprobs, teacher_tail, mask, temperature=1.0,
    loss="forward", beta=0.5, block_n=None, block_k=None)` returns the per-row loss `[N]` float32. Saved for
    backward: the inputs themselves (no copies) and `[5, N]` float32 row statistics. Only `student_logits` and
    `student_tail` receive gradients, each in its own dtype. Prefer the validated public entry points `kd_loss` /
    `kd_loss_triton`.
    """

    @staticmethod
    def forward(ctx, student_logits, student_tail, teacher_logprobs, teacher_tail, mask, temperature=1.0,
                loss="forward", beta=0.5, block_n=None, block_k=None):
        x, xt = student_logits, student_tail
        t, tt = teacher_logprobs.detach(), teacher_tail.detach()
        if x.dim() != 2:
            raise ValueError("KDLossFunction expects 2-D [N, K] logits; use kd_loss for [..., K]")
        N, K = x.shape
        T = float(temperature)
        m8 = _mask_u8(mask)
        out = torch.empty(N, dtype=torch.float32, device=x.device)
        stats = torch.empty((_N_STATS, N), dtype=torch.float32, device=x.device)
        BLOCK_N, BLOCK_K, num_warps = _launch_config(K, block_n, block_k)
        constants = _loss_constants(loss, float(beta))
        if N > 0:
            with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
                _kd_fwd_kernel[(triton.cdiv(N, BLOCK_N),)](
                    x, xt, t, tt, m8, out, stats,
                    N, K,
                    x.stride(0), x.stride(1), xt.stride(0), t.stride(0), t.stride(1), tt.stride(0), m8.stride(0),
                    1.0 / T, T * T,
                    **constants,
                    BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SINGLE_TILE=K <= BLOCK_K,
                    num_warps=num_warps,
                )
        ctx.save_for_backward(x, xt, t, tt, m8, stats)
        ctx.temperature = T
        ctx.constants = constants
        ctx.launch = (BLOCK_N, BLOCK_K, num_warps)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        x, xt, t, tt, m8, stats = ctx.saved_tensors
        nothing = (None,) * 8
        wants_x, wants_xt = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (wants_x or wants_xt):
            return (None, None, *nothing)
        N, K = x.shape
        T = ctx.temperature
        BLOCK_N, BLOCK_K, num_warps = ctx.launch
        dx = torch.empty((N, K), dtype=x.dtype, device=x.device)
        dxt = torch.empty(N, dtype=xt.dtype, device=x.device)
        if N > 0:
            with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
                _kd_bwd_kernel[(triton.cdiv(N, BLOCK_N),)](
                    x, xt, t, tt, m8, stats, grad_loss, dx, dxt,
                    N, K,
                    x.stride(0), x.stride(1), xt.stride(0), t.stride(0), t.stride(1), tt.stride(0), m8.stride(0),
                    grad_loss.stride(0), dx.stride(0), dx.stride(1),
                    T, 1.0 / T,
                    **ctx.constants,
                    BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                    num_warps=num_warps,
                )
        return (dx if wants_x else None, dxt if wants_xt else None, *nothing)


def kd_loss_triton(
    student_logits: torch.Tensor,
    student_tail: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    *,
    loss: str = "forward",
    beta: float = 0.5,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """Per-row top-K distillation loss, always through the Triton kernels.

    Same contract and edge-case semantics as `kd_loss_reference` (which see):
    `[..., K]` student logits and teacher log-probs, `[...]` tails and mask ->
    float32 loss `[...]`, differentiable with respect to `student_logits`
    and `student_tail`. Why a separate entry point: it lets tests run the real
    kernel on CPU tensors under ``TRITON_INTERPRET=1`` and lets benchmarks pin
    the kernel path. `block_n` / `block_k` (powers of two) override the tile
    shape; a `block_k` below K makes the kernel loop over the columns.
    On CUDA the teacher is not checked for finiteness (that would sync the
    host): a non-finite teacher value on an unmasked row gives that row NaN.
    """
    check_kd_loss_inputs(student_logits, student_tail, teacher_logprobs, teacher_tail, mask, temperature, loss, beta)
    for name, block in (("block_n", block_n), ("block_k", block_k)):
        if block is not None and (block < 1 or block & (block - 1)):
            raise ValueError(f"{name} must be a power of two, got {block}")
    _require_triton_for(student_logits, _kd_fwd_kernel if HAS_TRITON else None, "kd_loss")
    K = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    out = KDLossFunction.apply(
        student_logits.reshape(-1, K),  # a view for 2-D inputs (strides are passed through)
        student_tail.reshape(-1),
        teacher_logprobs.detach().reshape(-1, K),
        teacher_tail.detach().reshape(-1),
        mask.reshape(-1),
        float(temperature), loss, float(beta), block_n, block_k,
    )
    return out.reshape(lead)


def kd_loss(
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
    """Per-row distillation loss on the teacher's top-K columns plus the tail: Triton on CUDA, PyTorch on CPU.

    Over the K + 1 categories `[top-K ids, rest of the vocabulary]`, with
    `p = softmax([teacher_logprobs, teacher_tail] / T)` and
    `q = softmax([student_logits, student_tail] / T)`, `loss` picks
    `T^2 KL(p || q)` ("forward"), `T^2 KL(q || p)` ("reverse") or the
    beta-skewed Jensen-Shannon divergence `T^2 (beta KL(p || m) + (1 - beta)
    KL(q || m))`, `m = beta p + (1 - beta) q` ("jsd"); 0 where `mask` is
    false; float32 `[...]` for `[..., K]` logits. Why: distilling from a cache
    that keeps only the teacher's top-K log-probs and its remaining mass,
    without the student's distribution escaping into the tail unpenalised.
    Callers reduce, usually as `loss.sum() / mask.sum()`. CUDA tensors (with
    Triton available) take the fused kernels, which never materialise float32
    `[N, K]` intermediates and never synchronise with the host; anything else
    takes `kd_loss_reference`, whose semantics both share.
    """
    args = (student_logits, student_tail, teacher_logprobs, teacher_tail, mask, temperature)
    if isinstance(student_logits, torch.Tensor) and student_logits.is_cuda and HAS_TRITON:
        return kd_loss_triton(*args, loss=loss, beta=beta)
    return kd_loss_reference(*args, loss=loss, beta=beta)
