"""`pact eval`: measurements of a model or fine-tuned adapter.

    pact eval refusal --prompts FILE [--benign] ...   refusal (or over-refusal) rate
    pact eval task --data FILE ...                    accuracy on classification data
    pact eval drift --cache DIR ...                   safety-token drift

Each prints a summary (or one JSON object with `--json`) and, with
`--save-to RUN_DIR`, merges that JSON into RUN_DIR/eval.json for `pact report`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from pact.commands.arguments import (add_data_source_arguments, check_model_argument, check_output_file, data_source_options,
                                     device_name, input_files, positive_int, refuse_overwriting_inputs)
from pact.errors import PactError
from pact.models import DTYPES, EMBEDDED_MODEL, pad_token_id
from pact.report import EVAL_FILE, load_measurements


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter, --device and --dtype, shared by the generation-based measurements."""
    parser.add_argument("--model", metavar="M", default=None,
                        help=f"model to evaluate: local directory, hub id, .gguf file or {EMBEDDED_MODEL!r} (default: the embedded model)")
    parser.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory to apply on top of --model (e.g. a `pact train --out` directory)")
    parser.add_argument("--device", type=device_name, default="auto", help="auto, cpu or cuda (default auto)")
    _add_dtype_argument(parser)


def _add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """--dtype, the weight dtype of every model a measurement loads (logits are computed in float32 whatever it is)."""
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weight dtype of the model (and of --judge): auto (bfloat16 on a GPU that supports it, float16 "
                             "on an older one, float32 on CPU), bfloat16, float16 or float32 (default auto)")


