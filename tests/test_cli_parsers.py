"""The parsers of `pact` and `pact-cache` as a newcomer meets them: no abbreviated flags, short errors, help that puts
PACT's own settings first."""

from __future__ import annotations

import argparse

import pytest

from pact.cli import cache, main


def _parsers(parser: argparse.ArgumentParser):
    """`parser` and every subcommand parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _parsers(child)


@pytest.mark.parametrize("build", [main.build_parser, cache.build_parser], ids=["pact", "pact-cache"])
def test_no_parser_takes_an_abbreviated_flag(build):
    parsers = list(_parsers(build()))
    assert len(parsers) > 5
    assert [p.prog for p in parsers if p.allow_abbrev] == []


@pytest.mark.parametrize("entry, argv, culprit", [
    (main.main, ["train", "--train_file", "x.jsonl"], "unrecognized arguments: --train_file x.jsonl"),
    (main.main, ["train", "--cache", "c", "--learn", "1"], "unrecognized arguments: --learn 1"),
    (main.main, ["plan", "--lora_r", "8", "--mod", "m"], "unrecognized arguments: --mod m"),
    (main.main, ["nope"], "invalid choice: 'nope'"),
    (cache.main, ["build", "--mod", "m"], "unrecognized arguments: --mod m"),
    (cache.main, ["verify"], "the following arguments are required: DIR"),
])
def test_a_bad_command_line_is_one_error_line_and_a_pointer_to_help(entry, argv, culprit, capsys):
    with pytest.raises(SystemExit) as exit_:
        entry(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2
    assert culprit in err.splitlines()[0] and ": error: " in err.splitlines()[0]
    assert err.splitlines()[-1].endswith("--help` lists the flags)")
    assert "usage:" not in err and "Traceback" not in err and len(err.splitlines()) <= 5 and out == ""


def test_train_with_another_tool_s_data_flag_says_which_flag_takes_data(capsys):
    with pytest.raises(SystemExit) as exit_:
        main.main(["train", "--train_file=x.jsonl", "--output_dir", "run"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "pact train takes its training data as --data FILE" in err
    assert "could match" not in err


def test_train_help_shows_pact_s_settings_before_the_trainer_s(capsys):
    """`pact train --help`: a one-line usage, PACT's own settings first (under 150 lines before the Trainer's group),
    the required flags marked, the transformers TrainingArguments in their own group."""
    from pact.cli.train import TRAINER_GROUP

    with pytest.raises(SystemExit) as exit_:
        main.main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    before, trainer_group = text.split(f"\n{TRAINER_GROUP}:")
    assert len(before.splitlines()) < 150
    assert text.splitlines()[0] == "usage: pact train (--cache CACHE | --data FILE) --output_dir RUN [options]"
    for flag in ("--cache CACHE", "--data DATA", "--max_length MAX_LENGTH", "--output_dir OUTPUT_DIR", "--lam LAM", "--lora_r LORA_R", "--objective OBJECTIVE"):
        assert f"\n  {flag}" in before, flag
    for flag in ("--learning_rate", "--per_device_train_batch_size", "--optim", "--label_smoothing_factor", "--save_steps"):
        assert f"\n  {flag} " in trainer_group and f"\n  {flag} " not in before, flag
    entries = before.split("\n  --")
    required = sorted(entry.split()[0] for entry in entries if "(required)" in " ".join(entry.split()))
    assert required == ["output_dir"]
