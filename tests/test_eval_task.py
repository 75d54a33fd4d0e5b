"""Task accuracy (`pact.evaluation.task`): the label set, the bookkeeping on a hand-made set, and predictions that match
an independent unbatched computation."""

from __future__ import annotations

import pytest
import torch

from pact.data.rows import Conversation
from pact.data.sources import DataError
from pact.data.chat import encode_conversation
from pact.models.loading import load_model
from pact.evaluation.task import MAX_LABELS, TaskResult, evaluate_task, label_set


def _row(index: int, text: str, label: str) -> Conversation:
    return Conversation(index, [{"role": "user", "content": f"Sentiment, positive or negative?\n\n{text}"},
                                {"role": "assistant", "content": label}])


HAND_MADE = [_row(0, "great film", "positive"), _row(1, "lovely", "positive"), _row(2, "dull", "negative"),
             _row(3, "boring", "negative"), _row(4, "awful", "negative ")]


def test_label_set_is_read_from_the_data():
    """Distinct answers, trimmed and sorted; free text (more than MAX_LABELS answers) and one label are refused."""
    assert label_set(HAND_MADE) == ["negative", "positive"]
    with pytest.raises(DataError, match="distinct answers"):
        label_set([_row(i, "x", f"label {i}") for i in range(MAX_LABELS + 1)])
    with pytest.raises(DataError, match="single distinct answer"):
        label_set(HAND_MADE[2:])


def test_accuracy_and_per_label_counts_on_a_hand_made_set():
    """3 of 5 right; per label: gold rows, correct rows and predictions; majority baseline 3/5."""
    result = TaskResult(["negative", "positive"], ["positive", "positive", "negative", "negative", "negative"],
                        ["positive", "negative", "negative", "negative", "positive"])
    summary = result.to_dict()
    assert result.accuracy == summary["accuracy"] == pytest.approx(0.6)
    assert summary["n"] == 5 and summary["correct"] == 3
    assert summary["per_label"] == {"negative": {"n": 3, "correct": 2, "predicted": 3},
                                    "positive": {"n": 2, "correct": 1, "predicted": 2}}
    assert summary["majority_accuracy"] == pytest.approx(0.6)


def test_prediction_is_the_best_scoring_label(monkeypatch):
    """With injected scores (columns in sorted label order), predictions and accuracy follow the argmax."""
    scores = torch.tensor([[0.0, 1.0], [2.0, -1.0], [-3.0, -2.0], [5.0, 4.0], [-1.0, -1.0]], dtype=torch.float64)

    def fake_scores(model, tokenizer, prompts, candidates, *args, **kwargs):
        assert list(candidates) == ["negative", "positive"] and len(prompts) == len(HAND_MADE)
        return scores

    monkeypatch.setattr("pact.evaluation.task.score_responses", fake_scores)
    result = evaluate_task(None, None, HAND_MADE, progress=False)
    assert result.predicted == ["positive", "negative", "positive", "negative", "negative"]  # a tie goes to the first label
    assert result.gold == ["positive", "positive", "negative", "negative", "negative"]
    assert result.accuracy == pytest.approx(3 / 5)


def test_accuracy_matches_an_independent_loop(tiny_model_dir):
    """On the tiny model, accuracy equals the share of rows whose gold label has the highest unpadded log-prob."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    rows = HAND_MADE + [_row(5, "what a film", "positive"), _row(6, "never again", "negative")]
    labels = ["negative", "positive"]
    correct = 0
    for row in rows:
        totals = []
        for label in labels:
            example = encode_conversation(loaded.tokenizer, Conversation(0, row.messages[:-1] + [{"role": "assistant", "content": label}]))
            with torch.no_grad():
                logprobs = torch.log_softmax(loaded.model(torch.tensor([example.input_ids])).logits[0].double(), dim=-1)
            totals.append(sum(float(logprobs[t - 1, example.input_ids[t]]) for t in range(example.response_start, len(example.input_ids))))
        correct += labels[max(range(len(labels)), key=lambda i: totals[i])] == row.response.strip()
    result = evaluate_task(loaded.model, loaded.tokenizer, rows, batch_size=3, progress=False)
    assert result.accuracy == pytest.approx(correct / len(rows))
