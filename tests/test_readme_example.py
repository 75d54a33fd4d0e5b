"""The README's Python example runs as written: its ```python block under "## Python API", executed in a folder whose
`runs/demo-cache` is a cache of the tiny model (the quickstart builds it from the embedded model)."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import write_jsonl

from pact.cli.cache import main as cache_main

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    """The first ```python block of the README's "## Python API" section."""
    section = README.read_text(encoding="utf-8").split("\n## Python API", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has no ```python block"
    return match.group(1)


def test_the_readme_python_example_runs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """It imports from `pact` only (and peft), trains four steps from the cache and prints the evaluation's metrics."""
    code = readme_example()
    assert {line.split()[1] for line in code.splitlines() if line.startswith("from ")} <= {"pact", "peft"}
    rows = [{"instruction": f"Say something kind, number {i}.", "output": f"You are doing great, friend number {i}."}
            for i in range(8)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    assert cache_main(["build", "--model", str(tiny_model_dir), "--data", str(data), "--out", "runs/demo-cache",
                       "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert all(key in printed for key in ("eval_loss", "eval_ce", "eval_kl", "eval_tokens")), printed
    assert (tmp_path / "runs" / "api-run").is_dir()
