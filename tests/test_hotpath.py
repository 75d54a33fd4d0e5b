"""The training hot path: host syncs and device copies per optimizer step (counted by `tests/sync_counter.py`), the
non-finite guard that needs no sync, worker-collated batches, the causal mask that spares transformers' host reads, and
gradient checkpointing with LoRA (same loss and gradients, less activation memory)."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
from transformers import TrainerCallback

from helpers import tiny_llama_config
from pact.training.arguments import PactTrainingArguments
from pact.cache_tools import CacheError, CacheReader
from pact.data.batch import collate_rows
from pact.errors import CheckFailed
from pact.objective.loss import pact_batch_loss
from pact.objective.settings import ObjectiveArguments
from pact.models.parts import causal_attention_mask, hidden_states_at
from sync_counter import StepSyncs, SyncCounter
from test_qlora import bitsandbytes_on_cpu, needs_bitsandbytes, wide_cache, wide_model_dir  # noqa: F401  (fixtures)


def _args(cache, out, **overrides) -> PactTrainingArguments:
    """CPU training arguments on `cache` into `out`: 4 steps of 2 micro-batches of 2 rows, a log and a checkpoint every
    second step, changed by `overrides`."""
    settings = dict(cache=str(cache), output_dir=str(out), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    logging_steps=2, save_steps=2, learning_rate=1e-3, lr_scheduler_type="constant", seed=3, train_device="cpu",
                    disable_tqdm=True)
    settings.update(overrides)
    return PactTrainingArguments(**settings)


class _Checkpointing(TrainerCallback):
    """Notes at each step whether the model trains with activation checkpointing on."""

    def __init__(self):
        self.seen: set[bool] = set()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.seen.add(bool(model.is_gradient_checkpointing))


def _train_counted(args):
    """`pact.training.train.train(args)` as `pact train` runs it, inside a CPU `SyncCounter`; the `StepSyncs` of its steps and
    whether checkpointing was on."""
    from pact.training.train import train
    from pact.training.trainer import PactTrainer

    counter = SyncCounter("cpu")
    steps, checkpointing = StepSyncs(counter), _Checkpointing()

    class Counted(PactTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(steps)
            self.add_callback(checkpointing)

    with counter:
        train(args, trainer_class=Counted)
    return steps.steps, checkpointing.seen


# --- the counter itself ---------------------------------------------------------------------------------------------

def test_the_counter_counts_reads_data_dependent_operators_and_copies_between_devices():
    """Each kind of sync is counted once, with the line that made it; arithmetic, views and reads of tensors on another
    device type are not; a pageable copy to another device is blocking even with `non_blocking`."""
    values = torch.tensor([1.0, -2.0, 3.0])
    counter = SyncCounter("cpu")
    with counter:
        doubled = values * 2 + 1
        _ = doubled[1:].reshape(2, 1)
        assert doubled[0].item() == 3.0
        assert bool(doubled[0] > 0)
        assert values.tolist() == [1.0, -2.0, 3.0]
        assert torch.equal(values, values.clone())
        assert values[values > 0].shape == (2,)
        assert torch.nonzero(values).shape == (3, 1)
        _ = values.to("meta")
        _ = values.to("meta", non_blocking=True)
    counts = counter.counts
    assert (counts.host_reads, counts.data_dependent, counts.blocking_copies, counts.async_copies) == (3, 3, 2, 0), counts.describe()
    assert counts.syncs == 8
    assert all("test_hotpath.py" in event.where for event in counts.events), counts.describe()
    assert [event.op for event in counts.events[-2:]] == ["aten._to_copy.default host to device (pageable)"] * 2
    elsewhere = SyncCounter("cuda")
    with elsewhere:
        values.sum().item()
        values.tolist()
    assert elsewhere.counts.syncs == 0


# --- syncs per optimizer step of a real run ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["lora", "full", "lora-checkpointing", "full-checkpointing"])
def test_an_optimizer_step_syncs_once_when_it_logs_and_never_otherwise(variant, float32_cache, tmp_path):
    """A `pact train` run (LoRA or full, with or without gradient checkpointing; 2 micro-batches per step; a log and a checkpoint
    every second step): from the first micro-batch of a step to the next step's, one host read on a step that logs and
    saves (the guard's `tolist`, which the log and the checkpoint share), none on a step that does neither, none
    inside forward, backward and optimizer, and no blocking copy. The first step alone also validates the safety-token
    weights once (the CPU masked-KL path reads them). With `--gradient_checkpointing` the model does train with it on."""
    extra = {**(dict(full=True) if variant.startswith("full") else {}),
             **(dict(gradient_checkpointing=True) if variant.endswith("checkpointing") else {})}
    steps, checkpointing = _train_counted(_args(float32_cache, tmp_path / "run", **extra))
    assert checkpointing == {variant.endswith("checkpointing")}
    assert [(s.step, s.logged, s.saved) for s in steps] == [(1, False, False), (2, True, True), (3, False, False), (4, True, True)]
    for record in steps:
        report = f"step {record.step}:\n{record.whole.describe()}"
        first_step_checks = [e for e in record.whole.events if record.step == 1 and "kernels/_checks.py" in e.where]
        events = [e for e in record.whole.events if e not in first_step_checks]
        assert len(first_step_checks) == (3 if record.step == 1 else 0), report
        assert [e.op for e in events] == (["Tensor.tolist"] if record.logged else []), report
        assert all("step_guard.py" in e.where for e in events), report
        assert record.whole.blocking_copies == 0 and record.inner.syncs == len(first_step_checks), report
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4] and all(m["loss"] == pytest.approx(m["ce"] + m["kl"], rel=1e-5) for m in lines)


def test_logging_every_step_reads_once_per_step(float32_cache, tmp_path):
    """`pact train`'s default, a log every step: exactly one host read per optimizer step after the first."""
    steps, _ = _train_counted(_args(float32_cache, tmp_path / "run", logging_steps=1, save_steps=0))
    assert [s.logged for s in steps] == [True] * 4
    assert [s.whole.syncs for s in steps[1:]] == [1, 1, 1], "\n".join(s.whole.describe() for s in steps)


# --- a non-finite step is never applied --------------------------------------------------------------------------

def _lora_trainer(cache, model_dir, out, optim: str, steps: int):
    """A LoRA `PactTrainer` (seeded adapters, a log every second step, no checkpoints) for `steps` steps."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from pact.models.loading import load_model
    from pact.training.trainer import PactTrainer

    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    set_seed(0)
    model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    args = _args(cache, out, gradient_accumulation_steps=1, save_steps=0, optim=optim, max_steps=steps)
    return PactTrainer(model, args, cache=cache, processing_class=loaded.tokenizer)


def _poisoned_run(cache, model_dir, out, monkeypatch, optim: str, failing_step: int):
    """`_lora_trainer` for 4 steps whose loss is NaN at `failing_step`; returns it and the error it stops with."""
    import pact.training.trainer

    real = pact.training.trainer.pact_batch_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        result = real(*args, **kwargs)
        if calls["n"] == failing_step:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(pact.training.trainer, "pact_batch_loss", poisoned)
    trainer = _lora_trainer(cache, model_dir, out, optim, 4)
    with pytest.raises(CheckFailed) as caught:
        trainer.train()
    return trainer, str(caught.value)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_a_non_finite_step_between_logs_is_never_applied(optim, float32_cache, tiny_model_dir, tmp_path, monkeypatch):
    """Step 3 of 4 goes non-finite and only steps 2 and 4 log. With the fused optimizer (the default) no host read
    happens at step 3: the optimizer skips steps 3 and 4 on the device and the run stops at step 4's log, naming step 3.
    With an unfused one the check runs on the host at every step and stops at step 3. Either way the adapter and the
    optimizer's state are exactly those of a clean run stopped after step 2."""
    failed, message = _poisoned_run(float32_cache, tiny_model_dir, tmp_path / "bad", monkeypatch, optim, failing_step=3)
    assert message.startswith("step 3: the loss is nan")
    assert failed.state.global_step == (4 if optim == "adamw_torch_fused" else 2)
    monkeypatch.undo()
    clean = _lora_trainer(float32_cache, tiny_model_dir, tmp_path / "good", optim, 2)
    clean.train()
    want = {n: p for n, p in clean.model.named_parameters() if p.requires_grad}
    got = {n: p for n, p in failed.model.named_parameters() if p.requires_grad}
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    inner = getattr(failed.optimizer, "optimizer", failed.optimizer)
    assert {float(state["step"]) for state in inner.state.values()} == {2.0}


# --- the data path ------------------------------------------------------------------------------------------------

def test_a_damaged_shard_met_in_a_worker_is_raised_with_its_own_message(float32_cache, tmp_path):
    """A shard whose bytes changed (same size) is found by the worker that decodes it; `pact train` raises the reader's
    `CacheError` itself, naming the shard, not the DataLoader's wrapped copy with the worker's traceback."""
    import shutil

    from pact.training.train import train

    cache = tmp_path / "cache"
    shutil.copytree(float32_cache, cache)
    shard = cache / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError) as caught:
        train(_args(cache, tmp_path / "run", bucket_window=0, dataloader_num_workers=1, max_steps=6))
    assert str(caught.value).startswith("shard-00001.arrow: sha256 ") and "does not match" in str(caught.value)
    assert "DataLoader worker" not in str(caught.value) and "\n" not in str(caught.value)


