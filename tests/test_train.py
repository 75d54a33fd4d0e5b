"""`pact train` and `PactTrainer` on a tiny model and a cache built from it."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_tiny_model, write_jsonl
from pact.cache_tools.cli import main as cache_main
from pact.cli import main as pact_main
from pact.errors import PactError
from pact.objective import PactConfig
from pact.train import TrainConfig, train

ROWS = [
    {"instruction": f"Say the word number {i}.", "output": "zebra zebra zebra zebra quantum quantum"}
    for i in range(12)
]


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_dir, tmp_path_factory):
    """A float32 cache of 12 rows built from the tiny model with its own safety tokens."""
    root = tmp_path_factory.mktemp("train-cache")
    data = write_jsonl(root / "data.jsonl", ROWS)
    tokens = root / "safety.json"
    assert pact_main(["safety-tokens", "--aligned", str(tiny_model_dir), "--max-examples", "8", "--top", "24",
                      "--device", "cpu", "--out", str(tokens)]) == 0
    cache = root / "cache"
    assert cache_main(["build", "--model", str(tiny_model_dir), "--data", str(data), "--safety-tokens", str(tokens),
                       "--out", str(cache), "--dtype", "float32", "--device", "cpu", "--rows-per-shard", "5"]) == 0
    return cache


def _config(cache, out, **overrides):
    settings = dict(cache=str(cache), out=str(out), max_steps=4, batch_size=4, lr=1e-3, seed=3, device="cpu", progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_train_writes_every_output(tiny_cache, tmp_path):
    """Adapter in save_pretrained layout, metrics.jsonl per step, curves.png and config.json."""
    out = tmp_path / "run"
    result = train(_config(tiny_cache, out))
    assert result.steps == 4
    assert (out / "adapter_config.json").exists()
    assert load_file(out / "adapter_model.safetensors")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for record in lines:
        assert {"step", "loss", "ce", "kl", "lr", "tokens", "seconds"} <= record.keys()
        assert record["loss"] == pytest.approx(record["ce"] + record["kl"], rel=1e-5)
        assert record["tokens"] > 0 and record["seconds"] > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["lora_r"] == 8 and config["objective"]["lam"] == 1.0 and config["total_steps"] == 4


def test_large_lambda_pulls_kl_down_and_sft_pushes_it_up(tiny_cache, tmp_path):
    """With lambda large the KL falls during training; plain SFT (lambda 0) on the same data drives it up."""
    kl_runs = {}
    for lam in (0.0, 50.0):
        result = train(_config(tiny_cache, tmp_path / f"lam{lam}", max_steps=12, lr=2e-2, scheduler="constant",
                               objective=PactConfig(lam=lam)))
        kl_runs[lam] = [m["kl"] for m in result.metrics]
    assert kl_runs[50.0][-1] < kl_runs[50.0][0]
    assert kl_runs[0.0][-1] > kl_runs[0.0][0]
    assert kl_runs[50.0][-1] < kl_runs[0.0][-1]


def test_resume_equals_uninterrupted(tiny_cache, tmp_path):
    """Resuming from the step-3 checkpoint reproduces the uninterrupted run's adapter exactly (CPU, same seed)."""
    full = tmp_path / "full"
    train(_config(tiny_cache, full, max_steps=6, save_steps=3, epochs=1))
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoint-6")
    for name in ("adapter_model.safetensors", "adapter_config.json", "curves.png"):
        (crashed / name).unlink()
    resumed = train(_config(tiny_cache, crashed, max_steps=6, save_steps=3, resume=True))
    assert resumed.steps == 6
    want, got = load_file(full / "adapter_model.safetensors"), load_file(crashed / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert (crashed / "metrics.jsonl").read_text() .count("\n") == 6


def test_non_empty_out_without_resume_is_refused(tiny_cache, tmp_path):
    """A run never overwrites an earlier run's directory silently."""
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(PactError, match="not empty"):
        train(_config(tiny_cache, tmp_path))


def test_fingerprint_mismatch_is_refused_unless_forced(tiny_cache, tmp_path, capsys):
    """Another model's weights are refused with a message naming the model fingerprint; --force warns and trains."""
    other = make_tiny_model(tmp_path / "other", seed=7)
    with pytest.raises(PactError, match="model fingerprint differs"):
        train(_config(tiny_cache, tmp_path / "a", model=str(other)))
    result = train(_config(tiny_cache, tmp_path / "b", model=str(other), force=True, max_steps=1))
    assert result.steps == 1
    assert "warning: model fingerprint differs" in capsys.readouterr().out


def test_gate_parameter_baked_into_cache_is_refused(tiny_cache, tmp_path):
    """The cache stores the post-only top-p count for its p0; training with another p0 is refused."""
    with pytest.raises(PactError, match="p0"):
        train(_config(tiny_cache, tmp_path / "r", objective=PactConfig(p0=0.8)))


def test_cli_train_runs_and_help_lists_flags(tiny_cache, tmp_path, capsys):
    """`pact train` runs from the command line; --help documents the objective's constants."""
    out = tmp_path / "cli"
    assert pact_main(["train", "--cache", str(tiny_cache), "--out", str(out), "--max-steps", "2", "--batch-size", "3",
                      "--device", "cpu", "--no-progress", "--lambda", "2.0"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["objective"]["lam"] == 2.0
    with pytest.raises(SystemExit):
        pact_main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--lora-r", "--lora-targets", "--full", "--lambda", "--grad-accum", "--save-steps", "--resume", "--p0", "--tau"):
        assert flag in text


def test_pact_trainer_logs_ce_and_kl(tiny_cache, tiny_model_dir, tmp_path):
    """PactTrainer trains through transformers.Trainer with the cached loss and logs ce and kl."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from pact.models import load_model
    from pact.trainer import PactTrainer

    loaded = load_model(str(tiny_model_dir), device="cpu")
    model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3, disable_tqdm=True)
    trainer = PactTrainer(model=model, args=args, cache=tiny_cache, pad_id=loaded.tokenizer.pad_token_id)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    assert all("ce" in entry and "kl" in entry and entry["kl"] >= 0 for entry in logged)


def test_gradient_checkpointing_gives_the_same_adapter(tiny_cache, tmp_path):
    """Recomputing activations in backward changes memory, not the result."""
    plain = train(_config(tiny_cache, tmp_path / "plain", max_steps=2))
    checkpointed = train(_config(tiny_cache, tmp_path / "gc", max_steps=2, gradient_checkpointing=True))
    assert [m["loss"] for m in checkpointed.metrics] == pytest.approx([m["loss"] for m in plain.metrics], rel=1e-6)
    want = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    got = load_file(tmp_path / "gc" / "adapter_model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
