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
    _require_tensors(tensors)
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
    _check_mask_and_devices(tensors)
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


#: The divergences `kd_loss` computes, by the name its `loss` argument takes.
KD_LOSSES = ("forward", "reverse", "jsd")


def check_kd_loss_inputs(
    student_logits: torch.Tensor,
    student_tail: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    loss: str,
    beta: float,
) -> None:
    """Raise `ValueError` with a clear message if the top-K distillation inputs are inconsistent.

    Shapes: `student_logits` and `teacher_logprobs` are `[..., K]` (at least
    2-D, K >= 1); `student_tail`, `teacher_tail` and `mask` have the leading
    shape `[...]`. The student tensors are float32, float16 or bfloat16, the
    teacher tensors float32 (the cache stores them so), the mask bool (or 0/1
    numbers); all five on one device. `temperature` is a finite number > 0,
    `loss` one of `KD_LOSSES` and `beta` a number strictly between 0 and 1.

    The teacher must be finite on unmasked rows. That check reads the data,
    so it runs only for CPU tensors (where it costs one pass next to the
    several the computation makes); on CUDA it would force a host
    synchronisation on every step, and a non-finite teacher value on an
    unmasked row propagates into that row's loss instead.
    """
    tensors = {
        "student_logits": student_logits,
        "student_tail": student_tail,
        "teacher_logprobs": teacher_logprobs,
        "teacher_tail": teacher_tail,
        "mask": mask,
    }
    _require_tensors(tensors)
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits must be [N, K] (or [..., K]), got shape {tuple(student_logits.shape)}")
    if student_logits.shape[-1] == 0:
        raise ValueError("the top-K dimension K (last dim of student_logits) is empty")
    if teacher_logprobs.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logprobs shape {tuple(teacher_logprobs.shape)} does not match "
            f"student_logits shape {tuple(student_logits.shape)}"
        )
    lead = tuple(student_logits.shape[:-1])
    for name in ("student_tail", "teacher_tail", "mask"):
        if tuple(tensors[name].shape) != lead:
            raise ValueError(
                f"{name} must have the leading shape {lead} of the logits, got {tuple(tensors[name].shape)}"
            )
    for name in ("student_logits", "student_tail"):
        if tensors[name].dtype not in SUPPORTED_LOGIT_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {tensors[name].dtype}")
    for name in ("teacher_logprobs", "teacher_tail"):
        if tensors[name].dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {tensors[name].dtype}")
    _check_mask_and_devices(tensors)
    if not _finite_number("temperature", temperature) > 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    if not 0.0 < _finite_number("beta", beta) < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")
    if loss not in KD_LOSSES:
        raise ValueError(f"loss must be one of {', '.join(map(repr, KD_LOSSES))}, got {loss!r}")
    if student_logits.device.type == "cpu":
        rows = mask.detach() != 0
        if not (bool(torch.isfinite(teacher_logprobs.detach()[rows]).all())
                and bool(torch.isfinite(teacher_tail.detach()[rows]).all())):
            raise ValueError("teacher_logprobs and teacher_tail must be finite on unmasked rows")


def _require_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """`ValueError` naming the first input (by name) that is not a tensor."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_mask_and_devices(tensors: dict[str, torch.Tensor]) -> None:
    """`ValueError` for a complex `mask` among `tensors`, or inputs on more than one device (each named)."""
    if tensors["mask"].dtype.is_complex:
        raise ValueError(f"mask must be bool (or 0/1 numbers), got {tensors['mask'].dtype}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        where = ", ".join(f"{n}: {t.device}" for n, t in tensors.items())
        raise ValueError(f"all inputs must be on one device ({where})")


def _finite_number(name: str, value) -> float:
    """`value` as a float if it is a finite Python number (a tensor would sync the host); else `ValueError`."""
    if isinstance(value, (torch.Tensor, bool)):
        raise ValueError(f"{name} must be a Python number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number
