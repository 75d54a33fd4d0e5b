"""Kernels for PACT, installed as `pact.kernels`: tensors in, tensors out.

This package is a leaf: it imports nothing from `pact` or `pact.cache_tools`.

* `masked_kl` -- per-position KL between the re-weighted target distribution
  and the student on the safety-token columns (docs/objective.md section 2),
  optionally with one more category for the rest of the vocabulary (section 5):
  Triton forward/backward kernels on CUDA, plain PyTorch on CPU.
* `masked_kl_triton` -- the same, always through the Triton kernels (CPU
  tensors work under ``TRITON_INTERPRET=1``, which tests use).
* `masked_kl_reference` -- the plain-PyTorch implementation: the CPU path and
  the oracle the kernel is tested against.
* `MaskedKLFunction` -- the `torch.autograd.Function` around the kernels.
* `kd_loss` -- per-position distillation loss (forward KL, reverse KL or
  Jensen-Shannon) between a teacher's top-K log-probs plus its remaining
  mass and the student's logits on the same K ids plus the logsumexp of the
  rest: Triton forward/backward kernels on CUDA, plain PyTorch on CPU.
* `kd_loss_triton` -- the same, always through the Triton kernels.
* `kd_loss_reference` -- the plain-PyTorch implementation: the CPU path and
  the oracle the kernel is tested against.
* `KDLossFunction` -- the `torch.autograd.Function` around those kernels.

Triton is optional; without it everything except `masked_kl_triton` and `kd_loss_triton` works.
"""

from .kd_loss import KDLossFunction, kd_loss, kd_loss_triton
from .kd_reference import kd_loss_reference
from .masked_kl import HAS_TRITON, MaskedKLFunction, masked_kl, masked_kl_triton
from .reference import masked_kl_reference

__all__ = [
    "HAS_TRITON",
    "KDLossFunction",
    "MaskedKLFunction",
    "kd_loss",
    "kd_loss_reference",
    "kd_loss_triton",
    "masked_kl",
    "masked_kl_reference",
    "masked_kl_triton",
]
