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
usually a `pact train --out` directory, but any directory works. Runs of
several seeds named `NAME-seed0`, `NAME-seed1`, ... are reported as one row
(mean ± standard deviation), with the spread as error bars in the figure.
"""

from __future__ import annotations

import io
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pact.errors import PactError
from pact.files import atomic_write

EVAL_FILE = "eval.json"
MEASUREMENTS = ("refusal", "over_refusal", "task", "drift")
HEADLINES = {"refusal": "refusal_rate", "over_refusal": "refusal_rate", "task": "accuracy", "drift": "kl_mean"}
HEADLINE_RANGES = {"refusal_rate": (0, 1), "accuracy": (0, 1), "kl_mean": (-math.inf, math.inf)}


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by `data` through a temporary file and a rename, so a crash never leaves a torn file."""
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
    object, or a headline number (`HEADLINES`) that is not a finite number in its range (`HEADLINE_RANGES`: a rate or an
    accuracy is a share). Other keys and fields are left alone."""
    if not isinstance(data, dict):
        raise PactError(f"{path}: expected a JSON object with keys among {MEASUREMENTS}, got {type(data).__name__}")
    for key, field in HEADLINES.items():
        entry = data.get(key)
        if key in data and not isinstance(entry, dict):
            raise PactError(f"{path}: '{key}' must be a JSON object (a measurement), got {type(entry).__name__}")
        value = entry.get(field) if isinstance(entry, dict) else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise PactError(f"{path}: field '{key}.{field}' must be a number, got {type(value).__name__} {value!r}")
        low, high = HEADLINE_RANGES[field]
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            bounds = f" from {low} to {high}" if math.isfinite(low) else ""
            raise PactError(f"{path}: field '{key}.{field}' must be a finite number{bounds}, got {value!r}; "
                            f"measure it again with `pact eval ... --save-to {path.parent}`")
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
    except (ValueError, RecursionError) as err:  # nested too deeply, or an integer of more digits than Python converts
        raise PactError(f"{path}: invalid JSON ({type(err).__name__}: {err}); an {EVAL_FILE} is JSON written by `pact eval`") from err
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


SEED_SUFFIX = re.compile(r"[-_]seed\d+$")


@dataclass
class RunGroup:
    """Runs that differ only by seed (directory names ending in `-seedN` or `_seedN`), or one run alone."""

    name: str
    runs: list[RunSummary]

    def values(self, field: str) -> list[float]:
        """The measured values of `field` (a `RunSummary` field) over the group's runs."""
        return [value for value in (getattr(run, field) for run in self.runs) if value is not None]

    def mean(self, field: str) -> float | None:
        """The mean of `field` over the runs that measured it (None if none did)."""
        values = self.values(field)
        return statistics.fmean(values) if values else None

    def spread(self, field: str) -> float:
        """The sample standard deviation of `field` over seeds (0 with fewer than two values)."""
        values = self.values(field)
        return statistics.stdev(values) if len(values) > 1 else 0.0


def group_by_seed(runs: Sequence[RunSummary]) -> list[RunGroup]:
    """Runs whose names differ only by a trailing seed (`sft-seed0`, `sft-seed1`) in one group named without it, in
    first-seen order; other runs stay alone."""
    groups: dict[str, RunGroup] = {}
    for run in runs:
        key = SEED_SUFFIX.sub("", run.name)
        groups.setdefault(key, RunGroup(key, [])).runs.append(run)
    return [group if len(group.runs) > 1 else RunGroup(group.runs[0].name, group.runs) for group in groups.values()]


def markdown_table(runs: Sequence[RunSummary]) -> str:
    """A markdown table: run, refusal rate, over-refusal, task accuracy, drift KL ("-" where not measured); runs of
    several seeds are one row of mean ± standard deviation with the number of seeds."""
    groups = group_by_seed(runs)

    def cell(group: RunGroup, field: str, digits: int) -> str:
        values = group.values(field)
        if not values:
            return "-"
        if len(group.runs) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{group.mean(field):.{digits}f} ± {group.spread(field):.{digits}f} (n={len(values)})"

    lines = ["| run | refusal rate | over-refusal | task accuracy | drift KL |", "|---|---:|---:|---:|---:|"]
    for group in groups:
        lines.append(f"| {group.name} | {cell(group, 'refusal_rate', 3)} | {cell(group, 'over_refusal_rate', 3)} | "
                     f"{cell(group, 'task_accuracy', 3)} | {cell(group, 'drift_kl', 5)} |")
    return "\n".join(lines)


def plot_runs(runs: Sequence[RunSummary], path: str | Path) -> Path:
    """Write the trade-off figure: refusal rate vs task accuracy (groups with both), and one bar chart per measure,
    with the seed spread (standard deviation) as error bars where a group has several seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_by_seed(runs)
    measures = [("refusal_rate", "refusal rate (harmful)"), ("over_refusal_rate", "over-refusal (benign)"),
                ("task_accuracy", "task accuracy"), ("drift_kl", "safety-token drift KL")]
    figure, axes = plt.subplots(1, 1 + len(measures), figsize=(4.2 * (1 + len(measures)), 4))
    scatter = axes[0]
    for group in groups:
        x, y = group.mean("task_accuracy"), group.mean("refusal_rate")
        if x is not None and y is not None:
            scatter.errorbar(x, y, xerr=group.spread("task_accuracy"), yerr=group.spread("refusal_rate"), fmt="o", capsize=3)
            scatter.annotate(group.name, (x, y), textcoords="offset points", xytext=(5, 5))
    scatter.set(xlabel="task accuracy", ylabel="refusal rate (harmful prompts)", xlim=(-0.05, 1.05), ylim=(-0.05, 1.05),
                title="safety vs utility (up-right is better)")
    scatter.grid(alpha=0.3)
    names = [group.name for group in groups]
    for ax, (field, title) in zip(axes[1:], measures):
        values = [group.mean(field) for group in groups]
        ax.bar(range(len(groups)), [0.0 if v is None else v for v in values], color="tab:blue",
               yerr=[group.spread(field) for group in groups], capsize=4)
        for x, v in enumerate(values):
            ax.annotate("n/a" if v is None else f"{v:.3g}", (x, 0.0 if v is None else v), ha="center",
                        textcoords="offset points", xytext=(0, 3))
        ax.set_xticks(range(len(groups)), names, rotation=30, ha="right")
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