def test_batches_are_collated_in_a_worker_and_move_as_a_whole(float32_cache, tiny_model_dir, tmp_path):
    """The default loader (one worker) gives collated `CacheBatch`es equal to collating the same rows here; moving one
    (`to`, `non_blocking`) keeps every field."""
    from test_train import _trainer

    reader = CacheReader(float32_cache)
    trainer = _trainer(float32_cache, tiny_model_dir, tmp_path / "w", per_device_train_batch_size=3)
    loader = trainer.get_train_dataloader()
    assert loader.num_workers == 1
    for item in loader:
        ids = item["batch"].example_ids.tolist()
        here = collate_rows([reader[i] for i in ids], trainer.pad_id)
        moved = item["batch"].to("cpu", non_blocking=True)
        assert item["tokens"] == here.tokens
        for name, value in vars(here).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(getattr(moved, name), value), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and host-to-device copies need a GPU")
def test_on_a_gpu_batches_arrive_pinned_and_move_without_blocking(float32_cache, tiny_model_dir, tmp_path):
    """With CUDA the loader pins each batch in its thread and the move to the GPU counts only asynchronous copies."""
    from test_train import _trainer

    trainer = _trainer(float32_cache, tiny_model_dir, tmp_path / "g", train_device="cuda")
    item = next(iter(trainer.get_train_dataloader()))
    assert item["batch"].input_ids.is_pinned()
    counter = SyncCounter("cuda")
    with counter:
        item["batch"].to("cuda", non_blocking=True)
    assert counter.counts.syncs == 0 and counter.counts.async_copies > 0, counter.counts.describe()


