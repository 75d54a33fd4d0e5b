"""Task accuracy on classification-style instruction data (SST-2, AG News, ...).

Every row's answer is one of a few labels (`positive`/`negative`; `World`/
`Sports`/`Business`/`Sci/Tech`). The label set is read from the data: the
distinct answers, whitespace-trimmed.

Prediction is by scoring, not generation: each label is scored as the complete
answer to the row's prompt (sum of the log-probs of its tokens and of the
end-of-turn token, under the chat template; `pact.evaluation.generation.score_responses`)
and the highest-scoring label is the prediction (ties go to the label first in
sorted order). Unlike matching generated text to a label, this always yields a
label, does not depend on the answer's wording or casing ("Positive." vs
"positive"), and needs one forward pass per (row, label) instead of a decoding
loop.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pact.data.rows import Conversation
from pact.data.sources import DataError
from pact.evaluation.generation import score_responses

MAX_LABELS = 20


def label_set(conversations: Sequence[Conversation], source: str | None = None) -> list[str]:
    """The sorted distinct answers of classification data; refuses free-text data (more than `MAX_LABELS` answers)
    and data with a single answer. `source` (the data file) starts the error messages."""
    labels = sorted({c.response.strip() for c in conversations})
    where = f"{source}: " if source else ""
    if len(labels) > MAX_LABELS:
        raise DataError(
            f"{where}the data has {len(labels)} distinct answers (more than {MAX_LABELS}), so it is not classification "
            f"data with a few labels; examples: {labels[:5]}"
        )
    if len(labels) < 2:
        raise DataError(f"{where}the data has a single distinct answer {labels!r}; accuracy needs at least two labels "
                        "(use more rows, e.g. a larger --limit)")
    return labels


@dataclass
class TaskResult:
    """Gold and predicted labels of each row, and the label set."""

    labels: list[str]
    gold: list[str]
    predicted: list[str]

    @property
    def accuracy(self) -> float:
        """Share of rows whose predicted label is the gold one."""
        return sum(g == p for g, p in zip(self.gold, self.predicted)) / len(self.gold)

    def to_dict(self) -> dict:
        """JSON-ready summary (what `pact eval task --json` prints).

        `per_label[label]` has `n` (gold rows), `correct` and `predicted` (rows
        predicted as the label); `majority_accuracy` is the accuracy of always
        answering the most frequent gold label, the baseline to beat.
        """
        gold_counts = Counter(self.gold)
        predicted_counts = Counter(self.predicted)
        correct_counts = Counter(g for g, p in zip(self.gold, self.predicted) if g == p)
        n = len(self.gold)
        return {
            "accuracy": self.accuracy,
            "n": n,
            "correct": sum(correct_counts.values()),
            "labels": self.labels,
            "per_label": {label: {"n": gold_counts[label], "correct": correct_counts[label],
                                  "predicted": predicted_counts[label]} for label in self.labels},
            "majority_accuracy": max(gold_counts.values()) / n,
            "scoring": "sum of label-token log-probs (incl. end of turn) under the chat template",
        }


def predict_labels(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Conversation],
    labels: Sequence[str],
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """The highest-scoring label for each row's prompt (see the module docstring)."""
    prompts = [c.messages[:-1] for c in conversations]
    scores = score_responses(model, tokenizer, prompts, labels, batch_size, progress, desc="task")
    return [labels[i] for i in scores.argmax(dim=-1).tolist()]


def evaluate_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Conversation],
    batch_size: int = 8,
    progress: bool = True,
    labels: Sequence[str] | None = None,
) -> TaskResult:
    """Predict a label for every row and compare with its answer; the label set is `labels` if given (as
    `label_set` returns it), else read from the rows themselves."""
    labels = list(labels) if labels is not None else label_set(conversations)
    predicted = predict_labels(model, tokenizer, conversations, labels, batch_size, progress)
    return TaskResult(labels, [c.response.strip() for c in conversations], predicted)
