"""Training cost of PACT variants against plain SFT, side by side in one run.

Each variant runs in its own subprocess (so peak RSS is its own) on the same
cache rows, batches and LoRA settings, and the script prints median step time
and peak memory as ratios to plain SFT:

* sft            -- an independent plain-SFT loop: `model(..., labels=...)`, CE only
* online-separate-- online PACT with a separate reference model: two extra
                    forward passes per step (as the paper's released code)
* online-adapter -- online PACT, reference = the student with adapters disabled
* cached         -- cached PACT (`cached_pact_loss`), no reference model
* pact-train     -- the `pact train` loop itself (`pact.training.train.train`)
* pact-train-sft, pact-train-tokenwise, pact-train-pact+tokenwise, pact-train-refkl, pact-train-refkl+tokenwise
                 -- the same loop with lambda 0 (plain SFT) and with each other `--objective`:
                    the methods of benchmarks/reproduce_small.py, timed side by side
* pact-train-kd, pact-train-pact+kd
                 -- the same loop distilling from the cache's teacher top-K (`--objective kd`, `pact+kd`)
* pact-train-kd-only
                 -- `--objective kd` from a distillation-only cache of the same rows (`--safety_targets false`:
                    the top-K alone, no safety targets, so no safety-token logits in the step)
* cached-kd      -- `--objective kd` from the cache in the hand loop above (no teacher in memory)
* online-kd      -- the same with the teacher in memory (a second copy of the model, one more forward per
                    step, `OnlineTeacher`): what a KD cache saves

The cache is built with `--kd_top_k` (default 50), so every variant reads the same rows.

Peak memory is the process's peak RSS on CPU and `torch.cuda.max_memory_allocated`
on CUDA. `--dtype` sets the weight dtype of every variant (`pact train --dtype`;
float32 by default, bfloat16 is the usual choice on a GPU); a list runs each
variant in each dtype, side by side. Ratios are to the first row (plain SFT in
the first dtype when it runs). Usage:

    python benchmarks/bench_train.py --data ../shared/data/sst2_5k.jsonl --rows 32 --steps 6
    python benchmarks/bench_train.py --device cuda --dtype bfloat16
    python benchmarks/bench_train.py --variants pact-train --dtype float32,bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN_OBJECTIVES = {  # `pact train` variants: (objective, lambda)
    "pact-train": ("pact", 1.0),
    "pact-train-sft": ("pact", 0.0),
    "pact-train-tokenwise": ("tokenwise", 0.0),
    "pact-train-pact+tokenwise": ("pact+tokenwise", 1.0),
    "pact-train-refkl": ("refkl", 1.0),
    "pact-train-refkl+tokenwise": ("refkl+tokenwise", 1.0),
    "pact-train-kd": ("kd", 1.0),
    "pact-train-pact+kd": ("pact+kd", 1.0),
    "pact-train-kd-only": ("kd", 1.0),
}
KD_ONLY = "pact-train-kd-only"  # the variant that reads the distillation-only cache
VARIANTS = ("sft", "online-separate", "online-adapter", "cached", "cached-kd", "online-kd", *TRAIN_OBJECTIVES)


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(args) -> None:
    """Run one variant for --warmup + --steps optimizer steps and print a JSON line."""
    import torch
    from peft import LoraConfig, get_peft_model

    from pact.cache_tools import CacheReader
    from pact.data.chat import assistant_header_ids
    from pact.data.batch import collate_rows
    from pact.objective.distillation import OnlineTeacher
    from pact.objective.loss import cached_pact_loss, pact_batch_loss
    from pact.models.loading import load_model
    from pact.objective.settings import ObjectiveArguments
    from pact.objective.targets import OnlineTargets

    torch.manual_seed(0)
    reader = CacheReader(args.cache)
    rows = [reader[i] for i in range(min(len(reader), args.rows))]
    batches = [rows[i : i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    needed = args.warmup + args.steps
    batches = (batches * (needed // len(batches) + 1))[:needed]
    cfg = ObjectiveArguments()
    lora = dict(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")

    if args.variant in TRAIN_OBJECTIVES:
        from pact.training.arguments import PactTrainingArguments
        from pact.objective.settings import ObjectiveArguments
        from pact.training.train import train

        objective, lam = TRAIN_OBJECTIVES[args.variant]
        with tempfile.TemporaryDirectory() as out:
            result = train(PactTrainingArguments(cache=args.cache, output_dir=out, max_steps=needed,
                                                 per_device_train_batch_size=args.batch_size, learning_rate=1e-4, seed=0,
                                                 train_device=args.device, dtype=args.dtype, disable_tqdm=True),
                           ObjectiveArguments(lam=lam, objective=objective))
            times = [m["seconds"] for m in result.metrics][args.warmup :]
            device = torch.device("cuda" if args.device == "cuda" else "cpu")
            print(json.dumps({"variant": args.variant, "step_s": statistics.median(times), "peak_mb": _peak_memory_mb(device)}))
        return

    loaded = load_model(reader.manifest["model_source"], device=args.device, dtype=args.dtype)
    tok = loaded.tokenizer
    separate = args.variant in ("online-separate", "online-kd")
    reference_model = load_model(reader.manifest["model_source"], device=args.device, dtype=args.dtype).model if separate else None
    model = get_peft_model(loaded.model, LoraConfig(**lora))
    model.train()
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    safety = reader.manifest["safety_tokens"]
    safety_ids = torch.tensor(safety["ids"])
    weights = torch.tensor(safety["weights"])
    pad = tok.pad_token_id
    if args.variant.endswith("kd"):
        cfg = ObjectiveArguments(objective="kd")
    if args.variant in ("online-separate", "online-adapter"):
        online = OnlineTargets(reference_model if reference_model is not None else model, safety_ids,
                                 assistant_header_ids(tok), cfg, pad)
    if args.variant == "online-kd":
        online = OnlineTeacher(reference_model, reader.layout.kd_top_k)

    times = []
    for index, batch in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        if args.variant == "sft":
            length = max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), length), pad, dtype=torch.long)
            labels = torch.full((len(batch), length), -100, dtype=torch.long)
            attention = torch.zeros((len(batch), length), dtype=torch.long)
            for i, r in enumerate(batch):
                seq = torch.as_tensor(r["input_ids"], dtype=torch.long)
                ids[i, : len(seq)] = seq
                attention[i, : len(seq)] = 1
                for start, end in r["response_spans"].tolist():
                    labels[i, start:end] = seq[start:end]
            loss = model(input_ids=ids.to(device), attention_mask=attention.to(device), labels=labels.to(device)).loss
        elif args.variant in ("cached", "cached-kd"):
            loss = cached_pact_loss(model, batch, safety_ids, weights, cfg, pad).loss
        else:
            loss = pact_batch_loss(model, online.fill(collate_rows(batch, pad)), safety_ids, weights, cfg).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= args.warmup:
            times.append(time.perf_counter() - started)
    print(json.dumps({"variant": args.variant, "step_s": statistics.median(times), "peak_mb": _peak_memory_mb(device)}))


def _run_variant(variant: str, dtype: str, args, cache: Path) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--cache", str(cache), "--rows", str(args.rows),
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device, "--dtype", dtype]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if result.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _build_cache(out: Path, args, *extra: str) -> None:
    """`pact-cache build --kd_top_k K` of the first --rows rows of --data into `out`, plus `extra` flags."""
    build = [sys.executable, "-m", "pact.cli.cache", "build", "--out", str(out), "--max-length", str(args.max_length),
             "--limit", str(args.rows), "--dtype", "float32", "--kd_top_k", str(args.kd_top_k), *extra]
    if args.data:
        build += ["--data", args.data]
    if args.model:
        build += ["--model", args.model]
    # PYTHONSAFEPATH: `-m` started in a checkout's root would import its pact/ folder, not an installed wheel.
    subprocess.run(build, check=True, env={**os.environ, "PYTHONSAFEPATH": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="training data file (default: the project's demo benign data)")
    parser.add_argument("--cache", help="use this cache instead of building one")
    parser.add_argument("--model", help="model the cache is built with, and every variant trains (default: the embedded "
                                        "model); ignored with --cache, whose manifest names its model")
    parser.add_argument("--rows", type=int, default=32, help="rows to train on (default 32)")
    parser.add_argument("--kd-top-k", type=int, default=50, help="the built cache's --kd_top_k, for the kd variants (default 50)")
    parser.add_argument("--max-length", type=int, default=256, help="cache --max-length (default 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step (default 4)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (default 6)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all variants, interleaved (default 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32",
                        help="weight dtype of every variant: float32 or bfloat16, or both comma-separated (default float32)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        _worker(args)
        return
    dtypes = [d for d in args.dtype.split(",") if d]
    if not dtypes or not set(dtypes) <= {"float32", "bfloat16"}:
        parser.error(f"--dtype {args.dtype}: expected float32, bfloat16 or both, comma-separated")

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) / "cache"
        kd_only = Path(tmp) / "cache-kd-only"
        variants = [v for v in args.variants.split(",") if v]
        if KD_ONLY in variants and args.cache:
            parser.error(f"{KD_ONLY} builds its own distillation-only cache of --data: leave out --cache")
        if not args.cache:
            _build_cache(cache, args)
        if KD_ONLY in variants:
            _build_cache(kd_only, args, "--safety_targets", "false")
        runs = [(v, d) for v in variants for d in dtypes]
        results: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
        for _ in range(args.repeats):
            for variant, dtype in runs:
                results[variant, dtype].append(_run_variant(variant, dtype, args, kd_only if variant == KD_ONLY else cache))
                print(f"  {variant} {dtype}: {results[variant, dtype][-1]}", file=sys.stderr)
    summary = {run: {"step_s": statistics.median(r["step_s"] for r in rs), "peak_mb": statistics.median(r["peak_mb"] for r in rs)}
               for run, rs in results.items()}
    base = next(iter(summary.values()))
    print(f"\n{args.rows} rows, batch {args.batch_size}, LoRA r=8 q_proj,v_proj, {args.steps} timed steps, device {args.device}; "
          f"ratios to {' '.join(next(iter(summary)))}")
    print(f"{'variant':<26} {'dtype':<9} {'step s':>8} {'peak MB':>9} {'time/base':>9} {'mem/base':>8}")
    for (variant, dtype), values in summary.items():
        print(f"{variant:<26} {dtype:<9} {values['step_s']:8.3f} {values['peak_mb']:9.0f} {values['step_s'] / base['step_s']:9.3f} "
              f"{values['peak_mb'] / base['peak_mb']:8.3f}")


if __name__ == "__main__":
    main()
