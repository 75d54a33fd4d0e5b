"""`export_merged(run, out)`: a LoRA run folder merged into its base model and saved
as a plain full model (safetensors weights, config, tokenizer) that
`AutoModelForCausalLM.from_pretrained(out)` loads with no peft installed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pact.errors import PactError, os_error_reason
from pact.models.adapters import ADAPTER_CONFIG, adapter_base_model, check_adapter_dir, load_student

RUN = "RUN"  # how `pact export` names the run folder in messages (its positional argument)


def _check_adapter(run: Path) -> None:
    """Refuse a run folder without an adapter to merge (a full model, or no run at all), then check the adapter as
    `--adapter` is checked (`check_adapter_dir`: its settings and weights), before any model loads."""
    if not (run / ADAPTER_CONFIG).is_file():
        what = "a full model (config.json), nothing to merge; use it as it is" if (run / "config.json").is_file() else "no adapter"
        raise PactError(f"{run}: no {ADAPTER_CONFIG}, so this is {what}")
    check_adapter_dir(run, RUN)


def _check_out(out: Path, run: Path) -> None:
    """Refuse an `out` that is the run folder, exists as a file or a folder with files in it, or lies under a file."""
    if out.resolve() == run.resolve():
        raise PactError(f"--out {out} is the run folder itself; choose a new folder for the merged model")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PactError(f"--out {out} already exists and is not an empty folder; choose a new folder for the merged model")
    folder = next(p for p in out.absolute().parents if p.exists())
    if not folder.is_dir():
        raise PactError(f"--out {out}: {folder} is a file, so no folder can be created there; choose a new folder for the merged model")


def _new_staging(out: Path) -> Path:
    """A new, empty folder beside `out` to write the merged model into before it is renamed to `out`.

    Its name is made unique on creation (`.<out>.<random>.tmp`), so it is this
    export's own: a folder of the user's, whatever its name, is never written
    into or removed.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        raise PactError(f"--out {out}: cannot create a folder in {out.parent} ({os_error_reason(err)}); nothing was written") from err


def merged_model(run: str | Path, model: str | None = None, device: str = "cpu"):
    """The run's adapter merged into its base model (`model`, or the one the run records: `adapter_base_model`), and
    the run's tokenizer.

    The adapter folder is checked first (`_check_adapter`), so a damaged run is
    named before any model loads.
    """
    from transformers import AutoTokenizer

    run = Path(run).expanduser()
    _check_adapter(run)
    loaded = load_student(model, str(run), device=device, dtype="float32", flag=RUN)
    tokenizer = AutoTokenizer.from_pretrained(run) if (run / "tokenizer_config.json").is_file() else loaded.tokenizer
    return loaded.model.merge_and_unload(), tokenizer


def export_merged(run: str | Path, out: str | Path, model: str | None = None, device: str = "cpu") -> Path:
    """Write the merged model and tokenizer of LoRA run folder `run` to `out` (staged in a new folder of its own beside
    it, then renamed into place); `out` must be new or an empty folder."""
    run, out = Path(run).expanduser(), Path(out).expanduser()
    _check_adapter(run)
    if model is None:
        adapter_base_model(run, RUN)  # an adapter folder naming its base, checked before anything is created
    _check_out(out, run)
    merged, tokenizer = merged_model(run, model, device)
    staging = _new_staging(out)
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise PactError(f"cannot write the merged model to {out}: {os_error_reason(err)}; nothing was written there") from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
