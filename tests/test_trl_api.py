"""`PactTrainer` takes what TRL's `SFTTrainer` takes: a model or its name, `train_dataset` / `eval_dataset` as a
`datasets.Dataset` in TRL's conversational or prompt-completion format (the cache is built on first use and reused),
`processing_class`, `peft_config`; and, with TRL installed, an `SFTConfig` as `args`, its unsupported settings refused
by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_cache_support import TINY_MAX_LENGTH, single_thread

from pact import CacheReader, PactTrainer, PactTrainingArguments, build_cache
from pact.data.chat import load_examples
from pact.data.sources import demo_data_path
from pact.errors import PactError

ROWS = 8


def _messages() -> list[dict]:
    """The first demo rows in TRL's conversational format (`messages`)."""
    rows = [json.loads(line) for line in demo_data_path("benign").read_text().splitlines()[:ROWS]]
    return [{"messages": [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
                          {"role": "assistant", "content": r["output"]}]} for r in rows]


def _prompt_completion() -> list[dict]:
    """The same rows in TRL's prompt-completion format."""
    return [{"prompt": [row["messages"][0]], "completion": [row["messages"][1]]} for row in _messages()]


def _lora():
    """The LoRA a TRL script passes as peft_config."""
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def _args(out, safety_file, **overrides) -> PactTrainingArguments:
    """Two quick CPU steps."""
    settings = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, seed=1,
                    train_device="cpu", disable_tqdm=True, report_to=[], safety_tokens=str(safety_file),
                    max_length=TINY_MAX_LENGTH)
    settings.update(overrides)
    return PactTrainingArguments(**settings)


def test_a_trl_script_trains_from_a_dataset_by_model_name_with_peft_config(tiny_model_dir, tiny_safety_file, tmp_path,
                                                                           monkeypatch, capfd):
    """The SFTTrainer call with PactTrainer in its place: the cache of the dataset is built once (and said where); the
    same rows in prompt-completion form are the same examples, so the second trainer reuses that cache; both train the
    same first step, evaluate on an eval Dataset, and the model is peft-wrapped by peft_config."""
    from datasets import Dataset

    monkeypatch.setenv("PACT_HOME", str(tmp_path / "home"))
    with single_thread():
        first = PactTrainer(str(tiny_model_dir), _args(tmp_path / "a", tiny_safety_file),
                            train_dataset=Dataset.from_list(_messages()), eval_dataset=Dataset.from_list(_messages()[:4]),
                            peft_config=_lora())
        err = capfd.readouterr().err
        assert "building the reference cache of the datasets.Dataset at " in err
        caches = sorted((tmp_path / "home" / "caches").iterdir())
        assert len(caches) == 2 and all(path.name.startswith("dataset-") for path in caches)
        assert hasattr(first.model, "peft_config") and first.warnings == []
        first.train()
        losses = [entry["loss"] for entry in first.state.log_history if "loss" in entry]
        metrics = first.evaluate()

        second = PactTrainer(str(tiny_model_dir), _args(tmp_path / "b", tiny_safety_file),
                             train_dataset=Dataset.from_list(_prompt_completion()), peft_config=_lora())
        assert f"using the cache at {second.cache.directory}" in capfd.readouterr().err
        assert second.cache.directory in caches and len(list((tmp_path / "home" / "caches").iterdir())) == 2
        second.train()
    assert [entry["loss"] for entry in second.state.log_history if "loss" in entry] == pytest.approx(losses, rel=1e-5)
    assert metrics["eval_tokens"] > 0 and metrics["eval_loss"] == metrics["eval_loss"]


