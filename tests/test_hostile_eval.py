"""Hostile inputs to `pact eval refusal|task|drift` and `pact report`: see tests/hostile.py.

Every eval case runs on the tiny model (`--model <model> --device cpu`,
`--max-new-tokens 4`). Cases outside `LOADS_A_MODEL` must fail before any
model or tokenizer is loaded, which `test_hostile_eval_fails_before_loading_a_model`
checks by making loading itself an error.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import make_tiny_model, make_tiny_tokenizer, tiny_llama_config, write_jsonl

from hostile import Case, check_case

FAMILY = "pact eval and pact report"


def refusal(w, *extra, prompts=None, model=None) -> list[str]:
    """`pact eval refusal` of `model` (default the tiny model) on `prompts` (default the data file), plus `extra`."""
    return ["eval", "refusal", "--model", str(model or w.model), "--device", "cpu", "--max-new-tokens", "4",
            "--prompts", str(prompts or w.data), *extra]


def task(w, data, *extra) -> list[str]:
    """`pact eval task` of the tiny model on `data`, plus `extra`."""
    return ["eval", "task", "--model", str(w.model), "--device", "cpu", "--data", str(data), *extra]


def drift(w, *extra, cache=None, model=None) -> list[str]:
    """`pact eval drift` of `model` (default the tiny model) on `cache` (default the cache), plus `extra`."""
    return ["eval", "drift", "--cache", str(cache or w.cache), "--model", str(model or w.model), "--device", "cpu", *extra]


def labelled(w, name: str, labels: list[str]):
    """A task data file `name` whose rows are answered by `labels` in turn."""
    return write_jsonl(w.path(name), [{"instruction": f"Classify text {i}.", "output": label} for i, label in enumerate(labels)])


def remove(path) -> None:
    """Delete a file of a fixture copy."""
    path.unlink()


def truncate(path) -> None:
    """Cut a file to half its size."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_middle_byte(path) -> None:
    """Corrupt a file without changing its size."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def wider_model(w):
    """A model with the tiny tokenizer but hidden size 48, so the 32-wide LoRA of `w.run` does not fit it."""
    from transformers import LlamaForCausalLM

    tokenizer = make_tiny_tokenizer()
    out = w.path("wide-model")
    LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden_size=48, intermediate_size=96)).save_pretrained(out)
    tokenizer.save_pretrained(out)


def mark_cache_incomplete(w) -> None:
    """Set `complete: false` in the cache's manifest by hand."""
    manifest = json.loads((w.cache / "manifest.json").read_text())
    w.write("cache/manifest.json", json.dumps({**manifest, "complete": False}))


def full_model_run(w) -> None:
    """A full fine-tune's run folder: the tiny model's files, no adapter_config.json."""
    shutil.copytree(w.model, w.path("full-run"))


def damaged_model(damage):
    """A `prepare` copying the tiny model to `damaged` and applying `damage(folder)` to the copy."""
    def prepare(w) -> None:
        shutil.copytree(w.model, w.path("damaged"))
        damage(w.path("damaged"))
    return prepare


