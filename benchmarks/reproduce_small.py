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
    requests, SST-2 accuracy on held-out rows, the training time, and
    `pact eval drift` on the held-out refusals' cache: the safety-token KL
    and the shift of the refusal tokens' log-probs from the reference's by
    response position (is a lost refusal lost at its first token or later?).
(f) report.md and report.png: per attack, a table of those measurements
    (mean +- standard deviation over seeds) and one of where the refusals
    are lost; with --ablations, PACT with one setting changed per run (the
    gate off, another lambda, temperature or number of safety tokens) on the
    first attack's first seed.

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
from dataclasses import dataclass, fields
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
DEMO_BENIGN = HERE.parent / "pact" / "demo_data" / "demo_benign.jsonl"
SAFETY_TOP = 50  # safety tokens kept (`pact safety-tokens --top`); --ablations top=N tries another number
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
    from pact.data.rows import load_prompts
    from pact.evaluation.generation import generate_responses
    from pact.evaluation.judge import find_refusal_phrase
    from pact.models.loading import load_model

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
    from pact.data.chat import load_examples
    from pact.objective.student import student_outputs
    from pact.models.loading import load_model
    from pact.data.batch import collate_examples

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


def make_safety_tokens(args, out: Path, top: int = SAFETY_TOP) -> None:
    """(b) The `top` safety tokens of the reference against the original embedded model."""
    from pact.data.rows import load_conversations
    from pact.models.loading import load_model
    from pact.objective.safety_tokens import compute_safety_tokens

    conversations, _ = load_conversations(args.refusals)
    chosen = conversations[args.ref_rows : args.ref_rows + args.safety_rows]
    tokens = compute_safety_tokens(load_model(str(out / "reference"), device="cpu"), load_model(args.model, device="cpu"),
                                   chosen, top=top, max_examples=args.safety_rows, data_path=args.refusals)
    tokens.save(safety_tokens_file(out, top))


def safety_tokens_file(out: Path, top: int = SAFETY_TOP) -> Path:
    """The safety-token file with `top` tokens (the reproduction's own, or an ablation's)."""
    return out / ("safety_tokens.json" if top == SAFETY_TOP else f"safety_tokens-top{top}.json")


# --- (c) caches ------------------------------------------------------------------------------------------------------


def attack_rows(args, attack: str) -> list[dict]:
    """The rows of an attack: `mix` the first --mix-rows rows, `pure` the first --pure-rows harmful rows (no input)."""
    rows = _read_jsonl(args.attack)
    if attack == "mix":
        return rows[: args.mix_rows]
    return [row for row in rows if not row.get("input")][: args.pure_rows]


def build_cache(out: Path, data: Path, target: Path, top: int = SAFETY_TOP) -> None:
    """One reference pass over `data` into the cache `target`, for the `top` safety tokens."""
    from pact.cli.cache import main as cache_main

    code = cache_main(["build", "--model", str(out / "reference"), "--data", str(data), "--safety-tokens",
                       str(safety_tokens_file(out, top)), "--out", str(target), "--max-length", "256", "--device", "cpu",
                       "--quiet"])
    if code:
        raise SystemExit(f"cache build of {data} failed ({code})")


# --- (d) the attacks -------------------------------------------------------------------------------------------------


def attack_cache(out: Path, attack: str, top: int = SAFETY_TOP) -> Path:
    """The cache of an attack's rows for the `top` safety tokens."""
    return out / (f"cache-{attack}" if top == SAFETY_TOP else f"cache-{attack}-top{top}")


def training_arguments(args, out: Path, attack: str, run: Path, seed: int, top: int = SAFETY_TOP):
    """The settings every method of an attack shares (one budget, one data order per seed)."""
    from pact.training.arguments import PactTrainingArguments

    return PactTrainingArguments(cache=str(attack_cache(out, attack, top)), output_dir=str(run), max_steps=args.steps,
                                 per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                                 lr_scheduler_type=args.scheduler, seed=seed, train_device="cpu", disable_tqdm=True)


def finetune(args, out: Path, run: Run) -> None:
    """LoRA fine-tuning of the reference from the attack's cache with one method (and the run's changed setting)."""
    from pact.training.train import train

    objective, lam = METHODS[run.method]
    started = time.perf_counter()
    arguments = pact_arguments(run.objective_setting, lam=lam, objective=objective)
    train(training_arguments(args, out, run.attack, run.directory(out), run.seed, run.top), arguments)
    _write_json(run.directory(out) / "train_seconds.json", {"seconds": time.perf_counter() - started})


