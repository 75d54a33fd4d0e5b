"""`pact train`: fine-tune from a reference cache with the PACT loss.

The flags are generated from `ObjectiveArguments` and `PactTrainingArguments`
(Hugging Face names such as `--learning_rate`, with the older short names such
as `--lr` as aliases); `--config FILE.yaml|json` supplies any of them.
"""

from __future__ import annotations

import argparse
import dataclasses

from transformers import TrainingArguments

from pact.cache_tools.settings import ExampleArguments
from pact.cli.flags import add_dataclass_flags, dataclasses_from_flags, with_flag
from pact.data.rows import DataSourceArguments
from pact.errors import InvalidSetting
from pact.models.adapters import AdapterArguments
from pact.objective.settings import ObjectiveArguments
from pact.training.arguments import PactTrainingArguments

DATACLASSES = (ObjectiveArguments, PactTrainingArguments)
ELSEWHERE = "pact train takes its training data as --data FILE (a file, a save_to_disk folder or a hub dataset), or a cache as --cache DIR"
REQUIRED = ("output_dir",)
TRAINER_GROUP = "Trainer settings (transformers TrainingArguments)"


def help_groups() -> tuple:
    """`--help`'s groups of flags: PACT's own settings (the run, the data, the objective, the adapter) first, then the
    Trainer's, then distillation's."""
    trainer = {f.name for f in dataclasses.fields(TrainingArguments)} - set(REQUIRED)
    adapter = {f.name for f in dataclasses.fields(AdapterArguments)}
    data = {f.name for kind in (ExampleArguments, DataSourceArguments) for f in dataclasses.fields(kind)}
    run = {f.name for f in dataclasses.fields(PactTrainingArguments)} - trainer - adapter - data
    objective = {f.name for f in dataclasses.fields(ObjectiveArguments)}
    distillation = {name for name in objective if name.startswith("kd_")}
    return (("PACT run settings (--cache or --data, and --output_dir)", run),
            ("PACT data: how --data becomes the cache (built on first use, then reused)", data),
            ("PACT objective (docs/objective.md)", objective - distillation),
            ("PACT adapter: LoRA, QLoRA or full fine-tuning", adapter), (TRAINER_GROUP, trainer),
            ("Distillation: --objective kd or pact+kd on a cache built with --kd_top_k (docs/distillation.md)", distillation))


def register(subparsers) -> None:
    """Add `pact train`."""
    parser = subparsers.add_parser(
        "train",
        help="fine-tune from a reference cache, or from data whose cache it builds once (no reference model in memory)",
        usage="pact train (--cache CACHE | --data FILE) --output_dir RUN [options]",
        description="Fine-tune the cache's reference model with CE + lambda * safety-token KL (or the token-wise constrained "
                    "objective: --objective tokenwise|pact+tokenwise), reading targets from the cache "
                    "(docs/objective.md); given --data instead, the cache of that data is built on first use and reused. The transformers TrainingArguments flags are accepted, less those the PACT loop would "
                    "ignore (refused by name; docs/commands.md); a YAML file may hold them (--config).",
    )
    parser.hints = {flag: ELSEWHERE for flag in ("--data_path", "--data-path", "--train_file", "--dataset", "--dataset_name")}
    defaults = add_dataclass_flags(parser, DATACLASSES, groups=help_groups(), required=REQUIRED)
    parser.set_defaults(func=run, parser=parser, defaults=defaults)


def parse(args: argparse.Namespace) -> tuple[ObjectiveArguments, PactTrainingArguments]:
    """The objective and training arguments the flags and the `--config` file describe (constructing them checks every value)."""
    return dataclasses_from_flags(args, DATACLASSES, args.defaults)


def run(args: argparse.Namespace) -> int:
    """Run training and print where the outputs are."""
    from pact.training.train import train

    objective, training = parse(args)
    try:
        result = train(training, objective)
    except InvalidSetting as err:
        raise with_flag(err, args) from err
    if not result.is_main:
        return 0
    last = result.metrics[-1] if result.metrics else {}
    print(f"trained {result.steps} steps; final loss {last.get('loss', float('nan')):.4f} "
          f"(ce {last.get('ce', float('nan')):.4f}, kl {last.get('kl', float('nan')):.4f}); outputs in {result.out}")
    if result.eval_metrics:
        print("eval: " + ", ".join(f"{key} {value:.4f}" for key, value in result.eval_metrics.items() if key != "eval_tokens"))
    return 0
