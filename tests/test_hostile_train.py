"""Hostile inputs to `pact train`: see tests/hostile.py. Beyond the table: a non-finite loss or gradient, a read-only
or full disk at every write, and kill -9 at several moments followed by `--resume`."""

from __future__ import annotations

import errno
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_tiny_model
from hostile import Case, check_case
from pact.cache_tools.manifest import save_manifest, set_totals
from pact.cli.main import main as pact_main
from test_cache_support import single_thread, subprocess_env

FAMILY = "pact train and pact export"

QUICK = {"--device": "cpu", "--batch-size": "4", "--max-steps": "1"}
RUN = {**QUICK, "--lr": "1e-3"}  # what the fixture's `run` was trained with (tests/hostile.py)


def _flags(defaults: dict[str, str], extra: tuple[str, ...]) -> list[str]:
    """`defaults` as flags, less those `extra` sets (and --max-steps when it sets --epochs), then `--no-progress` and `extra`."""
    skip = set(extra) | ({"--max-steps"} if "--epochs" in extra else set())
    return [item for flag, value in defaults.items() if flag not in skip for item in (flag, value)] + ["--no-progress", *extra]


def _train(*extra: str, out: str = "out", cache: str | None = None):
    """argv of a quick `pact train` on the world's cache (or the world folder `cache`) into `out`, plus `extra` flags."""
    return lambda w: ["train", "--cache", str(w.path(cache) if cache else w.cache), "--out", str(w.path(out)), *_flags(QUICK, extra)]


def _resume(*extra: str, cache: str | None = None):
    """argv resuming the world's one-step `run` with its own settings, changed by `extra` (on the world folder `cache`)."""
    return lambda w: ["train", "--cache", str(w.path(cache) if cache else w.cache), "--out", str(w.run), "--resume",
                      *_flags(RUN, extra)]


def _edit_manifest(w, name: str, edit) -> None:
    """Copy the world's cache to `name` and apply `edit` to the copy's manifest dict, saved as pact-cache saves it."""
    shutil.copytree(w.cache, w.path(name))
    manifest = json.loads((w.path(name) / "manifest.json").read_text())
    edit(manifest)
    save_manifest(w.path(name), manifest)


def _edit_run_config(change, unsealed: bool = False):
    """A `prepare` applying `change` to the world run's pact_config.json by hand (its checksums left as they were), or
    to the file as an older pact wrote it (`unsealed`: no checksums)."""
    def prepare(w) -> None:
        path = w.run / "pact_config.json"
        record = json.loads(path.read_text())
        if unsealed:
            del record["checksums"]
        change(record)
        path.write_text(json.dumps(record, indent=2))
    return prepare


def _edit_adapter_config(changes: dict):
    """A `prepare` updating the world run's adapter_config.json with `changes` (as a hand edit would)."""
    def prepare(w) -> None:
        path = w.run / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return prepare


def _edit_state(change):
    """A `prepare` applying `change` to the JSON of the world run's checkpoint-1/trainer_state.json."""
    def prepare(w) -> None:
        path = w.run / "checkpoint-1" / "trainer_state.json"
        state = json.loads(path.read_text())
        change(state)
        path.write_text(json.dumps(state))
    return prepare


def _edit_json(path, **changes) -> None:
    """Update the JSON object in `path` with `changes`, as a hand edit would."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _with_a_users_checkpoint_2(w) -> None:
    """A 2-step run `two` (a checkpoint per step) whose `checkpoint-2` was replaced by a folder of the user's."""
    assert pact_main(_train("--save-steps", "1", "--max-steps", "2", out="two")(w)) == 0
    shutil.rmtree(w.path("two/checkpoint-2"))
    w.write("two/checkpoint-2/notes.txt", "keep me")


def _drop_last_shard(manifest: dict) -> None:
    """A smaller but valid cache: the manifest forgets its last shard."""
    manifest["shards"].pop()
    set_totals(manifest)


def _truncate(w, relative: str, keep: int = 100) -> None:
    """Cut the world file `relative` down to its first `keep` bytes."""
    path = w.path(relative)
    path.write_bytes(path.read_bytes()[:keep])


def _invalid(name: str, flag_and_value: tuple[str, ...], message: str) -> Case:
    """A flag value the run cannot use: exit 2 before anything is written, naming the flag and the field."""
    return Case(name, f"`{' '.join(flag_and_value)}`", "pact", _train(*flag_and_value), 2, message)


def _changed_on_resume(name: str, extra: tuple[str, ...], message: str) -> Case:
    """`--resume` of the world's run with a setting that changes the result: refused, naming it with old and new value."""
    return Case(name, f"`--resume` with `{' '.join(extra)}` (the run used other values)", "pact", _resume(*extra), 2, message)


# what resuming the world's finished run rewrites: its settings, log, adapter and the files saved with it
RESUME_REWRITES = tuple(f"run/{name}" for name in ("pact_config.json", "metrics.jsonl", "adapter_model.safetensors", "adapter_config.json",
                                                  "README.md", "curves.png", "tokenizer.json", "tokenizer_config.json",
                                                  "chat_template.jinja", "special_tokens_map.json", "training_args.bin"))


