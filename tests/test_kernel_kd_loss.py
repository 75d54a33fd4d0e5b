"""Tests of the top-K distillation loss (`pact.kernels.kd_loss*`): forward KL, reverse KL and JSD over the teacher's
top-K columns plus one tail category.

The PyTorch reference is checked against an independent float64 transcription of the formulas written here, and
the Triton kernel (run on CPU tensors under TRITON_INTERPRET=1, which tests/conftest.py sets when there is no GPU)
against the reference and that transcription, one property per test. Sizes are small because the interpreter is
slow.
"""

from __future__ import annotations

import math

import pytest
import torch

from pact.kernels import HAS_TRITON, KDLossFunction, kd_loss, kd_loss_reference, kd_loss_triton

INF = float("inf")
NAN = float("nan")
LOSSES = ("forward", "reverse", "jsd")
HAS_CUDA = torch.cuda.is_available()

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
IMPLS = [pytest.param(kd_loss_triton, id="triton", marks=needs_triton), pytest.param(kd_loss_reference, id="reference")]

# The interpreter runs the kernels in numpy, which warns on the -inf - -inf of padding columns and masked rows (their
# results are discarded by `where`, as on a GPU).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def needs_cuda(test):
    """Mark `test` CUDA-only (`-m cuda` selects it) and skip it without a CUDA GPU and triton."""
    skip = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
    return pytest.mark.cuda(skip(test))


# --------------------------------------------------------------------------- oracle


def kd_float64(x, xt, t, tt, mask, T, loss, beta=0.5):
    """T^2 * the divergence per row in float64, straight from the formulas: p = softmax(teacher / T), q =
    softmax(student / T) over [K columns, tail]; masked rows 0."""
    log_q = torch.log_softmax(torch.cat([x.double(), xt.double()[:, None]], dim=1) / T, dim=1)
    log_p = torch.log_softmax(torch.cat([t.double(), tt.double()[:, None]], dim=1) / T, dim=1)
    p, q = log_p.exp(), log_q.exp()
    if loss == "forward":
        row = (p * (log_p - log_q)).sum(dim=1)
    elif loss == "reverse":
        row = (q * (log_q - log_p)).sum(dim=1)
    else:
        log_m = torch.logaddexp(math.log(beta) + log_p, math.log(1 - beta) + log_q)
        row = beta * (p * (log_p - log_m)).sum(dim=1) + (1 - beta) * (q * (log_q - log_m)).sum(dim=1)
    return T * T * row * mask.double()


def oracle(x, xt, t, tt, mask, T, g, loss, beta=0.5):
    """The float64 transcription's loss and gradients of both student inputs for upstream gradient g (autograd)."""
    x64, xt64 = x.detach().double().requires_grad_(True), xt.detach().double().requires_grad_(True)
    out = kd_float64(x64, xt64, t, tt, mask, T, loss, beta)
    (out * g.double()).sum().backward()
    return out.detach(), x64.grad, xt64.grad


def run(impl, x, xt, t, tt, mask, T, g, loss, beta=0.5, **kw):
    """Loss and the gradients of both student inputs through `impl` (new leaves sharing the inputs' strides)."""
    x, xt = x.detach().requires_grad_(True), xt.detach().requires_grad_(True)
    out = impl(x, xt, t, tt, mask, T, loss=loss, beta=beta, **kw)
    (out * g).sum().backward()
    return out.detach(), x.grad, xt.grad


