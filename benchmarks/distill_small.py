"""Knowledge distillation from a KD cache at small scale, on this machine's CPU: does a student distilled from a
cache (`pact-cache build --kd_top_k K --teacher T`, then `pact train --objective kd`, no teacher in memory) learn
what online distillation (the teacher in memory) teaches it, at the cost of plain SFT?

(a) The teacher: the embedded SmolLM2-135M-Instruct (or --model) FULLY fine-tuned on the first --teacher-rows
    SST-2 rows (`pact train --full --objective pact --lam 0`: plain SFT of every weight, from a cache of those rows
    that only serves their tokens), saved as a model folder.
(b) The student's cache, built once: `pact-cache build --model <the original model> --teacher <teacher>
    --kd_top_k K` on the next --student-rows SST-2 rows (disjoint from the teacher's: the teacher's soft labels on
    them are predictions, not recalled training answers).
(c) Three LoRA students of the original model per seed, on the same cache, rows, steps, learning rate, LoRA
    initialisation and batch order (`pact train --seed` seeds both), each training in its own subprocess (so its
    peak RSS is its own; the order of the three rotates from seed to seed, so a drift in the machine's load does
    not always fall on the same method):
      sft:     `pact train --objective pact --lam 0`, plain SFT (CE on the gold answer only; the safety-token KL
               is computed for the log, detached). Not `--objective kd --kd_alpha 0`: that has the same gradient
               but computes the distillation term too, so it would hide what KD costs over SFT;
      kd:      `pact train --objective kd` (--kd-loss, --kd-temperature, --kd-alpha): (1 - alpha) CE + alpha KD to
               the cached top-K and tail, no teacher in memory;
      online:  the same objective and loop (`pact.training.train.train` with a `PactTrainer` subclass passing
               `targets=OnlineTeacher(teacher, K)`): the teacher in memory fills each batch's top-K live, on the
               same cache's rows (its stored top-K is decoded and replaced).
(d) Every model is evaluated on held-out SST-2 rows used by neither teacher nor students (`--split test`: the last
    --eval-rows rows of the file; `--split dev`: the --eval-rows rows before them, for choosing hyperparameters,
    never reported as results): task accuracy as `pact eval task` computes it (pact.evaluation.task: the label
    scored highest under the chat template), and agreement with the teacher (the share of rows where a model's
    label equals the teacher's). Training cost: the median `metrics.jsonl` seconds per step (the first step left
    out) and the training process's peak RSS, both as ratios to the SFT run of the same seed.
(e) OUT/report[-dev].md and OUT/report[-dev].json: the table (mean ± standard deviation over seeds) and every
    per-seed number behind it.

Every hyperparameter default was fixed before any held-out (test) result was seen. Every stage writes its result
under --out and is skipped when that result exists, so an interrupted run continues where it stopped; a stage that
was cut off midway starts over. Training does not depend on --split: a dev run's models serve a later test run.

    python benchmarks/distill_small.py --sst2 ../shared/data/sst2_5k.jsonl --out runs/distill
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_small import Stages, mean_std_cell, read_jsonl, write_json, write_jsonl  # noqa: E402  (the stage runner, atomic files, cells)

METHODS = ("sft", "kd", "online")
LABELS = {"original": "original model (no fine-tuning)", "teacher": "teacher (full fine-tuning)",
          "sft": "SFT (`--objective pact --lam 0`)", "kd": "cached KD (`--objective kd`)",
          "online": "online KD (`OnlineTeacher`, teacher in memory)"}
SPLITS = ("test", "dev")


# --- (a), (b): data slices, the teacher, the student's cache -------------------------------------------------------


def row_slices(args, total: int) -> dict[str, slice]:
    """Which rows of --sst2 each part uses: teacher, student, dev, test (disjoint; refused if they would overlap)."""
    student_end = args.teacher_rows + args.student_rows
    if student_end > total - 2 * args.eval_rows:
        raise SystemExit(f"--sst2 has {total} rows: the teacher's {args.teacher_rows}, the students' {args.student_rows} and "
                         f"2 x --eval-rows {args.eval_rows} (dev and test) do not fit without overlapping; lower the counts")
    return {"teacher": slice(0, args.teacher_rows), "student": slice(args.teacher_rows, student_end),
            "dev": slice(total - 2 * args.eval_rows, total - args.eval_rows), "test": slice(total - args.eval_rows, total)}


def write_data(args, out: Path) -> None:
    """OUT/data/{teacher,student}.jsonl: the training rows of each, sliced from --sst2 (kept under --out only)."""
    rows = read_jsonl(args.sst2)
    slices = row_slices(args, len(rows))
    write_jsonl(out / "data" / "student.jsonl", rows[slices["student"]])
    write_jsonl(out / "data" / "teacher.jsonl", rows[slices["teacher"]])  # written last: the stage's marker


def _pact_cache(argv: list[str], what: str) -> None:
    """`pact-cache ARGV` in this process, stopping the script on failure."""
    from pact.cli.cache import main as cache_main

    code = cache_main(argv)
    if code:
        raise SystemExit(f"{what} failed (pact-cache exit {code}); command: pact-cache {' '.join(argv)}")


def make_safety_tokens(args, out: Path) -> None:
    """A safety-token file for the caches. Every cache holds PACT's targets for its safety tokens, but neither plain
    SFT (lambda 0) nor KD uses them, so a few of the bundled refusals are enough to make one quickly."""
    from pact.cli.main import main as pact_main

    argv = ["safety-tokens", "--max_examples", "16", "--device", "cpu", "--quiet", "--out", str(out / "safety_tokens.json")]
    if args.model:
        argv += ["--aligned", args.model]
    if pact_main(argv):
        raise SystemExit(f"pact {' '.join(argv)} failed")


def cache_done(directory: Path) -> bool:
    manifest = directory / "manifest.json"
    return manifest.exists() and bool(json.loads(manifest.read_text()).get("complete"))


def build_cache(args, out: Path, data: Path, target: Path, teacher: Path | None) -> None:
    """A cache of `data` with the original model as the reference; with `teacher`, its top --kd-top-k per response
    token too. An interrupted build is replaced."""
    argv = ["build", "--data", str(data), "--out", str(target), "--safety-tokens", str(out / "safety_tokens.json"),
            "--max-length", str(args.max_length), "--device", "cpu", "--threads", str(args.threads), "--quiet"]
    if args.model:
        argv += ["--model", args.model]
    if teacher is not None:
        argv += ["--kd_top_k", str(args.kd_top_k), "--teacher", str(teacher)]
    if target.exists():
        argv.append("--overwrite")
    _pact_cache(argv, f"cache build of {data}")


def common_train_flags(args) -> list[str]:
    return ["--device", "cpu", "--disable_tqdm", "true"]


def teacher_flags(args, out: Path) -> list[str]:
    """`pact train` flags of the teacher: full fine-tuning, plain SFT (lambda 0)."""
    return ["--cache", str(out / "teacher-cache"), "--output_dir", str(out / "teacher"), "--full", "--objective", "pact",
            "--lam", "0", "--max_steps", str(args.teacher_steps), "--batch-size", str(args.batch_size), "--lr",
            str(args.teacher_lr), "--seed", str(args.teacher_seed), *common_train_flags(args)]


def student_flags(args, out: Path, method: str, seed: int) -> list[str]:
    """`pact train` flags of a student run (the online run takes the kd run's, its targets coming from the teacher)."""
    flags = ["--cache", str(out / "student-cache"), "--output_dir", str(run_dir(out, method, seed)), "--max_steps",
             str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--scheduler", args.scheduler,
             "--seed", str(seed), "--lora_r", str(args.lora_r), *common_train_flags(args)]
    if method == "sft":
        return flags + ["--objective", "pact", "--lam", "0"]
    return flags + ["--objective", "kd", "--kd_loss", args.kd_loss, "--kd_temperature", str(args.kd_temperature),
                    "--kd_alpha", str(args.kd_alpha)]


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / f"{method}-seed{seed}"


def train_in_subprocess(args, flags: list[str], result: Path, teacher: Path | None = None) -> None:
    """One `pact train FLAGS` run (online: with `teacher` in memory) in its own process; its step times, peak RSS and
    wall time go to `result`. A folder an interrupted run left is removed first."""
    output_dir = Path(flags[flags.index("--output_dir") + 1])
    if output_dir.exists():
        shutil.rmtree(output_dir)
    spec = {"flags": flags, "teacher": str(teacher) if teacher else None, "kd_top_k": args.kd_top_k, "result": str(result),
            "threads": args.threads}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1",
           "PYTHONSAFEPATH": "1"}
    completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], env=env,
                               capture_output=True, text=True, check=False)
    if completed.returncode != 0 or not result.exists():
        raise SystemExit(f"training into {output_dir} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    summary = json.loads(result.read_text())
    print(f"  {output_dir.name}: {summary['steps']} steps, median {summary['step_s']:.2f} s/step, peak RSS "
          f"{summary['peak_rss_mb']:.0f} MB, final loss {summary['final'].get('loss', float('nan')):.4f}", flush=True)


def worker(spec: dict) -> None:
    """The training subprocess: `pact train FLAGS` (parsed by pact's own parser) through `pact.training.train.train`,
    with `OnlineTeacher` as the targets when a teacher is named. Writes the run's cost to spec['result']."""
    import resource

    import torch
    from pact.cli.main import build_parser
    from pact.cli.train import parse
    from pact.training.train import train
    from pact.training.trainer import PactTrainer

    torch.set_num_threads(spec["threads"])
    objective, training = parse(build_parser().parse_args(["train", *spec["flags"]]))
    trainer_class = PactTrainer
    if spec["teacher"]:
        from pact.models.loading import load_model
        from pact.objective.distillation import OnlineTeacher

        teacher = load_model(spec["teacher"], device="cpu", dtype="float32").model.eval()
        teacher.requires_grad_(False)
        top_k = spec["kd_top_k"]

        class OnlineKDTrainer(PactTrainer):
            """`PactTrainer` whose batch targets come from the teacher in memory (train() passes targets=None)."""

            def __init__(self, *args, targets=None, **kwargs):
                super().__init__(*args, targets=OnlineTeacher(teacher, top_k, targets), **kwargs)

        trainer_class = OnlineKDTrainer
    started = time.perf_counter()
    result = train(training, objective, trainer_class=trainer_class)
    wall = time.perf_counter() - started
    seconds = [m["seconds"] for m in result.metrics]
    timed = seconds[1:] if len(seconds) > 1 else seconds
    write_json(Path(spec["result"]), {
        "flags": spec["flags"], "online_teacher": spec["teacher"], "steps": result.steps, "step_s": statistics.median(timed),
        "step_seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": wall,
        "final": result.metrics[-1] if result.metrics else {}})


# --- (d) evaluation ----------------------------------------------------------------------------------------------------


def eval_path(out: Path, name: str, split: str) -> Path:
    return out / f"eval-{split}" / f"{name}.json"


def evaluate(args, out: Path, name: str, split: str, model: str | None, adapter: Path | None) -> None:
    """Task accuracy of one model (a folder or the original model, with a LoRA adapter or not) on a split's rows, with
    every row's predicted label, into OUT/eval-SPLIT/NAME.json."""
    import torch
    from pact.data.rows import load_conversations
    from pact.evaluation.task import evaluate_task, label_set
    from pact.models.adapters import load_student

    conversations, _ = load_conversations(args.sst2)
    rows = conversations[row_slices(args, len(conversations))[split]]
    loaded = load_student(model, str(adapter) if adapter else None, device="cpu", dtype="float32")
    with torch.inference_mode():
        result = evaluate_task(loaded.model, loaded.tokenizer, rows, batch_size=16, progress=False,
                               labels=label_set(conversations, args.sst2))
    write_json(eval_path(out, name, split), {**result.to_dict(), "predicted": result.predicted, "gold": result.gold})
    del loaded
    gc.collect()
    print(f"  {name} ({split}): accuracy {result.accuracy:.3f}", flush=True)


# --- (e) the report ----------------------------------------------------------------------------------------------------


def _agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def collect(args, out: Path, split: str) -> dict:
    """Every finished measurement of a split: per model and seed, accuracy, agreement with the teacher, and (students)
    training cost with its ratios to the same seed's SFT run."""
    def read(path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.exists() else None

    teacher = read(eval_path(out, "teacher", split))
    rows: dict[str, dict] = {}
    for name in ("original", "teacher"):
        result = read(eval_path(out, name, split))
        if result:
            rows[name] = {"seeds": [None], "accuracy": [result["accuracy"]],
                          "agreement": [_agreement(result["predicted"], teacher["predicted"])] if teacher else []}
    for method in [m for m in METHODS if m in args.methods]:
        entry = {"seeds": [], "accuracy": [], "agreement": [], "step_s": [], "peak_rss_mb": [], "time_ratio": [],
                 "memory_ratio": [], "final_loss": [], "final_kd": [], "train_wall_s": []}
        for seed in args.seeds:
            result = read(eval_path(out, f"{method}-seed{seed}", split))
            cost = read(run_dir(out, method, seed) / "train_result.json")
            if result is None or cost is None:
                continue
            sft = read(run_dir(out, "sft", seed) / "train_result.json")
            entry["seeds"].append(seed)
            entry["accuracy"].append(result["accuracy"])
            if teacher:
                entry["agreement"].append(_agreement(result["predicted"], teacher["predicted"]))
            entry["step_s"].append(cost["step_s"])
            entry["peak_rss_mb"].append(cost["peak_rss_mb"])
            entry["train_wall_s"].append(cost["wall_s"])
            entry["final_loss"].append(cost["final"].get("loss"))
            entry["final_kd"].append(cost["final"].get("kd"))
            if sft:
                entry["time_ratio"].append(cost["step_s"] / sft["step_s"])
                entry["memory_ratio"].append(cost["peak_rss_mb"] / sft["peak_rss_mb"])
        rows[method] = entry
    same = []  # how often the cached-KD and online-KD students of a seed give the same label
    for seed in args.seeds:
        kd, online = read(eval_path(out, f"kd-seed{seed}", split)), read(eval_path(out, f"online-seed{seed}", split))
        if kd and online:
            same.append(_agreement(kd["predicted"], online["predicted"]))
    majority = (teacher or read(eval_path(out, "original", split)) or {}).get("majority_accuracy")
    return {"rows": rows, "cached_vs_online_same_label": same, "majority_accuracy": majority}


def settings_of(args) -> dict:
    keys = ("sst2", "model", "teacher_rows", "teacher_steps", "teacher_lr", "teacher_seed", "student_rows", "steps",
            "batch_size", "lr", "scheduler", "lora_r", "seeds", "kd_top_k", "kd_loss", "kd_temperature", "kd_alpha",
            "eval_rows", "max_length", "threads")
    return {key: getattr(args, key) for key in keys}


def write_report(args, out: Path, split: str, stages: Stages) -> str:
    """OUT/report[-dev].md and .json from what has finished."""
    collected = collect(args, out, split)
    rows = collected["rows"]
    slices = row_slices(args, len(read_jsonl(args.sst2)))
    heads = ["model", f"SST-2 accuracy ({split}, n={args.eval_rows})", "agreement with teacher", "step time / SFT",
             "peak RSS / SFT", "step s", "peak RSS MB", "seeds"]
    lines = ["| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
    for name, entry in rows.items():
        student = name in METHODS
        n = len(entry["seeds"]) if student else 1
        cells = [LABELS[name], mean_std_cell(entry["accuracy"], 3), mean_std_cell(entry["agreement"], 3),
                 mean_std_cell(entry.get("time_ratio", []), 2) if student else "-",
                 mean_std_cell(entry.get("memory_ratio", []), 2) if student else "-",
                 mean_std_cell(entry.get("step_s", []), 2) if student else "-",
                 mean_std_cell(entry.get("peak_rss_mb", []), 0) if student else "-", str(n) if student else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    same = collected["cached_vs_online_same_label"]
    teacher_cost = out / "teacher" / "train_result.json"
    notes = [
        (f"Rows of `{Path(args.sst2).name}`: teacher {slices['teacher'].start}-{slices['teacher'].stop - 1}, students "
         f"{slices['student'].start}-{slices['student'].stop - 1} (disjoint from the teacher's), {split} "
         f"{slices[split].start}-{slices[split].stop - 1} (used by neither). Majority-label accuracy of the {split} rows: "
         f"{collected['majority_accuracy']:.3f}.") if collected["majority_accuracy"] is not None else "",
        (f"Teacher: full fine-tuning, plain SFT, {args.teacher_steps} steps x batch {args.batch_size}, lr {args.teacher_lr}"
         + (f" ({json.loads(teacher_cost.read_text())['wall_s']:.0f} s)." if teacher_cost.exists() else ".")),
        (f"Students: LoRA r={args.lora_r} on q_proj,v_proj of the original model, {args.steps} steps x batch "
         f"{args.batch_size}, lr {args.lr} ({args.scheduler}), seeds {','.join(map(str, args.seeds))}; KD: {args.kd_loss} KL "
         f"over the teacher's top-{args.kd_top_k} + tail, temperature {args.kd_temperature}, alpha {args.kd_alpha} "
         f"((1 - alpha) CE + alpha KD). Step time: median seconds per step of `metrics.jsonl` (first step left out); "
         f"peak RSS: the training process's; ratios to the SFT run of the same seed, then mean ± std over seeds."),
        (f"Cached-KD and online-KD students of the same seed give the same label on "
         f"{mean_std_cell(same, 3)} of the rows.") if same else "",
    ]
    report = "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes if n) + "\n"
    suffix = "" if split == "test" else f"-{split}"
    (out / f"report{suffix}.md").write_text(report, encoding="utf-8")
    write_json(out / f"report{suffix}.json", {"split": split, "settings": settings_of(args), "slices": {
        k: [s.start, s.stop] for k, s in slices.items()}, **collected, "stage_seconds": stages.timings})
    return report


# --- the run -------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sst2", help="sst2_5k.jsonl: SST-2 as Alpaca-style instructions (required)")
    parser.add_argument("--out", help="run directory; stages whose outputs are already there are skipped (required)")
    parser.add_argument("--model", default=None,
                        help="the student's starting model and the teacher's (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--teacher-rows", type=int, default=400, help="first SST-2 rows the teacher trains on (default 400)")
    parser.add_argument("--teacher-steps", type=int, default=50,
                        help="teacher full fine-tuning steps (default 50: one epoch of 400 rows at batch 8)")
    parser.add_argument("--teacher-lr", type=float, default=5e-5, help="teacher learning rate, linear decay (default 5e-5)")
    parser.add_argument("--teacher-seed", type=int, default=0, help="seed of the teacher's run (default 0)")
    parser.add_argument("--student-rows", type=int, default=128,
                        help="SST-2 rows after the teacher's that the students train on (default 128)")
    parser.add_argument("--steps", type=int, default=32, help="student LoRA steps (default 32: two epochs of 128 rows)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step, teacher and students (default 8)")
    parser.add_argument("--lr", type=float, default=3e-4, help="student learning rate (default 3e-4)")
    parser.add_argument("--scheduler", default="constant", help="student learning-rate schedule (default constant)")
    parser.add_argument("--lora-r", type=int, default=8, help="student LoRA rank, on q_proj,v_proj (default 8)")
    parser.add_argument("--seeds", default="0,1,2",
                        help="student seeds, comma-separated: each runs the three methods (default 0,1,2)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"student methods to run, a subset of {','.join(METHODS)} (default all; sft is the "
                             "baseline of the cost ratios)")
    parser.add_argument("--kd-top-k", type=int, default=50, help="teacher top-K stored per response token (default 50)")
    parser.add_argument("--kd-loss", default="forward", choices=("forward", "reverse", "jsd"),
                        help="divergence to the teacher (`pact train --kd_loss`; default forward)")
    parser.add_argument("--kd-temperature", type=float, default=1.0, help="`pact train --kd_temperature` (default 1.0)")
    parser.add_argument("--kd-alpha", type=float, default=0.5,
                        help="`pact train --kd_alpha`, the KD share: (1 - alpha) CE + alpha KD (default 0.5)")
    parser.add_argument("--eval-rows", type=int, default=200,
                        help="held-out rows: the last N of the file (test), the N before them (dev) (default 200)")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="evaluate on the test rows (reported) or the dev rows (for choosing settings) (default test)")
    parser.add_argument("--max-length", type=int, default=256, help="token limit per example (default 256)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of every stage (default 1: on a shared machine more threads than free cores make "
                             "steps erratic)")
    parser.add_argument("--report-only", action="store_true", help="run nothing: rewrite the report from what has finished")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if not args.sst2 or not args.out:
        parser.error("--sst2 and --out are required")
    if not Path(args.sst2).is_file():
        parser.error(f"--sst2 {args.sst2}: no such file (give the path of sst2_5k.jsonl)")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds}: expected integers, comma-separated")
    args.methods = [m for m in args.methods.split(",") if m]
    if not args.seeds or not args.methods or set(args.methods) - set(METHODS):
        parser.error(f"--seeds needs at least one seed and --methods a non-empty subset of {','.join(METHODS)}")
    for name in ("teacher_rows", "teacher_steps", "student_rows", "steps", "batch_size", "eval_rows", "kd_top_k", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    split = args.split
    if args.report_only:
        print(write_report(args, out, split, stages))
        return
    started = time.perf_counter()
    _ = row_slices(args, len(read_jsonl(args.sst2)))  # refuses overlapping slices before any work
    stages.run("a data", out / "data" / "teacher.jsonl", lambda: write_data(args, out))
    stages.run("a safety tokens", out / "safety_tokens.json", lambda: make_safety_tokens(args, out))
    stages.run("a teacher cache", lambda: cache_done(out / "teacher-cache"),
               lambda: build_cache(args, out, out / "data" / "teacher.jsonl", out / "teacher-cache", None))
    teacher = out / "teacher"
    stages.run("a teacher", teacher / "train_result.json",
               lambda: train_in_subprocess(args, teacher_flags(args, out), teacher / "train_result.json"))
    stages.run("b student cache", lambda: cache_done(out / "student-cache"),
               lambda: build_cache(args, out, out / "data" / "student.jsonl", out / "student-cache", teacher))
    base = json.loads((out / "student-cache" / "manifest.json").read_text())["model_source"]
    stages.run(f"d eval original {split}", eval_path(out, "original", split),
               lambda: evaluate(args, out, "original", split, base, None))
    stages.run(f"d eval teacher {split}", eval_path(out, "teacher", split),
               lambda: evaluate(args, out, "teacher", split, str(teacher), None))
    for index, seed in enumerate(args.seeds):
        order = [m for m in METHODS[index % 3:] + METHODS[: index % 3] if m in args.methods]
        for method in order:
            directory = run_dir(out, method, seed)
            stages.run(f"c train {method} seed{seed}", directory / "train_result.json",
                       lambda method=method, seed=seed, directory=directory: train_in_subprocess(
                           args, student_flags(args, out, method, seed), directory / "train_result.json",
                           teacher if method == "online" else None))
        for method in order:
            name = f"{method}-seed{seed}"
            stages.run(f"d eval {name} {split}", eval_path(out, name, split),
                       lambda method=method, seed=seed, name=name: evaluate(args, out, name, split, base, run_dir(out, method, seed)))
        write_report(args, out, split, stages)
    if stages.ran:  # a resumed run adds its own wall time under a new key
        key = f"total ({split})"
        count = sum(1 for k in stages.timings if k.startswith(key))
        stages.timings[key if not count else f"{key} #{count + 1}"] = round(time.perf_counter() - started, 1)
        write_json(stages.path, stages.timings)
    print(write_report(args, out, split, stages))
    suffix = "" if split == "test" else f"-{split}"
    print(f"report: {out / f'report{suffix}.md'}, {out / f'report{suffix}.json'}; wall time of this invocation "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
