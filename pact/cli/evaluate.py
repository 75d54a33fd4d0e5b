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

from pact.cli.common import check_model_argument, check_output_file, input_files, refuse_overwriting_inputs
from pact.cli.flags import add_dataclass_flags, dataclasses_from_flags, with_flag
from pact.data.rows import DataSourceArguments
from pact.errors import InvalidSetting, PactError
from pact.evaluation.report import EVAL_FILE, load_measurements
from pact.evaluation.settings import (
    DriftEvalArguments, EvalModelArguments, EvalOutputArguments, RefusalEvalArguments, TaskEvalArguments,
)
from pact.models.loading import pad_token_id


def _model_files(flag: str, model: str | None) -> dict[str, list[Path]]:
    """Check a model argument (`check_model_argument`) and return {flag: its files} (none for a hub id or the embedded model).

    A model directory's eval.json is not one of its files: `--save-to` may
    name the model's own run folder.
    """
    check_model_argument(flag, model)
    return {flag: input_files(model, skip_names=(EVAL_FILE,)) if model else []}


def _adapter_files(adapter: str | None) -> dict[str, list[Path]]:
    """Check `--adapter` (`pact.models.adapters.check_adapter_dir`) and return {"--adapter": the files peft reads}, or {} without one."""
    from pact.models.adapters import check_adapter_dir

    return {"--adapter": check_adapter_dir(adapter)} if adapter else {}


def _model_and_inputs(target: EvalModelArguments, default: str | None = None,
                      default_flag: str = "--model") -> tuple[str | None, dict[str, list[Path]]]:
    """The model a measurement loads and the files of it and of `--adapter`, all checked before anything loads:
    `--model`, else the base model `--adapter` was trained on (`pact.models.adapters.adapter_base_model`), else
    `default` (named `default_flag` in messages; None: the embedded model)."""
    from pact.models.adapters import adapter_base_model

    adapter = _adapter_files(target.adapter)
    if target.model:
        return target.model, {**adapter, **_model_files("--model", target.model)}
    if target.adapter:
        base = adapter_base_model(target.adapter)
        return base, {**adapter, **_model_files("the adapter's base model (--model)", base)}
    return default, _model_files(default_flag, default)


def _save_to_output(args: EvalOutputArguments) -> list[tuple[str, Path]]:
    """[("--save-to", RUN_DIR/eval.json)], or [] without the flag; a --save-to naming a file is a `PactError`."""
    if not args.save_to:
        return []
    run_dir = Path(args.save_to).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise PactError(f"--save-to {args.save_to}: a file, not a run directory")
    return [("--save-to", run_dir / EVAL_FILE)]


def _check_outputs(args: EvalOutputArguments, inputs: dict[str, list[Path]], outputs: Sequence[tuple[str, Path]] = ()) -> None:
    """Refuse, before any model is loaded, outputs (`outputs` and --save-to's eval.json) that would overwrite an
    input, and an existing eval.json that the final save could not merge into."""
    save_to = _save_to_output(args)
    refuse_overwriting_inputs([*outputs, *save_to], inputs)
    if save_to and save_to[0][1].exists():
        load_measurements(save_to[0][1].parent)


def _write_records(path: Path, records: list[dict]) -> None:
    """Write one JSON object per line to `path` atomically (a crash leaves the previous file, never a torn one)."""
    from pact.files import atomic_write

    atomic_write(path, "".join(json.dumps(record) + "\n" for record in records).encode())


def _save(args: EvalOutputArguments, key: str, result: dict) -> None:
    """Merge `result` into `--save-to`'s eval.json under `key`, if asked."""
    if args.save_to:
        from pact.evaluation.report import save_measurement

        path = save_measurement(args.save_to, key, result)
        if not args.json:
            print(f"saved as '{key}' in {path}")


def _report_skipped(report) -> None:
    """Tell the user (on stderr) how many invalid rows `--skip-invalid` skipped."""
    if report.skipped:
        print(f"skipped {report.skipped} invalid row(s) of {report.path}; first: {report.errors[0]}", file=sys.stderr)


REFUSAL = (RefusalEvalArguments, DataSourceArguments, EvalModelArguments, EvalOutputArguments)
TASK = (TaskEvalArguments, DataSourceArguments, EvalModelArguments, EvalOutputArguments)
DRIFT = (DriftEvalArguments, EvalModelArguments, EvalOutputArguments)
FLAGS_NOTE = " Every flag is accepted with - or _ between words; a YAML/JSON --config file may hold them."