def assert_close(actual, expected, rtol):
    """Everything finite and max |actual - expected| <= rtol * max |expected| (relative error in the max norm)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), actual
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= rtol * scale + 1e-30, f"max abs err {err:.3e} > {rtol:g} * {scale:.3e}"


def assert_all_close(got, want, rtol):
    """`assert_close` on the loss and on the gradient of the K + 1 student logits, columns and tail together (the
    tail's alone can be orders of magnitude below float32's rounding of the row)."""
    assert_close(got[0], want[0], rtol)
    assert_close(torch.cat([got[1], got[2][:, None]], 1), torch.cat([want[1], want[2][:, None]], 1), rtol)


def make(N, K, seed=0, scale=2.0, dtype=torch.float32):
    """Student logits and tail (dtype), teacher log-probs and tail (float32, normalised over K + 1), mask, upstream."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, K, generator=gen) * scale).to(dtype)
    xt = (torch.randn(N, generator=gen) * scale + math.log(K + 1)).to(dtype)
    teacher = torch.log_softmax(torch.randn(N, K + 1, generator=gen) * scale, dim=1)
    t, tt = teacher[:, :K].contiguous(), teacher[:, K].contiguous()
    mask = torch.rand(N, generator=gen) > 0.3
    mask[0] = True
    g = torch.rand(N, generator=gen) * 2 + 0.1
    return x, xt, t, tt, mask, g


# --------------------------------------------------------------------------- (a) the reference against float64


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("T", [0.5, 1.0, 2.5])
def test_reference_matches_the_float64_formulas(loss, T):
    """Loss and both gradients within 1e-5 of the float64 transcription, three temperatures, JSD at two betas."""
    x, xt, t, tt, mask, g = make(16, 20, seed=int(10 * T))
    for beta in (0.5, 0.2) if loss == "jsd" else (0.5,):
        got = run(kd_loss_reference, x, xt, t, tt, mask, T, g, loss, beta)
        assert_all_close(got, oracle(x, xt, t, tt, mask, T, g, loss, beta), 1e-5)


@pytest.mark.parametrize("loss", LOSSES)
def test_the_closed_form_gradients_are_autograds(loss):
    """The gradients the kernel computes (kd_loss.py's docstring) equal float64 autograd of the definition:
    forward T (q - p); reverse T q (a - sum q a), a = log q - log p; jsd T (1 - beta) q (g - sum q g), g = log q/m."""
    x, xt, t, tt, _mask, _ = make(6, 9, seed=1)
    T, beta = 1.7, 0.3
    _, dx, dxt = oracle(x, xt, t, tt, torch.ones(6, dtype=torch.bool), T, torch.ones(6), loss, beta)
    log_q = torch.log_softmax(torch.cat([x.double(), xt.double()[:, None]], 1) / T, 1)
    log_p = torch.log_softmax(torch.cat([t.double(), tt.double()[:, None]], 1) / T, 1)
    q, p = log_q.exp(), log_p.exp()
    if loss == "forward":
        closed = T * (q - p)
    else:
        a = log_q - (log_p if loss == "reverse" else torch.log(beta * p + (1 - beta) * q))
        closed = T * (1.0 if loss == "reverse" else 1 - beta) * q * (a - (q * a).sum(1, keepdim=True))
    assert_close(torch.cat([dx, dxt[:, None]], 1), closed, 1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_reference_bfloat16_student(loss):
    """A bfloat16 student: computed in float32, gradients in bfloat16, within bfloat16's rounding of float64."""
    x, xt, t, tt, mask, g = make(12, 30, seed=2, dtype=torch.bfloat16)
    got = run(kd_loss_reference, x, xt, t, tt, mask, 2.0, g, loss)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16 and got[0].dtype == torch.float32
    assert_all_close(got, oracle(x, xt, t, tt, mask, 2.0, g, loss), 1e-2)


# --------------------------------------------------------------------------- (b) the kernel against the reference


@needs_triton
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    "N,K,blocks",
    [(1, 1, {}), (7, 3, {}), (33, 50, {}), (7, 129, {}), (33, 129, {"block_n": 4, "block_k": 16}), (7, 1500, {}),
     (1, 1025, {})],
    ids=["N1-K1", "N7-K3", "N33-K50", "N7-K129", "N33-K129-looped", "N7-K1500-looped", "N1-K1025-looped"],
)
def test_triton_matches_the_reference(loss, N, K, blocks):
    """Odd sizes, one tile and several (K beyond the 1024-column tile or a forced small one, ragged last tile): loss
    and gradients within 1e-5 of the reference and of float64."""
    x, xt, t, tt, mask, g = make(N, K, seed=N * K)
    got = run(kd_loss_triton, x, xt, t, tt, mask, 2.0, g, loss, 0.3, **blocks)
    assert_all_close(got, run(kd_loss_reference, x, xt, t, tt, mask, 2.0, g, loss, 0.3), 1e-5)
    assert_all_close(got, oracle(x, xt, t, tt, mask, 2.0, g, loss, 0.3), 1e-5)


