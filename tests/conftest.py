"""Test-session setup shared by every test module.

Triton's interpreter must be chosen before `triton` is first imported, so the
kernel tests can run the real Triton kernel on CPU when no GPU is present.
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
