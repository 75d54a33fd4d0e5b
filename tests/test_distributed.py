"""Scaling out on torch.distributed, on CPU with gloo: the 2-process torchrun
cache build, the `--num-shards` parts joined by `merge`, resuming a crashed
multi-process build, and data-parallel and FSDP `pact train`, each against one
process.

Each torchrun launch costs about 15 s here (two fresh interpreters), so there
are three: one build, one data-parallel and one FSDP training run.

Shard bytes are compared between builds that use the same intra-op thread
count (`--threads 1`: CPU sums depend on it, whatever the environment's
OMP_NUM_THREADS or an earlier `torch.set_num_threads`); builds with other
thread counts are compared by value, within float32 rounding.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pact.cache_tools import CacheReader, load_manifest
from pact.cli.cache import main as cache_main
from pact.cache_tools.manifest import differences, save_manifest
from pact.cache_tools.writer import rank_manifest_name
from pact.distributed import contiguous_part
from pact.errors import PactError
from pact.training.arguments import PactTrainingArguments
from pact.training.train import train
from test_cache_support import (
    TINY_MAX_LENGTH, make_safety_tokens, one_thread, subprocess_env, tiny, tiny_safety, tiny_safety_file,
)

ROWS = 11  # 3 shards of 4, 4, 3 rows: rank 0 builds two, rank 1 one; an odd count leaves a rank an empty micro-batch


def _build_args(model_dir, safety_file, out, *extra, threads=1):
    return ["build", "--model", str(model_dir), "--safety-tokens", str(safety_file), "--out", str(out), "--device", "cpu",
            "--max-length", str(TINY_MAX_LENGTH), "--limit", str(ROWS), "--rows-per-shard", "4", "--batch-size", "3",
            "--dtype", "float32", "--threads", str(threads), "--quiet", *extra]


def _torchrun(*command) -> str:
    """Run `command` (a script or `-m module`, then its arguments) in 2 processes under torchrun; returns the output."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, command)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _pact_cache_script() -> list[str]:
    """The `pact-cache` console script as `$(which pact-cache)` finds it in this environment (else its module)."""
    script = Path(sys.executable).parent / "pact-cache"
    return [str(script)] if script.is_file() else ["-m", "pact.cli.cache"]


def _assert_same_rows(got_dir, want_dir) -> None:
    got, want = CacheReader(got_dir), CacheReader(want_dir)
    assert len(got) == len(want) == ROWS
    for a, b in zip(got, want):
        assert a["example_id"] == b["example_id"] and a["response_start"] == b["response_start"]
        assert torch.equal(a["input_ids"], b["input_ids"])
        # A top-p count is an integer threshold of rounded sums: allow a tie to tip by one at a rare step.
        count_diff = (a["post_count"] - b["post_count"]).abs()
        assert count_diff.max() <= 1 and (count_diff > 0).float().mean() <= 0.02
        for key in ("full_logits", "post_logits", "target_logprob", "logsumexp"):
            assert (a[key] - b[key]).abs().max() < 1e-4, key


def _sha256s(directory) -> list[str]:
    return [s["sha256"] for s in load_manifest(directory)["shards"]]


@pytest.fixture(scope="module")
def single_cache(tiny_model_dir, tiny_safety_file, tmp_path_factory):
    """The single-process float32 build everything is compared with (also the training cache)."""
    out = tmp_path_factory.mktemp("single") / "cache"
    assert cache_main(_build_args(tiny_model_dir, tiny_safety_file, out)) == 0
    return out


@pytest.fixture(scope="module")
def torchrun_cache(tiny_model_dir, tiny_safety_file, tmp_path_factory):
    """The same build by `torchrun --nproc-per-node 2 $(which pact-cache) build ...`."""
    out = tmp_path_factory.mktemp("torchrun") / "cache"
    printed = _torchrun(*_pact_cache_script(), *_build_args(tiny_model_dir, tiny_safety_file, out))
    assert printed.count("3 shards (0 resumed)") == 1  # one summary, from rank 0
    return out


def test_contiguous_part_splits_in_order():
    parts = [contiguous_part(range(11), 3, i) for i in range(3)]
    assert parts == [range(0, 4), range(4, 8), range(8, 11)]
    assert [contiguous_part([7], 2, i) for i in range(2)] == [[7], []]
    with pytest.raises(ValueError):
        contiguous_part(range(4), 2, 2)