def _measurement(measures, name: str, settings: tuple, run, **description) -> None:
    """Add one measurement, its flags generated from `settings`, run by `run(*settings)`."""
    parser = measures.add_parser(name, **description)
    defaults = add_dataclass_flags(parser, settings)
    parser.set_defaults(func=lambda flags: _run_measurement(flags, settings, run), parser=parser, defaults=defaults)


def _run_measurement(flags: argparse.Namespace, settings: tuple, run) -> int:
    """`run` on the settings the flags describe; a setting it refuses later (`InvalidSetting`, e.g. more new tokens than
    the model's context) is named by its flag, as one refused on construction is."""
    values = dataclasses_from_flags(flags, settings, flags.defaults)
    try:
        return run(*values)
    except InvalidSetting as err:
        raise with_flag(err, flags) from err


def register(subparsers) -> None:
    """Add `pact eval` and its measurements."""
    parser = subparsers.add_parser("eval", help="evaluate a model: refusal rate, task accuracy, safety-token drift",
                                   description="Evaluate a model or adapter.")
    measures = parser.add_subparsers(title="measurements", metavar="MEASUREMENT")
    _measurement(
        measures, "refusal", REFUSAL, run_refusal,
        help="refusal rate on prompts (harmful: safety; benign with --benign: over-refusal)",
        description="Answer every prompt greedily with the model's chat template and judge each answer refused or "
        "complied: always with the keyword judge (the refusal-phrase list of the GCG/AutoDAN literature, see "
        "pact/evaluation/judge.py), and also with a guard model if --judge is given. "
        "On harmful prompts the refusal rate measures safety (higher is safer). Over-refusal is the same command "
        "on benign prompts: the share of harmless requests refused (lower is better); pass --benign so the result is "
        "labelled, and saved by --save-to, as over_refusal. --json prints refusal_rate, n, refused (and "
        "judge_refusal_rate with --judge); --out writes one JSON object per prompt: prompt, response, refused, "
        "matched_phrase (and judge_refused, judge_p_refused with --judge)." + FLAGS_NOTE,
    )
    _measurement(
        measures, "task", TASK, run_task,
        help="accuracy on classification-style instruction data (SST-2, AG News, ...)",
        description="Accuracy on data whose answers are one of a few labels, read from the data (its distinct "
        "answers, at most 20). Each label is scored as the complete answer under the chat template (sum of its "
        "token log-probs, end-of-turn included) and the best-scoring label is the prediction. --json prints "
        "accuracy, n, labels, per_label, majority_accuracy." + FLAGS_NOTE,
    )
    _measurement(
        measures, "drift", DRIFT, run_drift,
        help="mean safety-token KL to the cached reference targets",
        description="Mean of the PACT KL term (default objective parameters) over every response token of a cache, "
        "and its mean by response position. For the reference model itself this is not zero: the gate mixes in "
        "the post-only context. Also the shift of the cached response tokens' log-probs from the reference's, "
        "log p_model(y_t) - log p_reference(y_t), overall and by position: on a cache of refusals, a large negative "
        "shift at the first steps says the model lost the refusal at its first tokens. --json prints kl_mean, "
        "tokens, kl_by_position, logprob_shift_mean, ..." + FLAGS_NOTE,
    )
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_refusal(args: RefusalEvalArguments, source: DataSourceArguments, target: EvalModelArguments,
                output: EvalOutputArguments) -> int:
    """Check the inputs and outputs, generate, judge, print the refusal rate and write the per-prompt file."""
    from pact.data.rows import load_prompts
    from pact.evaluation.judge import GuardJudge, evaluate_refusals
    from pact.models.adapters import load_student
    from pact.models.loading import load_model

    model, model_inputs = _model_and_inputs(target)
    inputs = {"--prompts": input_files(args.prompts), **model_inputs, **_model_files("--judge", args.judge)}
    _check_outputs(output, inputs, [("--out", check_output_file("--out", args.out))] if args.out else [])
    prompts, report = load_prompts(args.prompts, skip_invalid=args.skip_invalid, limit=args.limit, **source.data_options())
    _report_skipped(report)
    loaded = load_student(model, target.adapter, target.device, target.dtype)
    judge = None
    if args.judge:
        guard = load_model(args.judge, device=target.device, dtype=target.dtype)
        judge = GuardJudge(guard.model, guard.tokenizer)
    result = evaluate_refusals(loaded.model, loaded.tokenizer, prompts, args.max_new_tokens, args.batch_size, judge,
                               progress=not output.json)
    if args.out:
        _write_records(Path(args.out).expanduser(), result.records())
    summary = {**result.summary(), "benign": args.benign, "prompts": str(args.prompts), "model": loaded.source,
               "adapter": target.adapter, "max_new_tokens": args.max_new_tokens, "judge": args.judge}
    if output.json:
        print(json.dumps(summary))
    else:
        name = "over-refusal rate (benign prompts)" if args.benign else "refusal rate"
        print(f"{name}: {summary['refusal_rate']:.3f} ({summary['refused']}/{summary['n']} refused; keyword judge)")
        if judge is not None:
            print(f"{name}, guard model {args.judge}: {summary['judge_refusal_rate']:.3f} "
                  f"({summary['judge_refused']}/{summary['n']})")
        if args.out:
            print(f"answers and verdicts: {args.out}")
    _save(output, "over_refusal" if args.benign else "refusal", summary)
    return 0


