"""Input validation shared by the masked-KL kernel and its PyTorch reference.

Kept in its own module so that `reference.py` (the CPU path) never needs to
import Triton, and both paths reject bad inputs with the same messages.
"""

from __future__ import annotations

import math

import torch
from torch.utils.weak import WeakIdKeyDictionary

#: Logit dtypes both paths accept. Arithmetic is always float32 internally.
SUPPORTED_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: CPU weight tensors whose values passed the check, with their version counter at that time.
_VALIDATED_WEIGHTS = WeakIdKeyDictionary()


def check_masked_kl_inputs(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    student_rest: torch.Tensor | None = None,
    target_rest: torch.Tensor | None = None,
) -> None:
    """Raise `ValueError` with a clear message if the masked-KL inputs are inconsistent.

    Shapes: `student_logits` and `target_logits` are `[..., S]` (at least 2-D),
    `weights` is `[S]`, `mask` has the leading shape `[...]` of the logits.
    All four live on one device.

    The value check on `weights` (finite, non-negative, at least one positive)
    reads the data, so it runs only for CPU tensors; on CUDA it would force a
    host synchronisation on every training step. A CPU weight tensor is read
    once: it is remembered (by identity, while alive) with its version counter,
    which any in-place change bumps, so a training loop that passes the same
    weights every step reads them on its first step only. On CUDA, weights <= 0 simply
    drop their column from the target, and an all-zero weight vector makes every
    row a zero-mass row (loss 0, gradient 0).

    `student_rest` and `target_rest`, the rest category's logits, come both or
    neither, each with the leading shape `[...]`, in a logit dtype.
    """
    if (student_rest is None) != (target_rest is None):
        raise ValueError("student_rest and target_rest come together: give both (the rest category) or neither")
    tensors = {
        "student_logits": student_logits,
        "target_logits": target_logits,
        "weights": weights,
        "mask": mask,
    }
    if student_rest is not None:
        tensors.update(student_rest=student_rest, target_rest=target_rest)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if student_logits.dim() < 2:
        raise ValueError(
            f"student_logits must be [N, S] (or [..., S]), got shape {tuple(student_logits.shape)}"
        )
    if target_logits.shape != student_logits.shape:
        raise ValueError(
            f"target_logits shape {tuple(target_logits.shape)} does not match "
            f"student_logits shape {tuple(student_logits.shape)}"
        )
    S = student_logits.shape[-1]
    if S == 0:
        raise ValueError("the safety-token dimension S (last dim of the logits) is empty")
    if weights.dim() != 1 or weights.shape[0] != S:
        raise ValueError(
            f"weights must be 1-D of length S={S} (the last dim of the logits), "
            f"got shape {tuple(weights.shape)}"
        )
    lead = tuple(student_logits.shape[:-1])
    if tuple(mask.shape) != lead:
        raise ValueError(
            f"mask must have the leading shape {lead} of the logits, got {tuple(mask.shape)}"
        )
    for name in ("student_rest", "target_rest"):
        if name in tensors and tuple(tensors[name].shape) != lead:
            raise ValueError(f"{name} must have the leading shape {lead} of the logits, got {tuple(tensors[name].shape)}")
    for name in ("student_logits", "target_logits", "student_rest", "target_rest"):
        if name in tensors and tensors[name].dtype not in SUPPORTED_LOGIT_DTYPES:
            raise ValueError(
                f"{name} must be float32, float16 or bfloat16, got {tensors[name].dtype}"
            )
    if not weights.dtype.is_floating_point:
        raise ValueError(f"weights must be a floating-point tensor, got {weights.dtype}")
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be bool (or 0/1 numbers), got {mask.dtype}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        where = ", ".join(f"{n}: {t.device}" for n, t in tensors.items())
        raise ValueError(f"all inputs must be on one device ({where})")
    if isinstance(temperature, torch.Tensor):
        raise ValueError("temperature must be a Python number, not a tensor")
    try:
        t_val = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number, got {temperature!r}") from None
    if not (math.isfinite(t_val) and t_val > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    if weights.device.type == "cpu" and _VALIDATED_WEIGHTS.get(weights) != weights._version:
        w = weights.detach()
        if not bool(torch.isfinite(w).all()):
            raise ValueError("weights must be finite")
        if bool((w < 0).any()):
            raise ValueError("weights must be >= 0 (PACT uses w = max(v, 0))")
        if not bool((w > 0).any()):
            raise ValueError("weights must have at least one positive entry")
        _VALIDATED_WEIGHTS[weights] = weights._version
