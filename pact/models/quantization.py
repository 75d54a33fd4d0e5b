"""Quantised bases (QLoRA) through bitsandbytes: the loading configuration, the check that bitsandbytes can run on
this machine, and the dense weight of a quantised linear layer (for the LM-head rows the objective reads directly).

Only `pact train --load-in-4bit` / `--load-in-8bit` and `load_model(quantization=...)` import bitsandbytes; every
other path leaves it alone (importing it takes seconds).
"""

from __future__ import annotations

import torch

from pact.errors import InvalidSetting, PactError

QUANTIZATIONS = ("4bit", "8bit")
MIN_BITSANDBYTES = "0.50.2"  # the release verified with this project (keep in step with the `qlora` extra in pyproject.toml)
INSTALL = f"pip install 'bitsandbytes>={MIN_BITSANDBYTES}'"  # what the extra installs; pact-cache is on no index
# Bounds of a round trip of values in [-1, 1]: NF4 is off by up to half its widest gap, (1 - 0.723) / 2 = 0.139, plus the
# error of the double-quantised block scale (0.147 measured); LLM.int8() by half a step of the row absmax / 127.
NF4_TOLERANCE = 0.2
INT8_TOLERANCE = 1 / 127


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    """transformers' `BitsAndBytesConfig` for `quantization`: `4bit` is QLoRA's NF4 with double quantisation, computing
    in `compute_dtype`; `8bit` is LLM.int8(). transformers leaves the LM head (and tied embeddings) unquantised."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise InvalidSetting("quantization", f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")


def require_bitsandbytes(quantization: str, device: torch.device, setting: str) -> None:
    """Refuse `quantization` on `device` unless bitsandbytes (>= MIN_BITSANDBYTES) is installed and really quantises
    there: one small round trip must come back within the format's error. `InvalidSetting(setting, ...)` says which of
    these failed, so a machine without a GPU or a CPU backend gets a plain answer instead of a kernel error mid-load."""
    from packaging.version import Version

    try:
        import bitsandbytes
    except ModuleNotFoundError as err:
        if err.name != "bitsandbytes":
            raise InvalidSetting(setting, f"{setting} needs bitsandbytes, which is installed but cannot be imported ({err})") from err
        raise InvalidSetting(setting, f"{setting} needs bitsandbytes>={MIN_BITSANDBYTES}, which is not installed; "
                                      f"install it with: {INSTALL}") from err
    except Exception as err:  # noqa: BLE001 - a broken native library raises whatever its loader raises
        raise InvalidSetting(setting, f"{setting} needs bitsandbytes, which is installed but cannot be imported "
                                      f"({type(err).__name__}: {err})") from err
    version = bitsandbytes.__version__
    if Version(version) < Version(MIN_BITSANDBYTES):
        raise InvalidSetting(setting, f"{setting} needs bitsandbytes>={MIN_BITSANDBYTES}, but {version} is installed; "
                                      f"upgrade it with: pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'")
    machine = "this machine's CUDA GPU" if device.type == "cuda" else "this machine: no CUDA GPU and no CPU support"
    try:
        error = _round_trip_error(quantization, device)
    except Exception as err:  # noqa: BLE001 - a missing kernel surfaces as NotImplementedError, RuntimeError, ...
        raise InvalidSetting(setting, f"{setting} cannot run here: bitsandbytes {version} is installed but has no backend for "
                                      f"{machine} ({type(err).__name__}: {err}); train on a CUDA GPU, or drop {setting}") from err
    limit = NF4_TOLERANCE if quantization == "4bit" else INT8_TOLERANCE
    if not error <= limit:
        raise InvalidSetting(setting, f"{setting} cannot run here: bitsandbytes {version} quantises wrongly on {device.type} "
                                      f"(a test round trip is off by {error:.3g}, more than {limit:.3g}); train on a CUDA GPU, "
                                      f"or drop {setting}")


def _round_trip_error(quantization: str, device: torch.device) -> float:
    """The largest error of a `quantization` round trip of 128 values in [-1, 1] on `device` (bitsandbytes' own kernels)."""
    import bitsandbytes.functional as bnb

    sample = torch.linspace(-1, 1, 128, device=device).reshape(2, 64)
    if quantization == "4bit":
        packed, state = bnb.quantize_4bit(sample.bfloat16(), quant_type="nf4", compress_statistics=True)
        restored = bnb.dequantize_4bit(packed, state)
    else:
        packed, scales, _ = bnb.int8_vectorwise_quant(sample.half())
        restored = bnb.int8_vectorwise_dequant(packed, scales)
    return float((restored.float() - sample).abs().max())


def guard_cpu_layers(model: torch.nn.Module, device: torch.device) -> None:
    """Keep a 4-bit model that bitsandbytes (0.50) loaded on CPU correct and trainable, or refuse it.

    On a CPU with AVX512-BF16, a 4-bit layer's first forward in eval mode without gradient repacks its weight in place
    into an inference-only layout, after which the layer passes no gradient back (the LoRA adapters below it stop
    learning, silently) and its codes no longer dequantise as 4-bit NF4; so that repacking is switched off here. The CPU
    backend also dequantises a weight wrongly when its rows are not a whole number of quantisation blocks (64 values),
    which no real model has but a toy one may: such a layer is refused, naming it.
    """
    if device.type != "cpu":
        return
    for name, layer in model.named_modules():
        state = getattr(getattr(layer, "weight", None), "quant_state", None)
        if state is None:
            continue
        layer.support_avx512bf16_for_cpu = False
        if state.shape[-1] % state.blocksize:
            raise PactError(f"cannot quantise {name} to 4 bits on CPU: its rows of {state.shape[-1]} values are not a whole "
                            f"number of blocks of {state.blocksize}, which bitsandbytes' CPU backend dequantises wrongly; "
                            "quantise this model on a CUDA GPU")


def dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The weight [out, in] of linear `layer` as a plain tensor, dequantised when bitsandbytes quantised it.

    A 4-bit weight is packed bytes ([out * in / 2, 1] uint8) and an 8-bit one is int8 with a scale per row, so
    indexing rows of `layer.weight` would read codes, not weights. Returned: the 4-bit weight in the dtype it was
    quantised from (bitsandbytes' own dequantisation, as its forward uses), the 8-bit one in float32 (codes times
    row scale / 127), any other weight as it is (no copy).
    """
    weight = layer.weight
    kind = type(weight).__name__
    if kind not in ("Params4bit", "Int8Params"):
        return weight
    import bitsandbytes.functional as bnb

    if kind == "Params4bit":
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            raise PactError("this 4-bit weight was repacked by bitsandbytes for CPU inference, a layout its rows cannot "
                            "be read from; load the model with pact.models.loading.load_model(..., quantization='4bit'), which "
                            "keeps the plain one")
        return bnb.dequantize_4bit(weight.data, weight.quant_state)
    scales = weight.SCB if weight.SCB is not None else layer.state.SCB  # the layer's first forward moves them to its state
    return bnb.int8_vectorwise_dequant(weight.data, scales)


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether a model (or the model under a peft wrapper) holds quantised weights: loaded through a transformers
    quantiser, or marked `is_loaded_in_4bit`/`is_loaded_in_8bit` as peft checks (the planner's packed stand-ins are)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    marked = getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
    return bool(marked) or getattr(base, "hf_quantizer", None) is not None
