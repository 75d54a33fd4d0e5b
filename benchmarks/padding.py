"""Padding of `pact train`'s micro-batches with the plain shard-aware shuffle against length-bucketed batches
(`--bucket_window`), side by side in one run.

Each data file is tokenized as `pact-cache build` tokenizes it (chat template,
`--max-length`), cut into shards of `--rows-per-shard` consecutive rows as the
cache would be, and ordered by the train sampler's own function
(`pact.cache_tools.reader.shard_aware_order`) over `--epochs` epochs, once
without bucketing and once with `--window` micro-batches per sorted window.
The padding fraction is padded tokens over all tokens of the padded batches.
With two or more files a further line mixes their rows (seeded shuffle, as one
mixed data file). Only file names and numbers are printed, never rows.

    python benchmarks/padding.py --data ../shared/data/sst2_5k_harmful10.jsonl --limit 1000 --batch-size 8
    python benchmarks/padding.py --data ../shared/data/refusals.jsonl --data ../shared/data/sst2_5k.jsonl --limit 500
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

from pact.training.arguments import DEFAULT_BUCKET_WINDOW
from pact.cache_tools.builder import DEFAULT_ROWS_PER_SHARD
from pact.cache_tools.settings import DEFAULT_MAX_LENGTH
from pact.cache_tools.reader import padding_fraction, shard_aware_order
from pact.data.chat import load_examples
from pact.models.loading import load_tokenizer


def row_lengths(path: str, tokenizer, limit: int, max_length: int) -> list[int]:
    """Tokens of each of the first `limit` rows of `path`, encoded as the cache builder encodes them."""
    examples, _ = load_examples(path, tokenizer, max_length=max_length, limit=limit)
    return [len(example.input_ids) for example in examples]


def mean_padding(lengths: list[int], args: argparse.Namespace, window: int) -> float:
    """Mean padding fraction over the epochs of the train order of `lengths` (sharded as a cache) with `window`."""
    shards = [min(args.rows_per_shard, len(lengths) - start) for start in range(0, len(lengths), args.rows_per_shard)]
    fractions = [padding_fraction(shard_aware_order(shards, random.Random(args.seed * 1_000_003 + epoch), args.batch_size,
                                                    window, lengths), lengths, args.batch_size)
                 for epoch in range(args.epochs)]
    return statistics.fmean(fractions)


def table_row(name: str, lengths: list[int], args: argparse.Namespace) -> str:
    """One markdown line: the data, its rows, the plain and bucketed padding and their ratio."""
    plain, bucketed = mean_padding(lengths, args, 0), mean_padding(lengths, args, args.window)
    ratio = f"{bucketed / plain:.2f}" if plain else "-"
    return f"| {name} | {len(lengths)} | {100 * plain:.1f}% | {100 * bucketed:.1f}% | {ratio} |"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", required=True, metavar="FILE", help="data file (repeat for several)")
    parser.add_argument("--limit", type=int, default=1000, help="first N rows of each file (default 1000)")
    parser.add_argument("--batch-size", type=int, default=8, help="global micro-batch rows (default 8)")
    parser.add_argument("--window", type=int, default=DEFAULT_BUCKET_WINDOW,
                        help=f"micro-batches per sorted window, as --bucket_window (default {DEFAULT_BUCKET_WINDOW})")
    parser.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD,
                        help=f"rows per cache shard (default {DEFAULT_ROWS_PER_SHARD}, as pact-cache build)")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help=f"token limit (default {DEFAULT_MAX_LENGTH})")
    parser.add_argument("--epochs", type=int, default=3, help="epochs averaged (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--model", default=None, help="tokenizer's model (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)
    for flag in ("limit", "batch_size", "window", "rows_per_shard", "max_length", "epochs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Print the padding table: a line per file and, for several files, one for their rows mixed."""
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    per_file = {Path(path).name: row_lengths(path, tokenizer, args.limit, args.max_length) for path in args.data}
    print(f"batch {args.batch_size} rows, window {args.window} batches, shards of {args.rows_per_shard} rows, "
          f"mean over {args.epochs} epochs (seed {args.seed})")
    print("| data | rows | plain padding | bucketed padding | bucketed / plain |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, lengths in per_file.items():
        print(table_row(name, lengths, args))
    if len(per_file) > 1:
        mixed = [length for lengths in per_file.values() for length in lengths]
        random.Random(args.seed).shuffle(mixed)
        print(table_row(" + ".join(per_file) + " (mixed)", mixed, args))


if __name__ == "__main__":
    main()
