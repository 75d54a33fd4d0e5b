"""Tests of the masked-KL kernel (`pact.kernels.masked_kl*`).

Both the Triton kernel (run on CPU tensors under TRITON_INTERPRET=1, which
tests/conftest.py sets when there is no GPU) and the PyTorch reference are
checked against an independent float64 implementation written here, one
property per test. Sizes are tiny because the Triton interpreter is slow.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from pact.kernels import (
    HAS_TRITON,
    MaskedKLFunction,
    masked_kl,
    masked_kl_reference,
    masked_kl_triton,
)

INF = float("inf")
HAS_CUDA = torch.cuda.is_available()

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def needs_cuda(test):
    """Mark `test` CUDA-only (`-m cuda` selects it) and skip it without a CUDA GPU and triton."""
    return pytest.mark.cuda(pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")(test))


IMPLS = [
    pytest.param(masked_kl_triton, id="triton", marks=needs_triton),
    pytest.param(masked_kl_reference, id="reference"),
]


# --------------------------------------------------------------------------- oracle


def kl_float64(z, r, w, mask, T):
    """Independent float64 oracle: the textbook formula, nothing shared with the package."""
    z = z.double()
    r = r.detach().double()
    w = w.detach().double()
    a = r / T
    a = a - a.max(dim=-1, keepdim=True).values
    p_target = torch.exp(a) / torch.exp(a).sum(dim=-1, keepdim=True)
    u = p_target * w
    q = u / u.sum(dim=-1, keepdim=True)
    b = z / T
    b = b - b.max(dim=-1, keepdim=True).values.detach()
    log_p = b - torch.log(torch.exp(b).sum(dim=-1, keepdim=True))
    safe_log_q = torch.log(torch.where(q > 0, q, torch.ones_like(q)))
    terms = torch.where(q > 0, q * (safe_log_q - log_p), torch.zeros_like(q))  # 0 log 0 := 0
    return T * T * terms.sum(dim=-1) * mask.double()


def oracle(z, r, w, mask, T, g):
    """Float64 loss and gradient dL/dz for upstream gradient g (autograd on the oracle)."""
    z64 = z.detach().double().requires_grad_(True)
    loss = kl_float64(z64, r, w, mask, T)
    (loss * g.double()).sum().backward()
    return loss.detach(), z64.grad


def run(impl, z, r, w, mask, T, g, **kw):
    """Forward + backward through `impl`; returns (loss, grad of student)."""
    zz = z.detach().requires_grad_(True)  # a new leaf sharing z's storage and strides
    loss = impl(zz, r, w, mask, T, **kw)
    (loss * g).sum().backward()
    return loss.detach(), zz.grad


def assert_rel(actual, expected, rtol):
    """max |actual - expected| <= rtol * max |expected| (relative error in the max norm)."""
    actual = actual.double()
    expected = expected.double()
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), actual
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale + 1e-30, f"max abs err {err:.3e} > {rtol:g} * {scale:.3e}"


def make_inputs(N, S, dtype=torch.float32, seed=0, scale=2.0, zero_w_every=0):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, S, generator=gen) * scale).to(dtype)
    r = (torch.randn(N, S, generator=gen) * scale).to(dtype)
    w = torch.rand(S, generator=gen) + 0.05
    if zero_w_every:
        w[::zero_w_every] = 0.0
        w[-1] = 0.7 if S > 1 else w[-1]
    mask = torch.rand(N, generator=gen) > 0.3
    mask[0] = True
    g = torch.rand(N, generator=gen) * 2.0 + 0.1  # upstream gradient, not all ones
    return z, r, w, mask, g


def check_against_oracle(impl, z, r, w, mask, T, g, rtol, **kw):
    loss, grad = run(impl, z, r, w, mask, T, g, **kw)
    ref_loss, ref_grad = oracle(z, r, w, mask, T, g)
    assert loss.dtype == torch.float32
    assert grad.dtype == z.dtype
    assert_rel(loss, ref_loss, rtol)
    assert_rel(grad, ref_grad, rtol)
    return loss, grad


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("S", [1, 7, 50, 64, 127, 1024])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 1e-3)], ids=["fp32", "fp16"])
def test_kernel_matches_float64(impl, S, dtype, rtol):
    z, r, w, mask, g = make_inputs(7, S, dtype=dtype, seed=S)
    check_against_oracle(impl, z, r, w, mask, 2.0, g, rtol)


@needs_triton
@pytest.mark.parametrize(
    "S,block_n,block_s",
    [(1500, None, None), (300, 4, 64), (129, 2, 16)],
    ids=["S1500-default-blocks", "S300-bs64", "S129-bs16"],
)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 1e-3)], ids=["fp32", "fp16"])
def test_triton_loops_over_columns_and_row_blocks(S, block_n, block_s, dtype, rtol):
    """|S| larger than the column tile: the two-pass online-softmax path, with a ragged last tile."""
    z, r, w, mask, g = make_inputs(13, S, dtype=dtype, seed=S, scale=3.0, zero_w_every=5)
    check_against_oracle(masked_kl_triton, z, r, w, mask, 2.0, g, rtol, block_n=block_n, block_s=block_s)


@needs_triton
def test_triton_single_tile_and_looping_agree():
    z, r, w, mask, g = make_inputs(9, 200, seed=3)
    a, ga = run(masked_kl_triton, z, r, w, mask, 1.5, g)
    b, gb = run(masked_kl_triton, z, r, w, mask, 1.5, g, block_s=32, block_n=2)
    assert_rel(b, a, 1e-6)
    assert_rel(gb, ga, 1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [1.0, 2.0, 0.5, 3.7])
def test_kernel_temperatures(impl, T):
    z, r, w, mask, g = make_inputs(5, 33, seed=11)
    check_against_oracle(impl, z, r, w, mask, T, g, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_zero_weight_columns(impl):
    z, r, w, mask, g = make_inputs(7, 40, seed=5, zero_w_every=3)
    loss, grad = check_against_oracle(impl, z, r, w, mask, 2.0, g, 1e-5)
    # Target logits on zero-weight columns cannot matter, even huge ones.
    r2 = r.clone()
    r2[:, w == 0] = 1e4
    loss2, grad2 = run(impl, z, r2, w, mask, 2.0, g)
    assert_rel(loss2, loss, 1e-6)
    assert_rel(grad2, grad, 1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_weight_scale_invariance(impl):
    """q only depends on w up to scale: tiny or huge weights give the same result."""
    z, r, w, mask, g = make_inputs(5, 20, seed=8)
    loss, grad = run(impl, z, r, w, mask, 2.0, g)
    for s in (1e-30, 1e30):
        l2, g2 = run(impl, z, r, w * s, mask, 2.0, g)
        assert_rel(l2, loss, 1e-5)
        assert_rel(g2, grad, 1e-5)


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_masked_rows_are_zero_even_with_garbage(impl):
    z, r, w, mask, g = make_inputs(11, 24, seed=2)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    z[1] = float("nan")
    z[4, 3] = INF
    r[5] = float("nan")
    r[7, :] = -INF
    g[10] = float("nan")  # the upstream gradient of a masked row is ignored too
    loss, grad = run(impl, z, r, w, mask, 2.0, g)
    assert torch.all(loss[~mask] == 0)
    assert torch.all(grad[~mask] == 0)
    live = mask.clone()
    ref_loss, ref_grad = oracle(z[live], r[live], w, torch.ones(int(live.sum()), dtype=torch.bool), 2.0, g[live])
    assert_rel(loss[live], ref_loss, 1e-5)
    assert_rel(grad[live], ref_grad, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32], ids=["bool", "int", "float"])
def test_kernel_mask_dtypes(impl, mask_dtype):
    z, r, w, mask, g = make_inputs(7, 9, seed=4)
    a, ga = run(impl, z, r, w, mask, 2.0, g)
    b, gb = run(impl, z, r, w, mask.to(mask_dtype), 2.0, g)
    assert torch.equal(a, b) and torch.equal(ga, gb)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_all_masked_batch(impl):
    z, r, w, _, g = make_inputs(5, 17, seed=6)
    mask = torch.zeros(5, dtype=torch.bool)
    loss, grad = run(impl, z, r, w, mask, 2.0, g)
    assert torch.equal(loss, torch.zeros(5))
    assert torch.equal(grad, torch.zeros_like(grad))
    # ... and the usual mean reduction with a clamped denominator stays finite.
    zz = z.clone().requires_grad_(True)
    total = impl(zz, r, w, mask, 2.0).sum() / mask.sum().clamp_min(1)
    total.backward()
    assert total.item() == 0.0 and torch.equal(zz.grad, torch.zeros_like(zz))


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_empty_batch(impl):
    z = torch.zeros(0, 8, requires_grad=True)
    loss = impl(z, torch.zeros(0, 8), torch.ones(8), torch.zeros(0, dtype=torch.bool), 2.0)
    assert loss.shape == (0,)
    loss.sum().backward()
    assert z.grad.shape == (0, 8)


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_noncontiguous_inputs(impl):
    N, S = 7, 30
    gen = torch.Generator().manual_seed(9)
    zt = torch.randn(S, N, generator=gen) * 2  # student is a transposed view: stride (1, N)
    rb = torch.randn(N, 2 * S + 1, generator=gen) * 2  # target is a strided column slice
    wb = torch.rand(2 * S, generator=gen) + 0.1  # weights with stride 2
    mb = torch.rand(2 * N, generator=gen) > 0.3  # mask with stride 2
    z, r, w, mask = zt.t(), rb[:, 1::2][:, :S], wb[::2], mb[::2]
    mask[0] = True
    assert not (z.is_contiguous() or r.is_contiguous() or w.is_contiguous() or mask.is_contiguous())
    g = torch.rand(N, generator=gen) + 0.5
    zz = z.detach().requires_grad_(True)
    loss = impl(zz, r, w, mask, 2.0)
    (loss * g).sum().backward()
    ref_loss, ref_grad = oracle(z.contiguous(), r.contiguous(), w.contiguous(), mask.contiguous(), 2.0, g)
    assert_rel(loss.detach(), ref_loss, 1e-5)
    assert_rel(zz.grad, ref_grad, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_leading_dims(impl):
    """[B, L, S] logits with a [B, L] mask give a [B, L] loss equal to the flattened call."""
    z, r, w, mask, g = make_inputs(12, 10, seed=12)
    loss3 = impl(z.view(3, 4, 10), r.view(3, 4, 10), w, mask.view(3, 4), 2.0)
    assert loss3.shape == (3, 4)
    assert torch.equal(loss3.reshape(-1), impl(z, r, w, mask, 2.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_inputs_unmodified(impl):
    z, r, w, mask, g = make_inputs(5, 21, dtype=torch.float16, seed=13)
    zz = z.clone().requires_grad_(True)
    copies = [t.clone() for t in (z, r, w, mask, g)]
    loss = impl(zz, r, w, mask, 2.0)
    (loss * g).sum().backward()
    for before, after in zip(copies, (zz.detach(), r, w, mask, g)):
        assert torch.equal(before, after)
    assert zz.grad.data_ptr() != zz.data_ptr()


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_target_gets_no_gradient(impl):
    z, r, w, mask, g = make_inputs(5, 12, seed=14)
    zz, rr, ww = z.clone().requires_grad_(True), r.clone().requires_grad_(True), w.clone().requires_grad_(True)
    impl(zz, rr, ww, mask, 2.0).sum().backward()
    assert zz.grad is not None and rr.grad is None and ww.grad is None


@needs_triton
def test_triton_saves_no_float32_rows_by_columns():
    """Backward recomputes from the inputs + per-row stats; nothing [N, S]-sized is stored besides the inputs (the
    extras: the [4, N] row statistics, the [S] log-weights and the rest category's one log-weight)."""
    N, S = 13, 64
    z, r, w, mask, g = make_inputs(N, S, dtype=torch.float16, seed=15)
    zz = z.clone().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = MaskedKLFunction.apply(zz, r, w, mask, 2.0)
    input_ptrs = {zz.data_ptr(), r.data_ptr(), mask.data_ptr()}
    extra = [t for t in saved if t.data_ptr() not in input_ptrs]
    assert sum(t.numel() for t in extra) <= 4 * N + S + 1
    loss.sum().backward()
    assert zz.grad.dtype == torch.float16


# --------------------------------------------------------------------------- extreme values


def _extreme_case():
    z = torch.tensor(
        [
            [3e38, 3e38, -3e38, 3e38],  # float32-max-sized student logits
            [1e4, -1e4, 0.0, 5.0],  # +-1e4
            [0.0, 1.0, 2.0, 3.0],  # target has zero mass on every positive-weight column
            [0.5, -1.0, 2.0, 0.0],  # target -inf on one positive-weight column
            [1.0, 2.0, 3.0, 4.0],  # masked row
        ]
    )
    r = torch.tensor(
        [
            [3e38, 3e38, -3e38, 3e38],
            [-1e4, 1e4, 0.0, 2.0],
            [-INF, -INF, 5.0, -INF],
            [1.0, -INF, 0.5, 2.0],
            [1.0, 2.0, 3.0, 4.0],
        ]
    )
    w = torch.tensor([1.0, 0.5, 0.0, 1.0])
    mask = torch.tensor([True, True, True, True, False])
    return z, r, w, mask


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_extreme_logits(impl):
    z, r, w, mask = _extreme_case()
    g = torch.tensor([1.0, 0.5, 2.0, 1.5, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy overflows to -inf on purpose
        loss, grad = run(impl, z, r, w, mask, 2.0, g)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # Row 0: student and target put (numerically) the same mass on the 3e38 columns.
    # q = w/sum(w) on columns {0,1,3} = [0.4, 0.2, 0, 0.4]; student softmax = [1/3, 1/3, 0, 1/3].
    q0 = torch.tensor([0.4, 0.2, 0.0, 0.4], dtype=torch.float64)
    kl0 = 4.0 * sum(q * math.log(q / (1 / 3)) for q in q0.tolist() if q > 0)
    assert loss[0].item() == pytest.approx(kl0, rel=1e-5)
    p0 = torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3], dtype=torch.float64)
    assert_rel(grad[0], 2.0 * (p0 - q0), 1e-5)
    # Row 1: q is all on column 1, where the student's log-prob is -(1e4 + 1e4)/2 = -1e4.
    assert loss[1].item() == pytest.approx(4.0 * 1e4, rel=1e-6)
    assert grad[1].tolist() == pytest.approx([0.5 * 2.0, -0.5 * 2.0, 0.0, 0.0], abs=1e-6)
    # Row 2: no target mass -> loss 0, grad 0. Row 4: masked.
    assert loss[2].item() == 0.0 and torch.all(grad[2] == 0)
    assert loss[4].item() == 0.0 and torch.all(grad[4] == 0)
    # Row 3 is ordinary apart from the -inf target column: compare with the oracle.
    ref_loss, ref_grad = oracle(z[3:4], r[3:4], w, torch.ones(1), 2.0, g[3:4])
    assert_rel(loss[3:4], ref_loss, 1e-5)
    assert_rel(grad[3:4], ref_grad, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_extreme_logits_low_precision(impl):
    """fp16 with logits at the dtype's maximum / -inf, and T < 1 (the scaled logits overflow float16 but not float32)."""
    z = torch.tensor([[65504.0, -65504.0, 0.0], [-INF, 1.0, 2.0]], dtype=torch.float16)
    r = torch.tensor([[65504.0, 65504.0, -INF], [-INF, 0.0, 1.0]], dtype=torch.float16)
    w = torch.tensor([1.0, 1.0, 1.0])
    mask = torch.tensor([True, True])
    g = torch.ones(2)
    loss, grad = run(impl, z, r, w, mask, 0.5, g)
    # Row 0: q = [1/2, 1/2, 0]; the student's log-prob on column 1 is -2 * 131008.
    assert loss[0].item() == pytest.approx(0.25 * 0.5 * (math.log(0.5) + 0.0 + math.log(0.5) + 2 * 131008), rel=1e-4)
    assert torch.isfinite(grad).all()
    assert grad[0].float().tolist() == pytest.approx([0.5 * 0.5, 0.5 * -0.5, 0.0], abs=1e-3)
    assert torch.isfinite(loss[1])  # student -inf where q = 0 is fine


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_student_neg_inf_where_target_positive_is_inf(impl):
    """Pinned semantics: the KL is genuinely infinite -> loss +inf; the gradient stays finite, T*(p - q)."""
    z = torch.tensor([[0.0, -INF, 1.0], [-INF, -INF, -INF]])
    r = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    w = torch.tensor([1.0, 1.0, 0.0])
    mask = torch.tensor([True, True])
    loss, grad = run(impl, z, r, w, mask, 2.0, torch.ones(2))
    assert loss[0].item() == INF and loss[1].item() == INF
    assert torch.isfinite(grad).all()
    q0 = torch.softmax(torch.tensor([0.0, 0.5]), 0).tolist()
    p0 = torch.softmax(torch.tensor([0.0, 0.5]), 0).tolist()  # student softmax over columns {0, 2}
    assert grad[0].tolist() == pytest.approx([2 * (p0[0] - q0[0]), -2 * q0[1], 2 * p0[1]], abs=1e-6)
    # An all -inf student row: softmax taken as 0, gradient -T * q.
    assert grad[1].tolist() == pytest.approx([-1.0, -1.0, 0.0], abs=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_nan_in_active_row_propagates(impl):
    z = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]])
    r = torch.tensor([[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0]])
    loss = impl(z, r, torch.ones(3), torch.tensor([True, True]), 2.0)
    assert torch.isnan(loss).all()


