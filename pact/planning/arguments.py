"""What `pact plan` plans (`PlanArguments`): the model's architecture and the training settings that change the
step's memory, checked where they are declared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pact.checks import check_setting, parse_bytes
from pact.errors import InvalidSetting
from pact.models.adapters import AdapterArguments

PLAN_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class PlanArguments(AdapterArguments):
    """What `pact plan` plans: the model's architecture and the training settings that change the step's memory (the
    LoRA and quantisation ones are `AdapterArguments`, as `pact train` declares them)."""

    model: str | None = field(default=None, metadata={
        "help": "the model: a shipped architecture name (llama-2-7b-chat, qwen2.5-7b-instruct, smollm2-135m-instruct), "
                "a model directory, a hub id, or a config.json file; only the architecture is read, never weights (required)"})
    per_device_train_batch_size: int = field(default=8, metadata={"aliases": ["--batch-size"], "help": "rows per micro-batch"})
    max_length: int = field(default=512, metadata={"help": "tokens per row (every row is planned at this length)"})
    prompt_length: int = field(default=1, metadata={
        "help": "tokens of each row before its response; every later token is a response token the loss covers "
                "(1 plans the most a row of --max_length tokens can cost)"})
    dtype: str = field(default="bfloat16", metadata={"help": f"weight dtype: {', '.join(PLAN_DTYPES)}; with 4/8-bit weights, "
                                                             "the compute dtype and the dtype of the layers left unquantised"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each decoder layer in the backward instead of keeping its activations"})
    gpu_memory: str = field(default="24GiB", metadata={"help": "the GPU's memory, e.g. 24GiB, 80GB, 16000MiB"})
    safety_tokens: int = field(default=50, metadata={"help": "|S|, the number of safety tokens (pact safety-tokens --top)"})
    ce_chunk_size: int = field(default=1024, metadata={"help": "response positions per chunk of the cross-entropy (as pact train)"})
    kd_top_k: int = field(default=50, metadata={
        "help": "K of the distillation variants: the teacher's top-K per response token (pact-cache build --kd_top_k)"})

    def __post_init__(self) -> None:
        """Refuse a value the plan cannot use (`InvalidSetting` naming the field)."""
        if not self.model:
            raise InvalidSetting("model", "model is required: a shipped architecture name, a model directory, a hub id "
                                          "or a config.json file")
        self.check_adapter_settings()
        for name, low in (("per_device_train_batch_size", 1), ("max_length", 2), ("prompt_length", 1),
                          ("safety_tokens", 1), ("ce_chunk_size", 1), ("kd_top_k", 1)):
            check_setting(name, getattr(self, name), low, integer=True)
        if self.prompt_length >= self.max_length:
            raise InvalidSetting("prompt_length", f"prompt_length must be below max_length ({self.max_length}) so a response "
                                                  f"token is left, got {self.prompt_length}")
        if self.dtype not in PLAN_DTYPES:
            raise InvalidSetting("dtype", f"dtype must be one of {', '.join(PLAN_DTYPES)}, got {self.dtype!r}")
        if self.dtype == "float16" and self.full:
            raise InvalidSetting("dtype", "dtype float16 trains LoRA adapters only (as pact train); use bfloat16 or float32 with --full")
        parse_bytes(self.gpu_memory)

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a torch dtype."""
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        """The settings in a few words, e.g. `LoRA r=8 on q_proj, v_proj, 4-bit NF4 weights, checkpointing, batch 8 x 512`."""
        method = "full fine-tuning" if self.full else f"LoRA r={self.lora_r} on {', '.join(self.lora_target_modules)}"
        weights = {"4bit": "4-bit NF4 weights", "8bit": "8-bit weights", None: f"{self.dtype} weights"}[self.quantization]
        parts = [method, weights, *(["gradient checkpointing"] if self.gradient_checkpointing else []),
                 f"batch {self.per_device_train_batch_size} x {self.max_length} tokens"]
        return ", ".join(parts)
