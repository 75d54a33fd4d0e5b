"""The project's own evaluation prompt sets (benchmarks/data): readable as prompts, 100 distinct requests each,
and disjoint from every prompt the project trains or selects safety tokens on (the bundled demo data)."""

from pathlib import Path

import pytest

from pact.data import demo_data_path, load_prompts

SETS = Path(__file__).resolve().parent.parent / "benchmarks" / "data"


@pytest.mark.parametrize("name", ["harmful_unlike_refusals.jsonl", "sensitive_harmless.jsonl"])
def test_an_evaluation_set_is_100_distinct_requests_never_trained_on(name):
    prompts, report = load_prompts(SETS / name)
    texts = [p.text for p in prompts]
    assert report.skipped == 0 and len(texts) == 100 == len(set(texts))
    trained = {p.text for demo in ("benign", "refusals") for p in load_prompts(demo_data_path(demo))[0]}
    assert not trained & set(texts)
