"""What a run writes as it trains: `metrics.jsonl` (one object per logged step), `curves.png`, and the one line at its
start that says what the logged `kl` measures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from pact.files import atomic_write
from pact.objective.settings import REFKL_OBJECTIVES, ObjectiveArguments

METRICS_FILE = "metrics.jsonl"


class MetricsCallback(TrainerCallback):
    """Writes `metrics.jsonl` (one object per logging step: step, epoch, loss, ce, kl, tokenwise, kd, lr, grad_norm, tokens, seconds)
    and `curves.png` at the end, in the run folder, from the main process.

    On resume the file is cut back to the steps the checkpoint holds (later
    lines belong to steps that will be run again).
    """

    def __init__(self, out: Path, curves_at_end: bool = True):
        self.path = Path(out) / METRICS_FILE
        self.out = Path(out)
        self.curves_at_end = curves_at_end  # False when the caller saves `curves.png` with the final weights (`pact.training.train`)
        self.records: list[dict] = []
        self._started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        """Start `metrics.jsonl` afresh, or cut it back to the resumed checkpoint's steps."""
        if state.is_world_process_zero:
            self.records = _first_records(self.path, state.global_step)
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())
        self._started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Append a training log (one with `loss`, `ce` and `kl`) as a line of `metrics.jsonl`."""
        if not state.is_world_process_zero or not logs or "loss" not in logs or "ce" not in logs:
            return
        now = time.perf_counter()
        record = {"step": state.global_step, "epoch": state.epoch, "loss": logs["loss"], "ce": logs["ce"], "kl": logs["kl"],
                  "tokenwise": logs.get("tokenwise"), "kd": logs.get("kd"), "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                  "tokens": logs.get("tokens"), "seconds": now - self._started}
        self._started = now
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        """Plot `curves.png` (unless the caller saves it with the final weights)."""
        if state.is_world_process_zero and self.records and self.curves_at_end:
            plot_curves(self.records, self.out / "curves.png")


def kl_explanation_of(objective: str) -> str:
    """One sentence on what the logged `kl` of the objective named `objective` measures and where it starts: PACT's KL
    (under pact, tokenwise, pact+tokenwise) is taken against a gated, weighted target, not the reference's own
    distribution, so it is above 0 at step 1 although the student starts as the reference (docs/objective.md)."""
    if objective in REFKL_OBJECTIVES:
        return ("kl is the KL to the reference's own distribution over the safety tokens and the rest of the vocabulary, "
                "so it starts near 0, where the student equals the reference (docs/objective.md, section 5).")
    return ("kl is PACT's safety-token KL to a target that weights the reference's safety-token logits and mixes in its "
            "post-only view, not to the reference itself, so it is above 0 from step 1 while the student still equals the "
            "reference (docs/objective.md, section 2).")


class KlExplanation(TrainerCallback):
    """Prints `kl_explanation_of` the run's objective once, as training starts, from the main process: a first logged
    `kl` of several nats while the student still equals the reference otherwise looks like a bug."""

    def __init__(self, objective: ObjectiveArguments):
        self.text = kl_explanation_of(objective.objective)

    def on_train_begin(self, args, state, control, **kwargs):
        """Print the sentence (main process only)."""
        if state.is_world_process_zero:
            print(self.text, flush=True)


def _first_records(path: Path, steps: int) -> list[dict]:
    """The records of an earlier run's first `steps` steps in `path` (none for a fresh run). Reading stops at the first
    record past `steps` or the first torn line (a kill while it was written): those steps are run again."""
    if not steps or not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not isinstance(record, dict) or record.get("step", steps + 1) > steps:
            break
        records.append(record)
    return records


def plot_curves(metrics: list[dict], path: Path) -> None:
    """Plot CE and KL against optimizer steps into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, key, title in ((axes[0], "ce", "cross-entropy"), (axes[1], "kl", "safety-token KL")):
        axis.plot(steps, [m[key] for m in metrics], marker="." if len(steps) < 50 else None)
        axis.set_xlabel("optimizer step")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
