"""`pact plan`: will a training run fit in a GPU's memory?

The flags are generated from `pact.planning.arguments.PlanArguments` (Hugging Face names
such as `--per_device_train_batch_size`, with `--batch-size` and the dashed
spellings as aliases); `--config FILE.yaml|json` supplies any of them.
"""

from __future__ import annotations

import argparse
import json

from pact.cli.flags import add_dataclass_flags, dataclasses_from_flags, with_flag
from pact.errors import InvalidSetting


def register(subparsers) -> None:
    """Add `pact plan`."""
    from pact.planning.arguments import PlanArguments

    parser = subparsers.add_parser(
        "plan",
        help="will it fit? the peak GPU memory of a training step of plain SFT, cached PACT and online PACT",
        description="Run one real training step (the project's loss, LoRA, gradient checkpointing, the AdamW step) on meta "
                    "tensors, which hold no data, for plain SFT, cached PACT and online PACT (a second reference model), "
                    "count the bytes of the live tensors at every operator, and print each variant's peak broken down, "
                    "whether it fits in --gpu_memory (with a margin for what no tensor holds) and, where it does not, the "
                    "cheapest setting tried that fits. The model needs only its architecture (config.json), never weights.",
    )
    defaults = add_dataclass_flags(parser, (PlanArguments,))
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object on one line instead of the table")
    parser.set_defaults(func=run, parser=parser, defaults=defaults)


def run(args: argparse.Namespace) -> int:
    """Plan the step and print the table (or the JSON object)."""
    from pact.planning.arguments import PlanArguments
    from pact.planning.plan import plan

    (settings,) = dataclasses_from_flags(args, (PlanArguments,), args.defaults)
    try:
        result = plan(settings)
    except InvalidSetting as err:
        raise with_flag(err, args) from err
    print(json.dumps(result.to_dict()) if args.json else result.render())
    return 0
