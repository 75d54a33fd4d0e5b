"""Hostile inputs to `pact safety-tokens` (its flags, `--out`, `show`) and safety-token files wherever they are read
(`pact safety-tokens show`, `pact-cache build --safety-tokens`, a cache's own file on `--resume`): see tests/hostile.py.

Every table case must fail before any model is loaded (the `no_model_loading` fixture makes loading one an error):
the flags, `--out` and the file are checked against the model's tokenizer alone.
"""

from __future__ import annotations

import json

import pytest

from helpers import make_tiny_model, make_tiny_tokenizer

from hostile import NEEDS_NON_ROOT, Case, check_case, read_only_folder

FAMILY = "pact safety-tokens and safety-token files"


def show(w, name: str = "safety_tokens.json") -> list[str]:
    """`pact safety-tokens show` of the file `name` of the case's folder."""
    return ["safety-tokens", "show", str(w.path(name))]


def build(w, *extra: str) -> list[str]:
    """`pact-cache build` of the data with the tiny model and the case's safety-token file."""
    return ["build", "--model", str(w.model), "--data", str(w.data), "--safety-tokens", str(w.safety),
            "--out", str(w.path("out")), "--device", "cpu", "--quiet", *extra]


def compute(w, *extra: str) -> list[str]:
    """`pact safety-tokens` of the tiny model on the data, written to st.json, plus `extra` (a later flag wins)."""
    return ["safety-tokens", "--aligned", str(w.model), "--data", str(w.data), "--device", "cpu", "--quiet",
            "--out", str(w.path("st.json")), *extra]


def edit(change, name: str = "safety_tokens.json"):
    """A `prepare` that applies `change` to the JSON of the safety-token file `name` (the fixture's file by default)."""
    def prepare(w) -> None:
        path = w.path(name)
        data = json.loads(path.read_text(encoding="utf-8"))
        change(data)
        path.write_text(json.dumps(data), encoding="utf-8")
    return prepare


def set_entry(field: str, index: int, value):
    """A `change` setting entry `index` of the list `field` to `value`."""
    return lambda data: data[field].__setitem__(index, value)


def recorded_model(w) -> None:
    """Make the safety-token file record the tiny model (as `pact safety-tokens` records the aligned model it used)."""
    edit(lambda data: data["params"].update(aligned=str(w.model)))(w)