@needs_triton
@pytest.mark.parametrize("T", [0.5, 3.0])
def test_triton_temperatures(T):
    """Temperatures below and above 1, each loss."""
    x, xt, t, tt, mask, g = make(5, 33, seed=3)
    for loss in LOSSES:
        assert_all_close(run(kd_loss_triton, x, xt, t, tt, mask, T, g, loss),
                         run(kd_loss_reference, x, xt, t, tt, mask, T, g, loss), 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", LOSSES)
def test_masked_rows_hold_garbage_and_give_zero(impl, loss):
    """Masked rows, with NaN and inf in every input and the upstream gradient, give loss 0 and gradients exactly 0;
    the other rows are unaffected."""
    x, xt, t, tt, mask, g = make(9, 12, seed=4)
    mask = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0, 1], dtype=torch.bool)
    x[1, 3], xt[3], t[4], tt[7], g[1] = NAN, INF, NAN, -INF, NAN
    x[7], t[3, 0] = INF, INF
    out, dx, dxt = run(impl, x, xt, t, tt, mask, 2.0, g, loss)
    assert torch.all(out[~mask] == 0) and torch.all(dx[~mask] == 0) and torch.all(dxt[~mask] == 0)
    live = mask
    want = oracle(x[live], xt[live], t[live], tt[live], torch.ones(int(live.sum())), 2.0, g[live], loss)
    assert_all_close((out[live], dx[live], dxt[live]), want, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", LOSSES)
def test_all_masked_and_none_masked(impl, loss):
    """No row masked: the float64 values. Every row masked: loss and gradients exactly 0."""
    x, xt, t, tt, _, g = make(7, 10, seed=5)
    every = torch.ones(7, dtype=torch.bool)
    assert_all_close(run(impl, x, xt, t, tt, every, 1.0, g, loss), oracle(x, xt, t, tt, every, 1.0, g, loss), 1e-5)
    out, dx, dxt = run(impl, x, xt, t, tt, ~every, 1.0, g, loss)
    assert torch.equal(out, torch.zeros(7)) and torch.equal(dx, torch.zeros_like(x))
    assert torch.equal(dxt, torch.zeros(7))


def _extreme_case():
    """Rows with +-1e4 student spreads, a teacher tail of -1e4 and -80, a student tail dominating by 1e4, a teacher
    with a +-1e4 spread, and both tails dominating: finite in float32 with max-shifting, overflowing without."""
    gen = torch.Generator().manual_seed(6)
    K = 6
    x = torch.randn(6, K, generator=gen)
    xt = torch.randn(6, generator=gen)
    teacher = torch.log_softmax(torch.randn(6, K, generator=gen) * 2, dim=1)
    tt = torch.full((6,), -3.0)
    x[0] = torch.tensor([1e4, -1e4, 0.0, 5e3, -5e3, 1.0])
    tt[1] = -1e4
    tt[2] = -80.0
    xt[3] = 1e4
    teacher[4] = torch.tensor([0.0, -1e4, -1e4, -2.0, -5e3, -1.0])
    x[5], xt[5], tt[5] = x[5] - 3e3, 3e3, 0.0
    return x, xt, teacher, tt


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("T", [0.5, 2.0])
def test_extreme_logits_stay_finite(impl, loss, T):
    """The extreme rows: every loss and gradient finite and, row by row, within 1e-4 of float64."""
    x, xt, t, tt = _extreme_case()
    mask, g = torch.ones(6, dtype=torch.bool), torch.ones(6)
    got = run(impl, x, xt, t, tt, mask, T, g, loss)
    want = oracle(x, xt, t, tt, mask, T, g, loss)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all(), a
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-4), (a, b)


