"""Shareable run folders: adapter_config.json names the base model as others load it (the embedded model by its hub id),
our loaders map that hub id back to the embedded model offline, and README.md is a real model card."""

from __future__ import annotations

import json

import pytest

from pact.models import adapters
from pact.models.adapters import EMBEDDED_HUB_ID, adapter_base_model, load_student, share_base_model
from pact.models.loading import EMBEDDED_MODEL, load_model
from pact.training.arguments import PactTrainingArguments
from pact.training.run_folder import RUN_CONFIG
from pact.training.train import train


def _train(cache, out, **overrides):
    """A 2-step CPU LoRA run of the cache's model into `out`."""
    settings = dict(cache=str(cache), output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                    seed=3, train_device="cpu", disable_tqdm=True)
    settings.update(overrides)
    return train(PactTrainingArguments(**settings))


@pytest.fixture(scope="module")
def tiny_run(float32_cache, tmp_path_factory):
    """A LoRA run of the tiny model (a local folder) and its metrics."""
    out = tmp_path_factory.mktemp("card") / "tiny-run"
    return out, _train(float32_cache, out).metrics


def test_the_run_folder_has_a_model_card(tiny_run, float32_cache, tiny_model_dir):
    """README.md opens with the hub's YAML header (peft, the pact-cache tag; no base_model for a local folder) and says
    what the base is, the objective and its lambda, the cache and data, the final metrics and how to load it."""
    out, metrics = tiny_run
    card = (out / "README.md").read_text(encoding="utf-8")
    header, body = card.split("---\n", 2)[1:]
    assert "library_name: peft\n" in header and "- pact-cache\n" in header and "pipeline_tag: text-generation" in header
    assert "base_model:" not in header  # a local folder is no hub id
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)  # a local folder stays a path
    assert f"A LoRA adapter for `{tiny_model_dir}`" in body and "objective: `pact`" in body and "lambda 1.0" in body
    assert f"cache: `{float32_cache}`" in body and "r 8, alpha 32" in body
    last = metrics[-1]
    assert f"Step {last['step']}: loss {last['loss']:.4f}, ce {last['ce']:.4f}, kl {last['kl']:.4f}" in body
    assert "above 0 from step 1" in body
    assert f'AutoPeftModelForCausalLM.from_pretrained("{out}")' in body and f'PeftModel.from_pretrained(base, "{out}")' in body
    assert "Template" not in card and "[More Information Needed]" not in card  # not peft's blank template


def test_the_embedded_model_is_recorded_by_its_hub_id(tiny, tmp_path):
    """An adapter of the embedded model records its hub id as base_model_name_or_path (not the converted folder), and the
    model card's header names it as base_model; an adapter of any other model keeps what peft wrote."""
    from peft import LoraConfig, get_peft_model

    from pact.training.model_card import model_card

    student = get_peft_model(load_model(str(tiny.path), device="cpu", dtype="float32").model,
                             LoraConfig(r=2, target_modules=["q_proj"]))
    student.save_pretrained(tmp_path)
    share_base_model(tmp_path, str(tiny.path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny.path)
    share_base_model(tmp_path, EMBEDDED_MODEL)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_HUB_ID
    (tmp_path / RUN_CONFIG).write_text(json.dumps({"model_source": EMBEDDED_MODEL, "objective": {"objective": "refkl"}}))
    card = model_card(tmp_path, tmp_path, {"model_source": EMBEDDED_MODEL}, [])
    assert f"base_model: {EMBEDDED_HUB_ID}\n" in card and f"- base_model:adapter:{EMBEDDED_HUB_ID}\n" in card
    assert "Q4_1 GGUF" in card and "starts near 0" in card


def test_the_hub_id_reads_back_as_the_embedded_model_offline(tmp_path, monkeypatch):
    """Without the run's pact_config.json, the hub id in adapter_config.json loads the embedded model unless the local
    Hugging Face cache holds the hub model; pact_config.json's model_source, when present, comes first."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": EMBEDDED_HUB_ID}))
    assert adapter_base_model(tmp_path) == EMBEDDED_MODEL
    monkeypatch.setattr(adapters, "_in_hub_cache", lambda hub_id: True)
    assert adapter_base_model(tmp_path) == EMBEDDED_HUB_ID
    (tmp_path / RUN_CONFIG).write_text(json.dumps({"model_source": "some/other-model"}))
    assert adapter_base_model(tmp_path) == "some/other-model"


@pytest.mark.embedded
def test_a_run_of_the_embedded_model_is_shareable_and_loads_offline(embedded, tmp_path, capsys):
    """pact train on the embedded model records its hub id in adapter_config.json and the card; load_student, pact eval
    --adapter and pact export load the run with no hub and no --model."""
    from test_cache_support import make_safety_tokens

    from pact.cache_tools import build_cache
    from pact.cli.main import main as pact_main
    from pact.data.chat import load_examples
    from pact.data.sources import demo_data_path
    from helpers import write_jsonl

    examples, _ = load_examples(demo_data_path("benign"), embedded.tokenizer, max_length=192, limit=4)
    build_cache(embedded, examples, make_safety_tokens(embedded), tmp_path / "cache", dtype="float32", progress=False)
    run = tmp_path / "run"
    _train(tmp_path / "cache", run, max_steps=1)
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_HUB_ID
    assert f"base_model: {EMBEDDED_HUB_ID}\n" in (run / "README.md").read_text()
    assert load_student(None, str(run), device="cpu", dtype="float32").source == EMBEDDED_MODEL
    (run / RUN_CONFIG).unlink()  # an adapter shared alone: only adapter_config.json's hub id names the base
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Say hello."}])
    capsys.readouterr()
    assert pact_main(["eval", "refusal", "--adapter", str(run), "--prompts", str(prompts), "--max-new-tokens", "2",
                      "--json", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["model"] == EMBEDDED_MODEL and "warning" not in captured.err
    assert pact_main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