def edit_json(path, **changes) -> None:
    """Update the JSON object in `path` with `changes`, as a hand edit would."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def save_eval(w, name: str, content) -> None:
    """Write RUN/eval.json of the run folder copy (`content` as JSON unless it is text or bytes)."""
    w.write(f"run/{name}", content if isinstance(content, (str, bytes)) else json.dumps(content))


REFUSAL_CASES = [
    Case("refusal-out-is-prompts", "`--out` is the `--prompts` file", "pact",
         lambda w: refusal(w, "--out", str(w.data)), 2, "is the same file as --prompts"),
    Case("refusal-out-symlink-to-prompts", "`--out` is a symlink to the `--prompts` file", "pact",
         lambda w: refusal(w, "--out", str(w.path("answers.jsonl"))), 2, "is the same file as --prompts",
         prepare=lambda w: os.symlink(w.data, w.path("answers.jsonl"))),
    Case("refusal-out-hardlink-to-prompts", "`--out` is a hard link to the `--prompts` file", "pact",
         lambda w: refusal(w, "--out", str(w.path("answers.jsonl"))), 2, "is the same file as --prompts",
         prepare=lambda w: os.link(w.data, w.path("answers.jsonl"))),
    Case("refusal-out-is-model-file", "`--out` is a file of the `--model` directory", "pact",
         lambda w: refusal(w, "--out", str(w.model / "config.json")), 2, "is the same file as --model"),
    Case("refusal-out-is-adapter-file", "`--out` is the adapter's weights file", "pact",
         lambda w: refusal(w, "--adapter", str(w.run), "--out", str(w.run / "adapter_model.safetensors")), 2,
         "is the same file as --adapter"),
    Case("refusal-out-is-save-to-eval-json", "`--out` is the eval.json `--save-to` writes", "pact",
         lambda w: refusal(w, "--out", str(w.run / "eval.json"), "--save-to", str(w.run)), 2,
         "is the same file as --out"),
    Case("refusal-save-to-eval-json-is-prompts", "`--prompts` is RUN_DIR/eval.json of `--save-to RUN_DIR`", "pact",
         lambda w: refusal(w, "--save-to", str(w.path("res")), prompts=w.path("res/eval.json")), 2,
         "is the same file as --prompts",
         prepare=lambda w: w.write("res/eval.json", json.dumps([{"instruction": "Say hello."}]))),
    Case("refusal-out-is-directory", "`--out` is a directory", "pact",
         lambda w: refusal(w, "--out", str(w.run)), 2, "is a directory"),
    Case("refusal-out-folder-missing", "`--out` in a folder that does not exist", "pact",
         lambda w: refusal(w, "--out", str(w.path("no-folder/answers.jsonl"))), 2, "no-folder does not exist"),
    Case("refusal-save-to-is-file", "`--save-to` is a file", "pact",
         lambda w: refusal(w, "--save-to", str(w.safety)), 2, "a file, not a run directory"),
    Case("refusal-save-to-corrupt-eval-json", "`--save-to` holds an eval.json that is not JSON", "pact",
         lambda w: refusal(w, "--save-to", str(w.run)), 2, "eval.json: invalid JSON",
         prepare=lambda w: save_eval(w, "eval.json", '{"refusal": ')),
    Case("refusal-empty-prompts", "an empty `--prompts` file", "pact",
         lambda w: refusal(w, prompts=w.path("empty.jsonl")), 2, "empty.jsonl",
         prepare=lambda w: w.write("empty.jsonl", "")),
    Case("refusal-missing-prompts", "a `--prompts` file that does not exist", "pact",
         lambda w: refusal(w, prompts=w.path("nowhere.jsonl")), 2, "nowhere.jsonl"),
    Case("refusal-limit-zero", "`--limit 0`", "pact", lambda w: refusal(w, "--limit", "0"), 2, "--limit: limit must be an integer >= 1, got 0"),
    Case("refusal-batch-size-negative", "`--batch-size -2`", "pact",
         lambda w: refusal(w, "--batch-size", "-2"), 2, "--batch-size: batch_size must be an integer >= 1, got -2"),
    Case("refusal-max-new-tokens-zero", "`--max-new-tokens 0`", "pact",
         lambda w: refusal(w, "--max-new-tokens", "0"), 2, "--max-new-tokens: max_new_tokens must be an integer >= 1, got 0"),
    Case("refusal-config-float-count", "`--config` YAML with `max_new_tokens: 1.0e+30`", "pact",
         lambda w: ["eval", "refusal", "--model", str(w.model), "--device", "cpu", "--prompts", str(w.data), "--config",
                    str(w.path("bad.yaml"))], 2,
         "bad.yaml: max_new_tokens: expected an integer, got 1e+30 (a number)",
         prepare=lambda w: w.write("bad.yaml", "max_new_tokens: 1.0e+30\n")),
    Case("refusal-max-new-tokens-beyond-context", "`--max-new-tokens 10^11` (the model reads 2048 tokens; generation would "
         "never end)", "pact", lambda w: refusal(w, "--max-new-tokens", str(10**11)), 2,
         "--max-new-tokens: max_new_tokens must be at most the model's context length (2048 tokens, max_position_embeddings "
         "of its config), got 100000000000"),
    Case("refusal-limit-not-a-number", "`--limit ten`", "pact", lambda w: refusal(w, "--limit", "ten"), 2, "argument --limit: invalid int value: 'ten'"),
    Case("refusal-device-unknown", "`--device gpu` (not a torch device)", "pact",
         lambda w: refusal(w, "--device", "gpu"), 2, "--device: device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    Case("refusal-judge-missing", "`--judge` names a model directory that does not exist", "pact",
         lambda w: refusal(w, "--judge", str(w.path("no-judge"))), 2, "no-judge: no such model directory"),
    Case("refusal-model-missing", "`--model` names a directory that does not exist", "pact",
         lambda w: refusal(w, model=w.path("no-model")), 2, "no such model directory"),
    Case("refusal-model-weights-truncated", "`--model` a model folder whose model.safetensors is cut short", "pact",
         lambda w: refusal(w, model=w.path("damaged")), 2,
         "damaged: transformers cannot load this model folder (SafetensorError: Error while deserializing header",
         prepare=damaged_model(lambda folder: truncate(folder / "model.safetensors"))),
    Case("refusal-model-config-text-size", "`--model` a model folder whose config.json has a text `hidden_size`", "pact",
         lambda w: refusal(w, model=w.path("damaged")), 2, "damaged: transformers cannot load this model folder "
         "(StrictDataclassFieldValidationError: Validation error for field 'hidden_size'",
         prepare=damaged_model(lambda folder: edit_json(folder / "config.json", hidden_size="wide"))),
    Case("refusal-model-other-vocabulary", "`--model` a model folder whose config.json says another vocabulary than its weights",
         "pact", lambda w: refusal(w, model=w.path("damaged")), 2, "damaged: transformers cannot load this model folder (RuntimeError",
         prepare=damaged_model(lambda folder: edit_json(folder / "config.json", vocab_size=10))),
    Case("refusal-model-is-adapter", "`--model` is a LoRA run folder (an adapter)", "pact",
         lambda w: refusal(w, model=w.run), 2, "pass it as --adapter"),
]

ADAPTER_CASES = [
    Case("adapter-no-config", "`--adapter` folder without adapter_config.json", "pact",
         lambda w: refusal(w, "--adapter", str(w.run)), 2, "no adapter_config.json",
         prepare=lambda w: remove(w.run / "adapter_config.json")),
    Case("adapter-no-weights", "`--adapter` folder without adapter_model.safetensors", "pact",
         lambda w: refusal(w, "--adapter", str(w.run)), 2, "no adapter_model.safetensors",
         prepare=lambda w: remove(w.run / "adapter_model.safetensors")),
    Case("adapter-missing-dir", "`--adapter` folder that does not exist", "pact",
         lambda w: refusal(w, "--adapter", str(w.path("no-adapter"))), 2, "no-adapter: no such directory"),
    Case("adapter-is-file", "`--adapter` is a file", "pact",
         lambda w: refusal(w, "--adapter", str(w.data)), 2, "a file, not an adapter directory"),
    Case("adapter-is-full-model", "`--adapter` is a full fine-tuned model folder", "pact",
         lambda w: refusal(w, "--adapter", str(w.path("full-run"))), 2, "pass it as --model instead",
         prepare=full_model_run),
    Case("adapter-config-not-json", "`--adapter` with an adapter_config.json that is not JSON", "pact",
         lambda w: refusal(w, "--adapter", str(w.run)), 2, "adapter_config.json: not valid JSON",
         prepare=lambda w: w.write("run/adapter_config.json", "{")),
    Case("adapter-config-no-peft-type", "`--adapter` with an adapter_config.json lacking peft_type", "pact",
         lambda w: refusal(w, "--adapter", str(w.run)), 2, "adapter_config.json: field 'peft_type' is None",
         prepare=lambda w: w.write("run/adapter_config.json", "{}")),
    Case("adapter-config-alpha-nan", "`--adapter` whose adapter_config.json has `lora_alpha` NaN", "pact",
         lambda w: refusal(w, "--adapter", str(w.run)), 2, "adapter_config.json: field 'lora_alpha' must be a finite number > 0, got NaN",
         prepare=lambda w: w.write("run/adapter_config.json", json.dumps({**json.loads((w.run / "adapter_config.json").read_text()),
                                                                          "lora_alpha": float("nan")}))),
    Case("adapter-weights-truncated", "`--adapter` whose adapter_model.safetensors is truncated", "pact",
         lambda w: refusal(w, "--adapter", str(w.run)), 2, "adapter_model.safetensors is not a readable safetensors file",
         prepare=lambda w: truncate(w.run / "adapter_model.safetensors")),
    Case("adapter-other-base-model", "`--adapter` trained on another base model (hidden size 32 vs 48)", "pact",
         lambda w: refusal(w, "--adapter", str(w.run), model=w.path("wide-model")), 2,
         "cannot be applied to --model", prepare=wider_model),
]

TASK_CASES = [
    Case("task-one-label", "`--data` whose rows all have the same answer", "pact",
         lambda w: task(w, w.path("one-label.jsonl")), 2, "one-label.jsonl: the data has a single distinct answer",
         prepare=lambda w: labelled(w, "one-label.jsonl", ["positive"] * 4)),
    Case("task-free-text", "`--data` with 21 distinct answers (not classification)", "pact",
         lambda w: task(w, w.path("free-text.jsonl")), 2, "free-text.jsonl: the data has 21 distinct answers",
         prepare=lambda w: labelled(w, "free-text.jsonl", [f"answer {i}" for i in range(21)])),
    Case("task-empty-data", "an empty `--data` file", "pact",
         lambda w: task(w, w.path("empty.jsonl")), 2, "empty.jsonl", prepare=lambda w: w.write("empty.jsonl", "")),
    Case("task-limit-negative", "`--limit -3`", "pact", lambda w: task(w, w.data, "--limit", "-3"), 2, "--limit: limit must be an integer >= 1, got -3"),
    Case("task-batch-size-zero", "`--batch-size 0`", "pact",
         lambda w: task(w, w.data, "--batch-size", "0"), 2, "--batch-size: batch_size must be an integer >= 1, got 0"),
    Case("task-dtype-unknown", "`--dtype float64`", "pact",
         lambda w: task(w, w.data, "--dtype", "float64"), 2, "--dtype: dtype must be one of auto, bfloat16, float16, float32, got 'float64'"),
    Case("task-save-to-eval-json-is-data", "`--data` is RUN_DIR/eval.json of `--save-to RUN_DIR`", "pact",
         lambda w: task(w, w.path("res/eval.json"), "--save-to", str(w.path("res"))), 2, "is the same file as --data",
         prepare=lambda w: w.write("res/eval.json", json.dumps([{"instruction": "Rate it.", "output": v} for v in "ab"]))),
    Case("task-adapter-no-config", "`--adapter` folder without adapter_config.json", "pact",
         lambda w: task(w, w.data, "--adapter", str(w.run)), 2, "no adapter_config.json",
         prepare=lambda w: remove(w.run / "adapter_config.json")),
]

DRIFT_CASES = [
    Case("drift-missing-cache", "`--cache` that does not exist", "pact",
         lambda w: drift(w, cache=w.path("no-cache")), 2, "no-cache is not a pact cache"),
    Case("drift-cache-is-data-file", "`--cache` is a data file", "pact",
         lambda w: drift(w, cache=w.data), 2, "is not a pact cache"),
    Case("drift-manifest-edited", "`--cache` whose manifest was edited to say the build did not finish", "pact",
         lambda w: drift(w), 2, "cache/manifest.json", prepare=mark_cache_incomplete),
    Case("drift-shard-truncated", "`--cache` with a truncated shard", "pact",
         lambda w: drift(w), 2, "shard-00001.arrow: ", prepare=lambda w: truncate(w.cache / "shard-00001.arrow")),
    Case("drift-shard-missing", "`--cache` with a shard file deleted", "pact",
         lambda w: drift(w), 2, "shard-00002.arrow: missing", prepare=lambda w: remove(w.cache / "shard-00002.arrow")),
    Case("drift-shard-corrupt", "`--cache` with a flipped byte inside a shard (same size)", "pact",
         lambda w: drift(w), 2, "shard-00001.arrow: sha256", prepare=lambda w: flip_middle_byte(w.cache / "shard-00001.arrow")),
    Case("drift-other-tokenizer", "`--model` whose tokenizer (vocabulary 320) differs from the cache's", "pact",
         lambda w: drift(w, model=w.path("other-model")), 2, "its tokenizer differs from the one the cache",
         prepare=lambda w: make_tiny_model(w.path("other-model"), tokenizer=make_tiny_tokenizer(vocab_size=320))),
    Case("drift-adapter-no-weights", "`--adapter` folder without adapter_model.safetensors", "pact",
         lambda w: drift(w, "--adapter", str(w.run)), 2, "no adapter_model.safetensors",
         prepare=lambda w: remove(w.run / "adapter_model.safetensors")),
    Case("drift-save-to-is-cache-manifest", "`--save-to` RUN_DIR whose eval.json is the cache's manifest (symlink)", "pact",
         lambda w: drift(w, "--save-to", str(w.path("res"))), 2, "is the same file as --cache",
         prepare=lambda w: (w.path("res").mkdir(), os.symlink(w.cache / "manifest.json", w.path("res/eval.json")))),
    Case("drift-batch-size-zero", "`--batch-size 0`", "pact",
         lambda w: drift(w, "--batch-size", "0"), 2, "--batch-size: batch_size must be an integer >= 1, got 0"),
    Case("drift-dtype-unknown", "`--dtype int8` (a storage dtype of `pact-cache build`, not a weight dtype)", "pact",
         lambda w: drift(w, "--dtype", "int8"), 2, "--dtype: dtype must be one of auto, bfloat16, float16, float32, got 'int8'"),
]

REPORT_CASES = [
    Case("report-missing-run", "a RUN_DIR that does not exist", "pact",
         lambda w: ["report", str(w.path("no-run"))], 2, "no-run: no such run directory"),
    Case("report-no-eval-json", "a run folder without eval.json (trained, never evaluated)", "pact",
         lambda w: ["report", str(w.run)], 2, "run: no eval.json"),
    Case("report-eval-json-invalid", "an eval.json that is not valid JSON", "pact",
         lambda w: ["report", str(w.run)], 2, "eval.json: invalid JSON at line 1",
         prepare=lambda w: save_eval(w, "eval.json", '{"refusal": {"refusal_rate": 0.5,')),
    Case("report-eval-json-not-utf8", "an eval.json that is not UTF-8 text", "pact",
         lambda w: ["report", str(w.run)], 2, "eval.json: not UTF-8 text",
         prepare=lambda w: save_eval(w, "eval.json", b'{"task": "\xff"}')),
    Case("report-eval-json-array", "an eval.json holding an array", "pact",
         lambda w: ["report", str(w.run)], 2, "eval.json: expected a JSON object",
         prepare=lambda w: save_eval(w, "eval.json", [0.5])),
    Case("report-measurement-not-object", "an eval.json whose 'task' is a list", "pact",
         lambda w: ["report", str(w.run)], 2, "'task' must be a JSON object",
         prepare=lambda w: save_eval(w, "eval.json", {"task": [0.8]})),
    Case("report-rate-is-text", "an eval.json whose refusal_rate is a string", "pact",
         lambda w: ["report", str(w.run)], 2, "field 'refusal.refusal_rate' must be a number",
         prepare=lambda w: save_eval(w, "eval.json", {"refusal": {"refusal_rate": "high"}})),
    *[Case(f"report-{name}", f"an eval.json with {shown}", "pact", lambda w: ["report", str(w.run)], 2, f"eval.json: {message}",
           prepare=lambda w, text=text: save_eval(w, "eval.json", text))
      for name, shown, text, message in (
          ("rate-nan", "`NaN` as refusal_rate", '{"refusal": {"refusal_rate": NaN}}',
           "field 'refusal.refusal_rate' must be a finite number from 0 to 1, got nan"),
          ("accuracy-above-one", "an accuracy of 2.0", '{"task": {"accuracy": 2.0}}',
           "field 'task.accuracy' must be a finite number from 0 to 1, got 2.0"),
          ("kl-infinite", "`Infinity` as kl_mean", '{"drift": {"kl_mean": Infinity}}', "field 'drift.kl_mean' must be a finite number, got inf"),
          ("nested-too-deep", "100 000 nested `[`", "[" * 100_000, "invalid JSON (RecursionError"),
          ("integer-too-long", "a 5000-digit accuracy", '{"task": {"accuracy": ' + "9" * 5000 + "}}", "invalid JSON (ValueError: Exceeds the limit"),
      )],
    Case("report-other-keys", "an eval.json with keys of its own beside the measurements (accepted: they are left alone)", "pact",
         lambda w: ["report", str(w.run)], 0, "| run | - | - | 0.500 | - |",
         prepare=lambda w: save_eval(w, "eval.json", {"task": {"accuracy": 0.5, "notes": "mine"}, "owner": "me"}),
         may_change=("report.md", "report.png")),
    Case("report-out-symlink-to-eval-json", "`--out` PREFIX whose PREFIX.md is a symlink to a run's eval.json", "pact",
         lambda w: ["report", str(w.run), "--out", str(w.path("cmp"))], 2, "is the same file as the eval.json of RUN_DIR",
         prepare=lambda w: (save_eval(w, "eval.json", {"task": {"accuracy": 0.5}}),
                            os.symlink(w.run / "eval.json", w.path("cmp.md")))),
    Case("report-out-temporary-name-taken", "`--out` PREFIX beside a user's file named like its temporary file "
         "(`.tmp-PREFIX.md.<pid>`)", "pact", lambda w: ["report", str(w.run), "--out", str(w.path("cmp"))], 2,
         "already exists and was not created by this process; move it away",
         prepare=lambda w: (save_eval(w, "eval.json", {"task": {"accuracy": 0.5}}), w.write(f".tmp-cmp.md.{os.getpid()}", "mine"))),
    Case("report-out-is-directory", "`--out` PREFIX whose PREFIX.png is a directory", "pact",
         lambda w: ["report", str(w.run), "--out", str(w.path("cmp"))], 2, "cmp.png: is a directory",
         prepare=lambda w: (save_eval(w, "eval.json", {"task": {"accuracy": 0.5}}), w.path("cmp.png").mkdir())),
]

CASES = REFUSAL_CASES + ADAPTER_CASES + TASK_CASES + DRIFT_CASES + REPORT_CASES

LOADS_A_MODEL = {"adapter-weights-truncated", "adapter-other-base-model", "drift-shard-corrupt", "drift-other-tokenizer",
                 "refusal-max-new-tokens-beyond-context", "refusal-model-weights-truncated", "refusal-model-config-text-size",
                 "refusal-model-other-vocabulary"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_eval_input(case, world, capsys):
    check_case(case, world, capsys)


@pytest.mark.parametrize("case", [c for c in CASES if c.name not in LOADS_A_MODEL],
                         ids=[c.name for c in CASES if c.name not in LOADS_A_MODEL])
def test_hostile_eval_fails_before_loading_a_model(case, world, capsys, monkeypatch):
    """Bad files and flags are refused before any model or tokenizer is loaded (loading here is an internal error)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    for loader in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(loader, "from_pretrained", refuse)
    check_case(case, world, capsys)


