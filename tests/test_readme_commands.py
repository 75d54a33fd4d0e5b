"""The README's commands after the quickstart run as written: every `pact` / `pact-cache` command of its ```bash blocks
from "## Quickstart" on, read from README.md (not copied here), run in order in a fresh folder (after the quickstart's
own `pact-cache build`, which the later ones read), each exiting 0 and leaving the files it names.

The demo data paths the README uses (`pact/data/demo_data/...`, relative to a clone's root) are linked into that
folder, so `runs/` is written there and not into the clone.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from test_cache_support import subprocess_env

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DEMO_DATA = "pact/data/demo_data"
TIMEOUT = 3600  # seconds for one command: the embedded model on a busy CPU


def readme_commands() -> list[list[str]]:
    """The `pact` and `pact-cache` commands of the README's ```bash blocks from "## Quickstart" on, in order, each as its
    argument list (a line's `cmd1 && cmd2` gives both; `pip` and `python` commands are left out)."""
    text = README.read_text(encoding="utf-8").split("\n## Quickstart", 1)[1]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part)
                if words and words[0] in ("pact", "pact-cache"):
                    commands.append(words)
    return commands


def _needs_the_embedded_model(command: list[str]) -> bool:
    """Whether a command loads the embedded model: everything but `pact plan` (architecture only) and `pact report`."""
    return command[1] not in ("plan", "report")


def _value(command: list[str], flag: str) -> str | None:
    """The value `flag` is given in `command`, if any."""
    return command[command.index(flag) + 1] if flag in command else None


def _files_named(command: list[str]) -> list[str]:
    """The files a command names that must exist once it ran: its path arguments (inputs and outputs), what `--save-to`
    and `--output_dir` write inside their run folder, a cache's manifest and `pact report`'s table and figure."""
    paths = [word for word in command[2:] if "/" in word and not word.startswith("-")]
    if _value(command, "--save-to"):
        paths.append(f"{_value(command, '--save-to')}/eval.json")
    if _value(command, "--output_dir"):
        run = _value(command, "--output_dir")
        paths += [f"{run}/{name}" for name in ("adapter_config.json", "adapter_model.safetensors", "pact_config.json",
                                                "metrics.jsonl", "README.md")]
    if command[:2] == ["pact-cache", "build"]:
        paths.append(f"{_value(command, '--out')}/manifest.json")
    if command[:2] == ["pact", "report"]:
        paths += [(_value(command, "--out") or "report") + suffix for suffix in (".md", ".png")]
    return paths


def _run(command: list[str], folder: Path) -> None:
    """Run `command` as written (its console script, from this Python's environment) in `folder`; it must exit 0 and
    leave every file it names."""
    script = Path(sys.executable).parent / command[0]
    done = subprocess.run([str(script), *command[1:]], cwd=folder, env=subprocess_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    shown = " ".join(command)
    assert done.returncode == 0, f"{shown} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    missing = [path for path in _files_named(command) if not (folder / path).exists()]
    assert not missing, f"{shown} ran but left no {', '.join(missing)}"


@pytest.fixture
def clone_folder(tmp_path) -> Path:
    """A fresh folder standing in for a clone's root: the demo data at the README's relative path, nothing else."""
    target = tmp_path / DEMO_DATA
    target.parent.mkdir(parents=True)
    target.symlink_to(REPO / DEMO_DATA, target_is_directory=True)
    return tmp_path


def test_the_readme_commands_are_found():
    """The README shows the quickstart's cache build, a training run, each measurement it names and a report."""
    names = [" ".join(command[:2] if command[0] == "pact-cache" or command[1] != "eval" else command[:3])
             for command in readme_commands()]
    assert names[0] == "pact-cache build"
    assert {"pact train", "pact eval drift", "pact eval refusal", "pact report"} <= set(names)


@pytest.mark.parametrize("command", [c for c in readme_commands() if not _needs_the_embedded_model(c)
                                     and c[1] != "report"], ids=" ".join)
def test_the_readme_commands_without_a_model_run_as_written(command, clone_folder):
    """`pact plan` needs the architecture only: it runs on its own."""
    _run(command, clone_folder)


@pytest.mark.embedded
def test_the_readme_commands_after_the_quickstart_run_as_written(clone_folder):
    """The quickstart's cache build, then every later command that reads it (train, each eval, report), in order."""
    for command in readme_commands():
        if _needs_the_embedded_model(command) or command[1] == "report":
            _run(command, clone_folder)
