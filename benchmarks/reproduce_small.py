"""A small-scale reproduction of the PACT paper's claim, on this machine's CPU.

(a) Make an aligned reference: full fine-tuning of the embedded SmolLM2 on
    refusals mixed with SST-2 rows until it refuses held-out harmful requests.
(b) Compute its safety tokens against the original embedded model as base.
(c) Build the cache on the first rows of the harmful fine-tuning attack set.
(d) Fine-tune the reference with LoRA: plain SFT (lambda 0) and cached PACT,
    same budget, same data order.
(e) Report refusal rate on held-out harmful requests and SST-2 accuracy on
    held-out rows, for the reference, SFT and PACT (markdown table + PNG).

Every stage writes its result under --out and is skipped when that result
exists, so an interrupted run continues where it stopped. The harmful rows of
the attack set are only ever trained on, never printed.

    python benchmarks/reproduce_small.py --refusals ../shared/data/refusals.jsonl \
        --sst2 ../shared/data/sst2_5k.jsonl --attack ../shared/data/sst2_5k_harmful10.jsonl --out runs/repro
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch


def _stage(name: str, done: Path, timings: dict, run) -> None:
    """Run `run()` unless `done` exists; record its wall time."""
    if done.exists():
        print(f"[{name}] already done ({done})")
        return
    print(f"[{name}] ...", flush=True)
    started = time.perf_counter()
    run()
    timings[name] = round(time.perf_counter() - started, 1)
    print(f"[{name}] {timings[name]} s", flush=True)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def make_reference(args, out: Path) -> None:
    """(a) Full fine-tuning on refusals + SST-2 rows with CE on the response tokens."""
    from pact.data import load_examples
    from pact.loss import student_outputs
    from pact.reference import collate_examples
    from pact.models import load_model

    rows = _read_jsonl(args.refusals)[: args.ref_rows] + _read_jsonl(args.sst2)[: args.ref_rows]
    random.Random(args.seed).shuffle(rows)
    data = _write_jsonl(out / "reference_data.jsonl", rows)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    examples, _ = load_examples(data, loaded.tokenizer, max_length=args.max_length)
    torch.manual_seed(args.seed)
    model = loaded.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.ref_lr)
    order = random.Random(args.seed + 1)
    pad = loaded.tokenizer.pad_token_id
    for step in range(args.ref_steps):
        batch = order.sample(examples, args.batch_size)
        ce = student_outputs(model, collate_examples(batch, pad), None).ce
        ce.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.ref_steps - 1:
            print(f"  reference step {step + 1}/{args.ref_steps}: ce {ce.item():.4f}", flush=True)
    staging = out / "reference.tmp"
    model.save_pretrained(staging)
    loaded.tokenizer.save_pretrained(staging)
    staging.rename(out / "reference")


def make_safety_tokens(args, out: Path) -> None:
    """(b) Safety tokens of the reference against the original embedded model."""
    from pact.data import load_conversations
    from pact.models import load_model
    from pact.safety_tokens import compute_safety_tokens

    conversations, _ = load_conversations(args.refusals)
    chosen = conversations[args.ref_rows : args.ref_rows + args.safety_rows]
    tokens = compute_safety_tokens(load_model(str(out / "reference"), device="cpu"), load_model(args.model, device="cpu"),
                                   chosen, top=50, max_examples=args.safety_rows, data_path=args.refusals)
    tokens.save(out / "safety_tokens.json")
    print("  " + ", ".join(f"{t!r}:{w:.3f}" for t, w in sorted(zip(tokens.tokens, tokens.weights), key=lambda x: -x[1])[:12]))


def make_cache(args, out: Path) -> None:
    """(c) One reference pass over the attack set's first rows."""
    from pact.cache_tools.cli import main as cache_main

    code = cache_main(["build", "--model", str(out / "reference"), "--data", args.attack, "--limit", str(args.train_rows),
                       "--safety-tokens", str(out / "safety_tokens.json"), "--out", str(out / "cache"),
                       "--max-length", str(args.max_length), "--device", "cpu"])
    if code:
        raise SystemExit(f"cache build failed ({code})")


def finetune(args, out: Path, name: str, lam: float) -> None:
    """(d) LoRA fine-tuning from the cache; lambda 0 is plain SFT through the same pipeline."""
    from pact.arguments import PactTrainingArguments
    from pact.objective import PactArguments
    from pact.train import train

    train(PactTrainingArguments(cache=str(out / "cache"), output_dir=str(out / name), max_steps=args.steps,
                                per_device_train_batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                                train_device="cpu"), PactArguments(lam=lam))


