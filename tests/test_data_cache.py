"""Training from data instead of a cache: `pact train --data FILE` (and `train(args)` with `data`) builds the data's
reference cache on first use, under a name made from what it depends on, and reuses it after; a cache of other data
at the folder a run names is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import write_jsonl
from test_cache_support import TINY_MAX_LENGTH, TINY_ROWS, single_thread

from pact.cache_tools import CacheReader, build_cache
from pact.cache_tools.errors import CacheError
from pact.cache_tools.manifest import describe_data
from pact.data.chat import load_examples
from pact.data.sources import demo_data_path
from pact.training.arguments import PactTrainingArguments
from pact.training.train import train


@pytest.fixture
def rows_file(tmp_path):
    """The first TINY_ROWS demo rows as a JSONL file of the user's."""
    rows = [json.loads(line) for line in demo_data_path("benign").read_text().splitlines()[:TINY_ROWS]]
    return write_jsonl(tmp_path / "mine.jsonl", rows)


def _args(data, out, model_dir, safety, **overrides) -> PactTrainingArguments:
    """Two quick CPU steps on `data` with the tiny model as reference and student."""
    settings = dict(data=str(data), output_dir=str(out), model=str(model_dir), safety_tokens=str(safety),
                    max_length=TINY_MAX_LENGTH, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, seed=3,
                    train_device="cpu", disable_tqdm=True, report_to=[])
    settings.update(overrides)
    return PactTrainingArguments(**settings)


def test_train_on_data_builds_its_cache_once_then_reuses_it(rows_file, tiny, tiny_model_dir, tiny_safety, tiny_safety_file,
                                                            tmp_path, monkeypatch, capfd):
    """The first run builds the cache under $PACT_HOME/caches and says so; it holds what `build_cache` of the same
    rows writes (bytes of every shard's targets); the second run reuses it without a reference pass and trains the same
    first step."""
    monkeypatch.setenv("PACT_HOME", str(tmp_path / "home"))
    with single_thread():
        first = train(_args(rows_file, tmp_path / "run1", tiny_model_dir, tiny_safety_file))
    err = capfd.readouterr().err
    built = list((tmp_path / "home" / "caches").iterdir())
    assert len(built) == 1 and built[0].name.startswith("mine-")
    assert f"building the reference cache of {rows_file} at {built[0]}" in err
    record = json.loads((tmp_path / "run1" / "pact_config.json").read_text())
    assert record["cache"] == str(built[0])

    examples, _ = load_examples(rows_file, tiny.tokenizer, max_length=TINY_MAX_LENGTH)
    direct = tmp_path / "direct"
    with single_thread():
        build_cache(tiny, examples, tiny_safety, direct, progress=False,
                    data=describe_data(rows_file, tiny.tokenizer.chat_template, TINY_MAX_LENGTH, False, None))
    made, expected = CacheReader(built[0]), CacheReader(direct)
    assert len(made) == len(expected) == TINY_ROWS
    for index in range(TINY_ROWS):
        for key, value in expected[index].items():
            np.testing.assert_array_equal(np.asarray(made[index][key]), np.asarray(value), err_msg=key)

    shards = {path: path.stat().st_mtime_ns for path in built[0].glob("shard-*")}
    with single_thread():
        second = train(_args(rows_file, tmp_path / "run2", tiny_model_dir, tiny_safety_file))
    err = capfd.readouterr().err
    assert f"using the cache at {built[0]} (built from the same examples, {TINY_ROWS} rows)" in err
    assert {path: path.stat().st_mtime_ns for path in built[0].glob("shard-*")} == shards
    assert second.metrics[0]["loss"] == pytest.approx(first.metrics[0]["loss"], rel=1e-6)


def test_other_data_finds_another_cache_and_a_named_cache_of_other_data_is_refused(rows_file, tiny_model_dir,
                                                                                    tiny_safety_file, float32_cache,
                                                                                    tmp_path, monkeypatch):
    """Another max_length makes other examples: a cache of its own. A `cache` folder holding another build's examples
    is refused, naming what differs."""
    from pact.training.data_cache import default_location
    from pact.models.loading import load_model
    from pact.objective.settings import ObjectiveArguments

    monkeypatch.setenv("PACT_HOME", str(tmp_path / "home"))
    tiny = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    long, _ = load_examples(rows_file, tiny.tokenizer, max_length=TINY_MAX_LENGTH)
    short, _ = load_examples(rows_file, tiny.tokenizer, max_length=200)
    assert default_location(rows_file, long, tiny, None, ObjectiveArguments()) != default_location(rows_file, short, tiny, None, ObjectiveArguments())
    with pytest.raises(CacheError, match=r"was not built from this data: its examples differ from this data's"):
        train(_args(rows_file, tmp_path / "run", tiny_model_dir, tiny_safety_file, max_length=200, cache=str(float32_cache)))


def test_a_torn_manifest_in_the_named_cache_is_named(rows_file, tiny_model_dir, tiny_safety_file, tmp_path):
    """A `cache` folder whose manifest.json is torn is refused by the build, naming the file, not with a JSON traceback."""
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "manifest.json").write_text('{"complete": tr', encoding="utf-8")
    with pytest.raises(CacheError, match="manifest.json"):
        train(_args(rows_file, tmp_path / "run", tiny_model_dir, tiny_safety_file, cache=str(torn)))
