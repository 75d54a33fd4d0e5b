"""Quantised linear layers as bitsandbytes stores them, on meta tensors, for `pact plan`.

`pact train --load-in-4bit` loads the frozen base through bitsandbytes: every
linear layer of the decoder (transformers leaves the LM head alone) becomes
NF4 with double quantisation (QLoRA's format) or LLM.int8(). bitsandbytes
cannot run on meta tensors, so `PackedLinear` stands in for its layers when
a step is planned: it holds exactly the tensors bitsandbytes keeps (`packed_sizes`)
and, in the step, does what bitsandbytes' matmuls do to memory:

* 4-bit (`MatMul4Bit`): the forward dequantises the weight into a transient
  [out, in] tensor of the compute dtype, multiplies, and drops it; nothing of
  the input is saved; the backward dequantises again for the input's gradient.
* 8-bit (`MatMul8bitLt`): the backward does the same; its forward quantises
  the input to int8 instead of dequantising the weight, a transient of about
  the same size (documented approximation: the stand-in dequantises there too).

The stand-in computes nothing real: it exists only on meta tensors.
"""

from __future__ import annotations

import torch

NF4_BLOCK = 64  # weights per absmax in bitsandbytes' 4-bit blocks
NESTED_BLOCK = 256  # absmaxes per float32 scale under double quantisation (`compress_statistics`)
QUANTIZATIONS = {"4bit": 4, "8bit": 8}


def packed_sizes(out_features: int, in_features: int, bits: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors bitsandbytes keeps for one [out, in] weight, by name: shape and dtype.

    4-bit NF4 with double quantisation: two weights per byte, a uint8
    absmax per 64-weight block, a float32 scale per 256 of those, the offset,
    the 16-entry NF4 code and the 256-entry code of the nested quantisation.
    8-bit LLM.int8(): one int8 per weight and a float32 scale per output row.
    """
    count = out_features * in_features
    if bits == 4:
        blocks = -(-count // NF4_BLOCK)
        return {"weight": (((count + 1) // 2, 1), torch.uint8), "absmax": ((blocks,), torch.uint8),
                "nested_absmax": ((-(-blocks // NESTED_BLOCK),), torch.float32), "offset": ((), torch.float32),
                "code": ((16,), torch.float32), "nested_code": ((256,), torch.float32)}
    if bits == 8:
        return {"weight": ((out_features, in_features), torch.int8), "row_scales": ((out_features,), torch.float32)}
    raise ValueError(f"bits must be 4 or 8, got {bits}")


class _DequantizingMatmul(torch.autograd.Function):
    """`x @ W.T` with W dequantised into a transient tensor in the forward and again in the backward (bitsandbytes'
    matmuls), so no dense weight outlives the call and nothing of `x` is saved."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        ctx.has_bias = bias is not None and bias.requires_grad
        return torch.nn.functional.linear(x, layer.dequantized(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad @ ctx.layer.dequantized(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.sum(tuple(range(grad.dim() - 1))) if ctx.has_bias else None
        return grad_x, None, grad_bias


class PackedLinear(torch.nn.Linear):
    """A frozen linear layer held as bitsandbytes holds it after quantising (`bits` 4 or 8), on meta tensors.

    A subclass of `torch.nn.Linear`, so peft wraps it with a LoRA layer as it
    wraps bitsandbytes' layers; the packed weight is uint8/int8, so peft's
    k-bit preparation leaves it as it is and casts the bias, as it does there.
    """

    def __init__(self, layer: torch.nn.Linear, bits: int, compute_dtype: torch.dtype):
        if layer.weight.device.type != "meta":
            raise ValueError("PackedLinear is a planning stand-in for bitsandbytes' layers and holds no data: meta tensors only")
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits, self.compute_dtype = bits, compute_dtype
        for name, (shape, dtype) in packed_sizes(self.out_features, self.in_features, bits).items():
            tensor = torch.empty(shape, dtype=dtype, device="meta")
            if name == "weight":
                self.weight = torch.nn.Parameter(tensor, requires_grad=False)
            else:
                self.register_buffer(name, tensor)
        self.bias = layer.bias

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense [out, in] weight the matmul makes for one use (shape and dtype only: a meta tensor)."""
        return torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' forward: the input cast to the compute dtype, the matmul, the result cast back."""
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _DequantizingMatmul.apply(x.to(self.compute_dtype), self, bias).to(x.dtype)


def pack_linear_layers(model: torch.nn.Module, quantization: str, compute_dtype: torch.dtype) -> None:
    """Replace every linear layer of a meta `model` except its LM head by a `PackedLinear`, as transformers' bitsandbytes
    loading quantises them, and mark the model quantised (what peft's k-bit preparation looks for)."""
    bits = QUANTIZATIONS[quantization]
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child is not head:
                setattr(parent, name, PackedLinear(child, bits, compute_dtype))
    setattr(model, f"is_loaded_in_{quantization}", True)