def _add_output_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--json and --save-to, shared by every measurement."""
    parser.add_argument("--json", action="store_true", help=f"print one JSON object ({what})")
    parser.add_argument("--save-to", metavar="RUN_DIR",
                        help="also merge the JSON result into RUN_DIR/eval.json (read by `pact report`)")


def _model_files(flag: str, model: str | None) -> dict[str, list[Path]]:
    """Check a model argument (`check_model_argument`) and return {flag: its files} (none for a hub id or the embedded model).

    A model directory's eval.json is not one of its files: `--save-to` may
    name the model's own run folder.
    """
    check_model_argument(flag, model)
    return {flag: input_files(model, skip_names=(EVAL_FILE,)) if model else []}


def _adapter_files(adapter: str | None) -> dict[str, list[Path]]:
    """Check `--adapter` (`pact.drift.check_adapter_dir`) and return {"--adapter": the files peft reads}, or {} without one."""
    from pact.drift import check_adapter_dir

    return {"--adapter": check_adapter_dir(adapter)} if adapter else {}


def _save_to_output(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """[("--save-to", RUN_DIR/eval.json)], or [] without the flag; a --save-to naming a file is a `PactError`."""
    if not args.save_to:
        return []
    run_dir = Path(args.save_to).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise PactError(f"--save-to {args.save_to}: a file, not a run directory")
    return [("--save-to", run_dir / EVAL_FILE)]


def _check_outputs(args: argparse.Namespace, inputs: dict[str, list[Path]], outputs: Sequence[tuple[str, Path]] = ()) -> None:
    """Refuse, before any model is loaded, outputs (`outputs` and --save-to's eval.json) that would overwrite an
    input, and an existing eval.json that the final save could not merge into."""
    save_to = _save_to_output(args)
    refuse_overwriting_inputs([*outputs, *save_to], inputs)
    if save_to and save_to[0][1].exists():
        load_measurements(save_to[0][1].parent)


def _write_records(path: Path, records: list[dict]) -> None:
    """Write one JSON object per line to `path` atomically (a crash leaves the previous file, never a torn one)."""
    from pact.cache_tools.writer import atomic_write

    atomic_write(path, "".join(json.dumps(record) + "\n" for record in records).encode())


def _save(args: argparse.Namespace, key: str, result: dict) -> None:
    """Merge `result` into `--save-to`'s eval.json under `key`, if asked."""
    if args.save_to:
        from pact.report import save_measurement

        path = save_measurement(args.save_to, key, result)
        if not args.json:
            print(f"saved as '{key}' in {path}")


def _report_skipped(report) -> None:
    """Tell the user (on stderr) how many invalid rows `--skip-invalid` skipped."""
    if report.skipped:
        print(f"skipped {report.skipped} invalid row(s) of {report.path}; first: {report.errors[0]}", file=sys.stderr)


def register(subparsers) -> None:
    """Add `pact eval` and its measurements."""
    parser = subparsers.add_parser("eval", help="evaluate a model: refusal rate, task accuracy, safety-token drift",
                                   description="Evaluate a model or adapter.")
    measures = parser.add_subparsers(title="measurements", metavar="MEASUREMENT")

    refusal = measures.add_parser(
        "refusal",
        help="refusal rate on prompts (harmful: safety; benign with --benign: over-refusal)",
        description="Answer every prompt greedily with the model's chat template and judge each answer refused or "
        "complied: always with the keyword judge (the refusal-phrase list of the GCG/AutoDAN literature, see "
        "pact/judge.py), and also with a guard model if --judge is given. "
        "On harmful prompts the refusal rate measures safety (higher is safer). Over-refusal is the same command "
        "on benign prompts: the share of harmless requests refused (lower is better); pass --benign so the result is "
        "labelled, and saved by --save-to, as over_refusal.",
    )
    refusal.add_argument("--prompts", required=True, metavar="FILE|DIR|HUB_ID",
                         help="requests: a data file, a save_to_disk folder or a hub dataset id, rows in any --format "
                              "('instruction' or 'prompt' alone will do); answers, if present, are ignored")
    add_data_source_arguments(refusal, "--prompts")
    _add_model_arguments(refusal)
    refusal.add_argument("--max-new-tokens", type=positive_int, default=64, help="longest answer generated (default 64)")
    refusal.add_argument("--batch-size", type=positive_int, default=8, help="prompts generated together (default 8)")
    refusal.add_argument("--limit", type=positive_int, metavar="N", help="use only the first N rows of --prompts")
    refusal.add_argument("--skip-invalid", action="store_true", help="skip malformed rows (counted and reported) instead of stopping")
    refusal.add_argument("--judge", metavar="M",
                         help="guard model (any chat LM, loaded like --model) asked whether each answer refused; "
                              "adds judge_refused / judge_refusal_rate")
    refusal.add_argument("--benign", action="store_true",
                         help="the prompts are harmless: report the rate as over-refusal (saved as 'over_refusal')")
    refusal.add_argument("--out", metavar="FILE.jsonl",
                         help="write one JSON object per prompt: prompt, response, refused, matched_phrase "
                              "(and judge_refused, judge_p_refused with --judge)")
    _add_output_arguments(refusal, "refusal_rate, n, refused; judge_refusal_rate with --judge")
    refusal.set_defaults(func=run_refusal)

    task = measures.add_parser(
        "task",
        help="accuracy on classification-style instruction data (SST-2, AG News, ...)",
        description="Accuracy on data whose answers are one of a few labels, read from the data (its distinct "
        "answers, at most 20). Each label is scored as the complete answer under the chat template (sum of its "
        "token log-probs, end-of-turn included) and the best-scoring label is the prediction.",
    )
    task.add_argument("--data", required=True, metavar="FILE|DIR|HUB_ID",
                      help="labelled rows: a data file, a save_to_disk folder or a hub dataset id, rows in any --format")
    add_data_source_arguments(task, "--data")
    _add_model_arguments(task)
    task.add_argument("--batch-size", type=positive_int, default=16, help="(row, label) sequences per forward pass (default 16)")
    task.add_argument("--limit", type=positive_int, metavar="N", help="use only the first N rows of --data")
    task.add_argument("--skip-invalid", action="store_true", help="skip malformed rows (counted and reported) instead of stopping")
    _add_output_arguments(task, "accuracy, n, labels, per_label, majority_accuracy")
    task.set_defaults(func=run_task)

    drift = measures.add_parser(
        "drift",
        help="mean safety-token KL to the cached reference targets",
        description="Mean of the PACT KL term (default objective parameters) over every response token of a cache, "
        "and its mean by response position. For the reference model itself this is not zero: the gate mixes in "
        "the post-only context. Also the shift of the cached response tokens' log-probs from the reference's, "
        "log p_model(y_t) - log p_reference(y_t), overall and by position: on a cache of refusals, a large negative "
        "shift at the first steps says the model lost the refusal at its first tokens.",
    )
    drift.add_argument("--cache", required=True, help="cache directory built by `pact-cache build`")
    drift.add_argument("--model", help="model to measure (default: the cache's reference model)")
    drift.add_argument("--adapter", help="PEFT adapter directory to apply on top of --model")
    drift.add_argument("--batch-size", type=positive_int, default=8, help="cache rows per forward pass (default 8)")
    drift.add_argument("--device", type=device_name, default="auto", help="auto, cpu or cuda (default auto)")
    _add_dtype_argument(drift)
    _add_output_arguments(drift, "kl_mean, tokens, kl_by_position, logprob_shift_mean, ...")
    drift.set_defaults(func=run_drift)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_refusal(args: argparse.Namespace) -> int:
    """Check the inputs and outputs, generate, judge, print the refusal rate and write the per-prompt file."""
    from pact.data import load_prompts
    from pact.drift import load_student
    from pact.judge import GuardJudge, evaluate_refusals
    from pact.models import load_model

    inputs = {"--prompts": input_files(args.prompts), **_model_files("--model", args.model),
              **_model_files("--judge", args.judge), **_adapter_files(args.adapter)}
    _check_outputs(args, inputs, [("--out", check_output_file("--out", args.out))] if args.out else [])
    prompts, report = load_prompts(args.prompts, skip_invalid=args.skip_invalid, limit=args.limit, **data_source_options(args))
    _report_skipped(report)
    loaded = load_student(args.model, args.adapter, args.device, args.dtype)
    judge = None
    if args.judge:
        guard = load_model(args.judge, device=args.device, dtype=args.dtype)
        judge = GuardJudge(guard.model, guard.tokenizer)
    result = evaluate_refusals(loaded.model, loaded.tokenizer, prompts, args.max_new_tokens, args.batch_size, judge,
                               progress=not args.json)
    if args.out:
        _write_records(Path(args.out).expanduser(), result.records())
    summary = {**result.summary(), "benign": args.benign, "prompts": str(args.prompts), "model": loaded.source,
               "adapter": args.adapter, "max_new_tokens": args.max_new_tokens, "judge": args.judge}
    if args.json:
        print(json.dumps(summary))
    else:
        name = "over-refusal rate (benign prompts)" if args.benign else "refusal rate"
        print(f"{name}: {summary['refusal_rate']:.3f} ({summary['refused']}/{summary['n']} refused; keyword judge)")
        if judge is not None:
            print(f"{name}, guard model {args.judge}: {summary['judge_refusal_rate']:.3f} "
                  f"({summary['judge_refused']}/{summary['n']})")
        if args.out:
            print(f"answers and verdicts: {args.out}")
    _save(args, "over_refusal" if args.benign else "refusal", summary)
    return 0


def run_task(args: argparse.Namespace) -> int:
    """Check the inputs, the output and the label set, score the labels, print the accuracy."""
    from pact.data import load_conversations
    from pact.drift import load_student
    from pact.task_eval import evaluate_task, label_set

    _check_outputs(args, {"--data": input_files(args.data), **_model_files("--model", args.model),
                          **_adapter_files(args.adapter)})
    conversations, report = load_conversations(args.data, skip_invalid=args.skip_invalid, limit=args.limit,
                                               **data_source_options(args))
    _report_skipped(report)
    labels = label_set(conversations, source=report.path)
    loaded = load_student(args.model, args.adapter, args.device, args.dtype)
    result = evaluate_task(loaded.model, loaded.tokenizer, conversations, args.batch_size, progress=not args.json,
                           labels=labels)
    summary = {**result.to_dict(), "data": str(args.data), "model": loaded.source, "adapter": args.adapter}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"task accuracy: {summary['accuracy']:.3f} ({summary['correct']}/{summary['n']}; "
              f"majority baseline {summary['majority_accuracy']:.3f})")
        for label, counts in summary["per_label"].items():
            print(f"  {label!r}: {counts['correct']}/{counts['n']} correct, predicted {counts['predicted']} times")
    _save(args, "task", summary)
    return 0


