"""Fused masked KL on the safety-token columns: Triton forward/backward kernels and autograd glue.

Math (per position i, over the |S| safety-token columns, temperature T):

    q_i    = normalize(softmax(r_i / T) * w)                  # target, no gradient
    loss_i = T^2 * sum_s q_is * (log q_is - log_softmax(z_i / T)_s)
    dloss_i / dz_i = T * (softmax(z_i / T) - q_i)
    loss_i = 0 and gradient 0 where mask_i is false

Design (Liger-Kernel / flash-attention style):

* Forward: one program per block of ``BLOCK_N`` rows. When ``S <= BLOCK_S``
  the row tile is loaded once; otherwise the kernel loops over ``S`` in
  ``BLOCK_S`` chunks twice (pass 1: online max / sum-exp for the student and
  the target, pass 2: the KL terms), so any ``S`` works. Everything is
  float32 in registers whatever the input dtype. Masked rows are never read.
* It writes the per-row loss plus four float32 statistics per row (student
  max and log-sum-exp, target max and log-normaliser). The backward kernel
  recomputes ``softmax(z/T)`` and ``q`` from the saved inputs and those
  statistics in a single streaming pass: nothing of size ``[N, S]`` in
  float32 is ever saved.
* The gradient goes into a fresh buffer in the student's dtype; inputs are
  never modified. Arbitrary strides are supported (no copies). The CUDA path
  performs no host synchronisation.

`masked_kl` dispatches to Triton for CUDA tensors and to the PyTorch
reference (`reference.masked_kl_reference`) on CPU. `masked_kl_triton`
always runs the kernel (on CPU tensors only under ``TRITON_INTERPRET=1``,
which must be set before Triton is first imported).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._checks import check_masked_kl_inputs
from .reference import masked_kl_reference

try:  # Triton is optional: the CPU path needs only PyTorch.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None

__all__ = ["MaskedKLFunction", "masked_kl", "masked_kl_triton", "HAS_TRITON"]

#: True when Triton imported, i.e. `masked_kl_triton` can run at all.
HAS_TRITON = triton is not None

# Largest column tile; wider rows loop. A tile holds about _TILE_ELEMS values:
# with 8 warps that is 8 values per thread, which ptxas (sm_90) compiles to
# <= 128 registers and no spills for every tile shape below (checked offline
# with Triton's bundled ptxas).
_MAX_BLOCK_S = 1024
_MIN_BLOCK_S = 16
_TILE_ELEMS = 2048
_MAX_BLOCK_N = 64


if HAS_TRITON:

    @triton.jit
    def _masked_kl_fwd_kernel(
        z_ptr,
        r_ptr,
        logw_ptr,
        mask_ptr,
        loss_ptr,
        stats_ptr,
        N,
        S,
        stride_zn,
        stride_zs,
        stride_rn,
        stride_rs,
        stride_mask,
        inv_t,
        t_sq,
        BLOCK_N: tl.constexpr,
        BLOCK_S: tl.constexpr,
        SINGLE_TILE: tl.constexpr,
    ):
        """Per-row masked KL and the per-row statistics the backward reuses.

        stats is [4, N] float32: shifted student max, student log-sum-exp
        (relative to that shift), shifted target max, target log-normaliser
        (-inf for rows with no target mass).
        """
        NEG_INF: tl.constexpr = float("-inf")
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        live = tl.load(mask_ptr + rows64 * stride_mask, mask=row_ok, other=0) != 0
        live = live & row_ok
        z_rows = z_ptr + rows64[:, None] * stride_zn
        r_rows = r_ptr + rows64[:, None] * stride_rn
        cols0 = tl.arange(0, BLOCK_S)

        if SINGLE_TILE:
            col_ok = cols0 < S
            ld = live[:, None] & col_ok[None, :]
            z = tl.load(z_rows + cols0[None, :] * stride_zs, mask=ld, other=NEG_INF).to(tl.float32)
            r = tl.load(r_rows + cols0[None, :] * stride_rs, mask=ld, other=NEG_INF).to(tl.float32)
            logw = tl.load(logw_ptr + cols0, mask=col_ok, other=NEG_INF)
            rr = tl.where(logw[None, :] != NEG_INF, r, NEG_INF)
            m_z = tl.max(z, axis=1)
            m_z = tl.where(m_z == NEG_INF, 0.0, m_z)
            s_z = tl.sum(tl.exp((z - m_z[:, None]) * inv_t), axis=1)
            m_r = tl.max(rr, axis=1)
            m_r = tl.where(m_r == NEG_INF, 0.0, m_r)
            s_r = tl.sum(tl.exp((rr - m_r[:, None]) * inv_t + logw[None, :]), axis=1)
        else:
            m_z = tl.full([BLOCK_N], NEG_INF, tl.float32)
            m_r = tl.full([BLOCK_N], NEG_INF, tl.float32)
            s_z = tl.zeros([BLOCK_N], tl.float32)
            s_r = tl.zeros([BLOCK_N], tl.float32)
            # Pass 1: online max / sum-exp (flash-attention style rescaling).
            for start in range(0, S, BLOCK_S):
                cols = start + cols0
                col_ok = cols < S
                ld = live[:, None] & col_ok[None, :]
                z = tl.load(z_rows + cols[None, :] * stride_zs, mask=ld, other=NEG_INF).to(tl.float32)
                r = tl.load(r_rows + cols[None, :] * stride_rs, mask=ld, other=NEG_INF).to(tl.float32)
                logw = tl.load(logw_ptr + cols, mask=col_ok, other=NEG_INF)
                rr = tl.where(logw[None, :] != NEG_INF, r, NEG_INF)

                new_m_z = tl.maximum(m_z, tl.max(z, axis=1))
                shift_z = tl.where(new_m_z == NEG_INF, 0.0, new_m_z)
                s_z = s_z * tl.exp((m_z - shift_z) * inv_t) + tl.sum(
                    tl.exp((z - shift_z[:, None]) * inv_t), axis=1
                )
                m_z = new_m_z

                new_m_r = tl.maximum(m_r, tl.max(rr, axis=1))
                shift_r = tl.where(new_m_r == NEG_INF, 0.0, new_m_r)
                s_r = s_r * tl.exp((m_r - shift_r) * inv_t) + tl.sum(
                    tl.exp((rr - shift_r[:, None]) * inv_t + logw[None, :]), axis=1
                )
                m_r = new_m_r
            m_z = tl.where(m_z == NEG_INF, 0.0, m_z)
            m_r = tl.where(m_r == NEG_INF, 0.0, m_r)

        # s_z == 0 only for a student row that is -inf everywhere; s_r == 0 for
        # a row without target mass. NaN compares unequal, so NaN propagates.
        lse_z = tl.log(tl.where(s_z != 0.0, s_z, 1.0))
        has_mass = s_r != 0.0
        lse_r = tl.log(tl.where(has_mass, s_r, 1.0))
        active = live & has_mass

        if SINGLE_TILE:
            logp = (z - m_z[:, None]) * inv_t - lse_z[:, None]
            logq = (rr - m_r[:, None]) * inv_t + logw[None, :] - lse_r[:, None]
            q = tl.exp(logq)
            nz = q != 0.0
            # 0 * log 0 := 0, computed without ever forming 0 * inf.
            acc = tl.sum(q * (tl.where(nz, logq, 0.0) - tl.where(nz, logp, 0.0)), axis=1)
        else:
            acc = tl.zeros([BLOCK_N], tl.float32)
            # Pass 2: the KL terms, now that both normalisers are known.
            for start in range(0, S, BLOCK_S):
                cols = start + cols0
                col_ok = cols < S
                ld = active[:, None] & col_ok[None, :]
                z = tl.load(z_rows + cols[None, :] * stride_zs, mask=ld, other=NEG_INF).to(tl.float32)
                r = tl.load(r_rows + cols[None, :] * stride_rs, mask=ld, other=NEG_INF).to(tl.float32)
                logw = tl.load(logw_ptr + cols, mask=col_ok, other=NEG_INF)
                rr = tl.where(logw[None, :] != NEG_INF, r, NEG_INF)
                logp = (z - m_z[:, None]) * inv_t - lse_z[:, None]
                logq = (rr - m_r[:, None]) * inv_t + logw[None, :] - lse_r[:, None]
                q = tl.exp(logq)
                nz = q != 0.0
                acc += tl.sum(q * (tl.where(nz, logq, 0.0) - tl.where(nz, logp, 0.0)), axis=1)

        loss = tl.where(active, acc * t_sq, 0.0)
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        tl.store(stats_ptr + rows, m_z, mask=row_ok)
        tl.store(stats_ptr + N + rows, lse_z, mask=row_ok)
        tl.store(stats_ptr + 2 * N + rows, m_r, mask=row_ok)
        tl.store(stats_ptr + 3 * N + rows, tl.where(has_mass, lse_r, NEG_INF), mask=row_ok)

    @triton.jit
    def _masked_kl_bwd_kernel(
        z_ptr,
        r_ptr,
        logw_ptr,
        mask_ptr,
        stats_ptr,
        g_ptr,
        dz_ptr,
        N,
        S,
        stride_zn,
        stride_zs,
        stride_rn,
        stride_rs,
        stride_mask,
        stride_g,
        stride_dzn,
        stride_dzs,
        inv_t,
        temp,
        BLOCK_N: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        """dz = g * T * (softmax(z/T) - q), recomputed from inputs + per-row stats; 0 on inactive rows."""
        NEG_INF: tl.constexpr = float("-inf")
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        live = tl.load(mask_ptr + rows64 * stride_mask, mask=row_ok, other=0) != 0
        m_z = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
        lse_z = tl.load(stats_ptr + N + rows, mask=row_ok, other=0.0)
        m_r = tl.load(stats_ptr + 2 * N + rows, mask=row_ok, other=0.0)
        lse_r = tl.load(stats_ptr + 3 * N + rows, mask=row_ok, other=NEG_INF)
        has_mass = lse_r != NEG_INF
        active = live & row_ok & has_mass
        lse_r = tl.where(has_mass, lse_r, 0.0)
        g = tl.load(g_ptr + rows64 * stride_g, mask=active, other=0.0).to(tl.float32)
        coef = g * temp

        z_rows = z_ptr + rows64[:, None] * stride_zn
        r_rows = r_ptr + rows64[:, None] * stride_rn
        dz_rows = dz_ptr + rows64[:, None] * stride_dzn
        cols0 = tl.arange(0, BLOCK_S)
        for start in range(0, S, BLOCK_S):
            cols = start + cols0
            col_ok = cols < S
            ld = active[:, None] & col_ok[None, :]
            z = tl.load(z_rows + cols[None, :] * stride_zs, mask=ld, other=NEG_INF).to(tl.float32)
            r = tl.load(r_rows + cols[None, :] * stride_rs, mask=ld, other=NEG_INF).to(tl.float32)
            logw = tl.load(logw_ptr + cols, mask=col_ok, other=NEG_INF)
            rr = tl.where(logw[None, :] != NEG_INF, r, NEG_INF)
            p = tl.exp((z - m_z[:, None]) * inv_t - lse_z[:, None])
            q = tl.exp((rr - m_r[:, None]) * inv_t + logw[None, :] - lse_r[:, None])
            dz = tl.where(active[:, None], coef[:, None] * (p - q), 0.0)
            st = row_ok[:, None] & col_ok[None, :]
            tl.store(dz_rows + cols[None, :] * stride_dzs, dz.to(dz_ptr.dtype.element_ty), mask=st)


def _launch_config(S: int, block_n: Optional[int], block_s: Optional[int]):
    """Pick (BLOCK_N, BLOCK_S, num_warps) for rows of width S; explicit values win (tests, tuning)."""
    if block_s is None:
        block_s = min(max(triton.next_power_of_2(S), _MIN_BLOCK_S), _MAX_BLOCK_S)
    elif block_s < 1 or block_s & (block_s - 1):
        raise ValueError(f"block_s must be a power of two, got {block_s}")
    if block_n is None:
        block_n = max(1, min(_MAX_BLOCK_N, _TILE_ELEMS // block_s))
    elif block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    num_warps = 8 if block_n * block_s >= 1024 else 4
    return block_n, block_s, num_warps


def _log_weights(weights: torch.Tensor) -> torch.Tensor:
    """log(w / max w) as contiguous float32, -inf where w <= 0 (device ops only, no host sync)."""
    w = weights.detach().float()
    scale = w.amax().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(w > 0, torch.log(w / scale), float("-inf")).contiguous()


def _mask_u8(mask: torch.Tensor) -> torch.Tensor:
    """The row mask as a uint8 view (bool) or a fresh uint8 tensor (0/1 numbers), any strides."""
    if mask.dtype == torch.bool:
        return mask.detach().view(torch.uint8)
    return (mask.detach() != 0).view(torch.uint8)


def _require_triton_for(t: torch.Tensor) -> None:
    """Fail early, with a message that says what to do, when the kernel cannot run on t's device."""
    if not HAS_TRITON:
        raise RuntimeError("masked_kl_triton needs the `triton` package; use masked_kl on CPU")
    if t.device.type != "cuda":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(_masked_kl_fwd_kernel, InterpretedFunction):
            raise RuntimeError(
                "masked_kl_triton got CPU tensors but Triton is not in interpreter mode; "
                "set TRITON_INTERPRET=1 before triton is first imported, or use masked_kl"
            )


class MaskedKLFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton masked-KL kernels, on 2-D `[N, S]` logits.

    `forward(ctx, student_logits, target_logits, weights, mask, temperature, block_n=None, block_s=None)`
    returns the per-row loss `[N]` float32. Saved for backward: the inputs
    themselves (no copies) and `[4, N]` float32 row statistics. Only
    `student_logits` receives a gradient, in its own dtype. Prefer the
    validated public entry points `masked_kl` / `masked_kl_triton`.
    """

    @staticmethod
    def forward(ctx, student_logits, target_logits, weights, mask, temperature=2.0, block_n=None, block_s=None):
        z, r = student_logits, target_logits.detach()
        if z.dim() != 2:
            raise ValueError("MaskedKLFunction expects 2-D [N, S] logits; use masked_kl for [..., S]")
        N, S = z.shape
        T = float(temperature)
        logw = _log_weights(weights)
        m8 = _mask_u8(mask)
        loss = torch.empty(N, dtype=torch.float32, device=z.device)
        stats = torch.empty((4, N), dtype=torch.float32, device=z.device)
        BLOCK_N, BLOCK_S, num_warps = _launch_config(S, block_n, block_s)
        if N > 0:
            grid = (triton.cdiv(N, BLOCK_N),)
            with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
                _masked_kl_fwd_kernel[grid](
                    z, r, logw, m8, loss, stats,
                    N, S,
                    z.stride(0), z.stride(1), r.stride(0), r.stride(1), m8.stride(0),
                    1.0 / T, T * T,
                    BLOCK_N=BLOCK_N, BLOCK_S=BLOCK_S, SINGLE_TILE=S <= BLOCK_S,
                    num_warps=num_warps,
                )
        ctx.save_for_backward(z, r, logw, m8, stats)
        ctx.temperature = T
        ctx.launch = (BLOCK_N, BLOCK_S, num_warps)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        z, r, logw, m8, stats = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        N, S = z.shape
        T = ctx.temperature
        BLOCK_N, BLOCK_S, num_warps = ctx.launch
        dz = torch.empty((N, S), dtype=z.dtype, device=z.device)
        if N > 0:
            grid = (triton.cdiv(N, BLOCK_N),)
            with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
                _masked_kl_bwd_kernel[grid](
                    z, r, logw, m8, stats, grad_loss, dz,
                    N, S,
                    z.stride(0), z.stride(1), r.stride(0), r.stride(1), m8.stride(0),
                    grad_loss.stride(0), dz.stride(0), dz.stride(1),
                    1.0 / T, T,
                    BLOCK_N=BLOCK_N, BLOCK_S=BLOCK_S,
                    num_warps=num_warps,
                )
        return dz, None, None, None, None, None, None


def masked_kl_triton(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 2.0,
    *,
    block_n: Optional[int] = None,
    block_s: Optional[int] = None,
) -> torch.Tensor:
    """Per-position PACT KL on the safety tokens, always through the Triton kernels.

    Same contract and edge-case semantics as `masked_kl_reference` (which see):
    `[..., S]` logits, `[S]` weights, `[...]` mask -> float32 loss `[...]`,
    differentiable with respect to `student_logits`. Why a separate entry
    point: it lets tests run the real kernel on CPU tensors under
    ``TRITON_INTERPRET=1`` and lets benchmarks pin the kernel path.
    `block_n` / `block_s` (powers of two) override the tile shape; a
    `block_s` below S makes the kernel loop over the columns.
    On CUDA the weights are not value-checked (that would sync the host):
    weights <= 0 drop their column, all-zero weights give loss 0 everywhere.
    """
    check_masked_kl_inputs(student_logits, target_logits, weights, mask, temperature)
    _require_triton_for(student_logits)
    S = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    z = student_logits.reshape(-1, S)  # a view for 2-D inputs (strides are passed through)
    r = target_logits.detach().reshape(-1, S)
    loss = MaskedKLFunction.apply(z, r, weights, mask.reshape(-1), float(temperature), block_n, block_s)
    return loss.reshape(lead)


def masked_kl(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 2.0,
) -> torch.Tensor:
    """Per-position PACT KL on the safety tokens: Triton on CUDA, PyTorch on CPU.

    `loss_i = T^2 * KL(q_i || softmax(student_i / T))` with
    `q_i = normalize(softmax(target_i / T) * weights)`, 0 where `mask_i` is
    false; float32 `[...]` for `[..., S]` logits. This is the KL term of the
    PACT objective (docs/objective.md section 2); callers usually reduce it as
    `loss.sum() / mask.sum()`. CUDA tensors (with Triton available) take the
    fused kernel, which never materialises float32 `[N, S]` intermediates and
    never synchronises with the host; anything else takes
    `masked_kl_reference`. Both share the semantics documented there
    (masked and zero-target-mass rows: loss 0, gradient 0; `-inf` student
    logit where q > 0: loss +inf).
    """
    if isinstance(student_logits, torch.Tensor) and student_logits.is_cuda and HAS_TRITON:
        return masked_kl_triton(student_logits, target_logits, weights, mask, temperature)
    return masked_kl_reference(student_logits, target_logits, weights, mask, temperature)