def test_torchrun_build_equals_one_process(single_cache, torchrun_cache):
    _assert_same_rows(torchrun_cache, single_cache)
    assert _sha256s(torchrun_cache) == _sha256s(single_cache)  # the same shards, byte for byte
    merged, single = load_manifest(torchrun_cache), load_manifest(single_cache)
    assert differences(single, merged) == [] and merged["part"] is None
    assert sorted(p.name for p in torchrun_cache.iterdir()) == ["manifest.json", "safety_tokens.json",
                                                              "shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    assert cache_main(["verify", str(torchrun_cache)]) == 0


def test_other_thread_counts_give_the_same_values_within_rounding(tiny_model_dir, tiny_safety_file, single_cache, tmp_path):
    """Bytes are promised only for equal thread counts; with 2 threads the decoded values agree within float32 rounding."""
    assert cache_main(_build_args(tiny_model_dir, tiny_safety_file, tmp_path / "two-threads", threads=2)) == 0
    assert load_manifest(tmp_path / "two-threads")["params"]["threads"] == 2
    _assert_same_rows(tmp_path / "two-threads", single_cache)


def test_crashed_two_process_build_resumes_in_one_process(tiny_model_dir, tiny_safety_file, single_cache, torchrun_cache, tmp_path):
    """Ranks 0 and 1 were killed after recording shards 0 and 2; a single process reuses both and builds shard 1."""
    out = tmp_path / "crashed"
    shutil.copytree(torchrun_cache, out)
    manifest = load_manifest(out)
    (out / "manifest.json").unlink()
    (out / "shard-00001.arrow").unlink()
    for rank, shards in ((0, [0]), (1, [2])):
        save_manifest(out, {**manifest, "complete": False, "shards": [manifest["shards"][i] for i in shards]},
                      rank_manifest_name(rank, 2))
    assert cache_main(_build_args(tiny_model_dir, tiny_safety_file, out, "--resume")) == 0
    assert _sha256s(out) == _sha256s(single_cache)
    assert not list(out.glob("manifest.rank-*"))
    assert load_manifest(out)["complete"]


def test_parts_merge_into_the_single_build(tiny_model_dir, tiny_safety_file, single_cache, tmp_path, capsys):
    """4 parts of 3 shards: one shard each, the last part empty; merged in any order they give the single build back."""
    parts = [tmp_path / f"part{i}" for i in range(4)]
    for index, part in enumerate(parts):
        assert cache_main(_build_args(tiny_model_dir, tiny_safety_file, part, "--num-shards", "4", "--shard-index", str(index))) == 0
        assert load_manifest(part)["part"] == {"index": index, "count": 4}
    assert "(part 3 of 4): empty" in capsys.readouterr().out
    assert [len(load_manifest(p)["shards"]) for p in parts] == [1, 1, 1, 0]
    assert cache_main(["merge", str(tmp_path / "merged"), *map(str, [parts[2], parts[0], parts[3], parts[1]])]) == 0
    _assert_same_rows(tmp_path / "merged", single_cache)
    assert _sha256s(tmp_path / "merged") == _sha256s(single_cache)
    merged = load_manifest(tmp_path / "merged")
    assert differences(load_manifest(single_cache), merged) == [] and merged["part"] is None
    capsys.readouterr()
    assert cache_main(_build_args(tiny_model_dir, tiny_safety_file, tmp_path / "bad", "--num-shards", "2", "--shard-index", "2")) == 2
    assert "--shard-index 2 is not in 0..1" in capsys.readouterr().err


def test_merge_refuses_missing_duplicate_and_mismatched_parts(tiny, tiny_model_dir, tiny_safety_file, single_cache, tmp_path, capsys):
    def part(name, index, count, *extra, safety=tiny_safety_file):
        out = tmp_path / name
        assert cache_main(_build_args(tiny_model_dir, safety, out, "--num-shards", str(count), "--shard-index", str(index), *extra)) == 0
        return str(out)

    first, second = part("p0", 0, 2), part("p1", 1, 2)
    other_safety = make_safety_tokens(tiny, seed=1).save(tmp_path / "other_safety.json")
    cases = [
        ([first], "part(s) 1 of 2 missing"),
        ([first, second, first], "part 0 of 2 is given twice"),
        ([first, part("third", 1, 3)], "is part 1 of 3"),
        ([first, part("data", 1, 2, "--limit", "10")], "data fingerprint"),
        ([first, part("params", 1, 2, "--zstd-level", "5")], "zstd level: 3 vs 5"),
        ([first, part("safety", 1, 2, safety=other_safety)], "safety-token ids"),
        ([first, str(single_cache)], "cannot merge parts of a --num-shards build with whole caches"),
    ]
    capsys.readouterr()
    for number, (inputs, message) in enumerate(cases):
        assert cache_main(["merge", str(tmp_path / f"out{number}"), *inputs]) == 2, message
        assert message in capsys.readouterr().err


def _train_args(cache, out, batch_size, *extra):
    return ["train", "--cache", str(cache), "--out", str(out), "--batch-size", str(batch_size), "--grad-accum", "2",
            "--max-steps", "2", "--save-steps", "1", "--lr", "1e-3", "--seed", "3", "--device", "cpu", "--no-progress", *extra]


def _one_process(cache, out, **overrides):
    """The single-process run the 2-process runs are compared with: 10 rows x 2 micro-batches per step."""
    settings = dict(cache=str(cache), output_dir=str(out), per_device_train_batch_size=10, gradient_accumulation_steps=2,
                    max_steps=2, save_steps=1, learning_rate=1e-3, seed=3, train_device="cpu", disable_tqdm=True)
    settings.update(overrides)
    return train(PactTrainingArguments(**settings))


def _assert_same_run(single, two, rel: float) -> None:
    """The 2-process run folder `two` logged the single run's metrics (within `rel`) on the same response tokens."""
    logged = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2 == len(single.metrics)
    for want, got in zip(single.metrics, logged):
        assert got["tokens"] == want["tokens"] == 244
        for key in ("loss", "ce", "kl", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=rel), key


def test_two_process_training_equals_one_process_on_the_same_global_batch(single_cache, tmp_path):
    """2 ranks x 5 rows x 2 micro-batches against 1 process x 10 rows x 2: the step's global batch is the epoch's 11 rows
    (10, then 1: rank 1's part of the second micro-batch is empty). Same loss, gradients and adapter."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = _one_process(single_cache, one)
    assert "trained 2 steps" in _torchrun("-m", "pact.cli", *_train_args(single_cache, two, 5))
    _assert_same_run(single, two, rel=1e-6)
    # AdamW's first moment after step 1 is 0.1 x the step's (clipped) gradient.
    moments = [torch.load(run / "checkpoint-1" / "optimizer.pt", weights_only=True)["state"] for run in (one, two)]
    assert moments[0].keys() == moments[1].keys()
    for index in moments[0]:
        torch.testing.assert_close(moments[1][index]["exp_avg"], moments[0][index]["exp_avg"], atol=1e-8, rtol=1e-5)
    want, got = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all((want[k] - got[k]).abs().max() < 1e-6 for k in want)
    config = json.loads((two / "pact_config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch_size"] == 20
    with pytest.raises(PactError, match="written by a run of 2 process"):
        _one_process(single_cache, two, max_steps=3, resume=True)


def test_the_loss_runs_the_forward_of_a_ddp_wrapped_model(single_cache, tiny_model_dir, tmp_path):
    """What PactTrainer relies on under accelerate's DDP: `cached_pact_loss` calls the wrapper's forward, same loss."""
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    from pact.objective.loss import cached_pact_loss
    from pact.models.loading import load_model
    from pact.objective.settings import ObjectiveArguments

    reader = CacheReader(single_cache)
    rows = [reader[i] for i in range(3)]
    model = get_peft_model(load_model(str(tiny_model_dir), device="cpu").model, LoraConfig(r=4, target_modules=["q_proj"]))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        calls = []
        wrapped.register_forward_pre_hook(lambda module, args: calls.append(1))
        through_ddp = cached_pact_loss(wrapped, rows, reader.safety_ids, reader.safety_weights, ObjectiveArguments(), 2)
        through_ddp.loss.backward()
    finally:
        dist.destroy_process_group()
    direct = cached_pact_loss(model, rows, reader.safety_ids, reader.safety_weights, ObjectiveArguments(), 2)
    assert calls == [1]
    assert through_ddp.loss.item() == pytest.approx(direct.loss.item(), rel=1e-6)


def _fsdp2_sharded(model):
    """`model` sharded as accelerate's FSDP2 preparation shards it: each decoder layer, then the whole model, every
    one resharded after its forward (the root included, so its weights are gathered again for the backward)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers:
        fully_shard(layer, reshard_after_forward=True)
    return fully_shard(model, reshard_after_forward=True)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_loss_projects_inside_the_forward_of_an_fsdp2_sharded_model(single_cache, tiny_model_dir, tmp_path, lora):
    """Under FSDP2 the LM head's weight is this process's shard (a DTensor) outside the forward and freed after it: the
    loss projects inside the forward and its backward gathers the weight again. Same loss and gradients as the unwrapped
    model (1 process: the sharding machinery runs, the shard is the whole weight); the no-grad path (eval, drift) too."""
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.tensor import DTensor

    from pact.data.batch import collate_rows
    from pact.objective.loss import cached_pact_loss
    from pact.objective.student import student_outputs
    from pact.models.loading import load_model
    from pact.objective.settings import ObjectiveArguments

    reader = CacheReader(single_cache)
    rows = [reader[i] for i in range(3)]

    def student():
        model = load_model(str(tiny_model_dir), device="cpu", dtype="float32").model
        torch.manual_seed(0)  # the same random (nonzero) adapters both times
        return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)) if lora else model

    direct = student()
    want = cached_pact_loss(direct, rows, reader.safety_ids, reader.safety_weights, ObjectiveArguments(), 2)
    want.loss.backward()
    with torch.no_grad():
        want_logits = student_outputs(direct, collate_rows(rows, 2), reader.safety_ids, with_ce=False).safety_logits
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        sharded = _fsdp2_sharded(student())
        assert isinstance(sharded.get_output_embeddings().weight, DTensor)
        got = cached_pact_loss(sharded, rows, reader.safety_ids, reader.safety_weights, ObjectiveArguments(), 2)
        got.loss.backward()
        grads = {name: p.grad.full_tensor() for name, p in sharded.named_parameters() if p.grad is not None}
        with torch.no_grad():
            got_logits = student_outputs(sharded, collate_rows(rows, 2), reader.safety_ids, with_ce=False).safety_logits
    finally:
        dist.destroy_process_group()
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-6)
    want_grads = {name: p.grad for name, p in direct.named_parameters() if p.grad is not None}
    assert grads.keys() == want_grads.keys() and len(grads) == (4 if lora else 20)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-6, atol=1e-6)


