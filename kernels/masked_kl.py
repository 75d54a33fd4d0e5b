"""Fused masked KL on the safety-token columns: Triton forward/backward kernels and autograd glue.

Math (per position i, over the |S| safety-token columns, temperature T):

    q_i    = normalize(softmax(r_i / T) * w)                  # target, no gradient
    loss_i = T^2 * sum_s q_is * (log q_is - log_softmax(z_i / T)_s)
    dloss_i / dz_i = T * (softmax(z_i / T) - q_i)
    loss_i = 0 and gradient 0 where mask_i is false

With a rest category (`student_rest` zr_i, `target_rest` rr_i, both [N]) each
row has one more column, the rest of the vocabulary, with weight 1: the same
formulas over [z_i, zr_i] and [r_i, rr_i], and zr_i gets its gradient
T * (softmax([z_i, zr_i] / T)[rest] - q_i[rest]) (docs/objective.md section 5).

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
        zr_ptr,
        rr_ptr,
        logw_rest_ptr,
        N,
        S,
        stride_zn,
        stride_zs,
        stride_rn,
        stride_rs,
        stride_mask,
        stride_zr,
        stride_rr,
        inv_t,
        t_sq,
        BLOCK_N: tl.constexpr,
        BLOCK_S: tl.constexpr,
        SINGLE_TILE: tl.constexpr,
        HAS_REST: tl.constexpr,
    ):
        """Per-row masked KL and the per-row statistics the backward reuses.

        stats is [4, N] float32: shifted student max, student log-sum-exp
        (relative to that shift), shifted target max, target log-normaliser
        (-inf for rows with no target mass). With HAS_REST, each row has one
        more category (the rest of the vocabulary) whose logits are zr / rr
        and whose log-weight is logw_rest; it starts the running max and sum.
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
        if HAS_REST:
            zr = tl.load(zr_ptr + rows64 * stride_zr, mask=live, other=NEG_INF).to(tl.float32)
            rr_rest = tl.load(rr_ptr + rows64 * stride_rr, mask=live, other=NEG_INF).to(tl.float32)
            logw_rest = tl.load(logw_rest_ptr)
        else:
            zr = tl.full([BLOCK_N], NEG_INF, tl.float32)
            rr_rest = tl.full([BLOCK_N], NEG_INF, tl.float32)
            logw_rest = 0.0

        if SINGLE_TILE:
            col_ok = cols0 < S
            ld = live[:, None] & col_ok[None, :]
            z = tl.load(z_rows + cols0[None, :] * stride_zs, mask=ld, other=NEG_INF).to(tl.float32)
            r = tl.load(r_rows + cols0[None, :] * stride_rs, mask=ld, other=NEG_INF).to(tl.float32)
            logw = tl.load(logw_ptr + cols0, mask=col_ok, other=NEG_INF)
            rr = tl.where(logw[None, :] != NEG_INF, r, NEG_INF)
            m_z = tl.maximum(tl.max(z, axis=1), zr)
            m_z = tl.where(m_z == NEG_INF, 0.0, m_z)
            s_z = tl.sum(tl.exp((z - m_z[:, None]) * inv_t), axis=1) + tl.exp((zr - m_z) * inv_t)
            m_r = tl.maximum(tl.max(rr, axis=1), rr_rest)
            m_r = tl.where(m_r == NEG_INF, 0.0, m_r)
            s_r = tl.sum(tl.exp((rr - m_r[:, None]) * inv_t + logw[None, :]), axis=1) + tl.exp((rr_rest - m_r) * inv_t + logw_rest)
        else:
            # The rest category (all -inf without HAS_REST) starts the running max and sum.
            m_z = zr
            m_r = rr_rest
            s_z = tl.exp((zr - tl.where(m_z == NEG_INF, 0.0, m_z)) * inv_t)
            s_r = tl.exp((rr_rest - tl.where(m_r == NEG_INF, 0.0, m_r)) * inv_t + logw_rest)
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
        if HAS_REST:
            logp_rest = (zr - m_z) * inv_t - lse_z
            logq_rest = (rr_rest - m_r) * inv_t + logw_rest - lse_r
            q_rest = tl.exp(logq_rest)
            nz_rest = q_rest != 0.0
            acc += q_rest * (tl.where(nz_rest, logq_rest, 0.0) - tl.where(nz_rest, logp_rest, 0.0))

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
        zr_ptr,
        rr_ptr,
        logw_rest_ptr,
        dzr_ptr,
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
        stride_zr,
        stride_rr,
        inv_t,
        temp,
        BLOCK_N: tl.constexpr,
        BLOCK_S: tl.constexpr,
        HAS_REST: tl.constexpr,
    ):
        """dz = g * T * (softmax(z/T) - q), recomputed from inputs + per-row stats; 0 on inactive rows. With HAS_REST
        the rest category's gradient goes to dzr the same way."""
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
        if HAS_REST:
            zr = tl.load(zr_ptr + rows64 * stride_zr, mask=active, other=NEG_INF).to(tl.float32)
            rr_rest = tl.load(rr_ptr + rows64 * stride_rr, mask=active, other=NEG_INF).to(tl.float32)
            p_rest = tl.exp((zr - m_z) * inv_t - lse_z)
            q_rest = tl.exp((rr_rest - m_r) * inv_t + tl.load(logw_rest_ptr) - lse_r)
            dzr = tl.where(active, coef * (p_rest - q_rest), 0.0)
            tl.store(dzr_ptr + rows, dzr.to(dzr_ptr.dtype.element_ty), mask=row_ok)


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