# --- the causal mask ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_causal_mask_gives_the_response_positions_what_the_padding_mask_gives(implementation, float32_cache):
    """On a right-padded batch of cache rows, hidden states at the response positions under `causal_attention_mask` equal
    those under the 2-D padding mask (within float32 rounding), with grad (the model's forward) and without (the decoder's),
    and the forward under it reads nothing on the host."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(384, attn_implementation=implementation)).eval()
    reader = CacheReader(float32_cache)
    batch = collate_rows([reader[i] for i in range(5)], 2)
    assert batch.attention_mask.min() == 0  # there is padding
    mask = causal_attention_mask(model, batch.input_ids.shape[1], torch.device("cpu"))
    assert mask.shape == (1, 1, *batch.input_ids.shape[1:] * 2)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            want = hidden_states_at(model, batch.input_ids, batch.attention_mask, batch.rows, batch.positions)
            counter = SyncCounter("cpu")
            with counter:
                got = hidden_states_at(model, batch.input_ids, mask, batch.rows, batch.positions)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert counter.counts.syncs == 0, counter.counts.describe()


def test_models_whose_attention_is_more_than_causal_get_no_plain_mask():
    """A sliding window (or flash attention) needs transformers' own mask: `causal_attention_mask` gives None."""
    from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

    windowed = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=4, num_key_value_heads=2, sliding_window=4))
    assert causal_attention_mask(windowed, 8, torch.device("cpu")) is None
    flash = LlamaForCausalLM(tiny_llama_config(64))
    flash.config._attn_implementation = "flash_attention_2"
    assert causal_attention_mask(flash, 8, torch.device("cpu")) is None


