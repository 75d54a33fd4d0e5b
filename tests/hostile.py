"""The hostile-input regression harness: a table of bad inputs per command
family, each run through the real command line in-process, asserting

* the exit code (2 bad input, 1 a failed check, 0 a hostile input that must be accepted),
* a message on stderr that names the culprit (a file, a row, a field, a flag); for an accepted input, a line of
  stdout saying what was done,
* no traceback (errors are one message unless `--debug`),
* that no file which existed before the command changed or vanished
  (sha256 of every file under the case's folder and the shared fixtures).

Each `tests/test_hostile_*.py` holds one family's `CASES` and one
parametrised test calling `check_case`. `docs/hostile_inputs.md` is generated
from those tables (`python tests/hostile.py > docs/hostile_inputs.md`) and a
test keeps it current.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

HERE = Path(__file__).resolve().parent
FAMILY_MODULES = ("test_hostile_cache", "test_hostile_data", "test_hostile_safety_tokens", "test_hostile_train", "test_hostile_eval",
                  "test_hostile_plan")


@dataclass
class World:
    """The files a case works on: its own folder `root` (copies of the shared fixtures live there) and the tiny model.

    `model` is the tiny random model directory (shared, read-only for the
    cases: it is hashed too); `safety`, `cache` and `data` are copies inside
    `root` of a safety-token file for the tiny model, a small float32 cache
    built with it, and a 12-row Alpaca JSONL file; `run` is a trained LoRA run
    folder (one step, with its `checkpoint-1`, so `--resume` can be tried) on that cache.
    """

    root: Path
    model: Path
    safety: Path
    cache: Path
    data: Path
    run: Path

    def path(self, name: str) -> Path:
        """`root / name` as a path (not created)."""
        return self.root / name

    def write(self, name: str, content: str | bytes) -> Path:
        """Create `root / name` holding `content` (text as UTF-8); returns its path."""
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")
        return target


@dataclass(frozen=True)
class Case:
    """One hostile input: what it is, the command, and what must come out.

    `argv(world)` is the command's arguments after the program name;
    `prepare(world)` creates the hostile files first; `message` is a substring
    stderr must contain (it names the culprit), or stdout for an input that
    must be accepted (exit code 0); `may_change` lists paths
    relative to `root` that the command is allowed to create or change (its
    own outputs); everything else must keep its bytes.
    """

    name: str
    input: str
    program: str
    argv: Callable[[World], list[str]]
    exit_code: int
    message: str
    prepare: Callable[[World], object] | None = None
    may_change: tuple[str, ...] = field(default_factory=tuple)

    def command(self) -> str:
        """The command as shown in the docs table, with placeholders for the fixtures' paths."""
        shown = World(*(Path(f"<{name}>") for name in ("dir", "model", "safety", "cache", "data", "run")))
        return " ".join([self.program, *(str(a).replace("<dir>/", "") for a in self.argv(shown))])


@contextlib.contextmanager
def read_only_folder(path: Path):
    """Create `path` as a folder the OS refuses writes into (for non-root users; see `NEEDS_NON_ROOT`), restored on exit."""
    path.mkdir()
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


NEEDS_NON_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders, so there is nothing to refuse")


def _entry_point(program: str) -> Callable[[list[str]], int]:
    if program == "pact":
        from pact.cli.main import main
    elif program == "pact-cache":
        from pact.cli.cache import main
    else:
        raise ValueError(f"unknown program {program!r}")
    return main


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots`, keyed by path."""
    hashes = {}
    for root in roots:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def check_case(case: Case, world: World, capsys) -> str:
    """Run `case` against `world` and assert its exit code, message, no traceback and untouched files; returns stderr."""
    if case.prepare is not None:
        case.prepare(world)
    before = snapshot(world.root, world.model)
    capsys.readouterr()
    try:
        code = _entry_point(case.program)(case.argv(world))
    except SystemExit as exit_:  # argparse rejects a flag's value by exiting
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == case.exit_code, f"exit {code}, expected {case.exit_code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    said, stream = (out, "stdout") if case.exit_code == 0 else (err, "stderr")
    assert case.message in said, f"{stream} lacks {case.message!r}:\n{said[-2000:]}"
    assert "Traceback" not in out + err
    after = snapshot(world.root, world.model)
    allowed = {str(world.root / name) for name in case.may_change}
    changed = sorted(path for path, digest in before.items()
                     if after.get(path) != digest and not any(path == a or path.startswith(a + "/") for a in allowed))
    assert not changed, f"pre-existing files changed or removed: {changed}"
    return err


@pytest.fixture(scope="session")
def hostile_fixtures(tiny, tiny_model_dir, tiny_safety_file, float32_cache, tmp_path_factory):
    """The shared originals a `World` copies: safety tokens, cache, data, a trained run (built once per session)."""
    from pact.training.arguments import PactTrainingArguments
    from pact.data.sources import demo_data_path
    from pact.training.train import train

    base = tmp_path_factory.mktemp("hostile-originals")
    rows = [line for line in demo_data_path("benign").read_text(encoding="utf-8").splitlines() if line.strip()][:12]
    data = base / "data.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    run = base / "run"
    train(PactTrainingArguments(cache=str(float32_cache), output_dir=str(run), max_steps=1, per_device_train_batch_size=4,
                                learning_rate=1e-3, save_steps=1, train_device="cpu", disable_tqdm=True))
    return {"model": tiny_model_dir, "safety": Path(tiny_safety_file), "cache": Path(float32_cache), "data": data, "run": run}


@pytest.fixture
def world(hostile_fixtures, tmp_path, monkeypatch) -> World:
    """A fresh `World` for one case, its folder the working directory."""
    root = tmp_path / "world"
    root.mkdir()
    shutil.copy(hostile_fixtures["safety"], root / "safety_tokens.json")
    shutil.copytree(hostile_fixtures["cache"], root / "cache")
    shutil.copy(hostile_fixtures["data"], root / "data.jsonl")
    shutil.copytree(hostile_fixtures["run"], root / "run")
    monkeypatch.chdir(root)
    return World(root, hostile_fixtures["model"], root / "safety_tokens.json", root / "cache", root / "data.jsonl", root / "run")


def markdown_table() -> str:
    """The docs page: every family's cases as (input, command, exit code, message)."""
    sys.path.insert(0, str(HERE))
    lines = ["# Hostile inputs and what the commands answer", "",
             "Generated from the regression tables in `tests/test_hostile_*.py` by `python tests/hostile.py`; each row is",
             "a test asserting the exit code (2 bad input, 1 a failed check, 0 a hostile input that must be accepted), a message",
             "on stderr naming the culprit (on stdout for an accepted input: what was done), no traceback, and that no file",
             "existing before the command changed. `<model>`, `<safety>`, `<cache>`, `<data>` and",
             "`<run>` stand for a model directory, a safety-token file, a cache, an Alpaca JSONL file and a training run folder.",
             ""]
    for module_name in FAMILY_MODULES:
        module = importlib.import_module(module_name)
        lines += [f"## {module.FAMILY}", "", "| input | command | exit | message contains |", "| --- | --- | ---: | --- |"]
        for case in module.CASES:
            cells = [case.input, f"`{case.command()}`", str(case.exit_code), f"`{case.message}`"]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table(), end="")
