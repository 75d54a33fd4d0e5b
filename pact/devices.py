"""Where a model computes and in which dtype: `auto|cpu|cuda[:N]` to a torch device, `auto|bfloat16|float16|float32`
to the weight dtype, shared by every command that loads a model and by the distributed helpers.
"""

from __future__ import annotations

import torch

from pact.errors import PactError

DTYPES = ("auto", "bfloat16", "float16", "float32")  # the choices of every `--dtype` that sets a model's weight dtype


def resolve_device(device: str = "auto") -> torch.device:
    """Map `auto|cpu|cuda[:N]` to a torch device; `auto` prefers CUDA."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PactError(f"--device {device} was requested but CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str = "auto", device: torch.device | None = None, quantized: bool = False) -> torch.dtype:
    """Map `auto|float32|bfloat16|float16` to a torch dtype for a model's weights.

    `auto` is bfloat16 on a GPU that supports it, float16 on an older GPU and
    float32 on CPU (half-precision matmuls there are slow and gain nothing),
    except that a `quantized` (bitsandbytes) model computes in bfloat16 on CPU
    too, as QLoRA does (bitsandbytes' fused CPU kernels are bfloat16 ones).
    """
    if dtype == "auto":
        device = device or resolve_device("auto")
        if device.type != "cuda":
            return torch.bfloat16 if quantized else torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise PactError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return names[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a torch dtype as the `--dtype` flags spell it (`torch.bfloat16` -> `bfloat16`)."""
    return str(dtype).removeprefix("torch.")
