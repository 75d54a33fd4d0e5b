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

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pact.errors import PactError

EVAL_FILE = "eval.json"
MEASUREMENTS = ("refusal", "over_refusal", "task", "drift")
HEADLINES = {"refusal": "refusal_rate", "over_refusal": "refusal_rate", "task": "accuracy", "drift": "kl_mean"}


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by `data` through a temporary file and a rename, so a crash never leaves a torn file."""
    from pact.cache_tools.writer import atomic_write

    atomic_write(path, data)


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
    _write_atomically(path, (json.dumps(merged, indent=2) + "\n").encode())
    return path


def _check_measurements(path: Path, data: object) -> dict:
    """Refuse an eval.json whose content `pact report` cannot read: not an object, a measurement that is not an
    object, or a headline number (`HEADLINES`) that is not a number. Other keys and fields are left alone."""
    if not isinstance(data, dict):
        raise PactError(f"{path}: expected a JSON object with keys among {MEASUREMENTS}, got {type(data).__name__}")
    for key, field in HEADLINES.items():
        entry = data.get(key)
        if key in data and not isinstance(entry, dict):
            raise PactError(f"{path}: '{key}' must be a JSON object (a measurement), got {type(entry).__name__}")
        value = entry.get(field) if isinstance(entry, dict) else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise PactError(f"{path}: field '{key}.{field}' must be a number, got {type(value).__name__} {value!r}")
    return data


def load_measurements(run_dir: str | Path) -> dict:
    """The `eval.json` object of a run directory; a `PactError` names the directory or file if it is missing or invalid."""
    run_dir = Path(run_dir).expanduser()
    path = run_dir / EVAL_FILE
    if not run_dir.is_dir():
        raise PactError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise PactError(f"{run_dir}: no {EVAL_FILE}; write one with `pact eval refusal|task|drift ... --save-to {run_dir}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise PactError(f"{path}: not UTF-8 text (byte {err.start}); an {EVAL_FILE} is JSON written by `pact eval`") from err
    except json.JSONDecodeError as err:
        raise PactError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    return _check_measurements(path, data)


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
    value = {key: data.get(key, {}).get(field) for key, field in HEADLINES.items()}
    return RunSummary(name, value["refusal"], value["over_refusal"], value["task"], value["drift"])


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
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    plt.close(figure)
    path = Path(path)
    _write_atomically(path, image.getvalue())
    return path


def report_paths(prefix: str | Path) -> tuple[Path, Path]:
    """The two files a report with output prefix `prefix` writes: `PREFIX.md` and `PREFIX.png`."""
    prefix = Path(prefix).expanduser()
    return prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".png")


def write_report(run_dirs: Sequence[str | Path], prefix: str | Path) -> tuple[str, Path, Path]:
    """Summarise runs into `PREFIX.md` (the table) and `PREFIX.png` (the figure), each written atomically;
    returns (table, md path, png path)."""
    if not run_dirs:
        raise PactError("no run directories given")
    runs = [summarize_run(d, name) for d, name in zip(run_dirs, run_names(run_dirs))]
    table = markdown_table(runs)
    markdown, figure = report_paths(prefix)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(markdown, (table + "\n").encode())
    return table, markdown, plot_runs(runs, figure)
