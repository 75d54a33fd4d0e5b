"""`pact safety-tokens`: compute the safety-token file of an aligned model, or show one.

    pact safety-tokens [--aligned M] [--base M] [--data FILE] ... --out FILE.json
    pact safety-tokens show FILE.json [--model M]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from pact.cli.common import check_model_argument, check_output_file, input_files, refuse_overwriting_inputs
from pact.cli.flags import add_dataclass_flags, dataclasses_from_flags
from pact.data.rows import DataSourceArguments, load_conversations
from pact.data.sources import DataError, demo_data_path
from pact.errors import PactError
from pact.models.loading import EMBEDDED_MODEL, load_model, load_tokenizer
from pact.objective.safety_tokens import (
    SafetyTokenArguments, SafetyTokens, check_same_tokenizer, compute_safety_tokens, encode_refusals,
)

SETTINGS = (SafetyTokenArguments, DataSourceArguments)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `safety-tokens` (compute) and its `show` action to the `pact` parser."""
    parser = subparsers.add_parser(
        "safety-tokens",
        help="compute the safety tokens of an aligned model (or show a safety-token file)",
        description=(
            "Find the tokens on which the aligned model's refusals differ most from its base model "
            "(docs/objective.md section 1) and write them with their weights to a JSON file. "
            "Use 'pact safety-tokens show FILE' to print an existing file. Every flag is accepted with - or _ between "
            "words; a YAML/JSON --config file may hold them."
        ),
    )
    defaults = add_dataclass_flags(parser, SETTINGS)
    parser.set_defaults(func=run, parser=parser, defaults=defaults)

    actions = parser.add_subparsers(title="actions", metavar="ACTION", dest="action")
    show = actions.add_parser(
        "show",
        help="print a safety-token file as a table",
        description="Print a safety-token file: rank by weight, token id, token text and weight, then its parameters; "
                    "first check it against a tokenizer as pact-cache build does (--model M's, else the recorded model's when "
                    "it loads without the network), refusing a file whose ids decode to other texts, naming the first.",
    )
    show.add_argument("file", metavar="FILE", help="a file written by 'pact safety-tokens --out'")
    show.add_argument("--model", metavar="M", help="check the file against M's tokenizer: every id inside its vocabulary and "
                                                   "decoding to the text the file records, and the tokenizer's fingerprint "
                                                   "(default: the model the file records, when it loads without the network)")
    show.set_defaults(func=run_show)


def _check_inputs_and_out(args: SafetyTokenArguments, data_path: str) -> Path:
    """Refuse model arguments and an `--out` that cannot work, before any work is done; returns `--out`.

    `--out` must not be a directory nor the data file, and its nearest existing
    folder must be a writable folder (the file is saved atomically at the end).
    """
    for flag, model in (("--aligned", args.aligned), ("--base", args.base)):
        check_model_argument(flag, model)
    out = check_output_file("--out", args.out, creates_folder=True)
    refuse_overwriting_inputs([("--out", out)], {"--data": input_files(data_path)})
    folder = next(p for p in out.absolute().parents if p.exists())
    if not folder.is_dir():
        raise PactError(f"--out {out}: {folder} is a file, so no folder can be created there")
    if not os.access(folder, os.W_OK):
        raise PactError(f"--out {out}: the folder {folder} is not writable")
    return out


def _usable_rows(args: SafetyTokenArguments, source: DataSourceArguments, data_path: str, aligned: PreTrainedTokenizerBase,
                 base: PreTrainedTokenizerBase) -> list:
    """Read and encode the data with the tokenizers alone, so a bad row stops the command before any model loads."""
    conversations, report = load_conversations(data_path, skip_invalid=args.skip_invalid, limit=args.max_examples,
                                               **source.data_options())
    kept, _, errors = encode_refusals(aligned, base, conversations, args.max_resp_len, args.skip_invalid, source=report.path)
    skipped = report.errors + errors
    if not kept:
        raise DataError(f"{report.path}: no row could be encoded ({len(skipped)} invalid, first: {skipped[0]})")
    if skipped:
        print(f"skipped {len(skipped)} invalid row(s) of {report.path}; first: {skipped[0]}")
    return kept