# --- gradient checkpointing with LoRA -----------------------------------------------------------------------------

def _peak_bytes(run) -> int:
    """Peak growth of the CPU allocator's live bytes while `run()` runs, from torch's profiler memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = [e["args"] for e in json.load(open(trace.name))["traceEvents"] if e.get("name") == "[memory]"]
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_lora_keeps_loss_and_gradients_and_saves_memory(reentrant, float32_cache):
    """A LoRA student (4 layers) on a cache batch: with checkpointing enabled as the Trainer enables it (non-reentrant,
    `pact train`'s default, or reentrant, where the embeddings' output must require grad) the loss and every LoRA
    gradient equal those without it, and the peak of live activation memory in forward + backward is lower."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    reader = CacheReader(float32_cache)
    batch = collate_rows([reader[i] for i in range(8)], 2)
    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = LlamaForCausalLM(tiny_llama_config(384, num_hidden_layers=4, hidden_size=64, intermediate_size=256))
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        out = {}

        def step():
            result = pact_batch_loss(model, batch, reader.safety_ids, reader.safety_weights, ObjectiveArguments())
            result.loss.backward()
            out["loss"] = result.loss.detach()

        peak = _peak_bytes(step)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g.abs().sum() > 0 for g in grads.values())
        results[checkpointing] = (out["loss"], grads, peak)
    (loss, grads, plain_peak), (gc_loss, gc_grads, gc_peak) = results[False], results[True]
    torch.testing.assert_close(gc_loss, loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(gc_grads[name], grads[name], rtol=1e-5, atol=1e-8)
    assert gc_peak < 0.8 * plain_peak, (gc_peak, plain_peak)


def test_cpu_weights_are_value_checked_once_until_they_change():
    """The masked KL reads CPU weights on its first call only; an in-place change (a new version) is checked again."""
    from pact.kernels import masked_kl

    logits, target, mask = torch.randn(3, 4), torch.randn(3, 4), torch.ones(3, dtype=torch.bool)
    weights = torch.tensor([0.5, 0.0, 1.0, 0.25])
    counts = []
    for _ in range(2):
        counter = SyncCounter("cpu")
        with counter:
            masked_kl(logits, target, weights, mask)
        counts.append(counter.counts.host_reads)
    assert counts == [3, 0]
    weights[1] = -1.0
    with pytest.raises(ValueError, match="weights must be >= 0"):
        masked_kl(logits, target, weights, mask)



@needs_bitsandbytes
def test_qlora_with_gradient_checkpointing_syncs_as_lora_does(wide_cache, tmp_path, bitsandbytes_on_cpu):
    """QLoRA (`--load-in-4bit`, peft's k-bit preparation) with `--gradient_checkpointing`: checkpointing is on and, with
    no checkpoint written (saving reads every 4-bit layer's quantisation state on the host, in bitsandbytes), a step
    syncs once when it logs and never otherwise, after the first step's weight check."""
    steps, checkpointing = _train_counted(_args(wide_cache, tmp_path / "run", load_in_4bit=True, gradient_checkpointing=True,
                                                save_steps=0))
    assert checkpointing == {True}
    assert [s.logged for s in steps] == [False, True, False, True]
    assert [[e.op for e in s.whole.events] for s in steps[1:]] == [["Tensor.tolist"], [], ["Tensor.tolist"]], \
        "\n".join(s.whole.describe() for s in steps)
    assert all(s.inner.syncs == 0 for s in steps[1:])