def test_a_peft_model_the_user_built_trains_from_a_dataset_without_force(tiny_model_dir, tiny, tiny_safety, tiny_safety_file,
                                                                         tmp_path, monkeypatch):
    """The TRL script of the issue: `AutoModelForCausalLM.from_pretrained`, `get_peft_model` with random-B adapters (so
    they change the outputs), `tok.pad_token` set, a `Dataset` in: the cache is built from the base weights (adapters
    off), its fingerprints are the folder's, and training starts with no `force` and no warning."""
    import copy

    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("PACT_HOME", str(tmp_path / "home"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), _lora())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    with single_thread():
        trainer = PactTrainer(model, _args(tmp_path / "run", tiny_safety_file), train_dataset=Dataset.from_list(_messages()),
                              processing_class=tokenizer)
        assert trainer.warnings == []
        assert trainer.cache.manifest["fingerprints"]["model"] == tiny.fingerprint
        examples, _ = load_examples(Dataset.from_list(_messages()), tiny.tokenizer, max_length=TINY_MAX_LENGTH)
        build_cache(tiny, examples, tiny_safety, tmp_path / "plain", dtype=trainer.cache.manifest["dtype"], progress=False)
        plain = CacheReader(tmp_path / "plain")
        for index in range(len(plain)):  # built with the adapters off: the base model's targets
            for key, value in plain[index].items():
                np.testing.assert_array_equal(np.asarray(trainer.cache[index][key]), np.asarray(value), err_msg=key)
        trainer.train()
    assert trainer.state.global_step == 2


def test_arguments_the_pact_loop_would_not_honour_are_refused_by_name(tiny_model_dir, float32_cache, tmp_path):
    """A loss function, a formatting function or a data collator would be ignored: each is refused naming it, and so is
    a cache given twice."""
    for name in ("compute_loss_func", "formatting_func", "data_collator"):
        with pytest.raises(PactError, match=f"PactTrainer does not take {name}="):
            PactTrainer(str(tiny_model_dir), _args(tmp_path / name, "unused"), cache=float32_cache, **{name: print})
    with pytest.raises(PactError, match="train_dataset= and a cache were both given"):
        PactTrainer(str(tiny_model_dir), _args(tmp_path / "twice", "unused"), cache=float32_cache, train_dataset=float32_cache)


def test_trl_sft_config_is_taken_as_args_and_its_unsupported_settings_refused(tiny, float32_cache, tmp_path):
    """With the real TRL: an `SFTConfig` (a TrainingArguments) trains PACT on a cache; a Trainer setting the loop ignores
    is warned about by name; `packing=True` and `completion_only_loss=False` are refused by name."""
    trl = pytest.importorskip("trl")
    import copy

    config = dict(output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=4, use_cpu=True,
                  report_to=[], disable_tqdm=True)
    with single_thread():
        trainer = PactTrainer(copy.deepcopy(tiny.model), trl.SFTConfig(**config), train_dataset=float32_cache,
                              processing_class=tiny.tokenizer, peft_config=_lora())
        trainer.train()
    assert trainer.state.global_step == 1
    with pytest.warns(UserWarning, match="label_smoothing_factor 0.3 would be ignored by a PACT run"):
        PactTrainer(copy.deepcopy(tiny.model), trl.SFTConfig(**config, label_smoothing_factor=0.3), train_dataset=float32_cache,
                    processing_class=tiny.tokenizer)
    for name, value in (("packing", True), ("completion_only_loss", False)):
        with pytest.raises(PactError, match=f"args.{name}={value!r} cannot be honoured by PactTrainer"):
            PactTrainer(copy.deepcopy(tiny.model), trl.SFTConfig(**config, **{name: value}), train_dataset=float32_cache,
                        processing_class=tiny.tokenizer)


def test_a_dataset_is_not_cached_from_a_quantised_model(tiny, tiny_safety_file, tmp_path, monkeypatch):
    """A quantised model's outputs are not the reference's: data given with one is refused, saying how to build the
    cache from the unquantised model (the model is marked as bitsandbytes marks it; nothing is built)."""
    import copy

    from datasets import Dataset

    monkeypatch.setenv("PACT_HOME", str(tmp_path / "home"))
    model = copy.deepcopy(tiny.model)
    model.is_loaded_in_4bit = True
    with pytest.raises(PactError, match="train_dataset= is data, whose reference cache is built from the model given, and "
                                        "that model is quantised"):
        PactTrainer(model, _args(tmp_path / "run", tiny_safety_file), train_dataset=Dataset.from_list(_messages()),
                    processing_class=tiny.tokenizer)
    assert not (tmp_path / "home" / "caches").exists()
