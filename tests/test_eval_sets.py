"""The project's own evaluation prompt sets (benchmarks/data): readable as prompts, 100 distinct requests each,
and disjoint from every prompt the project trains or selects safety tokens on (the bundled demo data)."""

import json
from collections import Counter
from pathlib import Path

import pytest

from pact.data.sources import demo_data_path
from pact.data.rows import load_prompts

SETS = Path(__file__).resolve().parent.parent / "benchmarks" / "data"


@pytest.mark.parametrize("name", ["harmful_unlike_refusals.jsonl", "sensitive_harmless.jsonl"])
def test_an_evaluation_set_is_100_distinct_requests_never_trained_on(name):
    prompts, report = load_prompts(SETS / name)
    texts = [p.text for p in prompts]
    assert report.skipped == 0 and len(texts) == 100 == len(set(texts))
    trained = {p.text for demo in ("benign", "refusals") for p in load_prompts(demo_data_path(demo))[0]}
    assert not trained & set(texts)


def _normalised(text: str) -> str:
    """A request compared case- and whitespace-insensitively."""
    return " ".join(text.casefold().split())


def _instructions(path: Path) -> list[str]:
    return [json.loads(line)["instruction"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_the_benign_alignment_prompts_are_300_distinct_requests_none_of_them_evaluated_or_in_the_demo_data():
    """benchmarks/data/benign_alignment.jsonl only builds the small reproduction's reference: no request of it may be one
    the project evaluates on (the two sets above) or ships as demo data."""
    path = SETS / "benign_alignment.jsonl"
    prompts, report = load_prompts(path)
    assert report.skipped == 0 and len(prompts) == 300
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    mine = [_normalised(row["instruction"]) for row in rows]
    assert len(rows) == 300 == len(set(mine))
    assert Counter(row["category"] for row in rows) == {
        "everyday": 70, "knowledge": 60, "writing": 50, "math_code": 40, "sensitive_looking": 80}
    others = [SETS / "harmful_unlike_refusals.jsonl", SETS / "sensitive_harmless.jsonl",
              demo_data_path("benign"), demo_data_path("refusals")]
    evaluated = {_normalised(text) for other in others for text in _instructions(other)}
    assert len(evaluated) > 300 and not evaluated & set(mine)
    assert not evaluated & {_normalised(p.text) for p in prompts}


DEV_SETS = {"harmful_unlike_refusals_dev.jsonl": 50, "sensitive_harmless_dev.jsonl": 60, "everyday_dev.jsonl": 40}


@pytest.mark.parametrize("name,count", DEV_SETS.items())
def test_a_development_set_shares_no_request_with_any_other_set(name, count):
    """The reproduction's development sets (for choosing hyperparameters) are distinct requests that appear in no
    reported set, in the reference's alignment data and in the demo data, so choosing on them leaks nothing."""
    prompts, report = load_prompts(SETS / name)
    mine = {_normalised(p.text) for p in prompts}
    assert report.skipped == 0 and len(prompts) == count == len(mine)
    others = [path for path in SETS.glob("*.jsonl") if path.name != name] + [demo_data_path("benign"), demo_data_path("refusals")]
    elsewhere = {_normalised(text) for other in others for text in _instructions(other)}
    assert not elsewhere & mine
