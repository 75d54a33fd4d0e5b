"""Shared fixtures and helpers of the cache tests (imported by test_cache_*.py).

A tiny random model, a hand-made safety-token set for it, a few encoded demo
examples, and a small float32 cache built once per session. Torch runs on one
thread in these tests: the tiny forward passes are much faster that way on a
busy 2-core machine.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

TINY_MAX_LENGTH = 256
TINY_ROWS = 12


@contextlib.contextmanager
def single_thread():
    """Run torch single-threaded inside the block (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread():
    """Every cache test runs torch single-threaded."""
    with single_thread():
        yield


def subprocess_env() -> dict:
    """Environment for CLI subprocesses: single-threaded, unbuffered."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """The tiny random model, loaded on CPU in float32."""
    from pact.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


def make_safety_tokens(loaded, count: int = 12, seed: int = 0):
    """A safety-token set of `count` random ids with about half the weights positive, made for `loaded`."""
    from pact.safety_tokens import SafetyTokens

    generator = torch.Generator().manual_seed(seed)
    ids = sorted(torch.randperm(loaded.model.config.vocab_size, generator=generator)[:count].tolist())
    weights = [max(0.0, float(v)) for v in torch.randn(count, generator=generator)]
    weights[0] = weights[0] or 0.5  # at least one positive weight
    return SafetyTokens(ids, weights, [loaded.tokenizer.decode([i]) for i in ids], {"made_by": "test"},
                        {"aligned_model": loaded.fingerprint, "base_model": loaded.fingerprint, "tokenizer": loaded.tokenizer_fingerprint})


@pytest.fixture(scope="session")
def tiny_safety(tiny):
    """Safety tokens for the tiny model."""
    return make_safety_tokens(tiny)


@pytest.fixture(scope="session")
def tiny_safety_file(tiny_safety, tmp_path_factory):
    """The tiny safety tokens saved as a file (for the CLI)."""
    return tiny_safety.save(tmp_path_factory.mktemp("safety") / "safety_tokens.json")


@pytest.fixture(scope="session")
def tiny_examples(tiny):
    """The first TINY_ROWS demo examples encoded with the tiny tokenizer."""
    from pact.data import demo_data_path, load_examples

    examples, _ = load_examples(demo_data_path("benign"), tiny.tokenizer, max_length=TINY_MAX_LENGTH, limit=TINY_ROWS)
    return examples


@pytest.fixture(scope="session")
def float32_cache(tiny, tiny_examples, tiny_safety, tmp_path_factory):
    """An exact (float32) cache of the tiny examples, 4 rows per shard."""
    from pact.cache_tools import build_cache

    out = tmp_path_factory.mktemp("cache") / "f32"
    with single_thread():
        build_cache(tiny, tiny_examples, tiny_safety, out, dtype="float32", rows_per_shard=4, batch_size=3, progress=False)
    return out