@needs_triton
@pytest.mark.parametrize("loss", LOSSES)
def test_triton_bfloat16_student(loss):
    """A bfloat16 student (and a float32 tail, a dtype of its own): float32 loss equal to the reference's, gradients
    in each input's dtype within bfloat16 rounding."""
    x, xt, t, tt, mask, g = make(7, 50, seed=7, dtype=torch.bfloat16)
    for tail in (xt, xt.float()):
        got = run(kd_loss_triton, x, tail, t, tt, mask, 2.0, g, loss)
        want = run(kd_loss_reference, x, tail, t, tt, mask, 2.0, g, loss)
        assert got[1].dtype == torch.bfloat16 and got[2].dtype == tail.dtype
        assert_close(got[0], want[0], 1e-5)
        assert_close(got[1], want[1], 1e-2)
        assert_close(got[2], want[2], 1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_noncontiguous_inputs(impl):
    """A transposed student, a strided teacher slice, strided tails and mask: the contiguous inputs' values."""
    N, K = 7, 30
    x, xt, t, tt, mask, g = make(N, K, seed=8)
    xs = x.t().contiguous().t()  # stride (1, N)
    ts = torch.zeros(N, 2 * K + 1).index_copy_(1, torch.arange(1, 2 * K + 1, 2), t)[:, 1::2]
    xts, tts, masks = (torch.stack([v, v], 1)[:, 1] for v in (xt, tt, mask))
    assert not any(v.is_contiguous() for v in (xs, ts, xts, tts, masks))
    for loss in LOSSES:
        got = run(impl, xs, xts, ts, tts, masks, 2.0, g, loss)
        assert_all_close(got, oracle(x, xt, t, tt, mask, 2.0, g, loss), 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dims_and_empty_batch(impl):
    """[B, L, K] inputs give a [B, L] loss equal to the flattened call; N = 0 gives empty loss and gradients."""
    x, xt, t, tt, mask, _ = make(12, 5, seed=9)
    out = impl(x.view(3, 4, 5), xt.view(3, 4), t.view(3, 4, 5), tt.view(3, 4), mask.view(3, 4), 2.0, loss="jsd")
    assert out.shape == (3, 4)
    assert torch.equal(out.reshape(-1), impl(x, xt, t, tt, mask, 2.0, loss="jsd"))
    out, dx, dxt = run(impl, x[:0], xt[:0], t[:0], tt[:0], mask[:0], 2.0, torch.zeros(0), "reverse")
    assert out.shape == (0,) and dx.shape == (0, 5) and dxt.shape == (0,)


@pytest.mark.parametrize("impl", IMPLS)
def test_inputs_unmodified_and_teacher_gets_no_gradient(impl):
    """Inputs keep their values, the gradients are fresh buffers, and only the student receives a gradient; a tail
    that needs no gradient gets none."""
    x, xt, t, tt, mask, g = make(5, 21, seed=10, dtype=torch.float16)
    before = [v.clone() for v in (x, xt, t, tt, mask)]
    xx, xxt = x.clone().requires_grad_(True), xt.clone().requires_grad_(True)
    tg, ttg = t.clone().requires_grad_(True), tt.clone().requires_grad_(True)
    (impl(xx, xxt, tg, ttg, mask, 2.0, loss="reverse") * g).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, (xx.detach(), xxt.detach(), tg.detach(), ttg.detach(), mask)))
    assert xx.grad.data_ptr() != xx.data_ptr() and xx.grad.dtype == torch.float16
    assert tg.grad is None and ttg.grad is None
    xx.grad = None
    impl(xx, xt, t, tt, mask, 2.0).sum().backward()
    assert xx.grad is not None


