"""`pact export RUN --merge --out DIR`: a LoRA run merged into a full model (safetensors)."""

from __future__ import annotations

import argparse

from pact.cli.common import device_name


def register(subparsers) -> None:
    """Add `pact export`."""
    parser = subparsers.add_parser(
        "export",
        help="merge a LoRA run into its base model and save it as a full model (safetensors + tokenizer)",
        description="Load RUN's base model, apply RUN's adapter, merge it into the weights and save the result with the "
                    "tokenizer to --out, loadable by AutoModelForCausalLM.from_pretrained without peft.",
    )
    parser.add_argument("run", metavar="RUN", help="a `pact train` run folder holding a LoRA adapter")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the base model (the only export so far; required)")
    parser.add_argument("--out", required=True, metavar="DIR", help="new folder for the merged model")
    parser.add_argument("--model", help="the base model (default: the one the adapter names)")
    parser.add_argument("--device", default="cpu", type=device_name, help="where to merge: auto|cpu|cuda[:N] (default cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and print where."""
    from pact.errors import PactError
    from pact.models.export import export_merged

    if not args.merge:
        raise PactError("pact export: say what to export: --merge (merge the adapter into the base model)")
    out = export_merged(args.run, args.out, args.model, args.device)
    print(f"merged model written to {out}")
    return 0
