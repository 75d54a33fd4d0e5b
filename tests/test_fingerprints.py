"""A fingerprint means "the same reference": the weights a model was loaded from, whatever adapters are on it, whether it
came by folder or hub id, and a tokenizer whatever pad token a script set; a real difference is named with the Python
argument that overrides it."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import make_tiny_model
from test_cache_support import single_thread

from pact.errors import PactError
from pact.models.loading import load_model, model_fingerprint, tokenizer_fingerprint, tokenizer_matches, weights_fingerprint
from pact.training.compatibility import StudentIdentity
from pact.training.trainer import PactTrainer
from pact.training.arguments import PactTrainingArguments

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _lora(model):
    """`model` with LoRA on q_proj and v_proj whose B matrices are random (an adapter that changes the outputs)."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return wrapped


def test_a_lora_wrapped_model_has_its_base_weights_fingerprint(tiny_model_dir):
    """Adapters (and peft's renamed base layers and saved-module copies) leave the weights fingerprint as the plain
    model's; a changed base weight changes it."""
    plain = load_model(str(tiny_model_dir), device="cpu", dtype="float32").model
    expected = weights_fingerprint(plain)
    wrapped = _lora(load_model(str(tiny_model_dir), device="cpu", dtype="float32").model)
    assert weights_fingerprint(wrapped) == expected
    with torch.no_grad():
        wrapped.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight[0, 0] += 1
    assert weights_fingerprint(wrapped) != expected


@pytest.fixture
def hub_model(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny model loaded by the hub id `someone/tiny` from a Hugging Face cache in `tmp_path` (no hub asked)."""
    import huggingface_hub.constants
    from transformers import AutoModelForCausalLM

    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = AutoModelForCausalLM.from_pretrained("someone/tiny", cache_dir=str(tmp_path / "hub"), local_files_only=True)
    assert model.config._name_or_path == "someone/tiny"
    return model


def test_a_model_loaded_by_hub_id_is_fingerprinted_by_its_cached_files(hub_model, tiny):
    """A model loaded by hub id has the fingerprint of the same files in a folder (the cache's, built from the folder),
    with or without adapters."""
    assert model_fingerprint(hub_model) == tiny.fingerprint
    assert model_fingerprint(_lora(hub_model)) == tiny.fingerprint


def test_a_model_not_in_any_cache_is_fingerprinted_by_its_weights(tiny_model_dir):
    """An id that is neither a folder nor in the Hugging Face cache falls back to the weights themselves."""
    model = load_model(str(tiny_model_dir), device="cpu", dtype="float32").model
    model.config._name_or_path = "nobody/not-downloaded"
    assert model_fingerprint(model) == weights_fingerprint(model)


def test_the_pad_token_a_script_sets_keeps_the_tokenizer_fingerprint(tiny):
    """`tok.pad_token = ...` changes nothing a cache depends on; fingerprints recorded with the pad token (by earlier
    versions) still match; another special token does change it."""
    import copy

    tokenizer = copy.deepcopy(tiny.tokenizer)
    before = tokenizer_fingerprint(tokenizer)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(5)
    assert tokenizer_fingerprint(tokenizer) == before
    from pact.models.loading import _tokenizer_hash

    assert tokenizer_matches(tokenizer, _tokenizer_hash(tokenizer, with_pad=True))
    assert not tokenizer_matches(tokenizer, _tokenizer_hash(tiny.tokenizer, with_pad=True).replace("a", "b", 1) + "0")
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(6)
    assert tokenizer_fingerprint(tokenizer) != before


def _trainer(cache, model, tokenizer, out, **kwargs) -> PactTrainer:
    """A PactTrainer as a TRL user builds one: the model object, no fingerprint handed in."""
    args = PactTrainingArguments(output_dir=str(out), max_steps=1, per_device_train_batch_size=2, train_device="cpu",
                                 disable_tqdm=True, report_to=[])
    return PactTrainer(model, args, cache=cache, processing_class=tokenizer, **kwargs)


def test_pact_trainer_takes_a_lora_model_by_hub_id_with_a_pad_token_set(float32_cache, hub_model, tiny, tmp_path):
    """The issue's TRL user: a model loaded by hub id, wrapped by `get_peft_model`, its tokenizer given a pad token; the
    cache was built from the same weights by folder. Accepted without `force`."""
    import copy

    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(3)
    with single_thread():
        trainer = _trainer(float32_cache, _lora(hub_model), tokenizer, tmp_path / "run")
    assert trainer.warnings == []


def test_a_model_held_only_in_memory_is_compared_by_its_weights(tiny, tmp_path):
    """A cache recorded the weights' fingerprint (built from a model with no files) matches the same weights under
    LoRA; the identity computes it only when the files' fingerprint does not match."""
    manifest = {"fingerprints": {"model": weights_fingerprint(tiny.model), "tokenizer": tiny.tokenizer_fingerprint}}
    assert StudentIdentity(_lora(copy_of(tiny.model)), tiny.tokenizer).differences(manifest) == []


def copy_of(model):
    """A deep copy of `model` (so wrapping it leaves the session's fixture alone)."""
    import copy

    return copy.deepcopy(model)


def test_a_real_difference_is_named_with_the_python_argument(float32_cache, tmp_path):
    """Other weights are refused, the message naming both models and `force=True`; a changed chat template is named as
    such."""
    other = load_model(str(make_tiny_model(tmp_path / "other", seed=7)), device="cpu", dtype="float32")
    with pytest.raises(PactError, match=r"model fingerprint differs.*weights of '.*other'.*force=True") as err:
        _trainer(float32_cache, other.model, other.tokenizer, tmp_path / "a")
    assert "--force" in str(err.value)


def test_a_changed_chat_template_is_named(tiny):
    """A tokenizer whose chat template differs from the one the cache's data was tokenized with is refused as such."""
    import copy
    import hashlib

    from helpers import chatml_template

    manifest = {"fingerprints": {"tokenizer": tiny.tokenizer_fingerprint},
                "data": {"chat_template_sha256": hashlib.sha256(tiny.tokenizer.chat_template.encode()).hexdigest()}}
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.chat_template = chatml_template(default_system=None)
    problems = StudentIdentity(tiny.model, tokenizer, tiny.fingerprint).differences(manifest)
    assert len(problems) == 1 and "its chat template differ" in problems[0]
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert "its vocabulary or special tokens differ" in StudentIdentity(tiny.model, tokenizer, tiny.fingerprint).differences(manifest)[0]
