"""The masked-KL kernel with the rest category (`student_rest` / `target_rest`): the KL over S and one more category
(the rest of the vocabulary, weight 1), forward and backward, through the Triton kernel (run on CPU tensors under
TRITON_INTERPRET=1, which tests/conftest.py sets without a GPU) and the PyTorch reference, each against an
independent float64 oracle written here from the definition, one property per test. Sizes are tiny because the
Triton interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

from pact.kernels import HAS_TRITON, masked_kl, masked_kl_reference, masked_kl_triton

INF = float("inf")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
IMPLS = [pytest.param(masked_kl_triton, id="triton", marks=needs_triton), pytest.param(masked_kl_reference, id="reference")]


def coarse_kl_float64(z, zr, r, rr, w, mask, T):
    """T^2 * KL(q || p) per row in float64, straight from the definition: p the softmax of [z, zr] / T; q the target
    softmax of [r, rr] / T times the weights [w, 1], normalised; 0 log 0 = 0; masked rows 0."""
    student = torch.cat([z.double(), zr.double()[:, None]], dim=1) / T
    target = torch.cat([r.double(), rr.double()[:, None]], dim=1) / T
    weights = torch.cat([w.double(), torch.ones(1, dtype=torch.float64)])
    log_p = torch.log_softmax(student, dim=1)
    log_u = target + torch.log(weights)
    log_q = torch.log_softmax(log_u, dim=1)  # shifted by the row maximum first: exact for float32-max-sized logits
    q = torch.exp(log_q)
    terms = torch.where(q > 0, q * (torch.where(q > 0, log_q, 0.0) - log_p), 0.0)
    return T * T * terms.sum(dim=1) * mask.double()


def make(N, S, seed=0, scale=2.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, S, generator=gen) * scale).to(dtype)
    zr = (torch.randn(N, generator=gen) * scale).to(dtype)
    r = torch.randn(N, S, generator=gen) * scale
    rr = torch.randn(N, generator=gen) * scale
    w = torch.rand(S, generator=gen) + 0.05
    mask = torch.rand(N, generator=gen) > 0.3
    mask[0] = True
    g = torch.rand(N, generator=gen) * 2 + 0.1
    return z, zr, r, rr, w, mask, g


def run(impl, z, zr, r, rr, w, mask, T, g, **kw):
    """Loss and the gradients of both student inputs through `impl`."""
    z, zr = z.detach().clone().requires_grad_(True), zr.detach().clone().requires_grad_(True)
    loss = impl(z, r, w, mask, T, student_rest=zr, target_rest=rr, **kw)
    (loss * g).sum().backward()
    return loss.detach(), z.grad, zr.grad


def oracle(z, zr, r, rr, w, mask, T, g):
    """The float64 oracle's loss and gradients (autograd through the definition)."""
    z64, zr64 = z.detach().double().requires_grad_(True), zr.detach().double().requires_grad_(True)
    loss = coarse_kl_float64(z64, zr64, r, rr, w, mask, T)
    (loss * g.double()).sum().backward()
    return loss.detach(), z64.grad, zr64.grad


