"""Hostile inputs to `pact plan`: see tests/hostile.py. Every case is refused before any step is planned, naming the
flag (and the file) that holds the bad value; `pact plan` never reads weights, so no case may load a model either."""

from __future__ import annotations

import pytest

from hostile import Case, check_case

FAMILY = "pact plan"


def plan(*extra: str, model: str | None = None):
    """argv of `pact plan` of the tiny model directory (or the world file `model`), plus `extra` flags."""
    return lambda w: ["plan", "--model", model or str(w.model), *extra]


def _case(name: str, shown: str, argv, message: str, prepare=None) -> Case:
    """A refused `pact plan`: exit 2, `message` on stderr."""
    return Case(name, shown, "pact", argv, 2, message, prepare)


CASES = [
    _case("no-model", "no `--model`", lambda w: ["plan"], "--model: model is required"),
    _case("missing-config", "`--model` a config.json that does not exist", plan(model="missing/config.json"),
          "--model: model 'missing/config.json': cannot read it"),
    _case("config-not-json", "`--model` a config.json that is not JSON", plan(model="bad/config.json"),
          "--model: model 'bad/config.json': not valid JSON", prepare=lambda w: w.write("bad/config.json", "{vocab")),
    _case("config-no-model-type", "`--model` a JSON file without `model_type`", plan(model="bad/config.json"),
          "not a transformers config.json (no model_type field)", prepare=lambda w: w.write("bad/config.json", '{"vocab_size": 8}')),
    _case("folder-without-config", "`--model` a folder without config.json", plan(model="empty"),
          "--model: model 'empty': no architecture could be read from it", prepare=lambda w: w.path("empty").mkdir()),
    _case("plain-file", "`--model` a file that is neither JSON nor GGUF", plan(model="notes.txt"),
          "a file, but neither a config.json nor a .gguf model", prepare=lambda w: w.write("notes.txt", "a model")),
    _case("gpu-memory-words", "`--gpu-memory lots`", plan("--gpu-memory", "lots"),
          "--gpu-memory: gpu_memory must be a memory size such as 24GiB, 80GB or 16000MiB, got 'lots'"),
    _case("gpu-memory-zero", "`--gpu-memory 0GiB`", plan("--gpu-memory", "0GiB"), "--gpu-memory: gpu_memory must be a memory size"),
    _case("quantised-full", "`--load-in-4bit --full`", plan("--load-in-4bit", "--full"),
          "--load-in-4bit: load_in_4bit trains LoRA adapters on a frozen quantised base (QLoRA)"),
    _case("two-quantisations", "`--load-in-4bit --load-in-8bit`", plan("--load-in-4bit", "--load-in-8bit"),
          "--load-in-8bit: load_in_4bit and load_in_8bit exclude each other"),
    _case("float16-full", "`--dtype float16 --full`", plan("--dtype", "float16", "--full"),
          "--dtype: dtype float16 trains LoRA adapters only"),
    _case("dtype-unknown", "`--dtype float8`", plan("--dtype", "float8"), "--dtype: dtype must be one of bfloat16, float16, float32"),
    _case("batch-zero", "`--batch-size 0`", plan("--batch-size", "0"),
          "--batch-size: per_device_train_batch_size must be an integer >= 1, got 0"),
    _case("prompt-fills-row", "`--prompt-length` as long as `--max-length`", plan("--max-length", "64", "--prompt-length", "64"),
          "--prompt-length: prompt_length must be below max_length (64)"),
    _case("safety-beyond-vocab", "`--safety-tokens` more than the vocabulary", plan("--safety-tokens", "100000"),
          "--safety-tokens: safety_tokens (100000) exceeds the vocabulary"),
    _case("config-int-memory", "`--config` YAML with `gpu_memory: 24` (a number, not a size)", plan("--config", "bad.yaml"),
          "bad.yaml: gpu_memory: expected text, got 24 (an integer); quote it to make it text",
          prepare=lambda w: w.write("bad.yaml", "gpu_memory: 24\n")),
    _case("config-command-line-flag", "`--config` YAML with `json: true` (a flag of the command line only)", plan("--config", "bad.yaml"),
          "bad.yaml: 'json' is a flag of the command line, not a setting a config file holds; give --json on the command line",
          prepare=lambda w: w.write("bad.yaml", "json: true\n")),
    _case("lora-target-unknown", "`--lora-targets` naming no module", plan("--lora-targets", "nope"),
          "--lora-targets: lora_target_modules names no module of the model: 'nope'"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_plan_input(case, world, capsys, monkeypatch):
    """Each case's exit code and message, no traceback, no file changed, and no weights or tokenizer loaded."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    for loader in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(loader, "from_pretrained", refuse)
    check_case(case, world, capsys)
