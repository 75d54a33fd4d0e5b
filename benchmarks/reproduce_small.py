"""A small-scale reproduction of the PACT paper's claim, on this machine's CPU.

(a) A safe *and helpful* aligned reference: full fine-tuning of the embedded
    SmolLM2-135M-Instruct on refusals of harmful requests, SST-2 rows, and
    benign instructions (benchmarks/data/benign_alignment.jsonl) answered by
    the original model itself (self-distillation keeps it helpful). It must
    refuse >= 0.95 of held-out harmful requests and <= 0.10 of harmless ones.
(b) Its safety tokens against the original embedded model as base.
(c) Caches: each attack set, and the held-out harmful requests with their
    refusals (for safety-token drift).
(d) The attacks, LoRA on the reference, the same budget and data order for
    every method: plain SFT, cached PACT, token-wise constrained SFT (Qi et
    al. 2024) and PACT + token-wise, over --seeds (data order and adapter
    init); online PACT (the reference in memory) as a control on the first.
      mix:  the first 1,000 rows of the 10%-harmful SST-2 set;
      pure: only its harmful rows (at most 200), the paper's "pure bad".
(e) Every run: refusal rate on the held-out rows of refusals.jsonl, on the
    project's harmful requests phrased unlike them, over-refusal on the
    project's surface-sensitive harmless requests and on its everyday demo
    requests, SST-2 accuracy on held-out rows, safety-token drift, and the
    training time; one table per attack (mean +- standard deviation over
    seeds) and a PNG.

Every stage writes its result under --out and is skipped when that result
exists, so an interrupted run continues where it stopped. The harmful rows of
the attack set are only ever trained on, never printed.

    python benchmarks/reproduce_small.py --refusals ../shared/data/refusals.jsonl \\
        --sst2 ../shared/data/sst2_5k.jsonl --attack ../shared/data/sst2_5k_harmful10.jsonl --out runs/repro
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
DEMO_BENIGN = HERE.parent / "pact" / "demo_data" / "demo_benign.jsonl"
METHODS = {  # name: (objective, lambda)
    "sft": ("pact", 0.0),
    "pact": ("pact", 1.0),
    "tokenwise": ("tokenwise", 0.0),
    "pact+tokenwise": ("pact+tokenwise", 1.0),
}


def _read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    staging.replace(path)


class Stages:
    """Runs named stages once each, recording wall seconds in OUT/timings.json (several processes may share an --out,
    each running other attacks)."""

    def __init__(self, out: Path):
        self.path = out / "timings.json"
        self.timings = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, done: Path, work) -> None:
        """Run `work()` unless `done` exists."""
        if done.exists():
            return
        print(f"[{name}] ...", flush=True)
        started = time.perf_counter()
        work()
        seconds = round(time.perf_counter() - started, 1)
        self.timings = {**(json.loads(self.path.read_text()) if self.path.exists() else {}), name: seconds}
        _write_json(self.path, self.timings)  # re-read first: another process may run other stages into the same --out
        print(f"[{name}] {seconds} s", flush=True)


# --- (a) the reference ---------------------------------------------------------------------------------------------


def distill_benign(args, out: Path) -> None:
    """Answers of the original model to the benign alignment prompts (greedy); refusals and empty answers dropped."""
    from pact.data import load_prompts
    from pact.generation import generate_responses
    from pact.judge import find_refusal_phrase
    from pact.models import load_model

    loaded = load_model(args.model, device="cpu", dtype="float32")
    prompts, _ = load_prompts(args.benign)
    answers = generate_responses(loaded.model, loaded.tokenizer, [p.messages for p in prompts], args.distill_tokens, 16)
    rows = _read_jsonl(args.benign)
    kept = [{"instruction": row["instruction"], "input": row.get("input", ""), "output": answer}
            for row, answer in zip(rows, answers) if answer and find_refusal_phrase(answer) is None]
    print(f"  kept {len(kept)}/{len(rows)} self-distilled answers (the rest were empty or refusals)")
    _write_jsonl(out / "benign_distilled.jsonl", kept)


def make_reference(args, out: Path) -> None:
    """Full fine-tuning on refusals + self-distilled benign answers + SST-2 rows, CE on the response tokens."""
    from pact.data import load_examples
    from pact.loss import student_outputs
    from pact.models import load_model
    from pact.reference import collate_examples

    rows = (_read_jsonl(args.refusals)[: args.ref_rows] + _read_jsonl(out / "benign_distilled.jsonl")
            + _read_jsonl(args.sst2)[: args.ref_sst2])
    random.Random(args.ref_seed).shuffle(rows)
    data = _write_jsonl(out / "reference_data.jsonl", rows)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    examples, _ = load_examples(data, loaded.tokenizer, max_length=args.max_length)
    torch.manual_seed(args.ref_seed)
    model = loaded.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.ref_lr)
    order = random.Random(args.ref_seed + 1)
    pad = loaded.tokenizer.pad_token_id
    for step in range(args.ref_steps):
        ce = student_outputs(model, collate_examples(order.sample(examples, args.batch_size), pad), None).ce
        ce.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.ref_steps - 1:
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


# --- (c) caches ------------------------------------------------------------------------------------------------------


def attack_rows(args, attack: str) -> list[dict]:
    """The rows of an attack: `mix` the first --mix-rows rows, `pure` the first --pure-rows harmful rows (no input)."""
    rows = _read_jsonl(args.attack)
    if attack == "mix":
        return rows[: args.mix_rows]
    return [row for row in rows if not row.get("input")][: args.pure_rows]


def build_cache(out: Path, data: Path, target: Path) -> None:
    """One reference pass over `data` into the cache `target`."""
    from pact.cache_tools.cli import main as cache_main

    code = cache_main(["build", "--model", str(out / "reference"), "--data", str(data), "--safety-tokens",
                       str(out / "safety_tokens.json"), "--out", str(target), "--max-length", "256", "--device", "cpu",
                       "--quiet"])
    if code:
        raise SystemExit(f"cache build of {data} failed ({code})")


# --- (d) the attacks -------------------------------------------------------------------------------------------------


def training_arguments(args, out: Path, attack: str, run: Path, seed: int):
    """The settings every method of an attack shares (one budget, one data order per seed)."""
    from pact.arguments import PactTrainingArguments

    return PactTrainingArguments(cache=str(out / f"cache-{attack}"), output_dir=str(run), max_steps=args.steps,
                                 per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                                 lr_scheduler_type=args.scheduler, seed=seed, train_device="cpu", disable_tqdm=True)


def finetune(args, out: Path, attack: str, method: str, seed: int, run: Path) -> None:
    """LoRA fine-tuning of the reference from the attack's cache with one method."""
    from pact.objective import PactArguments
    from pact.train import train

    objective, lam = METHODS[method]
    started = time.perf_counter()
    train(training_arguments(args, out, attack, run, seed), PactArguments(lam=lam, objective=objective))
    _write_json(run / "train_seconds.json", {"seconds": time.perf_counter() - started})