@needs_triton
def test_triton_saves_only_row_statistics():
    """Backward recomputes from the inputs and per-row statistics: besides the inputs, nothing bigger than [5, N]."""
    N, K = 13, 64
    x, xt, t, tt, mask, _ = make(N, K, seed=11, dtype=torch.bfloat16)
    xx = x.clone().requires_grad_(True)
    saved = []

    def pack(v):
        saved.append(v)
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        out = KDLossFunction.apply(xx, xt, t, tt, mask, 2.0, "jsd", 0.5)
    inputs = {v.untyped_storage().data_ptr() for v in (xx, xt, t, tt, mask)}
    extra = [v for v in saved if v.untyped_storage().data_ptr() not in inputs]
    assert sum(v.numel() for v in extra) <= 5 * N
    out.sum().backward()
    assert xx.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------- (c) limits


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", LOSSES)
def test_student_equal_to_teacher_gives_zero(impl, loss):
    """Student logits equal to the teacher's log-probs (tail included): every divergence 0 and gradient 0, at two
    temperatures and over the looped column path."""
    for K in (9, 1100):
        _, _, t, tt, mask, g = make(3, K, seed=K)
        for T in (1.0, 2.0):
            out, dx, dxt = run(impl, t.clone(), tt.clone(), t, tt, mask, T, g, loss)
            assert out.abs().max().item() <= 1e-6 and dx.abs().max().item() <= 1e-6 and dxt.abs().max().item() <= 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_jsd_is_symmetric_at_half(impl):
    """At beta = 0.5 the JSD does not depend on which distribution is the teacher; at 0.2 it does."""
    x, xt, t, tt, mask, _ = make(6, 14, seed=12)
    for T in (1.0, 2.0):
        ab = impl(x, xt, t, tt, mask, T, loss="jsd", beta=0.5)
        ba = impl(t, tt, x, xt, mask, T, loss="jsd", beta=0.5)
        assert_close(ab, ba, 1e-6)
    skewed = impl(x, xt, t, tt, mask, 1.0, loss="jsd", beta=0.2)
    assert not torch.allclose(skewed, impl(t, tt, x, xt, mask, 1.0, loss="jsd", beta=0.2), rtol=1e-3)