def test_fsdp_training_equals_one_process_on_the_same_global_batch(single_cache, tmp_path):
    """`pact train --full --fsdp` in 2 processes (accelerate's FSDP2, with gloo: see tests/fsdp_on_cpu.py) against one
    process on the same global batch: the same per-step loss, parts and gradient norm, the same weights, saved as a model
    AutoModelForCausalLM loads, and FSDP checkpoints that `--resume` accepts."""
    from transformers import AutoModelForCausalLM

    from pact.training.run_folder import check_resume_settings, prepare_output

    one, two = tmp_path / "one", tmp_path / "two"
    single = _one_process(single_cache, one, full=True)
    launcher = Path(__file__).with_name("fsdp_on_cpu.py")
    assert "trained 2 steps" in _torchrun(launcher, *_train_args(single_cache, two, 5, "--full", "--fsdp"))
    assert (two / "checkpoint-1" / "pytorch_model_fsdp.bin").is_file()  # accelerate's FSDP checkpoint: the run was sharded
    _assert_same_run(single, two, rel=1e-5)
    want, got = (AutoModelForCausalLM.from_pretrained(run).state_dict() for run in (one, two))
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    record = json.loads((two / "pact_config.json").read_text())
    assert record["fsdp"] is True and record["world_size"] == 2
    checkpoint = prepare_output(two, resume=True)
    assert checkpoint == two / "checkpoint-2"  # its optimizer.bin read, as --resume reads it
    with pytest.raises(PactError, match="was written by a run with FSDP, this one runs without"):
        check_resume_settings(two, checkpoint, {**record, "fsdp": False})