def _log_weights(weights: torch.Tensor, with_rest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log(w / M) [S], log(1 / M) [1]) as contiguous float32, -inf where w <= 0 (device ops only, no host sync).

    M is max w, or max(max w, 1) `with_rest` (the rest category has weight 1):
    scaling every weight alike leaves the target unchanged and keeps the sums in range.
    """
    w = weights.detach().float()
    scale = w.amax().clamp_min(1.0 if with_rest else torch.finfo(torch.float32).tiny)
    return torch.where(w > 0, torch.log(w / scale), float("-inf")).contiguous(), (-scale.log()).reshape(1)


def _mask_u8(mask: torch.Tensor) -> torch.Tensor:
    """The row mask as a uint8 view (bool) or a fresh uint8 tensor (0/1 numbers), any strides."""
    if mask.dtype == torch.bool:
        return mask.detach().view(torch.uint8)
    return (mask.detach() != 0).view(torch.uint8)


def _require_triton_for(t: torch.Tensor, kernel=None, op: str = "masked_kl") -> None:
    """Fail early, with a message that says what to do, when `kernel` (op `op`'s Triton forward kernel; default the
    masked KL's) cannot run on t's device: no Triton, or CPU tensors outside the interpreter."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}_triton needs the `triton` package; use {op} on CPU")
    if t.device.type != "cuda":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(kernel if kernel is not None else _masked_kl_fwd_kernel, InterpretedFunction):
            raise RuntimeError(
                f"{op}_triton got CPU tensors but Triton is not in interpreter mode; "
                f"set TRITON_INTERPRET=1 before triton is first imported, or use {op}"
            )


class MaskedKLFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton masked-KL kernels, on 2-D `[N, S]` logits.

    `forward(ctx, student_logits, target_logits, weights, mask, temperature, block_n=None, block_s=None,
    student_rest=None, target_rest=None)` returns the per-row loss `[N]` float32. Saved for backward: the
    inputs themselves (no copies) and `[4, N]` float32 row statistics. Only `student_logits` (and
    `student_rest`) receive a gradient, in their own dtype. Prefer the validated public entry points
    `masked_kl` / `masked_kl_triton`.
    """

    @staticmethod
    def forward(ctx, student_logits, target_logits, weights, mask, temperature=2.0, block_n=None, block_s=None,
                student_rest=None, target_rest=None):
        z, r = student_logits, target_logits.detach()
        if z.dim() != 2:
            raise ValueError("MaskedKLFunction expects 2-D [N, S] logits; use masked_kl for [..., S]")
        N, S = z.shape
        T = float(temperature)
        has_rest = student_rest is not None
        logw, logw_rest = _log_weights(weights, has_rest)
        # Without a rest category the kernel never reads these pointers; any tensor will do.
        zr = student_rest if has_rest else z
        rr = target_rest.detach() if has_rest else z
        m8 = _mask_u8(mask)
        loss = torch.empty(N, dtype=torch.float32, device=z.device)
        stats = torch.empty((4, N), dtype=torch.float32, device=z.device)
        BLOCK_N, BLOCK_S, num_warps = _launch_config(S, block_n, block_s)
        if N > 0:
            grid = (triton.cdiv(N, BLOCK_N),)
            with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
                _masked_kl_fwd_kernel[grid](
                    z, r, logw, m8, loss, stats, zr, rr, logw_rest,
                    N, S,
                    z.stride(0), z.stride(1), r.stride(0), r.stride(1), m8.stride(0),
                    zr.stride(0), rr.stride(0),
                    1.0 / T, T * T,
                    BLOCK_N=BLOCK_N, BLOCK_S=BLOCK_S, SINGLE_TILE=S <= BLOCK_S, HAS_REST=has_rest,
                    num_warps=num_warps,
                )
        ctx.save_for_backward(z, r, logw, m8, stats, zr, rr, logw_rest)
        ctx.temperature = T
        ctx.has_rest = has_rest
        ctx.launch = (BLOCK_N, BLOCK_S, num_warps)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        z, r, logw, m8, stats, zr, rr, logw_rest = ctx.saved_tensors
        nothing = (None,) * 6
        if not (ctx.needs_input_grad[0] or (ctx.has_rest and ctx.needs_input_grad[7])):
            return (None, *nothing, None, None)
        N, S = z.shape
        T = ctx.temperature
        BLOCK_N, BLOCK_S, num_warps = ctx.launch
        dz = torch.empty((N, S), dtype=z.dtype, device=z.device)
        dzr = torch.empty(N, dtype=zr.dtype, device=z.device) if ctx.has_rest else dz
        if N > 0:
            grid = (triton.cdiv(N, BLOCK_N),)
            with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
                _masked_kl_bwd_kernel[grid](
                    z, r, logw, m8, stats, grad_loss, dz, zr, rr, logw_rest, dzr,
                    N, S,
                    z.stride(0), z.stride(1), r.stride(0), r.stride(1), m8.stride(0),
                    grad_loss.stride(0), dz.stride(0), dz.stride(1), zr.stride(0), rr.stride(0),
                    1.0 / T, T,
                    BLOCK_N=BLOCK_N, BLOCK_S=BLOCK_S, HAS_REST=ctx.has_rest,
                    num_warps=num_warps,
                )
        return (dz, *nothing, dzr if ctx.has_rest else None, None)


def masked_kl_triton(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 2.0,
    *,
    student_rest: Optional[torch.Tensor] = None,
    target_rest: Optional[torch.Tensor] = None,
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
    check_masked_kl_inputs(student_logits, target_logits, weights, mask, temperature, student_rest, target_rest)
    _require_triton_for(student_logits)
    S = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    z = student_logits.reshape(-1, S)  # a view for 2-D inputs (strides are passed through)
    r = target_logits.detach().reshape(-1, S)
    rest = (student_rest.reshape(-1), target_rest.detach().reshape(-1)) if student_rest is not None else (None, None)
    loss = MaskedKLFunction.apply(z, r, weights, mask.reshape(-1), float(temperature), block_n, block_s, *rest)
    return loss.reshape(lead)


def masked_kl(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 2.0,
    *,
    student_rest: Optional[torch.Tensor] = None,
    target_rest: Optional[torch.Tensor] = None,
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

    `student_rest` / `target_rest` (`[...]`, both or neither) add one category
    to both distributions, the rest of the vocabulary, with weight 1 next to
    `weights`: the KL then also constrains the mass on S, not only its split
    (docs/objective.md section 5); `student_rest` gets a gradient too.
    """
    rest = {"student_rest": student_rest, "target_rest": target_rest}
    if isinstance(student_logits, torch.Tensor) and student_logits.is_cuda and HAS_TRITON:
        return masked_kl_triton(student_logits, target_logits, weights, mask, temperature, **rest)
    return masked_kl_reference(student_logits, target_logits, weights, mask, temperature, **rest)
