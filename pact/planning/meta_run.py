"""Running the project's real training code on meta tensors (shapes and dtypes, no data, no compute).

Three things stand between that code and the meta device, each handled here
so the code itself runs unchanged (`pact.planning` uses all three):

* `HostShadows`: code that asks a tensor for a value (`.item()`, `int(t)`,
  `bool(t)`; transformers asks whether an attention mask is all ones) gets
  it from a host copy kept for every small meta tensor whose value is known:
  one copied from the host, or computed from such tensors and constants.
  Asked about a value nobody can know (computed from weights), it raises.
* `fused_attention`: `scaled_dot_product_attention` on meta tensors would
  take PyTorch's math fallback, which keeps the whole [batch, heads, length,
  length] attention matrix for backward; a device runs a fused kernel that
  keeps only the output and a float32 log-sum-exp per query row. Under
  `fused_attention` meta tensors run the flash kernel CPU SDPA runs (its meta
  implementation), whose output and saved tensors have the shapes of the
  CUDA flash and memory-efficient kernels' (one kernel for every device, so
  the plan is checked against real CPU steps with the very kernel it assumes).
* `fused_optimizers`: the Trainer's default optimizer is AdamW with
  `fused=True`, which refuses meta parameters though its kernel has a meta
  implementation; inside the block it accepts them.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from pact.planning.memory import tensors_in

SHADOW_LIMIT = 1 << 22  # elements: a larger meta tensor gets no host copy (masks and index tensors of a batch are far smaller)


class UnknowableValue(RuntimeError):
    """Code run on meta tensors asked for a value computed from data that meta tensors do not hold."""


def _is_meta(value) -> bool:
    """Whether `value` is a meta tensor."""
    return isinstance(value, torch.Tensor) and value.device.type == "meta"


class HostShadows(TorchDispatchMode):
    """Keeps a host copy of every small meta tensor whose value is known, and answers `.item()` on meta tensors from it.

    A meta tensor's value is known when it was copied from the host, or made
    by an operator whose meta inputs all have known values (a factory such as
    `torch.ones`, a comparison of a mask, a sum of it): that operator is then
    also run on the host copies. An in-place operator that mixes in an
    unknown value makes its output unknown.
    """

    def __init__(self):
        super().__init__()
        self._host = WeakTensorKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tensors_in((args, kwargs)) if t.device.type == "meta"]
        if inputs and _returns_number(func):
            return self._number(func, args, kwargs, inputs)
        out = func(*args, **kwargs)
        outputs = [t for t in tensors_in(out) if t.device.type == "meta"]
        if not outputs:
            return out
        if all(t in self._host for t in inputs) and all(t.numel() <= SHADOW_LIMIT for t in outputs):
            for meta, host in zip(tensors_in(out), tensors_in(self._on_host(func, args, kwargs))):
                if meta.device.type == "meta":
                    self._host[meta] = host
        else:
            for tensor in outputs:  # a value computed from unknown ones (or written over by one) is unknown
                self._host.pop(tensor, None)
        return out

    def _number(self, func, args, kwargs, inputs: list[torch.Tensor]):
        """What `func` (`.item()`, `bool()`, `is_nonzero`, `equal`, ...) returns for meta tensors of known value."""
        unknown = [t for t in inputs if t not in self._host]
        if unknown:
            tensor = unknown[0]
            raise UnknowableValue(f"{func}: the value of a meta {tensor.dtype} tensor of shape {list(tensor.shape)} computed "
                                  "from the model's weights was asked for (.item(), int(), bool()); meta tensors hold no data, "
                                  "so the memory plan cannot follow a branch on it")
        return self._on_host(func, args, kwargs)

    def _on_host(self, func, args, kwargs):
        """`func` run on the host copies of its meta arguments (the meta device read as the host)."""
        def on_host(value):
            """A meta tensor's host copy, the meta device the host; anything else as it is."""
            if _is_meta(value):
                return self._host[value]
            return torch.device("cpu") if isinstance(value, torch.device) and value.type == "meta" else value

        return func(*tree_map(on_host, args), **tree_map(on_host, kwargs))


@functools.cache
def _returns_number(func) -> bool:
    """Whether an aten operator returns a Python number or bool (which a meta tensor cannot give) rather than tensors."""
    returns = func._schema.returns
    return bool(returns) and all(str(r.type) in ("number", "Scalar", "bool", "int", "float") for r in returns)


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What a device's fused attention runs for `F.scaled_dot_product_attention`: a boolean mask turned into an additive
    one in the query's dtype (as SDPA does), then one fused kernel, whose grouped-query form needs no copies of K and V."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        attn_mask = torch.where(attn_mask, zero, torch.full((), float("-inf"), dtype=query.dtype, device=query.device))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                       attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Inside the block, `F.scaled_dot_product_attention` on meta tensors runs a fused kernel, as on a device (see the
    module notes); other tensors take it as always. The function is swapped in `torch.nn.functional` itself: the
    backward's recomputation of checkpointed layers runs where no torch-function mode reaches."""
    original = F.scaled_dot_product_attention

    def attention(query, *args, **kwargs):
        """A fused kernel for meta tensors, the original function for any other."""
        return (_flash_attention if _is_meta(query) else original)(query, *args, **kwargs)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def fused_optimizers() -> Iterator[None]:
    """Inside the block, `torch.optim` optimizers with `fused=True` accept meta parameters (their fused kernels have meta
    implementations; only the optimizers' device check refuses them)."""
    import torch.optim.optimizer as optimizer_module

    supported = optimizer_module._get_fused_kernels_supported_devices
    optimizer_module._get_fused_kernels_supported_devices = lambda: [*supported(), "meta"]
    try:
        yield
    finally:
        optimizer_module._get_fused_kernels_supported_devices = supported