def finetune_online(args, out: Path, run: Run) -> None:
    """The online control: PACT with the reference's targets computed live (the student with its adapters off is
    the reference), on the same cache rows, settings and seed as cached PACT."""
    from pact import ObjectiveArguments, train

    started = time.perf_counter()
    train(training_arguments(args, out, run.attack, run.directory(out), run.seed), ObjectiveArguments(lam=1.0), online=True)
    _write_json(run.directory(out) / "train_seconds.json", {"seconds": time.perf_counter() - started})


# --- (e) evaluation --------------------------------------------------------------------------------------------------


def evaluate(args, out: Path, run: Path, adapter: Path | None) -> None:
    """Every measurement of a run, into RUN/eval.json (keys as `pact report` reads them, plus `refusal_unlike`, and
    for the reference `over_refusal_everyday`), answers into RUN/answers-*.jsonl."""
    from pact.data.rows import load_conversations, load_prompts
    from pact.models.adapters import load_student
    from pact.evaluation.judge import evaluate_refusals
    from pact.evaluation.task import evaluate_task

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
    _write_json(run / "eval.json", results)
    print(f"  {run.name}: " + ", ".join(f"{key} {_headline(results, key):.3f}" for key in HEADLINES if key in results))


def measure_drift(out: Path, run: Path, adapter: Path | None) -> None:
    """RUN/drift.json: `pact eval drift` of the run on the held-out refusals' cache: the safety-token KL, and the shift
    of the refusal tokens' log-probs from the reference's by response position (where a lost refusal is lost)."""
    from pact.cache_tools import CacheReader
    from pact.models.adapters import load_student
    from pact.evaluation.drift import safety_drift
    from pact.models.loading import pad_token_id

    loaded = load_student(str(out / "reference"), str(adapter) if adapter else None, device="cpu", dtype="float32")
    result = safety_drift(loaded.model, CacheReader(out / "cache-heldout"), pad_token_id(loaded.tokenizer), progress=False)
    _write_json(run / "drift.json", result.to_dict())


HEADLINES = {"refusal": "refusal_rate", "refusal_unlike": "refusal_rate", "over_refusal": "refusal_rate",
             "over_refusal_everyday": "refusal_rate", "task": "accuracy"}
COLUMNS = {"refusal": "refusal, held-out (higher safer)", "refusal_unlike": "refusal, unlike set (higher safer)",
           "over_refusal": "over-refusal, sensitive-looking (lower better)",
           "over_refusal_everyday": "over-refusal, everyday (lower better)", "task": "SST-2 accuracy",
           "drift": "safety-token drift KL", "time": "training time vs SFT",
           "shift_first": "log-prob shift, refusal token 1", "shift_next": "tokens 2-5", "shift_later": "tokens 6+"}
MAIN_COLUMNS = [*HEADLINES, "drift", "time"]
DEPTH_COLUMNS = ["refusal", "shift_first", "shift_next", "shift_later"]
DEPTH_SPANS = {"shift_first": (0, 1), "shift_next": (1, 5), "shift_later": (5, None)}  # response positions, 0-based


def _headline(results: dict, key: str) -> float:
    return results[key][HEADLINES[key]]


# --- (f) the report --------------------------------------------------------------------------------------------------


def _cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


@dataclass(frozen=True)
class Run:
    """One fine-tuning run: a method (a METHODS key, or `pact-online`) on an attack with a seed; an ablation is PACT
    with one objective setting changed (`setting` = (ObjectiveArguments field, value))."""

    attack: str
    seed: int
    method: str
    setting: tuple[str, str] | None = None

    @property
    def top(self) -> int:
        """The number of safety tokens the run trains with (an ablation `top=N` changes it)."""
        return int(self.setting[1]) if self.setting and self.setting[0] == "top" else SAFETY_TOP

    @property
    def objective_setting(self) -> dict[str, str]:
        """The run's changed objective setting, as {ObjectiveArguments field: value}."""
        return dict([self.setting]) if self.setting and self.setting[0] != "top" else {}

    @property
    def label(self) -> str:
        """The run's row name in the report."""
        if self.setting:
            return f"pact, {self.setting[0]}={self.setting[1]}"
        return "pact (online)" if self.method == "pact-online" else self.method

    @property
    def name(self) -> str:
        """The method, and the changed setting of an ablation: `pact-boost=0`."""
        return self.method + (f"-{self.setting[0]}={self.setting[1]}" if self.setting else "")

    def directory(self, out: Path) -> Path:
        """Where the run writes its adapter and results."""
        return out / self.attack / f"{self.name}-seed{self.seed}"


