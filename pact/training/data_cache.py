"""The reference cache of training data, made when a run is given data instead of a cache (`pact train --data FILE`,
`PactTrainer(train_dataset=Dataset)`): built the first time, reused after.

A cache depends on the tokenized examples, the reference model and tokenizer, the safety tokens and the gate, so it
is kept under a name made from their fingerprints (`$PACT_HOME/caches/<data>-<key>`, or the folder the run names): the
same data and reference find the same cache, any change builds another. An interrupted build continues where it
stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path

from pact.cache_tools import CacheReader
from pact.cache_tools.builder import build_cache
from pact.cache_tools.errors import CacheError
from pact.cache_tools.layout import FORMAT_VERSION
from pact.cache_tools.manifest import describe_data, examples_fingerprint
from pact.cache_tools.settings import ExampleArguments
from pact.cache_tools.writer import MANIFEST_NAME, SAFETY_TOKENS_NAME
from pact.data.chat import load_examples
from pact.data.rows import DataSourceArguments
from pact.distributed import current_ranks, run_on_main
from pact.models.loading import LoadedModel, pact_home
from pact.objective.safety_tokens import SafetyTokens, default_safety_tokens
from pact.objective.settings import ObjectiveArguments

CACHES = "caches"  # the folder under $PACT_HOME that holds the caches made from training data


def cache_from_data(data, reference: LoadedModel, settings: ExampleArguments, source: DataSourceArguments,
                    objective: ObjectiveArguments, cache: str | Path | None = None, progress: bool = True) -> CacheReader:
    """The cache of `data` (a file, folder, hub dataset id or `datasets.Dataset`, in any row format) under `reference`:
    the one already at `cache` (default: `default_location`) when it holds these examples, else built there.

    `settings` says how rows become examples and which safety tokens to use (none: the cache's own when reusing it, else
    computed from the bundled refusals); `objective` gives the gate the cache bakes in. A complete cache of other
    examples or other safety tokens at `cache` is refused, naming what differs; the model, tokenizer and gate are
    checked where the cache is used (`PactTrainer`). Says on stderr which cache it built or reused.
    """
    examples, report = load_examples(data, reference.tokenizer, max_length=settings.max_length, train_on=settings.train_on,
                                     **source.data_options())
    given = _given_safety_tokens(settings, reference)
    out = Path(cache).expanduser() if cache else default_location(data, examples, reference, given, objective)
    existing = _complete_cache(out)
    if existing is not None:
        _check_holds(existing, examples, given)
        _say(f"using the cache at {out} (built from the same examples, {len(existing)} rows)")
        return existing
    started = out.is_dir() and any(out.iterdir())
    tokens = given or _stored_safety_tokens(out) or run_on_main(lambda: default_safety_tokens(reference, progress=progress))
    _say(f"{'continuing the build of' if started else 'building'} the reference cache of {report.path} at {out} "
         f"({len(examples)} examples; reused by later runs on the same data and model)")
    description = describe_data(data, reference.tokenizer.chat_template, settings.max_length, False, None,
                                **source.data_options(), dataset_fingerprint=report.fingerprint, train_on=settings.train_on)
    with _reference_mode(reference.model):
        build_cache(reference, examples, tokens, out, data=description, objective=objective, resume=started, progress=progress)
    return CacheReader(out)


def default_location(data, examples, reference: LoadedModel, safety_tokens: SafetyTokens | None,
                     objective: ObjectiveArguments) -> Path:
    """`$PACT_HOME/caches/<data name>-<key>`, the key a sha256 of what the cache's contents depend on: the examples, the
    reference's and its tokenizer's fingerprints, the safety tokens (or that they are the default ones), the gate and
    the cache format."""
    identity = {
        "examples": examples_fingerprint(examples),
        "model": reference.fingerprint,
        "tokenizer": reference.tokenizer_fingerprint,
        "safety_tokens": [safety_tokens.ids, safety_tokens.weights] if safety_tokens else "default",
        "gate": [objective.p0, objective.gate_temperature],
        "format_version": FORMAT_VERSION,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    name = Path(str(data)).name.split(".")[0] if isinstance(data, (str, Path)) else "dataset"
    return pact_home() / CACHES / f"{name or 'data'}-{key}"


def _given_safety_tokens(settings: ExampleArguments, reference: LoadedModel) -> SafetyTokens | None:
    """The safety-token file the run names, checked against the reference's tokenizer; None when it names none."""
    if not settings.safety_tokens:
        return None
    tokens = SafetyTokens.load(Path(settings.safety_tokens).expanduser())
    tokens.check_tokenizer(reference.tokenizer, source=f"{settings.safety_tokens} (safety_tokens)")
    return tokens


def _stored_safety_tokens(out: Path) -> SafetyTokens | None:
    """The safety tokens an interrupted build stored in `out` (so it continues with the same ones), if any."""
    stored = out / SAFETY_TOKENS_NAME
    return SafetyTokens.load(stored) if stored.is_file() else None


def _complete_cache(out: Path) -> CacheReader | None:
    """The complete cache at `out`, or None when there is none yet (missing, empty, or a build that did not finish)."""
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        complete = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8")).get("complete")
    except (ValueError, AttributeError):  # torn or not an object: the build's resume names what is wrong with it
        return None
    return CacheReader(out) if complete else None


def _check_holds(reader: CacheReader, examples, safety_tokens: SafetyTokens | None) -> None:
    """Refuse a cache that holds other examples, or other safety tokens than the run names."""
    problems = []
    recorded = reader.manifest.get("fingerprints", {}).get("examples")
    if recorded != examples_fingerprint(examples):
        problems.append("its examples differ from this data's (another file, max_length, train_on or chat template)")
    if safety_tokens is not None and (reader.safety_ids.tolist() != list(safety_tokens.ids)
                                      or not _same_weights(reader.safety_weights.tolist(), safety_tokens.weights)):
        problems.append("its safety tokens differ from the safety_tokens file's")
    if problems:
        raise CacheError(f"the cache {reader.directory} was not built from this data: {'; '.join(problems)}; name another "
                         "cache folder, or none to use one kept per data and model")


def _same_weights(stored: list[float], given: list[float]) -> bool:
    """Whether the cache's float32 weights are the file's."""
    return len(stored) == len(given) and all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(stored, given))


@contextlib.contextmanager
def _reference_mode(model):
    """The model as the reference: in eval mode (no dropout) and, under a peft wrapper, with its adapters off;
    restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            yield
    finally:
        model.train(was_training)


def _say(message: str) -> None:
    """A line on stderr from the main process (where the run's cache came from)."""
    if current_ranks().is_main:
        print(f"pact: {message}", file=sys.stderr)