# --------------------------------------------------------------------------- dispatch, dtypes, validation


def test_kernel_cpu_dispatches_to_reference():
    z, r, w, mask, g = make_inputs(6, 19, seed=16)
    a, ga = run(masked_kl, z, r, w, mask, 2.0, g)
    b, gb = run(masked_kl_reference, z, r, w, mask, 2.0, g)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def _eager_same_dtype(z, r, w, mask, T):
    """What a straightforward eager PyTorch implementation computes when run in the inputs' dtype."""
    q = torch.softmax(r / T, dim=-1) * w.to(r.dtype)
    q = q / q.sum(dim=-1, keepdim=True)
    log_p = torch.log_softmax(z / T, dim=-1)
    terms = torch.where(q > 0, q * (torch.log(q) - log_p), torch.zeros_like(q))
    return T * T * terms.sum(dim=-1) * mask.to(z.dtype)


def _errors(impl, z, r, w, mask, T, g):
    loss, grad = run(impl, z, r, w, mask, T, g)
    ref_loss, ref_grad = oracle(z, r, w, mask, T, g)
    return (loss.double() - ref_loss).abs().max().item(), (grad.double() - ref_grad).abs().max().item()


def test_kernel_reference_bfloat16_vs_float64():
    z, r, w, mask, g = make_inputs(64, 50, dtype=torch.bfloat16, seed=17)
    loss, grad = check_against_oracle(masked_kl_reference, z, r, w, mask, 2.0, g, 1e-2)
    ours = _errors(masked_kl_reference, z, r, w, mask, 2.0, g)
    eager = _errors(_eager_same_dtype, z, r, w, mask, 2.0, g)
    assert ours[0] <= eager[0] and ours[1] <= eager[1], (ours, eager)