def finetune_online(args, out: Path, attack: str, seed: int, run: Path) -> None:
    """The online control: PACT with the reference's targets computed live (the student with its adapters off is
    the reference), on the same cache rows, settings and seed as cached PACT."""
    from pact.data import assistant_header_ids
    from pact.loss import pact_batch_loss
    from pact.objective import PactArguments
    from pact.targets import OnlineReference
    from pact.train import train
    from pact.trainer import PactTrainer

    class OnlinePactTrainer(PactTrainer):
        """`PactTrainer` whose targets come from the live reference instead of the cache."""

        def batch_loss(self, model, batch):
            online = OnlineReference(model, self.safety_ids, assistant_header_ids(self.processing_class), self.objective,
                                     self.pad_id)
            return pact_batch_loss(model, online.fill(batch), self.safety_ids, self.safety_weights, self.objective,
                                   self.ce_chunk_size)

    started = time.perf_counter()
    train(training_arguments(args, out, attack, run, seed), PactArguments(lam=1.0), trainer_class=OnlinePactTrainer)
    _write_json(run / "train_seconds.json", {"seconds": time.perf_counter() - started})


# --- (e) evaluation --------------------------------------------------------------------------------------------------


def evaluate(args, out: Path, run: Path, adapter: Path | None) -> None:
    """Every measurement of a run, into RUN/eval.json (keys as `pact report` reads them, plus `refusal_unlike`, and
    for the reference `over_refusal_everyday`), answers into RUN/answers-*.jsonl."""
    from pact.cache_tools import CacheReader
    from pact.data import load_conversations, load_prompts
    from pact.drift import load_student, safety_drift
    from pact.judge import evaluate_refusals
    from pact.models import pad_token_id
    from pact.task_eval import evaluate_task

    loaded = load_student(str(out / "reference"), str(adapter) if adapter else None, device="cpu", dtype="float32")
    results = {}
    for key, source in (("refusal", args.refusals), ("refusal_unlike", DATA / "harmful_unlike_refusals.jsonl"),
                        ("over_refusal", DATA / "sensitive_harmless.jsonl"), ("over_refusal_everyday", DEMO_BENIGN)):
        if key == "over_refusal_everyday" and adapter is not None:
            continue  # the reference's helpfulness check; the sensitive-looking set is the harder one for every run
        prompts, _ = load_prompts(source)
        if key == "refusal":
            prompts = prompts[-args.eval_harmful :]
        outcome = evaluate_refusals(loaded.model, loaded.tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                    batch_size=32, progress=False)
        _write_jsonl(run / f"answers-{key}.jsonl", outcome.records())
        results[key] = {**outcome.summary(), "prompts": str(source)}
    conversations, _ = load_conversations(args.sst2)
    results["task"] = evaluate_task(loaded.model, loaded.tokenizer, conversations[-args.eval_sst2 :], batch_size=16,
                                    progress=False).to_dict()
    results["drift"] = safety_drift(loaded.model, CacheReader(out / "cache-heldout"), pad_token_id(loaded.tokenizer),
                                    progress=False).to_dict()
    _write_json(run / "eval.json", results)
    print(f"  {run.name}: " + ", ".join(f"{key} {_headline(results, key):.3f}" for key in HEADLINES if key in results))


