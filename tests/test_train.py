"""`pact train` and `PactTrainer` on a tiny model and a float32 cache built from it (12 rows, 3 shards of 4)."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_tiny_model
from pact.training.arguments import PactTrainingArguments
from pact.cache_tools import CacheReader
from pact.cli.main import main as pact_main
from pact.errors import InvalidSetting, PactError
from pact.objective.settings import ObjectiveArguments
from pact.planning.arguments import PlanArguments
from pact.planning.plan import plan
from pact.training.train import train
from pact.training.trainer import PactTrainer

REPO = Path(__file__).resolve().parent.parent


def _args(cache, out, **overrides) -> PactTrainingArguments:
    """Quick CPU training arguments on `cache` into `out` (4 steps of 4 rows at lr 1e-3), changed by `overrides`."""
    settings = dict(cache=str(cache), output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, seed=3,
                    train_device="cpu", disable_tqdm=True)
    settings.update(overrides)
    return PactTrainingArguments(**settings)


def test_train_refuses_to_pick_the_run_folder_itself(float32_cache, tmp_path, monkeypatch):
    """Without output_dir, train() refuses by name instead of writing into transformers' ./trainer_output."""
    monkeypatch.chdir(tmp_path)
    args = PactTrainingArguments(cache=str(float32_cache), max_steps=1, train_device="cpu", disable_tqdm=True)
    with pytest.raises(InvalidSetting, match="output_dir is required") as err:
        train(args)
    assert err.value.field == "output_dir" and list(tmp_path.iterdir()) == []


def _trainer(cache, model_dir, out, **overrides):
    """A PactTrainer over `cache` on a LoRA student of the model in `model_dir` (Python API, as a user builds it)."""
    from peft import LoraConfig, get_peft_model

    from pact.models.loading import load_model

    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    settings = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, train_device="cpu",
                    disable_tqdm=True)
    trainer_kwargs = {key: overrides.pop(key) for key in ("objective", "eval_cache", "force") if key in overrides}
    settings.update(overrides)
    return PactTrainer(model, PactTrainingArguments(**settings), cache=cache, processing_class=loaded.tokenizer,
                       **trainer_kwargs)


def test_train_writes_the_outputs_the_ecosystem_expects(float32_cache, tmp_path):
    """Adapter and tokenizer in save_pretrained layout, the project's settings in pact_config.json (never config.json),
    metrics.jsonl per step (loss = ce + lambda kl, over the step's response tokens) and curves.png."""
    out = tmp_path / "run"
    result = train(_args(float32_cache, out))
    assert result.steps == 4
    assert load_file(out / "adapter_model.safetensors") and (out / "adapter_config.json").exists()
    assert (out / "tokenizer.json").exists() and not (out / "config.json").exists()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    reader = CacheReader(float32_cache)
    for record in lines:
        assert {"step", "loss", "ce", "kl", "lr", "grad_norm", "tokens", "seconds"} <= record.keys()
        assert record["loss"] == pytest.approx(record["ce"] + record["kl"], rel=1e-5)
    assert sum(m["tokens"] for m in lines[:3]) == sum(len(row["post_count"]) for row in reader)  # epoch 1: every row once
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "pact_config.json").read_text())
    assert config["lora_r"] == 8 and config["objective"]["lam"] == 1.0 and config["total_steps"] == 4


