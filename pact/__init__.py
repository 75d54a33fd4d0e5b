"""pact-cache: fine-tune aligned LLMs without losing their safety alignment.

The PACT objective keeps the model's confidence on a few safety tokens close
to the aligned reference; `pact.cache_tools` stores the reference's targets
once so training needs no reference model, and `pact.kernels` holds the
Triton masked-KL kernel.
"""

__version__ = "0.1.0"