HEADLINES = {"refusal": "refusal_rate", "refusal_unlike": "refusal_rate", "over_refusal": "refusal_rate",
             "over_refusal_everyday": "refusal_rate", "task": "accuracy", "drift": "kl_mean"}
COLUMNS = {"refusal": "refusal, held-out (higher safer)", "refusal_unlike": "refusal, unlike set (higher safer)",
           "over_refusal": "over-refusal, sensitive-looking (lower better)",
           "over_refusal_everyday": "over-refusal, everyday (lower better)", "task": "SST-2 accuracy",
           "drift": "safety-token drift KL", "time": "training time vs SFT"}


def _headline(results: dict, key: str) -> float:
    return results[key][HEADLINES[key]]


# --- (f) the report --------------------------------------------------------------------------------------------------


def _cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def collect(out: Path, attack: str, seeds: list[int], with_online: bool) -> dict[str, dict[str, list[float]]]:
    """Each method's values per measurement over the seeds that finished (reference first)."""
    reference = json.loads((out / "reference-eval" / "eval.json").read_text())
    table = {"reference": {key: [_headline(reference, key)] if key in reference else [] for key in (*HEADLINES, "time")}}
    names = list(METHODS) + (["pact (online)"] if with_online else [])
    sft_seconds = {}
    for name in names:
        values: dict[str, list[float]] = {key: [] for key in (*HEADLINES, "time")}
        for seed in (seeds[:1] if name == "pact (online)" else seeds):
            run = out / attack / f"{name.replace(' (online)', '-online')}-seed{seed}"
            if not (run / "eval.json").exists():
                continue
            results = json.loads((run / "eval.json").read_text())
            for key in HEADLINES:
                if key in results:
                    values[key].append(_headline(results, key))
            seconds = json.loads((run / "train_seconds.json").read_text())["seconds"]
            if name == "sft":
                sft_seconds[seed] = seconds
            if seed in sft_seconds:
                values["time"].append(seconds / sft_seconds[seed])
        table[name] = values
    return table