def test_the_loss_is_the_token_mean_of_the_whole_optimizer_step(float32_cache, tmp_path):
    """Batch 4 x 2 accumulated micro-batches gives the loss, metrics and adapter of batch 8 in one micro-batch."""
    one = train(_args(float32_cache, tmp_path / "one", per_device_train_batch_size=8, max_steps=2))
    accumulated = train(_args(float32_cache, tmp_path / "acc", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2))
    for want, got in zip(one.metrics, accumulated.metrics):
        assert got["tokens"] == want["tokens"]
        for key in ("loss", "ce", "kl", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
    want, got = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "acc" / "adapter_model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_large_lambda_pulls_kl_down_more_than_sft(float32_cache, tmp_path):
    """With lambda large the KL falls during training, and ends below plain SFT's (lambda 0) on the same batches."""
    kl_runs = {}
    for lam in (0.0, 50.0):
        result = train(_args(float32_cache, tmp_path / f"lam{lam}", max_steps=12, learning_rate=2e-2, lr_scheduler_type="constant"),
                       ObjectiveArguments(lam=lam))
        kl_runs[lam] = [m["kl"] for m in result.metrics]
    assert kl_runs[50.0][-1] < kl_runs[50.0][0]
    assert kl_runs[50.0][-1] < kl_runs[0.0][-1]


def test_resume_equals_uninterrupted(float32_cache, tmp_path):
    """Resuming from the step-3 checkpoint (mid-epoch 2) reproduces the uninterrupted run's adapter exactly (CPU, same seed)."""
    full = tmp_path / "full"
    train(_args(float32_cache, full, max_steps=6, save_steps=3))
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoint-6")
    for name in ("adapter_model.safetensors", "adapter_config.json", "curves.png"):
        (crashed / name).unlink()
    resumed = train(_args(float32_cache, crashed, max_steps=6, save_steps=3, resume=True))
    assert resumed.steps == 6
    want, got = load_file(full / "adapter_model.safetensors"), load_file(crashed / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    lines = [[{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (run / "metrics.jsonl").read_text().splitlines()]
             for run in (full, crashed)]
    assert [m["step"] for m in lines[1]] == [1, 2, 3, 4, 5, 6] and lines[1] == lines[0]


def test_non_empty_out_without_resume_is_refused(float32_cache, tmp_path):
    """A run never overwrites an earlier run's directory silently."""
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(PactError, match="not empty"):
        train(_args(float32_cache, tmp_path))


def test_pact_trainer_refuses_another_model_unless_forced(float32_cache, tmp_path):
    """The constructor compares the model's fingerprint with the cache's; force=True warns instead."""
    other = make_tiny_model(tmp_path / "other", seed=7)
    with pytest.raises(PactError, match="model fingerprint differs"):
        _trainer(float32_cache, other, tmp_path / "a")
    assert "model fingerprint differs" in _trainer(float32_cache, other, tmp_path / "b", force=True).warnings[0]


def test_pact_trainer_refuses_a_gate_the_cache_was_not_built_for(float32_cache, tiny_model_dir, tmp_path):
    """p0 and Tg are baked into the cache's counts: no `force` overrides them."""
    for objective, name in ((ObjectiveArguments(p0=0.8), "p0"), (ObjectiveArguments(gate_temperature=2.0), "gate_temperature")):
        with pytest.raises(PactError, match=f"gate {name}="):
            _trainer(float32_cache, tiny_model_dir, tmp_path / name, objective=objective, force=True)


def test_pact_trainer_trains_logs_and_evaluates_on_an_eval_cache(float32_cache, tiny_model_dir, tmp_path):
    """trainer.train() logs loss, ce and kl; trainer.evaluate() on an eval cache gives eval_loss = eval_ce + eval_kl."""
    trainer = _trainer(float32_cache, tiny_model_dir, tmp_path / "hf", eval_cache=float32_cache)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(entry["kl"] >= 0 and "ce" in entry for entry in logged)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_ce"] + metrics["eval_kl"], rel=1e-5)
    assert metrics["eval_tokens"] == sum(len(row["post_count"]) for row in CacheReader(float32_cache))
    with pytest.raises(PactError, match="needs an eval cache"):
        _trainer(float32_cache, tiny_model_dir, tmp_path / "none").evaluate()


@pytest.mark.parametrize("workers", [0, 1])
def test_the_train_sampler_decodes_each_shard_once_per_epoch(workers, float32_cache, tiny_model_dir, tmp_path, monkeypatch):
    """With a buffer too small for two shards, an epoch of the trainer's loader still decodes each shard exactly once,
    in this process or in its one worker process (the default), visits every row once, and the next epoch's order
    differs."""
    decodes = tmp_path / "decodes.txt"
    real_load = CacheReader.load_shard

    def load_shard(self, index):
        with open(decodes, "a") as handle:  # a file, so a worker process's decodes are counted too
            handle.write(f"{index}\n")
        return real_load(self, index)

    monkeypatch.setattr(CacheReader, "load_shard", load_shard)
    reader = CacheReader(float32_cache, buffer_bytes=1)
    trainer = _trainer(reader, tiny_model_dir, tmp_path / "s", per_device_train_batch_size=3, dataloader_num_workers=workers)
    loader = trainer.get_train_dataloader()
    orders = []
    for epoch in (0, 1):
        loader.batch_sampler.set_epoch(epoch)
        decodes.write_text("")
        orders.append([row for batch in loader for row in batch["batch"].example_ids.tolist()])
        assert sorted(decodes.read_text().split()) == [str(i) for i in range(len(reader.shards))]
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(row["example_id"] for row in CacheReader(float32_cache))
    assert orders[0] != orders[1]


def test_gradient_checkpointing_gives_the_same_adapter(float32_cache, tmp_path):
    """Recomputing activations in backward changes memory, not the result."""
    plain = train(_args(float32_cache, tmp_path / "plain", max_steps=2))
    checkpointed = train(_args(float32_cache, tmp_path / "gc", max_steps=2, gradient_checkpointing=True))
    assert [m["loss"] for m in checkpointed.metrics] == pytest.approx([m["loss"] for m in plain.metrics], rel=1e-6)
    want = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    got = load_file(tmp_path / "gc" / "adapter_model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_cli_train_runs_and_help_lists_the_hugging_face_names_and_the_old_ones(float32_cache, tmp_path, capsys):
    """`pact train` runs with the old short flags; --help lists the HF names, the aliases and the objective's constants."""
    out = tmp_path / "cli"
    assert pact_main(["train", "--cache", str(float32_cache), "--out", str(out), "--max-steps", "2", "--batch-size", "3",
                      "--device", "cpu", "--no-progress", "--lambda", "2.0", "--lora-targets", "q_proj,v_proj"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert json.loads((out / "pact_config.json").read_text())["objective"]["lam"] == 2.0
    with pytest.raises(SystemExit):
        pact_main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--output_dir", "--learning_rate", "--per_device_train_batch_size", "--gradient_accumulation_steps",
                 "--num_train_epochs", "--max_steps", "--lora_r", "--lora_alpha", "--lora_target_modules", "--report_to",
                 "--save_steps", "--seed", "--lr_scheduler_type", "--warmup_steps", "--weight_decay", "--max_grad_norm", "--bf16",
                 "--gradient_checkpointing", "--resume_from_checkpoint", "--resume", "--config", "--eval_cache",
                 "--out", "--lr", "--batch-size", "--grad-accum", "--epochs", "--lora-targets", "--lambda", "--scheduler",
                 "--no-progress", "--p0", "--tau", "--gate-offset", "--free-steps"):
        assert flag in text, flag


def _parse(argv):
    """The (ObjectiveArguments, PactTrainingArguments) `pact train argv` would run with."""
    import argparse

    from pact.cli import train as command

    parser = argparse.ArgumentParser(prog="pact")
    command.register(parser.add_subparsers())
    return command.parse(parser.parse_args(["train", *argv]))


def _same(a, b) -> None:
    """Two parses give the same objective and the same training arguments."""
    objective_a, training_a = a
    objective_b, training_b = b
    assert objective_a == objective_b
    assert training_a.to_dict() == training_b.to_dict()


REPRO_FLAGS = ["--cache", "runs/repro/cache-mix", "--output_dir", "runs/repro/mix/pact-seed0", "--lora_r", "8", "--lora_alpha", "32",
               "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "125", "--per_device_train_batch_size", "8",
               "--learning_rate", "2e-4", "--lr_scheduler_type", "constant", "--lambda", "1.0", "--seed", "0", "--device", "cpu"]


def test_the_repro_yaml_equals_the_same_flags_and_flags_override_it(tmp_path):
    """examples/repro_train.yaml parses to exactly what the flags give; a flag after --config wins over the file, and a
    JSON file with alias keys (`lr`, `lambda`) reads the same."""
    yaml_file = REPO / "examples" / "repro_train.yaml"
    _same(_parse(["--config", str(yaml_file)]), _parse(REPRO_FLAGS))
    objective, training = _parse(["--config", str(yaml_file), "--learning_rate", "1e-4", "--lambda", "2"])
    assert training.learning_rate == 1e-4 and objective.lam == 2.0 and training.max_steps == 125
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"cache": "runs/repro/cache-mix", "out": "runs/repro/mix/pact-seed0", "lr": "2e-4",
                                     "scheduler": "constant", "lambda": 1, "max_steps": 125, "batch-size": 8, "seed": 0,
                                     "device": "cpu"}))
    _same(_parse(["--config", str(json_file)]), _parse(REPRO_FLAGS))


def test_a_config_file_with_an_unknown_or_bad_setting_is_named(tmp_path, capsys):
    """An unknown key and a value the field refuses are named with the file."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: c\nlearnin_rate: 1e-3\n")
    assert pact_main(["train", "--config", str(bad)]) == 2
    assert f"--config {bad}: unknown setting 'learnin_rate'" in capsys.readouterr().err
    bad.write_text("cache: c\nper_device_train_batch_size: 0\n")
    assert pact_main(["train", "--config", str(bad)]) == 2
    assert f"{bad} (per_device_train_batch_size): per_device_train_batch_size must be an integer >= 1, got 0" in capsys.readouterr().err


def test_the_run_folder_loads_with_auto_peft_and_exports_merged(float32_cache, tiny_model_dir, tmp_path, capsys):
    """AutoPeftModelForCausalLM.from_pretrained(run) gives the trained model's logits; `pact export --merge` writes a full
    safetensors model whose logits equal adapter + base within 1e-4, loadable by AutoModelForCausalLM."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train(_args(float32_cache, out, max_steps=2, learning_rate=5e-2))
    ids = CacheReader(float32_cache)[0]["input_ids"].unsqueeze(0)
    adapted = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        want = adapted(ids).logits
        assert (want - base(ids).logits).abs().max() > 1e-4  # the adapter does change the model
    assert pact_main(["export", str(out), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").exists() and not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=0, atol=1e-4)
    capsys.readouterr()
    assert pact_main(["export", str(out), "--merge", "--out", str(tmp_path / "merged")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_full_run_loads_with_auto_model_and_keeps_its_settings_apart(float32_cache, tmp_path):
    """--full writes the model's own config.json (AutoModelForCausalLM loads it) and the project's pact_config.json."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    train(_args(float32_cache, out, max_steps=1, full=True))
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert json.loads((out / "pact_config.json").read_text())["full"] is True
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_push_to_hub_uploads_the_run_folder(float32_cache, tmp_path, monkeypatch):
    """--push_to_hub creates the repo and uploads the output folder as the Trainer does (hub calls replaced by a local
    stand-in: no network)."""
    import huggingface_hub

    calls = {}

    class Hub:
        def create_repo(self, repo_id, **kwargs):
            calls["repo"] = repo_id
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.setdefault("uploads", []).append((repo_id, Path(folder_path)))
            return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="",
                                              commit_description="", oid="0" * 40)

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    import transformers.trainer

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda *args, **kwargs: Hub(), raising=False)
    out = tmp_path / "run"
    train(_args(float32_cache, out, max_steps=1, push_to_hub=True, hub_model_id="someone/pact-run"))
    assert calls["repo"] == "someone/pact-run"
    assert ("someone/pact-run", out) in calls["uploads"]


def test_the_repro_yaml_runs_with_its_paths_overridden(float32_cache, tmp_path, capsys):
    """`pact train --config examples/repro_train.yaml` runs (on the test cache, one step, paths given as flags)."""
    out = tmp_path / "repro"
    assert pact_main(["train", "--config", str(REPO / "examples" / "repro_train.yaml"), "--cache", str(float32_cache),
                      "--output_dir", str(out), "--max_steps", "1", "--no-progress"]) == 0
    assert "trained 1 steps" in capsys.readouterr().out
    recorded = json.loads((out / "pact_config.json").read_text())
    assert recorded["learning_rate"] == 2e-4 and recorded["lora_r"] == 8 and recorded["seed"] == 0


def test_report_to_is_none_by_default(float32_cache, tiny_model_dir, tmp_path):
    """No logging integration is set up unless asked for, whatever is installed (tensorboard, wandb, ...)."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    trainer = _trainer(float32_cache, tiny_model_dir, tmp_path / "run")
    assert trainer.args.report_to == [] and PactTrainingArguments(output_dir=str(tmp_path)).report_to == []
    integrations = tuple(INTEGRATION_TO_CALLBACK.values())
    assert [type(c).__name__ for c in trainer.callback_handler.callbacks if isinstance(c, integrations)] == []


def test_report_to_tensorboard_writes_the_loss_and_its_parts(float32_cache, tmp_path):
    """`--report_to tensorboard` writes one event file under the run folder's runs/ with train/loss, train/ce and
    train/kl at every step: the numbers metrics.jsonl holds."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (`pip install tensorboard` to run this test)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert pact_main(["train", "--cache", str(float32_cache), "--output_dir", str(out), "--max_steps", "2",
                      "--per_device_train_batch_size", "4", "--device", "cpu", "--no-progress", "--report_to", "tensorboard"]) == 0
    events = list(out.glob("runs/*/events.out.tfevents.*"))
    assert len(events) == 1
    logged = EventAccumulator(str(events[0].parent)).Reload()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "ce", "kl"):
        scalars = logged.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([m[key] for m in metrics], rel=1e-6), key


# --- Gradient checkpointing turned on when the planner says the run would not fit without it ---------

class CheckpointingRecorder(PactTrainer):
    """A PactTrainer that records, at every loss, whether the model it trains recomputes its decoder layers."""

    seen: list[bool] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Record `model.is_gradient_checkpointing`, then compute the loss as PactTrainer does."""
        CheckpointingRecorder.seen.append(bool(model.is_gradient_checkpointing))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.fixture(scope="module")
def planned_needs(float32_cache, tiny_model_dir) -> tuple[int, int]:
    """What `pact plan` says the tiny run's cached-PACT step needs (peak plus margin) without and with gradient
    checkpointing: batch 4, float32, LoRA defaults, rows of the cache's longest row, its safety tokens."""
    reader = CacheReader(float32_cache)
    settings = PlanArguments(model=str(tiny_model_dir), per_device_train_batch_size=4, max_length=int(reader.row_lengths().max()),
                             dtype="float32", safety_tokens=len(reader.safety_ids))
    needs = [plan(dataclasses.replace(settings, gradient_checkpointing=on)).variants["cached_pact"].required_bytes
             for on in (False, True)]
    assert needs[1] < needs[0], "checkpointing must lower the tiny model's planned peak for these tests to mean anything"
    return needs[0], needs[1]


@pytest.mark.parametrize("memory, settings, expect_on, expect_line", [
    ("between", {}, True, "gradient checkpointing on: the step would not fit otherwise"),
    ("plenty", {}, False, None),
    ("between", {"auto_gradient_checkpointing": False}, False, None),
    ("plenty", {"gradient_checkpointing": True}, True, None),
    ("too_little", {}, False, "warning: the step may not fit even with gradient checkpointing"),
])
def test_gradient_checkpointing_is_turned_on_when_the_plan_needs_it(float32_cache, planned_needs, tmp_path, capsys, memory,
                                                                    settings, expect_on, expect_line):
    """With `plan_memory` between the planned need with and without checkpointing, `train()` turns checkpointing on
    (recorded, and the model really recomputes) and says why; with plenty of memory, with the automatic choice off, it
    stays off; an explicit on stays on; when even checkpointing does not fit, it warns and changes nothing."""
    without, checkpointed = planned_needs
    plan_memory = {"between": f"{(without + checkpointed) // 2}b", "plenty": "1TiB", "too_little": f"{checkpointed - 1}b"}[memory]
    args = _args(float32_cache, tmp_path / "run", max_steps=1, plan_memory=plan_memory, **settings)
    CheckpointingRecorder.seen = []
    train(args, trainer_class=CheckpointingRecorder)
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "pact_config.json").read_text())["gradient_checkpointing"] is expect_on
    assert CheckpointingRecorder.seen and set(CheckpointingRecorder.seen) == {expect_on}
    if expect_on:
        assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    if expect_line:
        line = next(line for line in printed.splitlines() if expect_line in line)
        assert f"{without / 2**30:.2f} GiB without gradient checkpointing" in line
    else:
        assert "gradient checkpointing on" not in printed and "may not fit" not in printed


def test_a_bad_plan_memory_is_named():
    """`plan_memory` is parsed as `pact plan --gpu-memory` is, and a bad value is refused naming the field."""
    with pytest.raises(InvalidSetting, match="plan_memory must be a memory size .* got 'lots'") as caught:
        PactTrainingArguments(output_dir="x", cache="c", plan_memory="lots")
    assert caught.value.field == "plan_memory"