CASES = [
    Case("train-data-into-a-cache-of-other-data", "`--data` with `--cache` naming a cache built from other examples", "pact",
         lambda w: ["train", "--data", str(w.data), "--cache", str(w.cache), "--model", str(w.model), "--max_length", "200",
                    "--output_dir", str(w.path("out")), "--device", "cpu"], 2,
         "was not built from this data: its examples differ from this data's"),
    Case("train-file-flag-of-another-tool", "`--train_file` (another tool's name for the data)", "pact",
         lambda w: ["train", "--train_file", str(w.data), "--output_dir", str(w.path("out"))], 2,
         "pact train takes its training data as --data FILE (a file, a save_to_disk folder or a hub dataset), or a cache as --cache DIR"),
    Case("train-abbreviated-flag", "`--learning 1e-3` (a flag's prefix is not taken for the flag)", "pact", _train("--learning", "1e-3"), 2,
         "pact train: error: unrecognized arguments: --learning 1e-3"),
    Case("train-no-output-dir", "no `--output_dir` (transformers would write ./trainer_output)", "pact",
         lambda w: ["train", "--cache", str(w.cache), *_flags(QUICK, ())], 2,
         "--output_dir: output_dir is required: the run folder the adapter (or full model), pact_config.json and metrics.jsonl "
         "are written to"),
    _invalid("lr-negative", ("--lr", "-1"), "--lr: learning_rate must be a finite number > 0, got -1.0"),
    _invalid("lr-nan", ("--lr", "nan"), "--lr: learning_rate must be a finite number > 0, got nan"),
    _invalid("lr-inf", ("--lr", "inf"), "--lr: learning_rate must be a finite number > 0, got inf"),
    _invalid("batch-size-zero", ("--batch-size", "0"), "--batch-size: per_device_train_batch_size must be an integer >= 1, got 0"),
    _invalid("grad-accum-zero", ("--grad-accum", "0"), "--grad-accum: gradient_accumulation_steps must be an integer >= 1, got 0"),
    _invalid("lora-r-zero", ("--lora-r", "0"), "--lora-r: lora_r must be an integer >= 1, got 0"),
    _invalid("lora-alpha-zero", ("--lora-alpha", "0"), "--lora-alpha: lora_alpha must be a finite number > 0, got 0"),
    _invalid("lora-dropout-one", ("--lora-dropout", "1"), "--lora-dropout: lora_dropout must be a finite number >= 0 and < 1"),
    _invalid("lora-dropout-negative", ("--lora-dropout", "-0.1"), "--lora-dropout: lora_dropout must be a finite number >= 0"),
    _invalid("lora-targets-unknown", ("--lora-targets", "q_proj,qkv"),
             "--lora-targets: lora_target_modules names no module of the model: 'qkv' (modules LoRA can adapt there: down_proj, embed_tokens"),
    Case("lora-targets-all-linear", "`--lora-targets all-linear` (peft's every-linear-layer shorthand)", "pact",
         _train("--lora-targets", "all-linear"), 0, "trained 1 steps", may_change=("out",)),
    Case("lora-targets-pattern", "`--lora-targets` one regular expression (peft's string form)", "pact",
         _train("--lora-targets", r"model\.layers\.\d+\.self_attn\.(q|v)_proj"), 0, "trained 1 steps", may_change=("out",)),
    _invalid("lora-targets-pattern-no-match", ("--lora-targets", "attn.*"),
             "--lora-targets: lora_target_modules 'attn.*': it matches no module's full name"),
    _invalid("lora-targets-all-linear-and-names", ("--lora-targets", "q_proj", "all-linear"),
             "--lora-targets: lora_target_modules 'all-linear' stands alone (peft takes either a list of module names or one string"),
    _invalid("lora-targets-bad-pattern", ("--lora-targets", "(q_proj"),
             "--lora-targets: lora_target_modules '(q_proj' is not a valid regular expression (missing ), unterminated subpattern"),
    _invalid("lora-targets-empty", ("--lora-targets", ","), "--lora-targets: lora_target_modules must name at least one module"),
    _invalid("label-smoothing", ("--label_smoothing_factor", "0.1"),
             "--label_smoothing_factor: label_smoothing_factor 0.1 would be ignored by a PACT run: PACT's cross-entropy"),
    _invalid("train-sampling-strategy", ("--train_sampling_strategy", "group_by_length"),
             "--train_sampling_strategy: train_sampling_strategy 'group_by_length' would be ignored by a PACT run"),
    _invalid("temperature-zero", ("--temperature", "0"), "--temperature: temperature must be a finite number > 0, got 0.0"),
    _invalid("temperature-negative", ("--temperature", "-2"), "--temperature: temperature must be a finite number > 0"),
    _invalid("temperature-nan", ("--temperature", "nan"), "--temperature: temperature must be a finite number > 0, got nan"),
    _invalid("epochs-zero", ("--epochs", "0"), "--epochs: num_train_epochs must be a finite number > 0, got 0.0"),
    _invalid("max-steps-zero", ("--max-steps", "0"), "--max-steps: max_steps must be an integer >= 1, got 0"),
    _invalid("lambda-nan", ("--lambda", "nan"), "--lambda: lam must be a finite number >= 0, got nan"),
    _invalid("lambda-negative", ("--lambda", "-1"), "--lambda: lam must be a finite number >= 0, got -1.0"),
    _invalid("warmup-steps-negative", ("--warmup-steps", "-1"), "--warmup-steps: warmup_steps must be a finite number >= 0, got -1.0"),
    _invalid("weight-decay-negative", ("--weight-decay", "-0.1"), "--weight-decay: weight_decay must be a finite number >= 0"),
    _invalid("max-grad-norm-zero", ("--max-grad-norm", "0"), "--max-grad-norm: max_grad_norm must be a finite number > 0, got 0.0"),
    _invalid("max-grad-norm-nan", ("--max-grad-norm", "nan"), "--max-grad-norm: max_grad_norm must be a finite number > 0, got nan"),
    _invalid("save-steps-negative", ("--save-steps", "-1"), "--save-steps: save_steps must be an integer >= 0, got -1"),
    _invalid("dataloader-workers-huge", ("--dataloader_num_workers", "100000"),
             "--dataloader_num_workers: dataloader_num_workers must be an integer >= 0 and <= 256, got 100000"),
    _invalid("seed-negative", ("--seed", "-1"), "--seed: seed must be an integer >= 0 and <= 4294967295, got -1"),
    _invalid("scheduler-unknown", ("--scheduler", "cosine_restarts"),
             "--scheduler: lr_scheduler_type must be one of linear, cosine, cosine_with_restarts,"),
    _invalid("device-unknown", ("--device", "gpu0"), "--device: train_device must be one of auto, cpu, cuda (cuda only where a GPU is), got 'gpu0'"),
    _invalid("alpha-zero", ("--alpha", "0"), "--alpha: alpha must be a finite number > 0, got 0.0"),
    _invalid("alpha-nan", ("--alpha", "nan"), "--alpha: alpha must be a finite number > 0, got nan"),
    _invalid("gate-offset-nan", ("--gate-offset", "nan"), "--gate-offset: b must be a finite number, got nan"),
    _invalid("tau-zero", ("--tau", "0"), "--tau: tau must be a finite number > 0, got 0.0"),
    _invalid("free-steps-negative", ("--free-steps", "-1"), "--free-steps: n_free must be an integer >= 0, got -1"),
    _invalid("boost-negative", ("--boost", "-1"), "--boost: boost must be a finite number >= 0, got -1.0"),
    _invalid("boost-inf", ("--boost", "inf"), "--boost: boost must be a finite number >= 0, got inf"),
    _invalid("p0-above-one", ("--p0", "1.5"), "--p0: p0 must be a finite number > 0 and <= 1, got 1.5"),
    _invalid("gate-temperature-zero", ("--gate-temperature", "0"), "--gate-temperature: gate_temperature must be a finite number > 0"),
    _invalid("objective-unknown", ("--objective", "foo"), "--objective: objective must be one of pact, tokenwise, pact+tokenwise,"),
    _invalid("beta-schedule-zero", ("--beta-schedule", "0"), "--beta-schedule: beta_schedule must be a finite number > 0, got 0.0"),
    _invalid("beta-schedule-nan", ("--beta-schedule", "0.5,nan"), "--beta-schedule: beta_schedule must be a finite number > 0, got nan"),
    _invalid("dtype-unknown", ("--dtype", "int8"), "--dtype: dtype must be one of auto, bfloat16, float16, float32, got 'int8'"),
    _invalid("dtype-float16-full", ("--dtype", "float16", "--full"), "--dtype: dtype float16 trains LoRA adapters only"),
    _invalid("dtype-float16-on-cpu", ("--dtype", "float16"), "--dtype: dtype float16 trains under a GPU's loss scaler (--fp16)"),
    _invalid("dtype-float16-with-bf16", ("--dtype", "float16", "--bf16"), "--dtype: dtype float16 uses float16 loss scaling (--fp16)"),
    _changed_on_resume("resume-other-dtype", ("--dtype", "bfloat16"), "dtype 'float32' -> 'bfloat16'"),
    Case("beta-schedule-empty", "`--beta-schedule ''`", "pact", _train("--beta-schedule", ""), 2,
         "--beta-schedule: beta_schedule must be comma-separated numbers > 0, one per response position (e.g. 0.5,2,2,2,2,0.1), got ''"),
    _invalid("batch-size-zero-hf-name", ("--per_device_train_batch_size", "0"),
             "--per_device_train_batch_size: per_device_train_batch_size must be an integer >= 1, got 0"),
    _invalid("learning-rate-negative-hf-name", ("--learning_rate", "-1"), "--learning_rate: learning_rate must be a finite number > 0"),
    Case("config-unknown-key", "`--config` YAML with a misspelt setting", "pact", _train("--config", "bad.yaml"), 2,
         "bad.yaml: unknown setting 'learnin_rate'", prepare=lambda w: w.write("bad.yaml", "learnin_rate: 1.0e-3\n")),
    Case("config-bad-value", "`--config` YAML with warmup_steps -1", "pact", _train("--config", "bad.yaml"), 2,
         "bad.yaml (warmup_steps): warmup_steps must be a finite number >= 0, got -1",
         prepare=lambda w: w.write("bad.yaml", "warmup_steps: -1\n")),
    Case("config-not-a-mapping", "`--config` YAML holding a list", "pact", _train("--config", "bad.yaml"), 2,
         "bad.yaml: expected a mapping of setting names to values, got list", prepare=lambda w: w.write("bad.yaml", "- lr\n- 1\n")),
    *[Case(f"config-{name}", f"`--config` YAML with {shown}", "pact", _train("--config", "bad.yaml"), 2, f"bad.yaml: {message}",
           prepare=lambda w, text=text: w.write("bad.yaml", text))
      for name, shown, text, message in (
          ("int-output-dir", "an integer `output_dir`", "output_dir: 5\n",
           "output_dir: expected text or null, got 5 (an integer); quote it to make it text"),
          ("int-switch", "`full: 2`", "full: 2\n", "full: expected true or false, got 2 (an integer)"),
          ("float-count", "`gradient_accumulation_steps: 1.5`", "gradient_accumulation_steps: 1.5\n",
           "gradient_accumulation_steps: expected an integer, got 1.5 (a number)"),
          ("null-count", "`per_device_train_batch_size: null`", "per_device_train_batch_size: null\n",
           "per_device_train_batch_size: expected an integer, got null"),
          ("bool-number", "`learning_rate: true`", "learning_rate: true\n", "learning_rate: expected a number, got true (a boolean)"),
          ("mapping-list", "a mapping as `lora_target_modules`", "lora_target_modules: {q_proj: 1}\n",
           'lora_target_modules: expected a list of text, got {"q_proj": 1} (a mapping)'),
          ("list-kwargs", "a list as `gradient_checkpointing_kwargs`", "gradient_checkpointing_kwargs: [1]\n",
           "gradient_checkpointing_kwargs: expected a mapping or text or null, got [1] (a list)"),
          ("unknown-choice", "`eval_strategy: sometimes`", "eval_strategy: sometimes\n",
           'eval_strategy: expected one of no, steps, epoch, got "sometimes" (text)'),
          ("not-utf8", "a Latin-1 `é`", "run_name: caf\xe9\n".encode("latin-1"), "not valid YAML text (UnicodeDecodeError"),
          ("empty", "nothing in it", "", "the file holds no settings"),
          ("nested-config", "a `config` key", "config: other.yaml\n",
           "'config' is a flag of the command line, not a setting a config file holds"),
      )],
    Case("config-later-refusal", "`--config` YAML with a LoRA target the model lacks (refused once the model is loaded)", "pact",
         _train("--config", "bad.yaml"), 2, "bad.yaml (lora_target_modules): lora_target_modules names no module of the model: 'qkv'",
         prepare=lambda w: w.write("bad.yaml", "lora_target_modules: [q_proj, qkv]\n")),
    Case("config-missing", "`--config` naming no file", "pact", _train("--config", "nowhere.yaml"), 2, "nowhere.yaml: cannot read it"),
    Case("export-into-the-run", "`pact export --merge` with `--out` the run itself", "pact",
         lambda w: ["export", str(w.run), "--merge", "--out", str(w.run)], 2, "is the run folder itself"),
    Case("export-not-an-adapter", "`pact export --merge` of a folder without an adapter", "pact",
         lambda w: ["export", str(w.path("plain")), "--merge", "--out", str(w.path("merged"))], 2, "plain: no adapter_config.json",
         prepare=lambda w: w.write("plain/notes.txt", "not a run")),
    Case("export-out-taken", "`pact export --merge` into a non-empty folder", "pact",
         lambda w: ["export", str(w.run), "--merge", "--out", str(w.path("busy"))], 2, "busy already exists and is not an empty folder",
         prepare=lambda w: w.write("busy/keep.txt", "keep me")),
    Case("export-beside-a-users-staging-name", "`pact export --merge --out merged` beside a user's folder `.merged.tmp`", "pact",
         lambda w: ["export", str(w.run), "--merge", "--out", str(w.path("merged"))], 0, "merged model written to",
         prepare=lambda w: w.write(".merged.tmp/keep.txt", "keep me"), may_change=("merged",)),
    *[Case(f"export-adapter-{name}", f"`pact export --merge` of a run whose adapter_config.json has {shown}", "pact",
           lambda w: ["export", str(w.run), "--merge", "--out", str(w.path("merged"))], 2, f"run/adapter_config.json: {message}",
           prepare=_edit_adapter_config(change))
      for name, shown, change, message in (
          ("rank-text", '`"r": "eight"`', {"r": "eight"}, 'field \'r\' must be an integer >= 1, got "eight"'),
          ("alpha-nan", "`lora_alpha` NaN (it would merge NaN into every weight)", {"lora_alpha": float("nan")},
           "field 'lora_alpha' must be a finite number > 0, got NaN"),
          ("targets-number", "a number as `target_modules`", {"target_modules": 5},
           "field 'target_modules' must be a module name or a list of them, got 5"),
          ("base-number", "a number as `base_model_name_or_path`", {"base_model_name_or_path": 5},
           "field 'base_model_name_or_path' must be a model name or path (text), got 5"),
          ("unknown-method", '`"peft_type": "FOO"`', {"peft_type": "FOO"}, "field 'peft_type' is 'FOO', expected the name of a PEFT method"),
      )],
    Case("export-adapter-other-rank", "`pact export --merge` of a run whose adapter_config.json says another rank than its weights",
         "pact", lambda w: ["export", str(w.run), "--merge", "--out", str(w.path("merged"))], 2,
         "run cannot be applied to --model", prepare=_edit_adapter_config({"r": 4})),
    Case("export-adapter-unknown-target", "`pact export --merge` of a run whose adapter targets a module the model lacks", "pact",
         lambda w: ["export", str(w.run), "--merge", "--out", str(w.path("merged"))], 2,
         "Target modules {'nope'} not found in the base model", prepare=_edit_adapter_config({"target_modules": ["nope"]})),
    Case("export-no-weights", "`pact export --merge` of a run without adapter_model.safetensors", "pact",
         lambda w: ["export", str(w.run), "--merge", "--out", str(w.path("merged"))], 2,
         "run: no adapter_model.safetensors (or adapter_model.bin) in this folder", prepare=lambda w: (w.run / "adapter_model.safetensors").unlink()),
    Case("export-truncated-weights", "`pact export --merge` of a run whose adapter_model.safetensors is cut short", "pact",
         lambda w: ["export", str(w.run), "--merge", "--out", str(w.path("merged"))], 2,
         "adapter_model.safetensors is not a readable safetensors file", prepare=lambda w: _truncate(w, "run/adapter_model.safetensors", 5)),
    Case("export-out-under-a-file", "`pact export --merge --out` below an existing file", "pact",
         lambda w: ["export", str(w.run), "--merge", "--out", str(w.path("data.jsonl/merged"))], 2,
         "data.jsonl is a file, so no folder can be created there"),
    Case("export-device-unknown", "`pact export --device gpu` (not a torch device)", "pact",
         lambda w: ["export", str(w.run), "--merge", "--out", str(w.path("merged")), "--device", "gpu"], 2,
         "argument --device: device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    Case("export-without-merge", "`pact export` without `--merge`", "pact",
         lambda w: ["export", str(w.run), "--out", str(w.path("merged"))], 2, "say what to export: --merge"),
    Case("cache-missing", "`--cache` that does not exist", "pact",
         _train(cache="nowhere"), 2,
         "nowhere is not a pact cache"),
    Case("cache-not-a-cache", "`--cache` a folder that is not a cache", "pact",
         _train(cache="plain"), 2,
         "plain is not a pact cache",
         prepare=lambda w: w.write("plain/notes.txt", "not a cache")),
    Case("cache-incomplete", "`--cache` whose build did not finish", "pact",
         _train(cache="partial"), 2,
         "partial: the build is incomplete",
         prepare=lambda w: _edit_manifest(w, "partial", lambda m: m.update(complete=False))),
    Case("cache-truncated-shard", "a cache shard cut short", "pact",
         _train(out="out"), 2, "shard-00000.arrow: 100 bytes, the manifest says",
         prepare=lambda w: _truncate(w, "cache/shard-00000.arrow"), may_change=("out",)),
    Case("out-is-a-file", "`--out` an existing file", "pact", _train(out="taken.txt"), 2,
         "taken.txt is a file, not a directory", prepare=lambda w: w.write("taken.txt", "keep me")),
    Case("out-inside-a-file", "`--out` below an existing file", "pact", _train(out="taken.txt/run"), 2,
         "cannot create the output directory", prepare=lambda w: w.write("taken.txt", "keep me")),
    Case("out-not-empty", "`--out` holding other files, no `--resume`", "pact", _train(out="busy"), 2,
         "busy is not empty; pass --resume", prepare=lambda w: w.write("busy/keep.txt", "keep me")),
    Case("resume-foreign-folder", "`--resume` into a folder of other files, with no checkpoint", "pact",
         lambda w: [*_train(out="busy")(w), "--resume"], 2, "busy holds no checkpoint to resume from and is not a pact train run",
         prepare=lambda w: w.write("busy/keep.txt", "keep me")),
    Case("resume-keeps-a-users-staging-name", "`--resume` of a finished run whose folder holds a user's `.final.tmp` "
         "and `.checkpoint-2.tmp`", "pact", _resume(), 0, "trained 1 steps",
         prepare=lambda w: (w.write("run/.final.tmp/keep.txt", "keep me"), w.write("run/.checkpoint-2.tmp/keep.txt", "keep me")),
         may_change=RESUME_REWRITES),
    Case("resume-over-a-users-checkpoint-name", "`--resume_from_checkpoint RUN/checkpoint-1` of a 2-step run whose "
         "`checkpoint-2` is a user's folder", "pact",
         lambda w: [*_train("--save-steps", "1", "--max-steps", "2", out="two")(w), "--resume_from_checkpoint",
                    str(w.path("two/checkpoint-1"))], 2,
         "checkpoint-2: something of that name is there that is not a checkpoint (no trainer_state.json); move it away",
         prepare=_with_a_users_checkpoint_2, may_change=("two/pact_config.json", "two/metrics.jsonl")),
    Case("resume-only-a-users-staging-name", "`--resume` into a folder holding only a user's `.checkpoint-3.tmp`", "pact",
         lambda w: [*_train(out="busy")(w), "--resume"], 2, "is not a pact train run folder (it holds .checkpoint-3.tmp)",
         prepare=lambda w: w.write("busy/.checkpoint-3.tmp/notes.txt", "keep me")),
    _changed_on_resume("resume-changed-lr", ("--lr", "2e-3"), "learning_rate 0.001 -> 0.002"),
    _changed_on_resume("resume-changed-batch-size", ("--batch-size", "2"), "per_device_train_batch_size 4 -> 2"),
    _changed_on_resume("resume-changed-grad-accum", ("--grad-accum", "2"), "gradient_accumulation_steps 1 -> 2"),
    _changed_on_resume("resume-changed-scheduler-and-warmup", ("--scheduler", "cosine", "--warmup-steps", "1"),
                       "lr_scheduler_type 'linear' -> 'cosine'; warmup_steps 0 -> 1.0"),
    _changed_on_resume("resume-changed-seed", ("--seed", "7"), "seed 42 -> 7"),
    _changed_on_resume("resume-changed-lora", ("--lora-r", "4", "--lora-targets", "q_proj"),
                       "lora_r 8 -> 4; lora_target_modules ['q_proj', 'v_proj'] -> ['q_proj']"),
    _changed_on_resume("resume-changed-full", ("--full",), "full False -> True"),
    _changed_on_resume("resume-changed-lambda", ("--lambda", "2"), "objective.lam 1.0 -> 2.0"),
    _changed_on_resume("resume-changed-objective", ("--objective", "pact+tokenwise"), "objective.objective 'pact' -> 'pact+tokenwise'"),
    _changed_on_resume("resume-changed-beta-schedule", ("--beta-schedule", "1"),
                       "objective.beta_schedule '0.5,2.0,2.0,2.0,2.0,0.1' -> '1.0'"),
    _changed_on_resume("resume-changed-max-steps", ("--max-steps", "3"), "total_steps 1 -> 3"),
    Case("resume-other-cache", "`--resume` on another cache (a shard fewer)", "pact", _resume(cache="smaller"), 2,
         "cache_identity 'sha256:", prepare=lambda w: _edit_manifest(w, "smaller", _drop_last_shard)),
    Case("model-heads-zero", "`--model` (and `--force`) a model folder whose config.json has 0 attention heads", "pact",
         lambda w: [*_train("--force")(w), "--model", str(w.path("damaged"))], 2,
         "damaged: transformers cannot load this model folder (ZeroDivisionError: integer modulo by zero)",
         prepare=lambda w: (shutil.copytree(w.model, w.path("damaged")), _edit_json(w.path("damaged/config.json"), num_attention_heads=0))),
    Case("resume-other-model", "`--resume` with another `--model` (and `--force`)", "pact",
         lambda w: [*_resume("--force")(w), "--model", str(w.path("other-model"))], 2, "model_fingerprint 'sha256:",
         prepare=lambda w: make_tiny_model(w.path("other-model"), seed=7)),
    Case("resume-torn-state", "`--resume` from a checkpoint whose trainer_state.json is torn", "pact", _resume(), 2,
         "trainer_state.json: cannot read the checkpoint state",
         prepare=lambda w: _truncate(w, "run/checkpoint-1/trainer_state.json", keep=5)),
    Case("resume-truncated-optimizer", "`--resume` from a checkpoint whose optimizer.pt is truncated", "pact", _resume(), 2,
         "checkpoint-1: cannot resume from this checkpoint", prepare=lambda w: _truncate(w, "run/checkpoint-1/optimizer.pt")),
    *[Case(f"resume-state-{name}", f"`--resume` from a checkpoint whose trainer_state.json has {shown}", "pact", _resume(), 2,
           f"checkpoint-1/trainer_state.json: {message}", prepare=_edit_state(change))
      for name, shown, change, message in (
          ("step-text", "a text `global_step`", lambda s: s.update(global_step="x"), 'field \'global_step\' must be an integer >= 0, got "x"'),
          ("step-beyond", "`global_step` 10^9 (the run would end at once, untrained)", lambda s: s.update(global_step=10**9),
           "field 'global_step' is 1000000000, but the folder is the checkpoint of step 1"),
          ("emptied", "nothing in it (`{}`)", lambda s: s.clear(), "field 'global_step' is 0, but the folder is the checkpoint of step 1"),
          ("log-number", "a number as `log_history`", lambda s: s.update(log_history=5), "field 'log_history' must be a list of objects"),
          ("epoch-nan", "`epoch` NaN", lambda s: s.update(epoch=float("nan")), "field 'epoch' must be a number >= 0, got NaN"),
          ("unknown-field", "a field no Trainer state has", lambda s: s.update(learning_rate=1.0),
           "field(s) 'learning_rate' are not fields of a Trainer state"),
      )],
    Case("resume-checkpoint-no-weights", "`--resume` from a checkpoint without its adapter weights", "pact", _resume(), 2,
         "checkpoint-1: no model weights in it", prepare=lambda w: (w.run / "checkpoint-1" / "adapter_model.safetensors").unlink()),
    Case("resume-checkpoint-truncated-weights", "`--resume` from a checkpoint whose adapter_model.safetensors is cut short", "pact",
         _resume(), 2, "checkpoint-1/adapter_model.safetensors: not a readable safetensors file",
         prepare=lambda w: _truncate(w, "run/checkpoint-1/adapter_model.safetensors")),
    Case("resume-checkpoint-foreign-optimizer", "`--resume` from a checkpoint whose optimizer.pt holds another object", "pact",
         _resume(), 2, "checkpoint-1/optimizer.pt: not the state the Trainer saves there (no 'state', 'param_groups')",
         prepare=lambda w: torch.save({"weights": [1.0]}, w.run / "checkpoint-1" / "optimizer.pt")),
    Case("resume-checkpoint-foreign-scheduler", "`--resume` from a checkpoint whose scheduler.pt holds another object", "pact",
         _resume(), 2, "checkpoint-1/scheduler.pt: not the state the Trainer saves there (no 'last_epoch')",
         prepare=lambda w: torch.save([0.001], w.run / "checkpoint-1" / "scheduler.pt")),
    Case("resume-checkpoint-no-random-state", "`--resume` from a checkpoint without rng_state.pth", "pact", _resume(), 2,
         "checkpoint-1: no rng_state.pth, so the run's random state cannot be restored",
         prepare=lambda w: (w.run / "checkpoint-1" / "rng_state.pth").unlink()),
    Case("resume-from-missing-checkpoint", "`--resume_from_checkpoint` naming no folder", "pact",
         _train("--resume_from_checkpoint", "nowhere"), 2, "--resume_from_checkpoint nowhere: no such checkpoint folder"),
    Case("resume-edited-config", "`--resume` with `--lr 2e-3` after pact_config.json's learning_rate was edited to match",
         "pact", _resume("--lr", "2e-3"), 2, "pact_config.json was edited after pact train wrote it: field(s) learning_rate do "
         "not match its checksums", prepare=_edit_run_config(lambda r: r.update(learning_rate=2e-3))),
    Case("resume-edited-config-steps", "`--resume --max-steps 3` after pact_config.json's total_steps and learning_rate were edited",
         "pact", _resume("--max-steps", "3"), 2, "field(s) learning_rate, total_steps do not match its checksums",
         prepare=_edit_run_config(lambda r: r.update(total_steps=3, learning_rate=5e-4))),
    Case("resume-edited-config-objective", "`--resume` after pact_config.json's `objective.lam` was edited", "pact", _resume(), 2,
         "field(s) objective.lam do not match its checksums", prepare=_edit_run_config(lambda r: r["objective"].update(lam=3.0))),
    Case("resume-old-config-objective-not-object", "`--resume` of an older run's pact_config.json (no checksums) whose "
         "`objective` is not an object", "pact", _resume(), 2, "objective.lam None -> 1.0",
         prepare=_edit_run_config(lambda r: r.update(objective=5), unsealed=True)),
    Case("resume-no-config", "`--resume` of a run folder whose pact_config.json is gone", "pact", _resume(), 2,
         "pact_config.json: cannot read the run's recorded settings", prepare=lambda w: (w.run / "pact_config.json").unlink()),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_train_input(case, world, capsys):
    check_case(case, world, capsys)


def test_no_output_dir_creates_no_default_folder(world, capsys):
    case = next(c for c in CASES if c.name == "train-no-output-dir")
    check_case(case, world, capsys)
    assert sorted(p.name for p in world.root.iterdir()) == ["cache", "data.jsonl", "run", "safety_tokens.json"]


def _fail_call(monkeypatch, owner, name: str, failing_call: int, make_failure) -> None:
    """Replace `owner.name` by a wrapper whose call number `failing_call` (from 1) returns `make_failure(args, real)`."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        return make_failure(args, real) if calls["n"] == failing_call else real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def _nan_loss(args, real):
    """The real loss of the batch, times NaN (as a pathological cache row would make it)."""
    result = real(*args)
    result.loss = result.loss * float("nan")
    return result


def _disk_full(path) -> OSError:
    """The error a full disk raises when writing `path`."""
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def _half_written(target):
    """A failure like a full disk while writing `target`: a torn file left behind, then ENOSPC."""
    target = pathlib.Path(target)
    target.write_bytes(b"torn")
    raise _disk_full(target)


def _steps_logged(out) -> int:
    """How many steps `out/metrics.jsonl` holds."""
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_stops_the_run_before_the_update(poison, world, capsys, monkeypatch):
    """Step 2 of 3 goes non-finite: exit 1 naming the step, no adapter written, checkpoint-1 intact; resuming from it
    without the fault finishes the run."""
    import pact.training.trainer

    if poison == "loss":
        _fail_call(monkeypatch, pact.training.trainer, "pact_batch_loss", 2, _nan_loss)
        message = "step 2: the loss is nan"
    else:
        import accelerate  # every Trainer version clips through it (torch's own function is not always called)

        _fail_call(monkeypatch, accelerate.Accelerator, "clip_grad_norm_", 2, lambda args, real: real(*args) * float("inf"))
        message = "and the gradient norm inf, not finite"
    argv = _train("--save-steps", "1", "--max-steps", "3")
    err = check_case(Case(f"nan-{poison}", "", "pact", argv, 1, message, may_change=("out",)), world, capsys)
    assert "the last checkpoint, checkpoint-1, is intact" in err
    out = world.path("out")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "metrics.jsonl", "pact_config.json"]
    assert _steps_logged(out) == 1
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-1" / "adapter_model.safetensors").values())
    monkeypatch.undo()
    assert pact_main([*argv(world), "--resume"]) == 0
    assert _steps_logged(out) == 3 and (out / "adapter_model.safetensors").exists()


def test_a_read_only_parent_of_out_is_named(world, capsys, monkeypatch):
    """Creating `--out` inside a folder the user may not write to (simulated: the tests run as root) is refused by path."""
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.is_relative_to(world.path("locked")) and self != world.path("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    case = Case("out-read-only", "", "pact", _train(out="locked/run"), 2,
                "cannot create the output directory", prepare=lambda w: w.write("locked/keep.txt", "keep me"))
    err = check_case(case, world, capsys)
    assert f"{world.path('locked/run')} (--output_dir): Permission denied (EACCES)" in err


def test_a_full_disk_at_the_final_save_leaves_the_earlier_adapter_and_checkpoint_intact(world, capsys, monkeypatch):
    """Resuming the finished run fails to write its adapter (ENOSPC after a torn file): exit 2 naming the folder, the
    adapter and checkpoint already there keep their bytes, no staging folder is left; with space back it completes."""
    from pact.training.trainer import PactTrainer

    adapter = world.run / "adapter_model.safetensors"
    before = adapter.read_bytes()

    def save_model(trainer, output_dir=None, _internal_call=False):
        pathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)
        _half_written(pathlib.Path(output_dir) / "adapter_model.safetensors")

    monkeypatch.setattr(PactTrainer, "save_model", save_model)
    case = Case("final-save-disk-full", "", "pact", _resume(), 2,
                f"cannot write the trained adapter to {world.run}: No space left on device (ENOSPC); nothing was replaced",
                may_change=("run/pact_config.json", "run/metrics.jsonl"))
    check_case(case, world, capsys)
    assert not list(world.run.glob(".final.*"))
    monkeypatch.undo()
    assert pact_main(_resume()(world)) == 0
    assert adapter.read_bytes() == before


def test_a_full_disk_while_writing_a_checkpoint_leaves_no_half_checkpoint(world, capsys, monkeypatch):
    """The second checkpoint's optimizer state hits ENOSPC: exit 2 naming it, no checkpoint-2 (complete or not) that
    --resume could pick up, checkpoint-1 intact; resuming from it finishes the run."""
    from transformers import Trainer

    _fail_call(monkeypatch, Trainer, "_save_optimizer_and_scheduler", 2,
               lambda args, real: _half_written(pathlib.Path(args[1]) / "optimizer.pt"))
    argv = _train("--save-steps", "1", "--max-steps", "3")
    out = world.path("out")
    check_case(Case("checkpoint-disk-full", "", "pact", argv, 2,
                    f"cannot write checkpoint {out / 'checkpoint-2'}: No space left on device (ENOSPC)", may_change=("out",)),
               world, capsys)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "metrics.jsonl", "pact_config.json"]
    monkeypatch.undo()
    assert pact_main([*argv(world), "--resume"]) == 0
    assert _steps_logged(out) == 3 and (out / "checkpoint-3").is_dir()


def test_resume_accepts_settings_that_do_not_change_the_result(world):
    """Checkpoint frequency, progress bar, gradient checkpointing and the cache's path may change between a run and
    its resumption: the finished run resumes (and rewrites its outputs) without complaint."""
    shutil.copytree(world.cache, world.path("moved-cache"))
    argv = _resume("--save-steps", "5", "--gradient-checkpointing", cache="moved-cache")(world)
    argv.remove("--no-progress")
    assert pact_main(argv) == 0
    assert json.loads((world.run / "pact_config.json").read_text())["cache"] == str(world.path("moved-cache"))


def _kill_run_when(argv: list[str], out, moment, cwd, log) -> None:
    """Start `pact train argv` in a subprocess, wait until `moment(out)` holds, then kill -9 it (which must still be running)."""
    proc = subprocess.Popen([sys.executable, "-m", "pact.cli", *argv], cwd=cwd, env=subprocess_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not moment(out) and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the run ended before the kill (exit {proc.returncode}); see {log.name}"


KILL_MOMENTS = {
    "after checkpoint-2 appears": lambda out: (out / "checkpoint-2").is_dir(),
    "while checkpoint-4 is written": lambda out: any(out.glob(".checkpoint-4.*.tmp")) or (out / "checkpoint-4").exists(),
    "during the final save": lambda out: any(out.glob(".final.*.tmp")) or (out / "adapter_model.safetensors").exists(),
}


def test_kill_9_at_several_moments_then_resume_equals_an_uninterrupted_run(world, tmp_path):
    """`pact train` killed -9 after a checkpoint, in the middle of writing one and during the final save, each time
    resumed with `--resume`, ends with the metrics and adapter of a run never interrupted (all on one thread)."""
    def argv(out):
        return ["train", "--cache", str(world.cache), "--out", str(out), "--max-steps", "6", "--save-steps", "1",
                "--batch-size", "4", "--lr", "1e-3", "--seed", "3", "--device", "cpu", "--no-progress", "--resume"]

    reference, out = tmp_path / "reference", tmp_path / "killed"
    with single_thread():
        assert pact_main(argv(reference)) == 0
    with open(tmp_path / "killed.log", "w") as log:
        for moment in KILL_MOMENTS.values():
            _kill_run_when(argv(out), out, moment, world.root, log)
    with single_thread():
        assert pact_main(argv(out)) == 0
    want = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    for w, g in zip(want, got):
        assert {k: g[k] for k in w if k != "seconds"} == pytest.approx({k: w[k] for k in w if k != "seconds"}, rel=1e-6, abs=1e-9)
    want_weights, got_weights = (load_file(run / "adapter_model.safetensors") for run in (reference, out))
    assert want_weights.keys() == got_weights.keys()
    for name in want_weights:
        torch.testing.assert_close(got_weights[name], want_weights[name], rtol=0, atol=1e-6)
