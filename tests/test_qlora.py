"""QLoRA: `pact train --load-in-4bit / --load-in-8bit` (bitsandbytes + peft's k-bit preparation, LoRA only), the plain
refusals when bitsandbytes is missing or cannot run, and the LM-head rows the objective reads for a quantised head.

The tests that quantise need bitsandbytes (the `qlora` extra) and a backend for this machine (CUDA or
its CPU one); their model is the tiny Llama widened to hidden size 64, since bitsandbytes' CPU backend dequantises
rows that are not whole 64-value blocks wrongly (see `pact.models.quantization.guard_cpu_layers`).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_tiny_model
from pact.training.arguments import PactTrainingArguments
from pact.cli.main import main as pact_main
from pact.data.sources import demo_data_path
from pact.data.chat import load_examples
from pact.errors import InvalidSetting, PactError
from pact.objective.student import student_outputs
from pact.models.loading import load_model
from pact.models.quantization import MIN_BITSANDBYTES, NF4_TOLERANCE, guard_cpu_layers, quantization_config, require_bitsandbytes
from pact.models.parts import causal_lm_parts, hidden_states_at
from pact.data.batch import collate_examples
from pact.training.train import train
from test_cache_support import TINY_MAX_LENGTH, make_safety_tokens, one_thread, single_thread  # noqa: F401  (one_thread: autouse)

needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes is not installed (the qlora extra)")
CPU = torch.device("cpu")
SAFETY_IDS = torch.tensor([0, 2, 17, 100, 250, 383])
WIDE = {"hidden_size": 64, "intermediate_size": 128}  # every linear layer's rows a whole number of 64-value blocks


@pytest.fixture(scope="module")
def bitsandbytes_on_cpu():
    """Skips, with bitsandbytes' own answer as the reason, unless 4-bit and 8-bit quantisation both run on this CPU."""
    try:
        for quantization in ("4bit", "8bit"):
            require_bitsandbytes(quantization, CPU, f"load_in_{quantization}")
    except InvalidSetting as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """The tiny Llama at hidden size 64 (tied embeddings), saved with the tiny tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("wide-model"), seed=1, **WIDE)


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory):
    """The hidden-64 tiny Llama with an LM head of its own (untied from the embeddings)."""
    return make_tiny_model(tmp_path_factory.mktemp("untied-model"), seed=2, tie_word_embeddings=False, **WIDE)


@pytest.fixture(scope="module")
def wide_cache(wide_model_dir, tmp_path_factory):
    """A float32 cache of 12 demo rows built by the unquantised hidden-64 model (the QLoRA student's reference)."""
    from pact.cache_tools import build_cache

    reference = load_model(str(wide_model_dir), device="cpu", dtype="float32")
    examples, _ = load_examples(demo_data_path("benign"), reference.tokenizer, max_length=TINY_MAX_LENGTH, limit=12)
    out = tmp_path_factory.mktemp("cache") / "wide"
    with single_thread():
        build_cache(reference, examples, make_safety_tokens(reference), out, dtype="float32", rows_per_shard=4, batch_size=3,
                    progress=False)
    return out


def _batch(tokenizer):
    """Three demo rows as a batch (token side only): the response positions whose logits are compared."""
    examples, _ = load_examples(demo_data_path("benign"), tokenizer, max_length=TINY_MAX_LENGTH, limit=3)
    return collate_examples(examples, tokenizer.pad_token_id)


def _own_logits(model, batch) -> torch.Tensor:
    """The model's own logits (its forward, its LM head) at the batch's response positions, [N, V] float32."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[batch.rows, batch.positions].float()


def _ours(model, batch):
    """The objective's view of the batch: safety-token logits [N, |S|] and response-token log-probs [N]."""
    with torch.no_grad():
        student = student_outputs(model, batch, SAFETY_IDS)
    return student.safety_logits, student.logprob


def _quantised_head_model(model_dir, quantization: str, dtype: torch.dtype):
    """`model_dir` loaded by bitsandbytes with every linear layer quantised, the LM head too (transformers skips it by
    default; a pre-quantised checkpoint may not), laid out for training as `load_model` lays it out."""
    from transformers import AutoModelForCausalLM

    config = quantization_config(quantization, dtype)
    config.llm_int8_skip_modules = []
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=dtype, device_map={"": CPU}).eval()
    guard_cpu_layers(model, CPU)
    return model