def assert_close(actual, expected, rtol):
    """max |actual - expected| <= rtol * max |expected|, everything finite."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), actual
    assert (actual - expected).abs().max().item() <= rtol * expected.abs().max().item() + 1e-30


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("S", [1, 7, 50, 127])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_rest_category_matches_the_definition(impl, S, T):
    """Loss, dL/dz and dL/d(rest) within 1e-5 of the float64 definition, odd sizes, two temperatures."""
    z, zr, r, rr, w, mask, g = make(9, S, seed=S)
    for got, want in zip(run(impl, z, zr, r, rr, w, mask, T, g), oracle(z, zr, r, rr, w, mask, T, g)):
        assert_close(got, want, 1e-5)


@needs_triton
@pytest.mark.parametrize("S,block_n,block_s", [(300, 4, 64), (129, 2, 16)], ids=["S300-bs64", "S129-bs16"])
def test_triton_rest_category_when_it_loops_over_columns(S, block_n, block_s):
    """|S| wider than the column tile: the rest category starts the online max and sum, ragged last tile."""
    z, zr, r, rr, w, mask, g = make(11, S, seed=S, scale=3.0)
    w[::5] = 0.0
    for got, want in zip(run(masked_kl_triton, z, zr, r, rr, w, mask, 2.0, g, block_n=block_n, block_s=block_s),
                         oracle(z, zr, r, rr, w, mask, 2.0, g)):
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_rest_category_constrains_the_mass_on_s(impl):
    """The point of the category: a student with the target's split inside S but too little mass on S has no KL
    without it and a positive one with it, whose gradient moves the rest logit down."""
    r = torch.tensor([[2.0, 1.0, 0.0]])
    w, mask = torch.ones(3), torch.tensor([True])
    z, rr = r.clone(), torch.tensor([-1.0])  # the target: most mass on S
    zr = torch.tensor([4.0])  # the student: the same split inside S, most mass elsewhere
    assert impl(z, r, w, mask, 1.0).item() == pytest.approx(0.0, abs=1e-7)
    loss, _, grad_rest = run(impl, z, zr, r, rr, w, mask, 1.0, torch.ones(1))
    assert loss.item() > 1.0 and grad_rest.item() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_rest_category_masked_rows_hold_garbage_and_give_zero(impl):
    """Masked rows, NaN and inf in their logits and rest logits included, give loss 0 and gradient exactly 0."""
    z, zr, r, rr, w, mask, g = make(6, 5, seed=3)
    mask[1:3] = False
    z[1, 2], zr[1], r[2, 0], rr[2] = float("nan"), INF, float("nan"), -INF
    loss, grad, grad_rest = run(impl, z, zr, r, rr, w, mask, 2.0, g)
    assert torch.all(loss[1:3] == 0) and torch.all(grad[1:3] == 0) and torch.all(grad_rest[1:3] == 0)
    live = mask.clone()
    for got, want in zip((loss[live], grad[live], grad_rest[live]),
                         [t[live] for t in oracle(z, zr, r, rr, w, mask, 2.0, g)]):
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_rest_category_extreme_logits_stay_finite(impl):
    """Large logits (+-1e4, float32-sized) and a target with no mass outside S (rest -inf) or none on S: finite
    losses and gradients equal to the definition's."""
    z = torch.tensor([[1e4, -1e4, 0.0], [3e38, 3e38, 3e38], [0.0, 1.0, 2.0], [0.5, 0.5, 0.5]])
    zr = torch.tensor([0.0, 3e38, -1e4, 20.0])
    r = torch.tensor([[-1e4, 1e4, 0.0], [3e38, -3e38, 3e38], [1.0, 2.0, 3.0], [-INF, -INF, -INF]])
    rr = torch.tensor([5.0, 3e38, -INF, 0.0])  # row 2: no mass outside S; row 3: all mass outside S
    w, mask, g = torch.ones(3), torch.ones(4, dtype=torch.bool), torch.ones(4)
    loss, grad, grad_rest = run(impl, z, zr, r, rr, w, mask, 1.0, g)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and torch.isfinite(grad_rest).all()
    want = oracle(z, zr, r, rr, w, mask, 1.0, g)
    for got, expected in zip((loss, grad, grad_rest), want):
        assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_rest_category_low_precision_student(impl):
    """bfloat16 and float16 student logits: computed in float32, gradients in the student's dtype, within the
    dtype's rounding of the float64 definition."""
    for dtype, rtol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        z, zr, r, rr, w, mask, g = make(7, 9, seed=5, dtype=dtype)
        loss, grad, grad_rest = run(impl, z, zr, r, rr, w, mask, 2.0, g)
        assert grad.dtype == dtype and grad_rest.dtype == dtype
        want = oracle(z, zr, r, rr, w, mask, 2.0, g)
        for got, expected in zip((loss, grad, grad_rest), want):
            assert_close(got, expected, rtol)


def test_rest_inputs_come_both_or_neither():
    """One of the two rest tensors alone, or one of another shape, is refused with a message naming it."""
    z, zr, r, rr, w, mask, _ = make(4, 3)
    with pytest.raises(ValueError, match="give both"):
        masked_kl(z, r, w, mask, 1.0, student_rest=zr)
    with pytest.raises(ValueError, match="target_rest must have the leading shape"):
        masked_kl(z, r, w, mask, 1.0, student_rest=zr, target_rest=rr[:2])


def test_cpu_tensors_take_the_reference():
    """`masked_kl` on CPU tensors with a rest category is the PyTorch reference (bit for bit)."""
    z, zr, r, rr, w, mask, _ = make(5, 6, seed=9)
    assert torch.equal(masked_kl(z, r, w, mask, 2.0, student_rest=zr, target_rest=rr),
                       masked_kl_reference(z, r, w, mask, 2.0, student_rest=zr, target_rest=rr))