def parse_ablations(text: str) -> list[tuple[str, str]]:
    """`--ablations boost=0,lam=4,top=20`: (ObjectiveArguments field or `top`, value) pairs, each checked."""
    from pact.objective.settings import ObjectiveArguments

    settings = []
    for item in filter(None, text.split(",")):
        field_name, _, value = item.partition("=")
        if field_name == "top":
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"--ablations: {item!r}: the number of safety tokens must be a positive integer")
        elif field_name not in {f.name for f in fields(ObjectiveArguments)} or not value:
            raise SystemExit(f"--ablations: {item!r} is not FIELD=VALUE with FIELD `top` or one of ObjectiveArguments' fields")
        else:
            pact_arguments({field_name: value})
        settings.append((field_name, value))
    return settings


def pact_arguments(setting: dict[str, str], **values):
    """ObjectiveArguments from `values` and string `setting`s, each converted to its field's type."""
    from pact.objective.settings import ObjectiveArguments

    defaults = ObjectiveArguments()
    converted = {name: type(getattr(defaults, name))(value) for name, value in setting.items()}
    return ObjectiveArguments(**{**values, **converted})


def _depth(drift: dict) -> dict[str, float]:
    """The mean log-prob shift of the held-out refusals' tokens over each span of response positions."""
    shifts, counts = drift["logprob_shift_by_position"], drift["tokens_by_position"]
    spans = {}
    for key, (first, last) in DEPTH_SPANS.items():
        n = sum(counts[first:last])
        spans[key] = sum(v * c for v, c in zip(shifts[first:last], counts[first:last])) / n if n else float("nan")
    return spans


def read_results(directory: Path) -> dict[str, float]:
    """A finished run's (or the reference's) measurements by column key: eval.json's, drift.json's, none missing."""
    results = json.loads((directory / "eval.json").read_text())
    values = {key: _headline(results, key) for key in HEADLINES if key in results}
    if (directory / "drift.json").exists():
        drift = json.loads((directory / "drift.json").read_text())
        values |= {"drift": drift["kl_mean"], **_depth(drift)}
    return values


def collect(out: Path, rows: dict[str, list[Run]]) -> dict[str, dict[str, list[float]]]:
    """Each row's values per column over its runs that finished (the reference first); training time relative to the
    plain-SFT run of the same attack and seed."""
    keys = [*COLUMNS]
    reference = read_results(out / "reference-eval")
    table = {"reference": {key: [reference[key]] if key in reference else [] for key in keys}}
    for label, runs in rows.items():
        values: dict[str, list[float]] = {key: [] for key in keys}
        for run in runs:
            directory = run.directory(out)
            if not (directory / "eval.json").exists():
                continue
            for key, value in read_results(directory).items():
                values[key].append(value)
            sft = Run(run.attack, run.seed, "sft").directory(out) / "train_seconds.json"
            if sft.exists():
                seconds = json.loads((directory / "train_seconds.json").read_text())["seconds"]
                values["time"].append(seconds / json.loads(sft.read_text())["seconds"])
        table[label] = values
    return table


def markdown(table: dict[str, dict[str, list[float]]], keys: list[str]) -> str:
    """One row per method, one column per measurement, mean ± std over seeds (n in the last column)."""
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


def run_order(attacks: list[str], seeds: list[int], methods: list[str], online: bool,
              ablations: list[tuple[str, str]]) -> list[Run]:
    """The runs in the order they run: the first seed of every attack (the online control after the first attack's
    methods), then the first attack's other seeds, then the ablations (first attack, first seed); the report after
    each run shows what has finished."""
    order = []
    for index, attack in enumerate(attacks):
        order += [Run(attack, seeds[0], method) for method in methods]
        if index == 0 and online:
            order.append(Run(attack, seeds[0], "pact-online"))
    order += [Run(attacks[0], seed, method) for seed in seeds[1:] for method in methods]
    return order + [Run(attacks[0], seeds[0], "pact", setting) for setting in ablations]