def _refusal_out_argv(w, out) -> list[str]:
    """A valid `pact eval refusal` of two prompts writing `--out out` and saving to the run folder."""
    return refusal(w, "--limit", "2", "--out", str(out), "--save-to", str(w.run), "--json")


def test_refusal_out_replaces_an_existing_file_atomically(world, capsys, monkeypatch):
    """An existing --out file is replaced whole; if the process dies at the rename, the old file is intact and no
    temporary file is left behind."""
    from pact.cli import main as cli

    out = world.write("answers.jsonl", "old answers\n")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert cli.main(_refusal_out_argv(world, out)) == 130
    assert out.read_text() == "old answers\n"
    assert sorted(p.name for p in world.root.iterdir() if "answers" in p.name) == ["answers.jsonl"]
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(_refusal_out_argv(world, out)) == 0
    summary = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == summary["n"] == 2
    assert json.loads((world.run / "eval.json").read_text())["refusal"] == summary


def test_report_replaces_outputs_atomically(world, capsys, monkeypatch):
    """`pact report` writes PREFIX.md and PREFIX.png through a rename: a crash keeps the previous files whole."""
    from pact.cli import main as cli

    save_eval(world, "eval.json", {"refusal": {"refusal_rate": 0.25}, "task": {"accuracy": 0.75}})
    old_md, old_png = world.write("cmp.md", "old table\n"), world.write("cmp.png", b"old png")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert cli.main(["report", str(world.run), "--out", str(world.path("cmp"))]) == 130
    assert (old_md.read_text(), old_png.read_bytes()) == ("old table\n", b"old png")
    assert sorted(p.name for p in world.root.iterdir() if p.name.startswith(".") or "cmp" in p.name) == ["cmp.md", "cmp.png"]
    monkeypatch.undo()
    assert cli.main(["report", str(world.run), "--out", str(world.path("cmp"))]) == 0
    assert "| run | 0.250 | - | 0.750 | - |" in old_md.read_text().splitlines()
    assert old_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_drift_with_the_run_adapter_saves_to_the_run(world, capsys):
    """The checks let the normal flow through: drift of a trained run's adapter on its own cache, saved into the run
    folder (whose eval.json is not an input even though the folder is the adapter's)."""
    from pact.cli import main as cli

    argv = drift(world, "--adapter", str(world.run), "--save-to", str(world.run), "--json")
    for _ in range(2):
        assert cli.main(argv) == 0
        result = json.loads(capsys.readouterr().out)
    assert result["tokens"] > 0
    assert json.loads((world.run / "eval.json").read_text())["drift"]["kl_mean"] == result["kl_mean"]