# --------------------------------------------------------------------------- (d) validation and dispatch


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case,match",
    [
        ("teacher_shape", "teacher_logprobs shape"),
        ("student_tail_shape", "student_tail must have the leading shape"),
        ("teacher_tail_shape", "teacher_tail must have the leading shape"),
        ("mask_shape", "mask must have the leading shape"),
        ("student_1d", "student_logits must be"),
        ("empty_k", "K .* is empty"),
        ("int_student", "student_logits must be float32, float16 or bfloat16"),
        ("float64_tail", "student_tail must be float32, float16 or bfloat16"),
        ("bf16_teacher", "teacher_logprobs must be float32"),
        ("not_a_tensor", "teacher_tail must be a torch.Tensor"),
        ("devices", "all inputs must be on one device"),
        ("temperature_zero", "temperature must be finite and > 0"),
        ("temperature_inf", "temperature must be finite"),
        ("temperature_tensor", "temperature must be a Python number"),
        ("beta_one", r"beta must be in \(0, 1\)"),
        ("beta_zero", r"beta must be in \(0, 1\)"),
        ("loss_name", "loss must be one of 'forward', 'reverse', 'jsd'"),
        ("teacher_nan", "must be finite on unmasked rows"),
        ("teacher_tail_inf", "must be finite on unmasked rows"),
    ],
)
def test_validation_errors(impl, case, match):
    """Inconsistent inputs are refused with a message naming the culprit, by both paths alike."""
    x, xt, t, tt, mask, _ = make(4, 6, seed=13)
    args = {"student_logits": x, "student_tail": xt, "teacher_logprobs": t, "teacher_tail": tt, "mask": mask,
            "temperature": 2.0}
    kw = {}
    if case == "teacher_shape":
        args["teacher_logprobs"] = t[:, :5]
    elif case == "student_tail_shape":
        args["student_tail"] = xt[:3]
    elif case == "teacher_tail_shape":
        args["teacher_tail"] = tt[:, None]
    elif case == "mask_shape":
        args["mask"] = torch.ones(5, dtype=torch.bool)
    elif case == "student_1d":
        args.update(student_logits=x[0], teacher_logprobs=t[0])
    elif case == "empty_k":
        args.update(student_logits=x[:, :0], teacher_logprobs=t[:, :0])
    elif case == "int_student":
        args["student_logits"] = x.long()
    elif case == "float64_tail":
        args["student_tail"] = xt.double()
    elif case == "bf16_teacher":
        args["teacher_logprobs"] = t.bfloat16()
    elif case == "not_a_tensor":
        args["teacher_tail"] = tt.tolist()
    elif case == "devices":
        args["teacher_tail"] = tt.to("meta")
    elif case == "temperature_zero":
        args["temperature"] = 0.0
    elif case == "temperature_inf":
        args["temperature"] = INF
    elif case == "temperature_tensor":
        args["temperature"] = torch.tensor(2.0)
    elif case == "beta_one":
        kw = {"loss": "jsd", "beta": 1.0}
    elif case == "beta_zero":
        kw = {"loss": "jsd", "beta": 0.0}
    elif case == "loss_name":
        kw = {"loss": "kl"}
    elif case == "teacher_nan":
        args["teacher_logprobs"] = t.clone().index_put_((torch.tensor(0), torch.tensor(2)), torch.tensor(NAN))
    elif case == "teacher_tail_inf":
        args["teacher_tail"] = tt.clone().index_put_((torch.tensor(0),), torch.tensor(-INF))
    with pytest.raises(ValueError, match=match):
        impl(**args, **kw)


@needs_triton
def test_triton_block_sizes_must_be_powers_of_two():
    """The tile overrides name themselves when they are not powers of two."""
    x, xt, t, tt, mask, _ = make(4, 6, seed=14)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        kd_loss_triton(x, xt, t, tt, mask, block_k=24)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        kd_loss_triton(x, xt, t, tt, mask, block_n=0)


def test_cpu_tensors_take_the_reference():
    """`kd_loss` on CPU tensors is the PyTorch reference, bit for bit, loss and gradients."""
    x, xt, t, tt, mask, g = make(5, 11, seed=15)
    for loss in LOSSES:
        a, b = run(kd_loss, x, xt, t, tt, mask, 2.0, g, loss), run(kd_loss_reference, x, xt, t, tt, mask, 2.0, g, loss)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


# --------------------------------------------------------------------------- CUDA only


@needs_cuda
@pytest.mark.parametrize("K", [50, 512, 4096])
@pytest.mark.parametrize("loss", LOSSES)
def test_triton_cuda_matches_float64(K, loss):
    """The compiled kernel on a GPU, float32 and bfloat16 students, against the float64 transcription."""
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x, xt, t, tt, mask, g = make(1023, K, seed=K, dtype=dtype)
        got = run(kd_loss, *(v.cuda() for v in (x, xt, t, tt, mask)), 2.0, g.cuda(), loss, 0.3)
        assert_all_close([v.cpu() for v in got], oracle(x, xt, t, tt, mask, 2.0, g, loss, 0.3), rtol)


@needs_cuda
def test_triton_cuda_no_host_sync():
    """Forward and backward of every loss run without synchronising the host."""
    x, xt, t, tt, mask, g = (v.cuda() for v in make(513, 50, seed=16, dtype=torch.bfloat16))
    x, xt = x.requires_grad_(True), xt.requires_grad_(True)
    for loss in LOSSES:
        kd_loss(x, xt, t, tt, mask, 2.0, loss=loss)  # warm up (compilation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for loss in LOSSES:
            kd_loss(x, xt, t, tt, mask, 2.0, loss=loss).backward(g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all() and torch.isfinite(xt.grad).all()
