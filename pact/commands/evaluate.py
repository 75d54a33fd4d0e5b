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

from pact.models import EMBEDDED_MODEL, pad_token_id


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter and --device, shared by the generation-based measurements."""
    parser.add_argument("--model", metavar="M", default=None,
                        help=f"model to evaluate: local directory, hub id, .gguf file or {EMBEDDED_MODEL!r} (default: the embedded model)")
    parser.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory to apply on top of --model (e.g. a `pact train --out` directory)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")


def _add_output_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--json and --save-to, shared by every measurement."""
    parser.add_argument("--json", action="store_true", help=f"print one JSON object ({what})")
    parser.add_argument("--save-to", metavar="RUN_DIR",
                        help="also merge the JSON result into RUN_DIR/eval.json (read by `pact report`)")


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
    refusal.add_argument("--prompts", required=True, metavar="FILE",
                         help="requests, .jsonl/.json/.csv/.parquet or a save_to_disk folder; rows with 'instruction' "
                              "(optional 'input'), 'prompt', or chat 'messages'; answers, if present, are ignored")
    _add_model_arguments(refusal)
    refusal.add_argument("--max-new-tokens", type=int, default=64, help="longest answer generated (default 64)")
    refusal.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    refusal.add_argument("--limit", type=int, metavar="N", help="use only the first N rows of --prompts")
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
    task.add_argument("--data", required=True, metavar="FILE",
                      help="labelled rows ('instruction'/'input'/'output' or chat 'messages'), any format pact reads")
    _add_model_arguments(task)
    task.add_argument("--batch-size", type=int, default=16, help="(row, label) sequences per forward pass (default 16)")
    task.add_argument("--limit", type=int, metavar="N", help="use only the first N rows of --data")
    task.add_argument("--skip-invalid", action="store_true", help="skip malformed rows (counted and reported) instead of stopping")
    _add_output_arguments(task, "accuracy, n, labels, per_label, majority_accuracy")
    task.set_defaults(func=run_task)

    drift = measures.add_parser(
        "drift",
        help="mean safety-token KL to the cached reference targets",
        description="Mean of the PACT KL term (default objective parameters) over every response token of a cache, "
        "and its mean by response position. For the reference model itself this is not zero: the gate mixes in "
        "the post-only context.",
    )
    drift.add_argument("--cache", required=True, help="cache directory built by `pact-cache build`")
    drift.add_argument("--model", help="model to measure (default: the cache's reference model)")
    drift.add_argument("--adapter", help="PEFT adapter directory to apply on top of --model")
    drift.add_argument("--batch-size", type=int, default=8, help="cache rows per forward pass (default 8)")
    drift.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    _add_output_arguments(drift, "kl_mean, tokens, kl_by_position, ...")
    drift.set_defaults(func=run_drift)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_refusal(args: argparse.Namespace) -> int:
    """Generate, judge, print the refusal rate and write the per-prompt file."""
    from pact.data import load_prompts
    from pact.drift import load_student
    from pact.judge import GuardJudge, evaluate_refusals
    from pact.models import load_model

    prompts, report = load_prompts(args.prompts, skip_invalid=args.skip_invalid, limit=args.limit)
    _report_skipped(report)
    loaded = load_student(args.model, args.adapter, args.device)
    judge = None
    if args.judge:
        guard = load_model(args.judge, device=args.device)
        judge = GuardJudge(guard.model, guard.tokenizer)
    result = evaluate_refusals(loaded.model, loaded.tokenizer, prompts, args.max_new_tokens, args.batch_size, judge,
                               progress=not args.json)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            for record in result.records():
                handle.write(json.dumps(record) + "\n")
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
    """Score the labels, print the accuracy."""
    from pact.data import load_conversations
    from pact.drift import load_student
    from pact.task_eval import evaluate_task

    conversations, report = load_conversations(args.data, skip_invalid=args.skip_invalid, limit=args.limit)
    _report_skipped(report)
    loaded = load_student(args.model, args.adapter, args.device)
    result = evaluate_task(loaded.model, loaded.tokenizer, conversations, args.batch_size, progress=not args.json)
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
    """Measure drift and print it."""
    from pact.cache_tools import CacheReader
    from pact.drift import load_student, safety_drift

    reader = CacheReader(args.cache)
    loaded = load_student(args.model or reader.manifest["model_source"], args.adapter, args.device)
    result = safety_drift(loaded.model, reader, pad_token_id(loaded.tokenizer), batch_size=args.batch_size, progress=not args.json)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"safety-token drift: mean KL {result.kl_mean:.6f} over {result.tokens} response tokens")
        for t, (value, count) in enumerate(zip(result.by_position[:16], result.tokens_by_position[:16])):
            print(f"  step {t:3d}: {value:.6f}  ({count} tokens)")
    _save(args, "drift", {**result.to_dict(), "cache": str(args.cache), "model": loaded.source, "adapter": args.adapter})
    return 0
