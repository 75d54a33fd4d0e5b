"""Hostile inputs to `pact plan`: see tests/hostile.py. Every case is refused before any step is planned, naming the
flag (and the file) that holds the bad value; `pact plan` never reads weights, so no case may load a model either."""

from __future__ import annotations

import json

import pytest
from helpers import TINY_VOCAB_SIZE, tiny_llama_config

from hostile import Case, check_case

FAMILY = "pact plan"


def plan(*extra: str, model: str | None = None):
    """argv of `pact plan` of the tiny model directory (or the world file `model`), plus `extra` flags."""
    return lambda w: ["plan", "--model", model or str(w.model), *extra]


def architecture(folder: str = "m", **changes):
    """A `prepare` writing `folder/config.json`: the tiny test model's architecture with `changes` (a dict value is merged
    into the field, e.g. `rope_parameters`)."""
    def prepare(w) -> None:
        values = tiny_llama_config(TINY_VOCAB_SIZE).to_dict()
        for key, value in changes.items():
            values[key] = {**values[key], **value} if isinstance(value, dict) else value
        w.write(f"{folder}/config.json", json.dumps(values))
    return prepare


def _arch(name: str, shown: str, message: str, **changes) -> Case:
    """`pact plan --model m/config.json` of the tiny architecture with `changes`: refused naming the file and the field."""
    return _case(f"architecture-{name}", f"`--model` a config.json with {shown}", plan(model="m/config.json"),
                 f"--model: model 'm/config.json': {message}", architecture(**changes))


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
    _arch("size-text", "`vocab_size: \"big\"`", "transformers cannot build a config from it (Validation error for field "
          "'vocab_size': TypeError: Field 'vocab_size' expected int, got str (value: 'big'))", vocab_size="big"),
    _arch("heads-zero", "`num_attention_heads: 0`", "transformers cannot build a config from it (integer modulo by zero)",
          num_attention_heads=0),
    _arch("heads-indivisible", "5 heads for a hidden size of 32", "transformers cannot build a config from it (Class validation "
          "error for validator 'validate_architecture': ValueError: The hidden size (32) is not a multiple of the number of "
          "attention heads (5)", num_attention_heads=5),
    _arch("kv-heads-indivisible", "3 key-value heads for 4 heads", "num_attention_heads 4 is not a multiple of num_key_value_heads 3",
          num_key_value_heads=3),
    _arch("size-zero", "`vocab_size: 0`", "vocab_size must be an integer from 1 to 16777216 (or a list of them), got 0", vocab_size=0),
    _arch("size-huge", "a hidden size of 10^12 (its tensors' byte counts overflow)",
          "hidden_size must be an integer from 1 to 16777216 (or a list of them), got 1000000000000",
          hidden_size=10**12, intermediate_size=10**12),
    _arch("layers-huge", "a million layers (their modules exhaust host memory)",
          "num_hidden_layers must be an integer from 1 to 1024 (or a list of them), got 1000000", num_hidden_layers=10**6),
    _arch("experts-huge", "a million experts", "num_experts must be an integer from 0 to 1024 (or a list of them), got 1000000",
          model_type="qwen2_moe", num_experts=10**6),
    _arch("positions-negative", "`max_position_embeddings: -5`", "max_position_embeddings must be an integer from 1 to",
          max_position_embeddings=-5),
    _arch("nan", "`NaN` as `rope_parameters.rope_theta`", "rope_parameters.rope_theta is nan, not a finite number",
          rope_parameters={"rope_theta": float("nan")}),
    _case("architecture-nested-too-deep", "`--model` a config.json of 100 000 nested `[`", plan(model="m/config.json"),
          "--model: model 'm/config.json': not valid JSON (RecursionError", prepare=lambda w: w.write("m/config.json", "[" * 100_000)),
    _case("model-folder-bad-config", "`--model` a folder whose config.json has a text `hidden_size`", plan(model="m"),
          "--model: model 'm': its config.json is not one transformers accepts (Validation error for field 'hidden_size'",
          prepare=architecture(hidden_size="wide")),
    _case("batch-too-large", "`--batch-size 10^14` (its synthetic micro-batch would exhaust host memory)",
          plan("--batch-size", str(10**14)), "--batch-size: 100000000000000 rows of 512 tokens with 50 safety tokens are too large "
          "to plan: the plan builds one such micro-batch in host memory"),
    _case("length-too-large", "`--max-length 10^14`", plan("--max-length", str(10**14)),
          "--max-length: 8 rows of 100000000000000 tokens with 50 safety tokens are too large to plan"),
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
    Case("lora-target-all-linear", "`--lora-targets all-linear` (peft's every-linear-layer shorthand)", "pact",
         plan("--lora-targets", "all-linear"), 0, "LoRA r=8 on all-linear"),
    Case("lora-target-pattern", "`--lora-targets` one regular expression (peft's string form)", "pact",
         plan("--lora-targets", r".*\.(q|v)_proj"), 0, r"LoRA r=8 on .*\.(q|v)_proj"),
    _case("lora-target-pattern-no-match", "`--lora-targets` a regular expression matching no module", plan("--lora-targets", "attn.*"),
          "--lora-targets: lora_target_modules 'attn.*': it matches no module's full name"),
    _case("lora-target-pattern-container", "`--lora-targets` a regular expression matching an attention block",
          plan("--lora-targets", ".*self_attn"),
          "--lora-targets: lora_target_modules '.*self_attn': it matches 'model.layers.0.self_attn', which LoRA cannot adapt"),
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