def test_fsdp_that_accelerate_does_not_set_up_is_refused(single_cache, tmp_path, monkeypatch, capsys):
    """`accelerate launch` with an FSDP config on CPU: accelerate drops the FSDP plugin and would train unsharded, without a
    word; `pact train` refuses (exit 2) before training. (`--fsdp` on CPU processes is refused by the same check.)"""
    from pact.cli.main import main as pact_main

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file FSDP.yaml` sets
    assert pact_main(_train_args(single_cache, tmp_path / "run", 5, "--full")) == 2
    assert "asks for sharded training, but accelerate set up no FSDP (distributed type NO): it runs FSDP only on GPUs" \
        in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_accelerate_fsdp_example_sets_up_what_fsdp_sets_up(tmp_path, monkeypatch):
    """examples/accelerate_fsdp.yaml is a valid accelerate config (accelerate refuses unknown keys) asking for the FSDP
    plugin that `pact train --fsdp` builds: FSDP2, a unit per decoder layer, resharded after forward, full state dicts."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(Path(__file__).resolve().parent.parent / "examples" / "accelerate_fsdp.yaml"))
    assert config.distributed_type == DistributedType.FSDP and config.mixed_precision == "no"
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # TrainingArguments(fsdp=...) sets it; restored afterwards
    flag = PactTrainingArguments(output_dir=str(tmp_path), full=True, fsdp=True, train_device="cpu").fsdp_plugin_args
    assert flag == {key: config.fsdp_config[key if key == "fsdp_version" else f"fsdp_{key}"] for key in flag}
    assert flag["fsdp_version"] == 2 and flag["reshard_after_forward"] is True
