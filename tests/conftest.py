"""Test-session setup shared by every test module.

Triton's interpreter must be chosen before `triton` is first imported, so the
kernel tests can run the real Triton kernel on CPU when no GPU is present.
"""

import os

import torch

import pact  # noqa: F401 - first, before anything imports transformers (see pact._unshadow_hub_kernels)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# --- Shared model fixtures (tests/helpers.py builds the tiny pieces) ---------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (seed 0) saved with the tiny ChatML tokenizer; loadable by `load_model(str(dir))`."""
    from helpers import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct, loaded once per session with `pact.models.loading.load_model()`.

    The embedded model is part of the quickstart install, so a missing package fails the test
    (with the pip command to run) instead of skipping it.
    """
    from pact.models.loading import ModelNotFoundError, load_model

    try:
        return load_model()
    except ModelNotFoundError as err:
        pytest.fail(f"the embedded model is not available: {err}", pytrace=False)


# --- The hostile-input harness (tests/hostile.py) and the cache fixtures it builds on ---------

from hostile import hostile_fixtures, world  # noqa: E402,F401
from test_cache_support import float32_cache, tiny, tiny_examples, tiny_safety, tiny_safety_file  # noqa: E402,F401