def run_drift(args: argparse.Namespace) -> int:
    """Check the cache, the model's tokenizer and the output, measure drift and print it."""
    from pact.cache_tools import CacheReader
    from pact.drift import check_cache_files, check_tokenizer, load_student, safety_drift
    from pact.models import load_tokenizer, tokenizer_fingerprint

    reader = CacheReader(args.cache)
    model = args.model or reader.manifest.get("model_source")
    if not model:
        raise PactError(f"--cache {args.cache}: the manifest names no model_source; pass --model")
    _check_outputs(args, {"--cache": check_cache_files(reader), **_adapter_files(args.adapter),
                          **_model_files("--model" if args.model else "the cache's model_source (--model)", model)})
    check_tokenizer(reader.manifest, tokenizer_fingerprint(load_tokenizer(model)), model, args.cache)
    loaded = load_student(model, args.adapter, args.device, args.dtype)
    result = safety_drift(loaded.model, reader, pad_token_id(loaded.tokenizer), batch_size=args.batch_size, progress=not args.json)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"safety-token drift: mean KL {result.kl_mean:.6f} over {result.tokens} response tokens; "
              f"mean log-prob shift of the cached response {result.logprob_shift_mean:+.6f}")
        rows = zip(result.by_position[:16], result.logprob_shift_by_position, result.tokens_by_position)
        for t, (value, shift, count) in enumerate(rows):
            print(f"  step {t:3d}: KL {value:.6f}  log-prob shift {shift:+.6f}  ({count} tokens)")
    _save(args, "drift", {**result.to_dict(), "cache": str(args.cache), "model": loaded.source, "adapter": args.adapter})
    return 0