def run_task(args: TaskEvalArguments, source: DataSourceArguments, target: EvalModelArguments,
             output: EvalOutputArguments) -> int:
    """Check the inputs, the output and the label set, score the labels, print the accuracy."""
    from pact.data.rows import load_conversations
    from pact.evaluation.task import evaluate_task, label_set
    from pact.models.adapters import load_student

    model, model_inputs = _model_and_inputs(target)
    _check_outputs(output, {"--data": input_files(args.data), **model_inputs})
    conversations, report = load_conversations(args.data, skip_invalid=args.skip_invalid, limit=args.limit,
                                               **source.data_options())
    _report_skipped(report)
    labels = label_set(conversations, source=report.path)
    loaded = load_student(model, target.adapter, target.device, target.dtype)
    result = evaluate_task(loaded.model, loaded.tokenizer, conversations, args.batch_size, progress=not output.json,
                           labels=labels)
    summary = {**result.to_dict(), "data": str(args.data), "model": loaded.source, "adapter": target.adapter}
    if output.json:
        print(json.dumps(summary))
    else:
        print(f"task accuracy: {summary['accuracy']:.3f} ({summary['correct']}/{summary['n']}; "
              f"majority baseline {summary['majority_accuracy']:.3f})")
        for label, counts in summary["per_label"].items():
            print(f"  {label!r}: {counts['correct']}/{counts['n']} correct, predicted {counts['predicted']} times")
    _save(output, "task", summary)
    return 0


def run_drift(args: DriftEvalArguments, target: EvalModelArguments, output: EvalOutputArguments) -> int:
    """Check the cache, the model's tokenizer and the output, measure drift and print it."""
    from pact.cache_tools import CacheReader
    from pact.evaluation.drift import check_cache_files, check_tokenizer, safety_drift
    from pact.models.adapters import load_student
    from pact.models.loading import load_tokenizer

    reader = CacheReader(args.cache)
    model, model_inputs = _model_and_inputs(target, reader.manifest.get("model_source"), "the cache's model_source (--model)")
    if not model:
        raise PactError(f"--cache {args.cache}: the manifest names no model_source; pass --model")
    _check_outputs(output, {"--cache": check_cache_files(reader), **model_inputs})
    check_tokenizer(reader.manifest, load_tokenizer(model), model, args.cache)
    loaded = load_student(model, target.adapter, target.device, target.dtype)
    result = safety_drift(loaded.model, reader, pad_token_id(loaded.tokenizer), batch_size=args.batch_size, progress=not output.json)
    summary = {**result.to_dict(), "cache": str(args.cache), "model": loaded.source, "adapter": target.adapter}
    if output.json:
        print(json.dumps(summary))
    else:
        print(f"safety-token drift: mean KL {result.kl_mean:.6f} over {result.tokens} response tokens; "
              f"mean log-prob shift of the cached response {result.logprob_shift_mean:+.6f}")
        rows = zip(result.by_position[:16], result.logprob_shift_by_position, result.tokens_by_position)
        for t, (value, shift, count) in enumerate(rows):
            print(f"  step {t:3d}: KL {value:.6f}  log-prob shift {shift:+.6f}  ({count} tokens)")
    _save(output, "drift", summary)
    return 0
