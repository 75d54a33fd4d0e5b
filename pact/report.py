"""Comparing runs: the `eval.json` file of a run directory, and the report
(markdown table + PNG) built from several of them.

`RUN_DIR/eval.json` is one JSON object that `pact eval ... --save-to RUN_DIR`
fills in, one key per measurement, each holding that command's `--json`
output (plus what was measured: model, adapter, data):

    {"refusal":      {"refusal_rate": 0.87, "n": 100, ...},   # harmful prompts
     "over_refusal": {"refusal_rate": 0.04, "n": 100, ...},   # benign prompts (`--benign`)
     "task":         {"accuracy": 0.85, "n": 500, ...},
     "drift":        {"kl_mean": 0.012, "tokens": 9000, ...}}

Saving a measurement again replaces that key only. A run directory is
usually a `pact train --out` directory, but any directory works.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pact.errors import PactError

EVAL_FILE = "eval.json"
MEASUREMENTS = ("refusal", "over_refusal", "task", "drift")


def save_measurement(run_dir: str | Path, key: str, result: dict) -> Path:
    """Merge `result` into `run_dir/eval.json` under `key` (one of `MEASUREMENTS`); returns the file.

    The file is rewritten atomically (temporary file + rename), so an
    interrupted save never leaves a truncated `eval.json`.
    """
    if key not in MEASUREMENTS:
        raise ValueError(f"unknown measurement {key!r}; expected one of {MEASUREMENTS}")
    run_dir = Path(run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / EVAL_FILE
    merged = load_measurements(run_dir) if path.exists() else {}
    merged[key] = result
    handle, staging = tempfile.mkstemp(prefix=f".{EVAL_FILE}.", dir=run_dir)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(merged, out, indent=2)
    os.replace(staging, path)
    return path


def load_measurements(run_dir: str | Path) -> dict:
    """The `eval.json` object of a run directory; a `PactError` names the directory if it is missing or invalid."""
    path = Path(run_dir).expanduser() / EVAL_FILE
    if not path.is_file():
        raise PactError(f"{run_dir}: no {EVAL_FILE}; write one with `pact eval refusal|task|drift ... --save-to {run_dir}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PactError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    if not isinstance(data, dict):
        raise PactError(f"{path}: expected a JSON object with keys among {MEASUREMENTS}")
    return data


@dataclass
class RunSummary:
    """The headline numbers of one run (None where it was not measured)."""

    name: str
    refusal_rate: float | None
    over_refusal_rate: float | None
    task_accuracy: float | None
    drift_kl: float | None


def summarize_run(run_dir: str | Path, name: str) -> RunSummary:
    """Read a run's headline numbers from its `eval.json`."""
    data = load_measurements(run_dir)

    def value(key: str, field: str) -> float | None:
        entry = data.get(key)
        return entry.get(field) if isinstance(entry, dict) else None

    return RunSummary(name, value("refusal", "refusal_rate"), value("over_refusal", "refusal_rate"),
                      value("task", "accuracy"), value("drift", "kl_mean"))


def run_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Labels for runs: each directory's name, or the path as given where two names collide."""
    names = [Path(d).expanduser().resolve().name for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs)]


def markdown_table(runs: Sequence[RunSummary]) -> str:
    """A markdown table: run, refusal rate, over-refusal, task accuracy, drift KL ("-" where not measured)."""

    def cell(number: float | None, digits: int) -> str:
        return "-" if number is None else f"{number:.{digits}f}"

    lines = ["| run | refusal rate | over-refusal | task accuracy | drift KL |", "|---|---:|---:|---:|---:|"]
    for run in runs:
        lines.append(f"| {run.name} | {cell(run.refusal_rate, 3)} | {cell(run.over_refusal_rate, 3)} | "
                     f"{cell(run.task_accuracy, 3)} | {cell(run.drift_kl, 5)} |")
    return "\n".join(lines)


def plot_runs(runs: Sequence[RunSummary], path: str | Path) -> Path:
    """Write the trade-off figure: refusal rate vs task accuracy (runs with both), and one bar chart per measure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [("refusal_rate", "refusal rate (harmful)"), ("over_refusal_rate", "over-refusal (benign)"),
                ("task_accuracy", "task accuracy"), ("drift_kl", "safety-token drift KL")]
    figure, axes = plt.subplots(1, 1 + len(measures), figsize=(4.2 * (1 + len(measures)), 4))
    scatter = axes[0]
    for run in runs:
        if run.refusal_rate is not None and run.task_accuracy is not None:
            scatter.scatter(run.task_accuracy, run.refusal_rate, s=50)
            scatter.annotate(run.name, (run.task_accuracy, run.refusal_rate), textcoords="offset points", xytext=(5, 5))
    scatter.set(xlabel="task accuracy", ylabel="refusal rate (harmful prompts)", xlim=(-0.05, 1.05), ylim=(-0.05, 1.05),
                title="safety vs utility (up-right is better)")
    scatter.grid(alpha=0.3)
    names = [run.name for run in runs]
    for ax, (field, title) in zip(axes[1:], measures):
        values = [getattr(run, field) for run in runs]
        ax.bar(range(len(runs)), [0.0 if v is None else v for v in values], color="tab:blue")
        for x, v in enumerate(values):
            ax.annotate("n/a" if v is None else f"{v:.3g}", (x, 0.0 if v is None else v), ha="center",
                        textcoords="offset points", xytext=(0, 3))
        ax.set_xticks(range(len(runs)), names, rotation=30, ha="right")
        ax.set_title(title)
        if field == "drift_kl":
            ax.margins(y=0.15)
        else:
            ax.set_ylim(0, 1.1)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_report(run_dirs: Sequence[str | Path], prefix: str | Path) -> tuple[str, Path, Path]:
    """Summarise runs into `PREFIX.md` (the table) and `PREFIX.png` (the figure); returns (table, md path, png path)."""
    if not run_dirs:
        raise PactError("no run directories given")
    runs = [summarize_run(d, name) for d, name in zip(run_dirs, run_names(run_dirs))]
    table = markdown_table(runs)
    prefix = Path(prefix).expanduser()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    markdown = prefix.with_name(prefix.name + ".md")
    markdown.write_text(table + "\n", encoding="utf-8")
    return table, markdown, plot_runs(runs, prefix.with_name(prefix.name + ".png"))
