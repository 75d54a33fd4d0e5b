"""The "Will it fit?" table of docs/memory.md: `pact plan`'s peak GPU memory of one optimizer step for plain SFT, cached PACT
and online PACT on the shipped 7B architectures, printed as a markdown table.

Each row is `pact.planning.plan.plan` (the real step on meta tensors; no GPU and no weights needed) for one model and one
setting; the columns are the three variants' peaks in GiB (without the fit margin), cached PACT over SFT, and the
checks of the project's memory targets: cached PACT <= 1.02x SFT, 7B LoRA bf16 with checkpointing under 20 GiB, 4-bit
under 12 GiB.

    python benchmarks/plan_table.py                       # batch 8 x 512, LoRA r=8 on q_proj,v_proj (about 2 minutes)
    python benchmarks/plan_table.py --batch-size 4 --max-length 1024
"""

from __future__ import annotations

import argparse
import time

from pact.planning.step import VARIANTS
from pact.planning.arguments import PlanArguments
from pact.planning.plan import gib, plan

MODELS = ("llama-2-7b-chat", "qwen2.5-7b-instruct")
SETTINGS = (("bf16", {}), ("bf16 + checkpointing", {"gradient_checkpointing": True}),
            ("4-bit + checkpointing", {"gradient_checkpointing": True, "load_in_4bit": True}))
TARGETS = {"bf16 + checkpointing": 20.0, "4-bit + checkpointing": 12.0}  # GiB, every variant's peak
CACHED_OVER_SFT = 1.02


def main() -> None:
    """Plan every model and setting, print the table, then whether each target is met."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    started = time.perf_counter()
    print("| model | setting | plain SFT | cached PACT | online PACT | cached / SFT |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    checks = []
    for model in args.models:
        for name, values in SETTINGS:
            result = plan(PlanArguments(model=model, per_device_train_batch_size=args.batch_size, max_length=args.max_length,
                                        gpu_memory="1TiB", **values))
            peaks = {variant: gib(result.variants[variant].peak_bytes) for variant in VARIANTS}
            ratio = peaks["cached_pact"] / peaks["sft"]
            print(f"| {model} | {name} | {peaks['sft']:.2f} | {peaks['cached_pact']:.2f} | {peaks['online_pact']:.2f} | "
                  f"{ratio:.3f} |")
            checks.append(f"{model}, {name}: cached PACT / SFT {ratio:.3f} <= {CACHED_OVER_SFT}: "
                          f"{'met' if ratio <= CACHED_OVER_SFT else 'MISSED'}")
            if name in TARGETS:
                verdicts = [f"{VARIANTS[v]} {'met' if peak < TARGETS[name] else 'MISSED'}" for v, peak in peaks.items()]
                checks.append(f"{model}, {name}: under {TARGETS[name]:.0f} GiB: {', '.join(verdicts)}")
    print(f"\nbatch {args.batch_size} x {args.max_length} tokens, LoRA r=8 on q_proj,v_proj, |S| = 50; peak GiB without the "
          f"fit margin; planned in {time.perf_counter() - started:.0f} s")
    print("\n".join(["", *checks]))


if __name__ == "__main__":
    main()