# --- Refusals -----------------------------------------------------------------------------------

def test_qlora_refuses_full_and_both_formats_at_once(tmp_path):
    common = {"output_dir": str(tmp_path), "train_device": "cpu"}
    for field in ("load_in_4bit", "load_in_8bit"):
        with pytest.raises(InvalidSetting, match=f"^{field} trains LoRA adapters on a frozen quantised base .* drop --full") as err:
            PactTrainingArguments(**common, full=True, **{field: True})
        assert err.value.field == field
    with pytest.raises(InvalidSetting, match="^load_in_4bit and load_in_8bit exclude each other; choose one$"):
        PactTrainingArguments(**common, load_in_4bit=True, load_in_8bit=True)


def test_cli_qlora_refuses_full_naming_the_flags(tmp_path, capsys):
    argv = ["train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert pact_main([*argv, "--full", "--load-in-4bit"]) == 2
    error = capsys.readouterr().err
    assert "error: --load-in-4bit: load_in_4bit trains LoRA adapters on a frozen quantised base (QLoRA)" in error
    assert "drop --full" in error
    assert pact_main([*argv, "--load_in_8bit", "--load_in_4bit"]) == 2
    assert "error: --load_in_8bit: load_in_4bit and load_in_8bit exclude each other; choose one" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        pact_main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--load_in_4bit" in text and "--load-in-8bit" in text and "NF4" in text


def _fake_bitsandbytes(monkeypatch, version: str) -> None:
    """Make `import bitsandbytes` give a module of `version` (whether or not the real one is installed)."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__=version))


def test_missing_old_or_unusable_bitsandbytes_is_named_before_anything_loads(tmp_path, monkeypatch):
    import pact.models.quantization

    common = {"output_dir": str(tmp_path), "train_device": "cpu", "load_in_4bit": True}
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import` sees when the package is not installed
    with pytest.raises(InvalidSetting, match=rf"^load_in_4bit needs bitsandbytes>={MIN_BITSANDBYTES}, which is not installed; "
                                             rf"install it with: pip install 'bitsandbytes>={MIN_BITSANDBYTES}'$"):
        PactTrainingArguments(**common)
    _fake_bitsandbytes(monkeypatch, "0.45.0")
    with pytest.raises(InvalidSetting, match=rf"^load_in_4bit needs bitsandbytes>={MIN_BITSANDBYTES}, but 0.45.0 is installed"):
        PactTrainingArguments(**common)

    def no_kernel(quantization, device):
        raise NotImplementedError(f"Could not run 'bitsandbytes::quantize_{quantization}' with arguments from the 'CPU' backend")

    _fake_bitsandbytes(monkeypatch, MIN_BITSANDBYTES)
    monkeypatch.setattr(pact.models.quantization, "_round_trip_error", no_kernel)
    with pytest.raises(InvalidSetting, match=rf"^load_in_8bit cannot run here: bitsandbytes {MIN_BITSANDBYTES} is installed but "
                                             r"has no backend for this machine: no CUDA GPU and no CPU support "
                                             r"\(NotImplementedError: Could not run 'bitsandbytes::quantize_8bit'"):
        PactTrainingArguments(**{**common, "load_in_4bit": False, "load_in_8bit": True})
    monkeypatch.setattr(pact.models.quantization, "_round_trip_error", lambda quantization, device: 1.6)
    with pytest.raises(InvalidSetting, match=r"^load_in_4bit cannot run here: .* quantises wrongly on cpu \(a test round trip is "
                                             r"off by 1.6, more than 0.2\)"):
        PactTrainingArguments(**common)


def test_cli_names_the_missing_bitsandbytes(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert pact_main(["train", "--cache", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cpu", "--load-in-4bit"]) == 2
    assert (f"error: --load-in-4bit: load_in_4bit needs bitsandbytes>={MIN_BITSANDBYTES}, which is not installed; "
            f"install it with: pip install 'bitsandbytes>={MIN_BITSANDBYTES}'") in capsys.readouterr().err


# --- The LM-head rows the objective reads --------------------------------------------------------

def test_an_untied_unquantised_head_gives_the_models_own_logits_and_log_probs(untied_model_dir):
    loaded = load_model(str(untied_model_dir), device="cpu", dtype="float32")
    assert loaded.model.lm_head.weight.data_ptr() != loaded.model.model.embed_tokens.weight.data_ptr()
    batch = _batch(loaded.tokenizer)
    safety_logits, logprob = _ours(loaded.model, batch)
    own = _own_logits(loaded.model, batch)
    torch.testing.assert_close(safety_logits, own[:, SAFETY_IDS], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logprob, own.log_softmax(-1).gather(1, batch.labels[:, None])[:, 0], rtol=1e-5, atol=1e-6)


@needs_bitsandbytes
def test_load_in_4bit_quantises_the_decoder_and_leaves_the_head_and_embeddings(untied_model_dir, tiny_model_dir,
                                                                                bitsandbytes_on_cpu):
    loaded = load_model(str(untied_model_dir), device="cpu", quantization="4bit")
    model = loaded.model
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16  # auto: bfloat16 compute
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    assert loaded.fingerprint == load_model(str(untied_model_dir), device="cpu").fingerprint  # the files, not the quantised copy
    batch = _batch(loaded.tokenizer)
    safety_logits, _ = _ours(model, batch)
    torch.testing.assert_close(safety_logits, _own_logits(model, batch)[:, SAFETY_IDS], rtol=1.6e-2, atol=1e-2)
    with pytest.raises(PactError, match=r"cannot quantise model.layers.0.self_attn.q_proj to 4 bits on CPU: its rows of 32 values "
                                        r"are not a whole number of blocks of 64"):
        load_model(str(tiny_model_dir), device="cpu", quantization="4bit")


@needs_bitsandbytes
def test_a_4bit_head_comes_out_dequantised_and_gives_the_models_own_logits(untied_model_dir, bitsandbytes_on_cpu):
    original = load_model(str(untied_model_dir), device="cpu", dtype="float32").model.lm_head.weight.detach()
    model = _quantised_head_model(untied_model_dir, "4bit", torch.float32)
    assert type(model.lm_head).__name__ == "Linear4bit" and model.lm_head.weight.dtype == torch.uint8
    _, head = causal_lm_parts(model)
    assert head.shape == original.shape
    # NF4 keeps each 64-value block (here: each row) within its code's widest half-gap of the block's absmax.
    assert ((head - original).abs() <= NF4_TOLERANCE * original.abs().amax(1, keepdim=True)).all()
    batch = _batch(load_model(str(untied_model_dir), device="cpu").tokenizer)
    safety_logits, logprob = _ours(model, batch)
    own = _own_logits(model, batch)
    torch.testing.assert_close(safety_logits, own[:, SAFETY_IDS], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logprob, own.log_softmax(-1).gather(1, batch.labels[:, None])[:, 0], rtol=1e-5, atol=1e-6)
    model.lm_head.weight.quant_state.packing_format_for_cpu = True  # what bitsandbytes' CPU inference repacking marks
    with pytest.raises(PactError, match="repacked by bitsandbytes for CPU inference"):
        causal_lm_parts(model)


@needs_bitsandbytes
def test_an_8bit_head_comes_out_dequantised_and_gives_the_models_own_logits(untied_model_dir, bitsandbytes_on_cpu):
    original = load_model(str(untied_model_dir), device="cpu", dtype="float32").model.lm_head.weight.detach()
    model = _quantised_head_model(untied_model_dir, "8bit", torch.float32)
    assert type(model.lm_head).__name__ == "Linear8bitLt" and model.lm_head.weight.dtype == torch.int8
    batch = _batch(load_model(str(untied_model_dir), device="cpu").tokenizer)
    _, before = causal_lm_parts(model)
    own = _own_logits(model, batch)  # the first forward moves the row scales from the weight into the layer's state
    _, head = causal_lm_parts(model)
    torch.testing.assert_close(head, before, rtol=0, atol=0)
    # LLM.int8() rounds each row to int8 steps of its absmax / 127 (from float16: within a step, not always the nearest).
    assert ((head - original).abs() <= original.abs().amax(1, keepdim=True) / 127).all()
    safety_logits, _ = _ours(model, batch)
    # The model's own forward also rounds the hidden states to int8 per row: one step of each off by at most this.
    with torch.no_grad():
        hidden = hidden_states_at(model, batch.input_ids, batch.attention_mask, batch.rows, batch.positions).float()
    bound = hidden.abs().amax(1, keepdim=True) / 127 * head[SAFETY_IDS].abs().sum(1)
    assert ((safety_logits - own[:, SAFETY_IDS]).abs() <= bound).all()


# --- Training ------------------------------------------------------------------------------------

def _epoch_means(metrics: list[dict], steps_per_epoch: int) -> list[float]:
    """The mean logged loss of each epoch (each epoch sees every cache row once)."""
    losses = [m["loss"] for m in metrics if "loss" in m]
    return [sum(losses[i:i + steps_per_epoch]) / steps_per_epoch for i in range(0, len(losses), steps_per_epoch)]


@needs_bitsandbytes
def test_cli_train_load_in_4bit_writes_an_adapter_and_learns(wide_cache, tmp_path, capsys, bitsandbytes_on_cpu):
    out = tmp_path / "qlora"
    assert pact_main(["train", "--cache", str(wide_cache), "--out", str(out), "--load-in-4bit", "--epochs", "3", "--batch-size", "4",
                      "--lr", "1e-2", "--device", "cpu", "--no-progress", "--seed", "0"]) == 0
    assert "trained 9 steps" in capsys.readouterr().out
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and {w.dtype for w in weights.values()} == {torch.float32}
    assert any(w.abs().max() > 0 for name, w in weights.items() if "lora_B" in name)
    config = json.loads((out / "pact_config.json").read_text())
    assert (config["load_in_4bit"], config["load_in_8bit"], config["dtype"]) == (True, False, "bfloat16")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([m["loss"], m["ce"], m["kl"]])).all() for m in metrics if "loss" in m)
    first, _, last = _epoch_means(metrics, 3)
    assert last < first - 0.1, (first, last)


@needs_bitsandbytes
def test_train_load_in_8bit_learns(wide_cache, tmp_path, bitsandbytes_on_cpu):
    result = train(PactTrainingArguments(cache=str(wide_cache), output_dir=str(tmp_path / "int8"), load_in_8bit=True, num_train_epochs=3,
                                         per_device_train_batch_size=4, learning_rate=1e-2, train_device="cpu", disable_tqdm=True))
    assert result.steps == 9 and load_file(tmp_path / "int8" / "adapter_model.safetensors")
    first, _, last = _epoch_means(result.metrics, 3)
    assert last < first - 0.1, (first, last)


@needs_bitsandbytes
def test_evaluating_between_4bit_steps_leaves_the_training_unchanged(wide_cache, tmp_path, bitsandbytes_on_cpu):
    """An eval pass (eval mode, no gradient) must not switch the 4-bit layers into bitsandbytes' inference-only CPU
    layout, which passes no gradient back: with an evaluation every other step the adapter comes out the same."""
    common = dict(cache=str(wide_cache), load_in_4bit=True, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                  seed=5, train_device="cpu", disable_tqdm=True)
    train(PactTrainingArguments(output_dir=str(tmp_path / "plain"), **common))
    result = train(PactTrainingArguments(output_dir=str(tmp_path / "evaluated"), eval_cache=str(wide_cache), eval_strategy="steps",
                                         eval_steps=2, **common))
    assert result.eval_metrics is not None
    plain, evaluated = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("plain", "evaluated"))
    assert plain.keys() == evaluated.keys()
    for name in plain:
        torch.testing.assert_close(evaluated[name], plain[name], rtol=1e-5, atol=1e-7)