def evaluate(args, out: Path, name: str, adapter: Path | None) -> None:
    """(e) Held-out refusal rate and SST-2 accuracy, saved to RUN/eval.json."""
    from pact.data import load_conversations, load_prompts
    from pact.drift import load_student
    from pact.judge import evaluate_refusals
    from pact.report import save_measurement
    from pact.task_eval import evaluate_task

    loaded = load_student(str(out / "reference"), str(adapter) if adapter else None, device="cpu")
    prompts, _ = load_prompts(args.refusals)
    held_out = prompts[-args.eval_harmful :]
    refusal = evaluate_refusals(loaded.model, loaded.tokenizer, held_out, max_new_tokens=args.max_new_tokens, batch_size=16)
    run = out / name
    (run / "refusal_responses.jsonl").parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(run / "refusal_responses.jsonl", refusal.records())
    conversations, _ = load_conversations(args.sst2)
    task = evaluate_task(loaded.model, loaded.tokenizer, conversations[-args.eval_sst2 :], batch_size=16)
    save_measurement(run, "task", task.to_dict())
    save_measurement(run, "refusal", refusal.summary())
    print(f"  {name}: refusal {refusal.summary()['refusal_rate']:.3f}, sst2 accuracy {task.accuracy:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refusals", required=True, help="refusals.jsonl (harmful requests with refusals)")
    parser.add_argument("--sst2", required=True, help="sst2_5k.jsonl (benign task data)")
    parser.add_argument("--attack", required=True, help="sst2_5k_harmful10.jsonl (the harmful fine-tuning attack set)")
    parser.add_argument("--out", required=True, help="run directory (stages already there are skipped)")
    parser.add_argument("--model", default=None, help="starting model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--ref-rows", type=int, default=600, help="refusal rows and SST-2 rows for the reference (default 600 each)")
    parser.add_argument("--ref-steps", type=int, default=150, help="reference full fine-tuning steps (default 150)")
    parser.add_argument("--ref-lr", type=float, default=5e-5, help="reference learning rate (default 5e-5)")
    parser.add_argument("--safety-rows", type=int, default=128, help="refusal rows after the reference's for safety tokens (default 128)")
    parser.add_argument("--train-rows", type=int, default=1000, help="first rows of the attack set to fine-tune on (default 1000)")
    parser.add_argument("--steps", type=int, default=125, help="LoRA fine-tuning steps (default 125)")
    parser.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate (default 2e-4)")
    parser.add_argument("--lambda", dest="lam", type=float, default=1.0, help="PACT lambda (default 1.0)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size everywhere (default 8)")
    parser.add_argument("--max-length", type=int, default=256, help="token limit per example (default 256)")
    parser.add_argument("--eval-harmful", type=int, default=100, help="held-out harmful requests: the last N refusal rows (default 100)")
    parser.add_argument("--eval-sst2", type=int, default=200, help="held-out SST-2 rows: the last N rows (default 200)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation length for refusal eval (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    args = parser.parse_args()
    if args.ref_rows + args.safety_rows > 1035 - args.eval_harmful:
        raise SystemExit("refusal rows for the reference, safety tokens and evaluation overlap; lower the counts")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    stages = [
        ("a reference", out / "reference", lambda: make_reference(args, out)),
        ("b safety tokens", out / "safety_tokens.json", lambda: make_safety_tokens(args, out)),
        ("c cache", out / "cache" / "manifest.json", lambda: make_cache(args, out)),
        ("d sft", out / "sft" / "adapter_model.safetensors", lambda: finetune(args, out, "sft", 0.0)),
        ("d pact", out / "pact" / "adapter_model.safetensors", lambda: finetune(args, out, "pact", args.lam)),
        ("e eval reference", out / "reference_eval" / "eval.json", lambda: evaluate(args, out, "reference_eval", None)),
        ("e eval sft", out / "sft" / "eval.json", lambda: evaluate(args, out, "sft", out / "sft")),
        ("e eval pact", out / "pact" / "eval.json", lambda: evaluate(args, out, "pact", out / "pact")),
    ]
    for name, done, run in stages:
        _stage(name, done, timings, run)
        timings_path.write_text(json.dumps(timings, indent=2))

    from pact.report import write_report

    table, markdown, png = write_report([out / "reference_eval", out / "sft", out / "pact"], out / "report")
    print(table)
    print(f"stage seconds: {json.dumps(timings)}")
    print(f"report: {markdown}, {png}")


if __name__ == "__main__":
    main()
