"""pact-cache: fine-tune aligned LLMs without losing their safety alignment.

The PACT objective keeps the model's confidence on a few safety tokens close
to the aligned reference; `pact.cache_tools` stores the reference's targets
once so training needs no reference model, and `pact.kernels` holds the
Triton masked-KL kernel.
"""

import sys
from pathlib import Path

__version__ = "0.1.0"


def _unshadow_hub_kernels() -> None:
    """Keep this checkout's `kernels/` folder from hiding the Hugging Face `kernels` package, which transformers (5.25 and
    later) imports: the folder is installed as `pact.kernels`, but `python -m ...` (pytest, torchrun, accelerate) started
    in the checkout's root puts that root on `sys.path`, where a top-level `import kernels` would find the folder."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "kernels" / "masked_kl.py").is_file():
        return
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
    shadow = sys.modules.get("kernels")
    if shadow is not None and Path(getattr(shadow, "__file__", None) or "/").resolve().parent == root / "kernels":
        del sys.modules["kernels"]


_unshadow_hub_kernels()