@needs_triton
def test_triton_bfloat16_interpreter_vs_float64():
    z, r, w, mask, g = make_inputs(7, 50, dtype=torch.bfloat16, seed=18)
    check_against_oracle(masked_kl_triton, z, r, w, mask, 2.0, g, 1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_mixed_dtypes(impl):
    """A float32 student with float16/bfloat16 cached targets (what the cache stores)."""
    z, r, w, mask, g = make_inputs(5, 30, seed=19)
    for rd in (torch.float16, torch.bfloat16):
        check_against_oracle(impl, z, r.to(rd), w, mask, 2.0, g, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case,match",
    [
        ("weights_len", "weights must be 1-D of length"),
        ("weights_2d", "weights must be 1-D of length"),
        ("target_shape", "target_logits shape"),
        ("mask_shape", "mask must have the leading shape"),
        ("student_1d", "student_logits must be"),
        ("int_logits", "must be float32, float16 or bfloat16"),
        ("float64_logits", "must be float32, float16 or bfloat16"),
        ("temperature", "temperature must be finite and > 0"),
        ("negative_weight", "weights must be >= 0"),
        ("zero_weights", "at least one positive"),
        ("nan_weight", "weights must be finite"),
    ],
)
def test_kernel_validation_errors(impl, case, match):
    z, r, w, mask, g = make_inputs(4, 6, seed=20)
    args = dict(student_logits=z, target_logits=r, weights=w, mask=mask, temperature=2.0)
    if case == "weights_len":
        args["weights"] = torch.ones(5)
    elif case == "weights_2d":
        args["weights"] = torch.ones(1, 6)
    elif case == "target_shape":
        args["target_logits"] = torch.zeros(4, 7)
    elif case == "mask_shape":
        args["mask"] = torch.ones(5, dtype=torch.bool)
    elif case == "student_1d":
        args.update(student_logits=z[0], target_logits=r[0], mask=mask[0])
    elif case == "int_logits":
        args["student_logits"] = z.long()
    elif case == "float64_logits":
        args["target_logits"] = r.double()
    elif case == "temperature":
        args["temperature"] = 0.0
    elif case == "negative_weight":
        args["weights"] = torch.tensor([1.0, -0.1, 0, 0, 0, 0])
    elif case == "zero_weights":
        args["weights"] = torch.zeros(6)
    elif case == "nan_weight":
        args["weights"] = torch.tensor([1.0, float("nan"), 0, 0, 0, 0])
    with pytest.raises(ValueError, match=match):
        impl(**args)


# --------------------------------------------------------------------------- CUDA only


@needs_cuda
@pytest.mark.parametrize("S", [50, 512, 4096])
def test_triton_cuda_matches_float64(S):
    z, r, w, mask, g = make_inputs(1023, S, seed=S)
    dev = "cuda"
    loss, grad = run(masked_kl, z.to(dev), r.to(dev), w.to(dev), mask.to(dev), 2.0, g.to(dev))
    ref_loss, ref_grad = oracle(z, r, w, mask, 2.0, g)
    assert_rel(loss.cpu(), ref_loss, 1e-5)
    assert_rel(grad.cpu(), ref_grad, 1e-5)


@needs_cuda
def test_triton_cuda_bfloat16_no_worse_than_eager():
    """The bf16 rule on GPU: error vs float64 no worse than eager PyTorch in the same dtype."""
    dev = "cuda"
    z, r, w, mask, g = make_inputs(4096, 50, dtype=torch.bfloat16, seed=21)
    z, r, w, mask, g = (t.to(dev) for t in (z, r, w, mask, g))
    loss, grad = run(masked_kl, z, r, w, mask, 2.0, g)
    eager_loss, eager_grad = run(_eager_same_dtype, z, r, w, mask, 2.0, g)
    ref_loss, ref_grad = oracle(z.cpu(), r.cpu(), w.cpu(), mask.cpu(), 2.0, g.cpu())
    ours = ((loss.cpu().double() - ref_loss).abs().max(), (grad.cpu().double() - ref_grad).abs().max())
    eager = ((eager_loss.cpu().double() - ref_loss).abs().max(), (eager_grad.cpu().double() - ref_grad).abs().max())
    assert ours[0] <= eager[0] and ours[1] <= eager[1], (ours, eager)


@needs_cuda
def test_triton_cuda_no_host_sync():
    dev = "cuda"
    z, r, w, mask, g = make_inputs(513, 50, dtype=torch.bfloat16, seed=22)
    z, r, w, mask, g = (t.to(dev) for t in (z, r, w, mask, g))
    zz = z.clone().requires_grad_(True)
    masked_kl(zz, r, w, mask, 2.0)  # warm up (compilation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = masked_kl(zz, r, w, mask, 2.0)
        loss.backward(g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(zz.grad).all()
