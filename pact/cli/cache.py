"""The `pact-cache` command: build, verify, inspect, summarise and merge
reference caches. A thin layer over the Python API of `pact.cache_tools`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pact.cache_tools.settings import OBJECTIVE_FIELDS, BuildArguments
from pact.cache_tools.writer import SAFETY_TOKENS_NAME
from pact.cli.common import device_name, integer_in, positive_float, positive_int
from pact.cli.flags import add_dataclass_flags, dataclasses_from_flags
from pact.cli.main import CommandParser, dispatch
from pact.data.rows import DataSourceArguments
from pact.objective.settings import ObjectiveArguments

BUILD_SETTINGS = (BuildArguments, DataSourceArguments, ObjectiveArguments)
SHOWN = 5  # verify's problems repeated in its one-line error


def _safety_tokens(args: BuildArguments, tokenizer):
    """The safety tokens a build was given (the --safety-tokens file, else the cache's own on --resume), checked
    against the model's tokenizer before the model is loaded; None when there are none and they must be computed."""
    from pact.objective.safety_tokens import SafetyTokens

    stored = Path(args.out).expanduser() / SAFETY_TOKENS_NAME
    path = Path(args.safety_tokens).expanduser() if args.safety_tokens else stored
    if not args.safety_tokens and not (args.resume and stored.is_file()):
        return None
    tokens = SafetyTokens.load(path)
    tokens.check_tokenizer(tokenizer, source=f"{path} (--safety-tokens)" if args.safety_tokens else str(path))
    return tokens


def _default_safety_tokens(args: BuildArguments, loaded):
    """Safety tokens computed from the bundled refusals, for a build given none (`default_safety_tokens`)."""
    from pact.data.sources import DEMO_REFUSALS, demo_data_path
    from pact.objective.safety_tokens import default_safety_tokens

    print(f"pact-cache: no --safety-tokens given; computing them from {demo_data_path(DEMO_REFUSALS)} (aligned model vs "
          "itself under a plain template; see `pact safety-tokens` for a base model)", file=sys.stderr)
    return default_safety_tokens(loaded, progress=not args.quiet)


def _build(flags) -> int:
    """Build a cache: check `--out`, then the data and the safety tokens with the tokenizer alone, then load the model
    and run it."""
    from pact.cache_tools.builder import RANK_WAIT, build_cache, check_output_directory
    from pact.cache_tools.manifest import describe_data
    from pact.data.chat import load_examples
    from pact.data.sources import DEMO_BENIGN, demo_data_path
    from pact.distributed import current_ranks, distributed_session, run_on_main
    from pact.models.loading import load_model, load_tokenizer

    args, source, objective = dataclasses_from_flags(flags, BUILD_SETTINGS, flags.defaults)
    with distributed_session(args.device, timeout=RANK_WAIT) as device:
        main_rank = current_ranks().is_main
        run_on_main(lambda: check_output_directory(args.out, args.resume, args.overwrite))
        tokenizer = load_tokenizer(args.model)
        data_path = args.data or demo_data_path(DEMO_BENIGN)
        examples, report = load_examples(data_path, tokenizer, max_length=args.max_length, skip_invalid=args.skip_invalid,
                                         limit=args.limit, train_on=args.train_on, **source.data_options())
        if report.skipped and main_rank:
            print(f"pact-cache: skipped {report.skipped} invalid row(s) of {report.path} (first: {report.errors[0]})", file=sys.stderr)
        safety_tokens = run_on_main(lambda: _safety_tokens(args, tokenizer)) if args.safety_targets else None
        loaded = load_model(args.model, device=str(device), dtype=args.model_dtype)
        teacher = load_model(args.teacher, device=str(device), dtype=args.model_dtype) if args.teacher else None
        if safety_tokens is None and args.safety_targets:
            safety_tokens = run_on_main(lambda: _default_safety_tokens(args, loaded))
        result = build_cache(
            loaded, examples, safety_tokens, args.out,
            data=describe_data(data_path, tokenizer.chat_template, args.max_length, args.skip_invalid, args.limit,
                               **source.data_options(), dataset_fingerprint=report.fingerprint, train_on=args.train_on),
            dtype=args.dtype, top_k=args.top_k, objective=objective,
            batch_size=args.batch_size, rows_per_shard=args.rows_per_shard, zstd_level=args.zstd_level,
            part_index=args.shard_index, part_count=args.num_shards,
            resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, threads=args.threads,
            kd_top_k=args.kd_top_k, teacher=teacher,
        )
        if main_rank:
            print(result.summary())
    return 0


def _verify(args) -> int:
    """Print the verify report; a damaged cache raises `CheckFailed` (exit 1) naming the first problem on stderr."""
    from pact.cache_tools.verify import verify_cache
    from pact.errors import CheckFailed

    report = verify_cache(args.dir, recompute=args.recompute, seed=args.seed, device=args.device)
    print(report.summary())
    if not report.ok:
        shown = "; ".join(report.problems[:SHOWN]) + ("; ..." if len(report.problems) > SHOWN else "")
        raise CheckFailed(f"{report.directory}: {len(report.problems)} problem(s): {shown}")
    return 0


def _inspect(args) -> int:
    """Print the manifest summary (and a decoded row with --row) as text or JSON."""
    from pact.cache_tools.inspection import format_inspection, inspect_cache

    info = inspect_cache(args.dir, row=args.row, top=args.top)
    print(json.dumps(info, indent=1) if args.json else format_inspection(info))
    return 0


def _stats(args) -> int:
    """Print the size and content statistics of a complete cache as text or JSON."""
    from pact.cache_tools.stats import cache_stats, format_stats

    stats = cache_stats(args.dir)
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    return 0


def _merge(args) -> int:
    """Merge the input caches into OUT and print what it holds."""
    from pact.cache_tools.merge import merge_caches

    manifest = merge_caches(args.out, args.dirs, overwrite=args.overwrite)
    t = manifest["totals"]
    print(f"merged {len(args.dirs)} cache(s) into {args.out}: {t['rows']} rows, {t['response_tokens']} response tokens, "
          f"{t['shards']} shards, {t['bytes']} bytes")
    return 0


def _export(args) -> int:
    """Write a distillation cache as the dataset axolotl's KD trainer reads, and print the YAML that trains from it."""
    from pact.cache_tools.kd_export import axolotl_config, export_axolotl
    from pact.cache_tools.reader import CacheReader

    out = export_axolotl(CacheReader(args.dir), args.out, args.file_format, progress=not args.quiet, overwrite=args.overwrite,
                         kd_temperature=args.kd_temperature)
    print(f"exported {args.dir} to {out}; an axolotl config that trains from it:\n")
    print(axolotl_config(out, kd_temperature=args.kd_temperature))
    return 0


def _add_build(subparsers) -> None:
    p = subparsers.add_parser(
        "build", help="run the reference model once over a training set and store its targets",
        description="Run the reference model once over a training set and store, for every response step, what the PACT "
                    "objective needs from it (logits on the safety tokens for the full and post-only contexts, the gate's "
                    "post-only top-p count, the target token's log-prob and the logsumexp) in zstd-compressed Arrow shards; "
                    "with --kd_top_k also a teacher's top-K for distillation, or only that with --safety_targets false. "
                    "Under `torchrun --nproc-per-node N $(which pact-cache) build ...` the N processes (one GPU each) share "
                    "the work and write one cache; see docs/scaling.md. Every flag is accepted with - or _ between words; "
                    "a YAML/JSON --config file may hold them.",
    )
    defaults = add_dataclass_flags(p, BUILD_SETTINGS, only={ObjectiveArguments: OBJECTIVE_FIELDS})
    p.set_defaults(func=_build, parser=p, defaults=defaults)


def build_parser() -> argparse.ArgumentParser:
    """The `pact-cache` parser with all subcommands."""
    parser = CommandParser(prog="pact-cache", description="Build and check offline caches of PACT reference targets.")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_build(subparsers)

    p = subparsers.add_parser("verify", help="check checksums, schema, row counts and the manifest (exit 1 on a problem)",
                              description="Check the manifest (its checksums name any field edited by hand, shard names, "
                                          "totals), safety_tokens.json against it, and every shard (size, sha256, schema, row "
                                          "and token counts, row invariants); exits 1 naming the field or shard on any problem, "
                                          "2 when DIR is not a pact cache at all.")
    p.add_argument("dir", metavar="DIR", help="cache directory")
    p.add_argument("--recompute", metavar="N", type=integer_in(0), default=0,
                   help="also re-run the reference model on N random rows and compare within the storage dtype's tolerance")
    p.add_argument("--seed", type=int, default=0, help="seed choosing the --recompute rows (default 0)")
    p.add_argument("--device", default="auto", type=device_name, help="device for --recompute: auto|cpu|cuda[:N]")
    p.set_defaults(func=_verify)

    p = subparsers.add_parser("inspect", help="summarise the manifest and decode one row",
                              description="Print the manifest summary; with --row, one row decoded: each response token with its "
                                          "log-prob and the safety tokens the reference found most likely there.")
    p.add_argument("dir", metavar="DIR", help="cache directory")
    p.add_argument("--row", metavar="I", type=int, default=None, help="decode row I (0-based, negative counts from the end)")
    p.add_argument("--top", metavar="N", type=positive_int, default=3, help="safety tokens shown per step (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_inspect)

    p = subparsers.add_parser("stats", help="bytes per response token, compression ratio and per-step entropy",
                              description="Size (overall and per column) and the distribution over response steps of the safety "
                                          "target's entropy, the post-only top-p count and the reference log-prob.")
    p.add_argument("dir", metavar="DIR", help="cache directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_stats)

    p = subparsers.add_parser("merge", help="join the parts of a --num-shards build, or caches built with the same settings",
                              description="Copy the shards of several complete caches into one new cache. Parts of a "
                                          "`build --num-shards K` (in any order) must be all K parts, each once, of the same "
                                          "build; the result equals a single build. Other caches need the same model, "
                                          "tokenizer, safety tokens and layout; when their example ids (row indices in each "
                                          "data file) collide, a later cache's ids are shifted to follow the earlier ones "
                                          "(recorded as example_id_offset in merged_from).")
    p.add_argument("out", metavar="OUT", help="new cache directory")
    p.add_argument("dirs", metavar="DIR", nargs="+", help="input cache directories (whole caches: in order)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache already in OUT (refused if OUT holds files pact-cache did not write)")
    p.set_defaults(func=_merge)

    p = subparsers.add_parser("export", help="write a --kd_top_k cache as a dataset other trainers distil from (axolotl)",
                              description="Write the teacher top-K of a cache built with --kd_top_k as the pre-tokenized "
                                          "dataset axolotl's knowledge-distillation trainer reads (columns input_ids, "
                                          "attention_mask, labels, target_token_ids, target_logprobs, target_mask; checked "
                                          "against axolotl 0.19.0), and print the YAML that trains from it. Written to a "
                                          "temporary folder, then renamed: a crash leaves no half-written OUT.")
    p.add_argument("dir", metavar="DIR", help="cache directory (built with --kd_top_k)")
    p.add_argument("--format", dest="target", choices=("axolotl",), default="axolotl",
                   help="whose dataset layout to write (default axolotl)")
    p.add_argument("--out", required=True, help="folder to create (required)")
    p.add_argument("--file-format", "--file_format", dest="file_format", choices=("arrow", "parquet", "jsonl"), default="arrow",
                   help="arrow: datasets' save_to_disk folder (default); parquet or jsonl: train-NNNNN-of-NNNNN files")
    p.add_argument("--kd-temperature", "--kd_temperature", dest="kd_temperature", type=positive_float, default=1.0,
                   help="the teacher's log-probs are renormalised over its top-K at this temperature, as axolotl's own "
                        "offline path does; give axolotl the same kd_temperature (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pact-cache` console script."""
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