def markdown(table: dict[str, dict[str, list[float]]]) -> str:
    """One row per method, one column per measurement, mean ± std over seeds (n in the last column)."""
    keys = [*HEADLINES, "time"]
    lines = ["| method | " + " | ".join(COLUMNS[k] for k in keys) + " | seeds |", "|---|" + "---:|" * (len(keys) + 1)]
    for name, values in table.items():
        cells = [_cell(values.get(k, []), 4 if k == "drift" else 2) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(values['refusal'])} |")
    return "\n".join(lines)


def plot(tables: dict[str, dict], path: Path) -> None:
    """Bars with seed-spread error bars per attack: refusal on both harmful sets, over-refusal, SST-2 accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["refusal", "refusal_unlike", "over_refusal", "task"]
    figure, axes = plt.subplots(len(tables), 1, figsize=(12, 3.8 * len(tables)), squeeze=False)
    for ax, (attack, table) in zip(axes[:, 0], tables.items()):
        names = list(table)
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            means = [statistics.mean(table[name][k]) if table[name][k] else 0.0 for k in keys]
            errors = [statistics.stdev(table[name][k]) if len(table[name][k]) > 1 else 0.0 for k in keys]
            ax.bar([x + i * width for x in range(len(keys))], means, width, yerr=errors, capsize=3, label=name)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))], [COLUMNS[k] for k in keys], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"attack: {attack}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=len(names))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_order(attacks: list[str], seeds: list[int], methods: list[str], online: bool) -> list[tuple[str, int, str]]:
    """(attack, seed, method) in the order they run: the first seed of every attack (the online control after the
    first attack's methods), then the first attack's other seeds; the report after each run shows what has finished."""
    order = []
    for index, attack in enumerate(attacks):
        order += [(attack, seeds[0], method) for method in methods]
        if index == 0 and online:
            order.append((attack, seeds[0], "pact-online"))
    return order + [(attacks[0], seed, method) for seed in seeds[1:] for method in methods]


def write_report(out: Path, attacks: list[str], seeds: list[int], online: bool) -> str:
    """OUT/report.md (one table per attack) and OUT/report.png from the runs that have finished."""
    tables = {attack: collect(out, attack, seeds if i == 0 else seeds[:1], i == 0 and online) for i, attack in enumerate(attacks)}
    report = "\n\n".join(f"### attack: {attack}\n\n{markdown(table)}" for attack, table in tables.items())
    (out / "report.md").write_text(report + "\n", encoding="utf-8")
    plot(tables, out / "report.png")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refusals", required=True, help="refusals.jsonl (harmful requests with refusals)")
    parser.add_argument("--sst2", required=True, help="sst2_5k.jsonl (benign task data)")
    parser.add_argument("--attack", required=True, help="sst2_5k_harmful10.jsonl (the harmful fine-tuning attack set)")
    parser.add_argument("--out", required=True, help="run directory (stages already there are skipped)")
    parser.add_argument("--model", default=None, help="starting model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--benign", default=str(DATA / "benign_alignment.jsonl"),
                        help="benign prompts whose self-distilled answers join the reference's data (default: the project's)")
    parser.add_argument("--distill-tokens", type=int, default=96, help="longest self-distilled answer (default 96)")
    parser.add_argument("--ref-rows", type=int, default=600, help="refusal rows for the reference (default 600)")
    parser.add_argument("--ref-sst2", type=int, default=300, help="SST-2 rows for the reference (default 300)")
    parser.add_argument("--ref-steps", type=int, default=150, help="reference full fine-tuning steps (default 150)")
    parser.add_argument("--ref-lr", type=float, default=5e-5, help="reference learning rate (default 5e-5)")
    parser.add_argument("--ref-seed", type=int, default=0, help="seed of the reference's data mix and order (default 0)")
    parser.add_argument("--safety-rows", type=int, default=128, help="refusal rows after the reference's for safety tokens (default 128)")
    parser.add_argument("--attacks", default="mix,pure", help="attacks to run, in order (default mix,pure)")
    parser.add_argument("--mix-rows", type=int, default=1000, help="mix attack: first rows of the attack set (default 1000)")
    parser.add_argument("--pure-rows", type=int, default=200, help="pure attack: first harmful rows (default 200)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the first attack (the others run the first seed only)")
    parser.add_argument("--steps", type=int, default=125, help="LoRA fine-tuning steps (default 125)")
    parser.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate (default 2e-4)")
    parser.add_argument("--scheduler", default="constant", help="learning-rate schedule (default constant)")
    parser.add_argument("--no-online", action="store_true", help="skip the online-PACT control")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"methods to run (default {','.join(METHODS)}); processes sharing an --out may split them")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size everywhere (default 8)")
    parser.add_argument("--max-length", type=int, default=256, help="token limit per example (default 256)")
    parser.add_argument("--eval-harmful", type=int, default=100, help="held-out harmful requests: the last N refusal rows (default 100)")
    parser.add_argument("--eval-sst2", type=int, default=200, help="held-out SST-2 rows: the last N rows (default 200)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation length for refusal evals (default 64)")
    parser.add_argument("--reference-only", action="store_true", help="stop after building and evaluating the reference")
    args = parser.parse_args()
    if args.ref_rows + args.safety_rows > 1035 - args.eval_harmful:
        raise SystemExit("refusal rows for the reference, safety tokens and evaluation overlap; lower the counts")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    stages.run("a distill", out / "benign_distilled.jsonl", lambda: distill_benign(args, out))
    stages.run("a reference", out / "reference", lambda: make_reference(args, out))
    stages.run("b safety tokens", out / "safety_tokens.json", lambda: make_safety_tokens(args, out))
    held_out = [row for row in _read_jsonl(args.refusals)[-args.eval_harmful :]]
    stages.run("c cache heldout", out / "cache-heldout" / "manifest.json",
               lambda: build_cache(out, _write_jsonl(out / "heldout_refusals.jsonl", held_out), out / "cache-heldout"))
    stages.run("e reference", out / "reference-eval" / "eval.json", lambda: evaluate(args, out, out / "reference-eval", None))
    if args.reference_only:
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    attacks = args.attacks.split(",")
    for attack in attacks:
        stages.run(f"c cache {attack}", out / f"cache-{attack}" / "manifest.json",
                   lambda: build_cache(out, _write_jsonl(out / f"attack-{attack}.jsonl", attack_rows(args, attack)),
                                       out / f"cache-{attack}"))
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; choose among {', '.join(METHODS)}")
    for attack, seed, method in run_order(attacks, seeds, methods, not args.no_online):
        run = out / attack / f"{method}-seed{seed}"
        work = (lambda: finetune_online(args, out, attack, seed, run)) if method == "pact-online" else \
            (lambda: finetune(args, out, attack, method, seed, run))
        stages.run(f"d {attack} {method} {seed}", run / "adapter_model.safetensors", work)
        stages.run(f"e {attack} {method} {seed}", run / "eval.json", lambda: evaluate(args, out, run, run))
        report = write_report(out, attacks, seeds, not args.no_online)
    print(report)
    print(f"stage seconds: {json.dumps(stages.timings)}")
    print(f"report: {out / 'report.md'}, {out / 'report.png'}")


if __name__ == "__main__":
    main()