def truncate(w) -> None:
    """Cut the safety-token file in the middle, as an interrupted copy would."""
    text = w.safety.read_text(encoding="utf-8")
    w.safety.write_text(text[: len(text) // 2], encoding="utf-8")


CASES = [
    Case("file-truncated", "a safety-token file cut in the middle", "pact",
         lambda w: show(w), 2, "safety_tokens.json: not a JSON safety-token file (invalid JSON at line", prepare=truncate),
    Case("file-missing", "a safety-token file that does not exist", "pact-cache",
         lambda w: build(w, "--safety-tokens", str(w.path("nowhere.json"))), 2, "safety-token file not found"),
    Case("file-is-directory", "a directory given as the safety-token file", "pact",
         lambda w: show(w, "cache"), 2, "cache is a directory, not a safety-token file"),
    Case("file-not-utf8", "binary bytes as the safety-token file", "pact-cache",
         lambda w: build(w), 2, "safety_tokens.json: not a JSON safety-token file (UnicodeDecodeError",
         prepare=lambda w: w.write("safety_tokens.json", b"\x80\x04\x95pickle?")),
    Case("tokens-fewer-than-ids", "`tokens` has one entry fewer than `ids`", "pact-cache",
         lambda w: build(w), 2, "field 'tokens' has 11 entries but 'ids' has 12", prepare=edit(lambda d: d["tokens"].pop())),
    Case("tokens-wrong-text", "a token text that is not what the tokenizer decodes its id to", "pact-cache",
         lambda w: build(w), 2, "field 'tokens' entry 1 is 'zebra' but the tokenizer decodes id",
         prepare=edit(set_entry("tokens", 1, "zebra"))),
    Case("ids-unsorted", "`ids` not in increasing order", "pact",
         lambda w: show(w), 2, "field 'ids' must be sorted in increasing order without duplicates, but entry 1",
         prepare=edit(lambda d: d["ids"].reverse())),
    Case("ids-duplicated", "an id listed twice", "pact-cache",
         lambda w: build(w), 2, "field 'ids' must be sorted in increasing order without duplicates, but entry 2",
         prepare=edit(lambda d: d["ids"].__setitem__(2, d["ids"][1]))),
    Case("ids-negative", "a negative id", "pact",
         lambda w: show(w), 2, "field 'ids' entry 0 (-1) must be a non-negative integer", prepare=edit(set_entry("ids", 0, -1))),
    Case("ids-bool", "`true` as an id", "pact-cache",
         lambda w: build(w), 2, "field 'ids' entry 0 (true) must be a non-negative integer", prepare=edit(set_entry("ids", 0, True))),
    Case("ids-float", "`3.0` as an id", "pact",
         lambda w: show(w), 2, "field 'ids' entry 0 (3.0) must be a non-negative integer", prepare=edit(set_entry("ids", 0, 3.0))),
    Case("ids-outside-vocabulary", "an id past the end of the vocabulary", "pact-cache",
         lambda w: build(w), 2, "field 'ids' entry 11 (384) is outside the tokenizer's vocabulary of 384 tokens",
         prepare=edit(set_entry("ids", 11, 384))),
    Case("weights-negative", "a negative weight", "pact-cache",
         lambda w: build(w), 2, "field 'weights' entry 3 (-0.5) must be >= 0", prepare=edit(set_entry("weights", 3, -0.5))),
    Case("weights-nan", "`NaN` as a weight", "pact",
         lambda w: show(w), 2, "field 'weights' entry 0 (NaN) must be a finite number", prepare=edit(set_entry("weights", 0, float("nan")))),
    Case("weights-infinite", "`Infinity` as a weight", "pact-cache",
         lambda w: build(w), 2, "field 'weights' entry 4 (Infinity) must be a finite number",
         prepare=edit(set_entry("weights", 4, float("inf")))),
    Case("weights-string", "`\"0.5\"` (a string) as a weight", "pact",
         lambda w: show(w), 2, "field 'weights' entry 0 (\"0.5\") must be a finite number", prepare=edit(set_entry("weights", 0, "0.5"))),
    Case("weights-huge-integer", "a 400-digit integer as a weight", "pact",
         lambda w: show(w), 2, "field 'weights' entry 0 (1000", prepare=edit(set_entry("weights", 0, 10**400))),
    Case("weights-none-positive", "every weight 0", "pact-cache",
         lambda w: build(w), 2, "field 'weights' has no positive weight",
         prepare=edit(lambda d: d.__setitem__("weights", [0.0] * len(d["weights"])))),
    Case("other-tokenizer", "a file made for another tokenizer (fingerprint differs)", "pact-cache",
         lambda w: build(w), 2, "field 'fingerprints.tokenizer' is sha256:0000 but this model's tokenizer is sha256:",
         prepare=edit(lambda d: d["fingerprints"].__setitem__("tokenizer", "sha256:0000"))),
    Case("resume-stored-other-tokenizer", "`--resume` of a cache whose own safety-token file was replaced (another tokenizer's)",
         "pact-cache", lambda w: ["build", "--model", str(w.model), "--data", str(w.data), "--out", str(w.cache), "--device",
                                  "cpu", "--quiet", "--resume"],
         2, "also holds safety_tokens.json, which pact-cache did not write",
         prepare=edit(lambda d: d["fingerprints"].__setitem__("tokenizer", "sha256:0000"), "cache/safety_tokens.json")),
    Case("show-missing", "`show` of a file that does not exist", "pact",
         lambda w: show(w, "nowhere.json"), 2, "safety-token file not found"),
    Case("show-wrong-text", "`show` of a file whose token text is not what its recorded model's tokenizer decodes", "pact",
         lambda w: show(w), 2, "safety_tokens.json: field 'tokens' entry 1 is 'zebra' but the tokenizer decodes id",
         prepare=lambda w: (recorded_model(w), edit(set_entry("tokens", 1, "zebra"))(w))),
    Case("show-other-model", "`show --model` of a model whose tokenizer has another vocabulary", "pact",
         lambda w: [*show(w), "--model", str(w.path("other-model"))], 2,
         "safety_tokens.json: field 'ids' entry 10 (349) is outside the tokenizer's vocabulary of 320 tokens",
         prepare=lambda w: make_tiny_model(w.path("other-model"), tokenizer=make_tiny_tokenizer(vocab_size=320))),
    Case("show-other-chat-template", "`show --model` of a model with the same vocabulary but another chat template", "pact",
         lambda w: [*show(w), "--model", str(w.path("other-model"))], 2,
         "safety_tokens.json: field 'fingerprints.tokenizer' is sha256:",
         prepare=lambda w: make_tiny_model(w.path("other-model"), tokenizer=make_tiny_tokenizer(default_system="Be terse."))),
    Case("show-model-missing", "`show --model` naming no model", "pact",
         lambda w: [*show(w), "--model", str(w.path("no-model"))], 2, "no-model: no such model directory or .gguf file"),
    Case("show-checked", "`show` of a file whose recorded model is here: checked against its tokenizer", "pact",
         lambda w: show(w), 0, "checked against the tokenizer of", prepare=recorded_model),
    Case("show-no-recorded-model", "`show` of a file that records no model: shown, unchecked", "pact", lambda w: show(w), 0,
         "not checked against a tokenizer: the file records no model (params.aligned); pass --model M"),
    Case("show-recorded-model-away", "`show` of a file whose recorded model (a hub id) is not on this machine: shown, unchecked",
         "pact", lambda w: show(w), 0, "not checked against a tokenizer: the model the file records ('pact-tests/no-such-model') "
         "cannot be loaded without the network; pass --model M", prepare=edit(lambda d: d["params"].update(aligned="pact-tests/no-such-model"))),
    Case("top-zero", "`--top 0`", "pact", lambda w: compute(w, "--top", "0"), 2, "--top: top must be an integer >= 1, got 0"),
    Case("max-examples-zero", "`--max-examples 0`", "pact",
         lambda w: compute(w, "--max-examples", "0"), 2, "--max-examples: max_examples must be an integer >= 1, got 0"),
    Case("max-resp-len-zero", "`--max-resp-len 0`", "pact",
         lambda w: compute(w, "--max-resp-len", "0"), 2, "--max-resp-len: max_resp_len must be an integer >= 1, got 0"),
    Case("batch-size-zero", "`--batch-size 0`", "pact",
         lambda w: compute(w, "--batch-size", "0"), 2, "--batch-size: batch_size must be an integer >= 1, got 0"),
    Case("temperature-zero", "`--temperature 0`", "pact",
         lambda w: compute(w, "--temperature", "0"), 2, "--temperature: temperature must be a finite number > 0, got 0.0"),
    Case("temperature-negative", "`--temperature -1`", "pact",
         lambda w: compute(w, "--temperature", "-1"), 2, "--temperature: temperature must be a finite number > 0, got -1.0"),
    Case("temperature-nan", "`--temperature nan`", "pact",
         lambda w: compute(w, "--temperature", "nan"), 2, "--temperature: temperature must be a finite number > 0, got nan"),
    Case("temperature-inf", "`--temperature inf`", "pact",
         lambda w: compute(w, "--temperature", "inf"), 2, "--temperature: temperature must be a finite number > 0, got inf"),
    Case("config-list-data", "`--config` YAML with a list as `data`", "pact", lambda w: compute(w, "--config", str(w.path("bad.yaml"))),
         2, 'bad.yaml: data: expected text or null, got ["a.jsonl", "b.jsonl"] (a list)',
         prepare=lambda w: w.write("bad.yaml", "data: [a.jsonl, b.jsonl]\n")),
    Case("top-not-a-number", "`--top many`", "pact", lambda w: compute(w, "--top", "many"), 2, "argument --top: invalid int value: 'many'"),
    Case("device-unknown", "`--device gpu0`", "pact", lambda w: compute(w, "--device", "gpu0"), 2, "--device: device must be auto, cpu, cuda or cuda:N, got 'gpu0'"),
    Case("aligned-missing", "`--aligned` a `.gguf` file that does not exist", "pact",
         lambda w: compute(w, "--aligned", str(w.path("none.gguf"))), 2, "none.gguf: no such model directory or .gguf file"),
    Case("base-is-a-data-file", "`--base` a data file, not a model", "pact",
         lambda w: compute(w, "--base", str(w.data)), 2, "data.jsonl: a file, but not a .gguf model"),
    Case("out-is-directory", "`--out` an existing directory", "pact",
         lambda w: compute(w, "--out", str(w.cache)), 2, "cache: is a directory; give a file path"),
    Case("out-under-a-file", "`--out` inside what is a file, not a folder", "pact",
         lambda w: compute(w, "--out", str(w.path("data.jsonl/st.json"))), 2, "data.jsonl is a file, so no folder can be created there"),
    Case("out-is-the-data", "`--out` the `--data` file itself", "pact",
         lambda w: compute(w, "--out", str(w.data)), 2, "data.jsonl) is the same file as --data"),
]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Make loading a model an error, so a case that passes was decided before any model was loaded."""
    import pact.cli.safety_tokens
    import pact.models.loading

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(pact.models.loading, "load_model", no_model)
    monkeypatch.setattr(pact.cli.safety_tokens, "load_model", no_model)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_safety_tokens_input(case, world, capsys, no_model_loading):
    check_case(case, world, capsys)


@NEEDS_NON_ROOT
def test_out_in_a_read_only_folder(world, capsys):
    """`--out` in a folder that cannot be written is refused before any work, and nothing is left there."""
    with read_only_folder(world.path("locked")) as folder:
        case = Case("out-read-only", "`--out` in a read-only folder", "pact",
                    lambda w: compute(w, "--out", str(folder / "st.json")), 2, "locked is not writable")
        check_case(case, world, capsys)
        assert list(folder.iterdir()) == []


def test_computed_file_is_accepted_by_its_tokenizer(world, capsys):
    """The file `pact safety-tokens` writes passes the same checks (`show`, and `check_tokenizer` with its tokenizer)."""
    from pact.cli.main import main
    from pact.models.loading import load_tokenizer
    from pact.objective.safety_tokens import SafetyTokens

    assert main(compute(world, "--top", "8", "--max-examples", "4")) == 0, capsys.readouterr().err
    tokens = SafetyTokens.load(world.path("st.json"))
    tokens.check_tokenizer(load_tokenizer(str(world.model)), source="st.json")
    assert main(show(world, "st.json")) == 0
    assert f"|S| = {len(tokens)}" in capsys.readouterr().out
