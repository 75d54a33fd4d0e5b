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

Triton is optional; without it everything except `masked_kl_triton` works.
"""

from .masked_kl import HAS_TRITON, MaskedKLFunction, masked_kl, masked_kl_triton
from .reference import masked_kl_reference

__all__ = [
    "HAS_TRITON",
    "MaskedKLFunction",
    "masked_kl",
    "masked_kl_reference",
    "masked_kl_triton",
]
