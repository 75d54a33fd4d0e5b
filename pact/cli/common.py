"""Reusable command-line pieces for the `pact` commands: argparse value types
(a bad value makes argparse exit 2 naming the flag) and checks of model and
output paths that a command runs before it loads any model.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterable, Mapping


from pact.checks import check_device
from pact.errors import InvalidSetting, PactError
from pact.models.loading import EMBEDDED_MODEL


def integer_in(low: int, high: int | None = None):
    """An argparse `type=`: an integer in low..high (no upper bound when None); a bad value makes argparse exit 2
    naming the flag and the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {f'in {low}..{high}' if high is not None else f'at least {low}'}, got {value}")
        return value
    return parse


positive_int = integer_in(1)  # counts: --limit, --batch-size, --max-new-tokens, ...


def positive_float(text: str) -> float:
    """An argparse `type=`: a finite number > 0 (temperatures); a bad value makes argparse exit 2 naming the flag."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def device_name(text: str) -> str:
    """An argparse `type=`: `auto` or a torch device name (`cpu`, `cuda`, `cuda:1`); a bad value makes argparse exit 2
    naming the flag, before any model is loaded."""
    try:
        check_device("device", text)
    except InvalidSetting as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _is_hub_id(text: str) -> bool:
    """Whether `text` is spelled like a Hugging Face hub id (`name` or `owner/name`), so it may be looked up there."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def check_model_argument(flag: str, value: str | None) -> None:
    """Refuse a model argument that cannot name a model, before anything is loaded.

    Accepted: None or the embedded model's name, an existing model directory
    (with config.json) or `.gguf` file, or a hub id (looked up later). A
    missing local path, a plain file, or a PEFT adapter folder (which belongs
    to `--adapter`) is a `PactError` naming `flag`.
    """
    from pact.models.adapters import ADAPTER_CONFIG, full_model_weights

    if value is None or value == EMBEDDED_MODEL:
        return
    path = Path(value).expanduser()
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file() and not full_model_weights(path):
            raise PactError(f"{flag} {value}: this folder holds a PEFT adapter (adapter_config.json), not a model; "
                            "pass it as --adapter, with the base model it was trained on as --model")
        if not (path / "config.json").is_file():
            raise PactError(f"{flag} {value}: no config.json in this folder, so it is not a Hugging Face model directory")
        return
    if path.is_file():
        if path.suffix != ".gguf":
            raise PactError(f"{flag} {value}: a file, but not a .gguf model; pass a model directory, a .gguf file, "
                            f"a hub id or {EMBEDDED_MODEL!r}")
        return
    if path.suffix == ".gguf" or not _is_hub_id(value):
        raise PactError(f"{flag} {value}: no such model directory or .gguf file")


def input_files(path: str | Path, skip_names: Iterable[str] = ()) -> list[Path]:
    """The files an input path stands for: itself if a file, every file below it if a directory (minus `skip_names`), else none."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        skipped = set(skip_names)
        return sorted(p for p in path.rglob("*") if p.is_file() and p.name not in skipped)
    return []


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal once resolved (symlinks followed), or, both existing, one inode (hard links)."""
    if a.expanduser().resolve() == b.expanduser().resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_file(flag: str, path: str | Path, creates_folder: bool = False) -> Path:
    """Refuse an output file path that is a directory, or whose folder does not exist unless the command
    `creates_folder`s; returns it as a `Path`."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise PactError(f"{flag} {path}: is a directory; give a file path")
    if not creates_folder and not path.parent.is_dir():
        raise PactError(f"{flag} {path}: the folder {path.parent} does not exist; create it first")
    return path


def refuse_overwriting_inputs(outputs: Iterable[tuple[str, Path]], inputs: Mapping[str, Iterable[Path]]) -> None:
    """Raise `PactError` when an output path is one of the inputs' files (writing would destroy it) or another output.

    `outputs` pairs a description of each output (e.g. "--out") with its path;
    `inputs` maps a description of each input (e.g. "--prompts") to its files.
    """
    claimed = [(label, Path(path)) for label, paths in inputs.items() for path in paths]
    for label, output in outputs:
        for other_label, other in claimed:
            if same_file(Path(output), other):
                raise PactError(f"{label} ({output}) is the same file as {other_label} ({other}); "
                                f"choose another path for {label}")
        claimed.append((label, Path(output)))