def run(flags: argparse.Namespace) -> int:
    """Compute the safety tokens from the command-line arguments and write them to `--out`.

    Everything that can be checked without a model is checked first: the
    flags, `--out`, the tokenizers and every data row.
    """
    args, source = dataclasses_from_flags(flags, SETTINGS, flags.defaults)
    if not args.out:
        flags.parser.error("--out FILE.json is required (or use: pact safety-tokens show FILE)")
    data_path = args.data or str(demo_data_path("refusals"))
    out = _check_inputs_and_out(args, data_path)
    started = time.perf_counter()
    same = args.base is None or args.base == args.aligned
    aligned_tokenizer = load_tokenizer(args.aligned)
    base_tokenizer = aligned_tokenizer if same else load_tokenizer(args.base)
    check_same_tokenizer(aligned_tokenizer, base_tokenizer, args.aligned or EMBEDDED_MODEL, args.base)
    conversations = _usable_rows(args, source, data_path, aligned_tokenizer, base_tokenizer)
    aligned = load_model(args.aligned, device=args.device, dtype=args.dtype)
    base = aligned if same else load_model(args.base, device=args.device, dtype=args.dtype)
    tokens = compute_safety_tokens(
        aligned,
        base,
        conversations,
        top=args.top,
        max_examples=args.max_examples,
        max_resp_len=args.max_resp_len,
        diff_mode=args.diff_mode,
        temperature=args.temperature,
        batch_size=args.batch_size,
        progress=not args.quiet,
        data_path=data_path,
    )
    path = tokens.save(out)
    positive = sum(w > 0 for w in tokens.weights)
    print(
        f"{len(tokens)} safety tokens ({positive} with positive weight) from "
        f"{tokens.params['examples_used']} examples in {time.perf_counter() - started:.1f}s -> {path}"
    )
    return 0


def format_table(tokens: SafetyTokens) -> str:
    """A readable table of a safety-token set, heaviest first, followed by its parameters and fingerprints."""
    order = sorted(range(len(tokens)), key=lambda i: (-tokens.weights[i], tokens.ids[i]))
    lines = [f"{'rank':>4}  {'id':>7}  {'token':<24}  {'weight':>8}"]
    for rank, i in enumerate(order, start=1):
        lines.append(f"{rank:>4}  {tokens.ids[i]:>7}  {repr(tokens.tokens[i]):<24}  {tokens.weights[i]:>8.4f}")
    positive = sum(w > 0 for w in tokens.weights)
    lines.append(f"|S| = {len(tokens)}, {positive} with positive weight")
    lines.extend(f"{key}: {value!r}" if isinstance(value, str) else f"{key}: {value}" for key, value in tokens.params.items())
    lines.extend(f"fingerprint {key}: {value}" for key, value in tokens.fingerprints.items())
    return "\n".join(lines)


def _local_tokenizer(source) -> PreTrainedTokenizerBase | None:
    """The tokenizer of the model argument `source` when it loads from this machine alone (a local model, or a hub id in
    the local Hugging Face cache); None when it does not, or `source` is no model argument."""
    if not isinstance(source, str) or not source:
        return None
    try:
        return load_tokenizer(source, local_files_only=True)
    except (PactError, OSError, ValueError):
        return None


def check_against_tokenizer(tokens: SafetyTokens, source: str, model: str | None) -> str:
    """Check a safety-token file against `model`'s tokenizer, or the tokenizer of the model the file records when that
    loads without the network, as `pact-cache build` checks it; returns the line saying what was checked.

    The ids and their recorded texts are compared first, so a file of another
    vocabulary is named by its first differing entry and id
    (`SafetyTokensFileError`), then the tokenizer's fingerprint (chat template
    included).
    """
    if model is not None:
        check_model_argument("--model", model)
        tokenizer, name = load_tokenizer(model), model
    else:
        name = tokens.params.get("aligned")
        tokenizer = _local_tokenizer(name)
        if tokenizer is None:
            why = (f"the model the file records ({name!r}) cannot be loaded without the network" if isinstance(name, str)
                   else "the file records no model (params.aligned)")
            return f"not checked against a tokenizer: {why}; pass --model M to check it against M's tokenizer"
    ids_and_texts = dataclasses.replace(tokens, fingerprints={k: v for k, v in tokens.fingerprints.items() if k != "tokenizer"})
    ids_and_texts.check_tokenizer(tokenizer, source=source)
    tokens.check_tokenizer(tokenizer, source=source)
    return f"checked against the tokenizer of {name}: all {len(tokens)} ids decode to the texts the file records"


def run_show(args: argparse.Namespace) -> int:
    """Print the safety-token file named on the command line, once checked against a tokenizer where one is at hand."""
    tokens = SafetyTokens.load(args.file)
    checked = check_against_tokenizer(tokens, args.file, args.model)
    print(format_table(tokens))
    print(checked)
    return 0