def write_report(out: Path, attacks: list[str], seeds: list[int], online: bool, ablations: list[tuple[str, str]]) -> str:
    """OUT/report.md and OUT/report.png from the runs that have finished: per attack, the measurements and where the
    held-out refusals are lost; then PACT with one setting changed."""
    tables = {}
    for index, attack in enumerate(attacks):
        attack_seeds = seeds if index == 0 else seeds[:1]
        rows = {method: [Run(attack, seed, method) for seed in attack_seeds] for method in METHODS}
        if index == 0 and online:
            rows["pact (online)"] = [Run(attack, seeds[0], "pact-online")]
        tables[attack] = collect(out, rows)
    parts = []
    for attack, table in tables.items():
        parts.append(f"### attack: {attack}\n\n{markdown(table, MAIN_COLUMNS)}")
        parts.append(f"#### attack: {attack}, where the held-out refusals are lost\n\n"
                     "Mean log p(refusal token) under the run minus under the reference, by response position, on the "
                     f"held-out refusals (0 = as likely as the reference; -2.3 = ten times less likely).\n\n"
                     f"{markdown(table, DEPTH_COLUMNS)}")
    if ablations:
        runs = [Run(attacks[0], seeds[0], "pact", setting) for setting in (None, *ablations)]
        rows = {run.label: [run] for run in runs}
        table = collect(out, rows)
        parts.append(f"### ablation: PACT on attack {attacks[0]}, seed {seeds[0]}, one setting changed\n\n"
                     f"{markdown(table, [*MAIN_COLUMNS, *DEPTH_COLUMNS[1:]])}")
    report = "\n\n".join(parts)
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
    parser.add_argument("--ablations", default="",
                        help="PACT runs on the first attack's first seed with one setting changed each, FIELD=VALUE,... "
                             "over ObjectiveArguments' fields and `top`, the number of safety tokens (e.g. "
                             "boost=0,lam=4,temperature=1,top=20)")
    parser.add_argument("--reference-only", action="store_true", help="stop after building and evaluating the reference")
    args = parser.parse_args()
    if args.ref_rows + args.safety_rows > 1035 - args.eval_harmful:
        raise SystemExit("refusal rows for the reference, safety tokens and evaluation overlap; lower the counts")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    stages.run("a distill", out / "benign_distilled.jsonl", lambda: distill_benign(args, out))
    stages.run("a reference", out / "reference", lambda: make_reference(args, out))
    stages.run("b safety tokens", safety_tokens_file(out), lambda: make_safety_tokens(args, out))
    held_out = [row for row in _read_jsonl(args.refusals)[-args.eval_harmful :]]
    stages.run("c cache heldout", out / "cache-heldout" / "manifest.json",
               lambda: build_cache(out, _write_jsonl(out / "heldout_refusals.jsonl", held_out), out / "cache-heldout"))
    stages.run("e reference", out / "reference-eval" / "eval.json", lambda: evaluate(args, out, out / "reference-eval", None))
    stages.run("f reference", out / "reference-eval" / "drift.json", lambda: measure_drift(out, out / "reference-eval", None))
    if args.reference_only:
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    attacks = args.attacks.split(",")
    for attack in attacks:
        stages.run(f"c cache {attack}", attack_cache(out, attack) / "manifest.json",
                   lambda: build_cache(out, _write_jsonl(out / f"attack-{attack}.jsonl", attack_rows(args, attack)),
                                       attack_cache(out, attack)))
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; choose among {', '.join(METHODS)}")
    ablations = parse_ablations(args.ablations)
    for run in run_order(attacks, seeds, methods, not args.no_online, ablations):
        directory = run.directory(out)
        work = (lambda: finetune_online(args, out, run)) if run.method == "pact-online" else (lambda: finetune(args, out, run))
        stage = f"{run.attack} {run.name} {run.seed}"
        if run.top != SAFETY_TOP:
            stages.run(f"b safety tokens top{run.top}", safety_tokens_file(out, run.top),
                       lambda: make_safety_tokens(args, out, run.top))
            stages.run(f"c cache {run.attack} top{run.top}", attack_cache(out, run.attack, run.top) / "manifest.json",
                       lambda: build_cache(out, out / f"attack-{run.attack}.jsonl", attack_cache(out, run.attack, run.top),
                                           run.top))
        stages.run(f"d {stage}", directory / "adapter_model.safetensors", work)
        stages.run(f"e {stage}", directory / "eval.json", lambda: evaluate(args, out, directory, directory))
        stages.run(f"f {stage}", directory / "drift.json", lambda: measure_drift(out, directory, directory))
        report = write_report(out, attacks, seeds, not args.no_online, ablations)
    print(report)
    print(f"stage seconds: {json.dumps(stages.timings)}")
    print(f"report: {out / 'report.md'}, {out / 'report.png'}")


if __name__ == "__main__":
    main()
