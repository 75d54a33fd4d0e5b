"""`benchmarks/gpu_check.py` keeps working without a GPU: its CPU run (`--cpu --quick`, Triton's interpreter) prints one
table listing every check, marks the GPU-only rows skipped, passes the rest and exits 0. It runs as on a GPU machine
without the embedded model's package: `--model` is a folder holding only a config and the embedded tokenizer's files,
given random weights by `--random-weights`."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from helpers import tiny_llama_config

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ["cuda-only tests", "objective parity cpu vs gpu", "host syncs per step", "kernel: ragged S, fp32",
          "kernel: float16", "kernel: bfloat16", "kernel: non-contiguous", "kernel: masked NaN/inf rows",
          "kernel: N*S > 2^31", "pact plan vs peak", "pact plan vs peak, checkpointing",
          "pact plan vs peak, 4-bit + checkpointing", "bench_masked_kl", "bench_train"]
GPU_ONLY = {"objective parity cpu vs gpu", "kernel: N*S > 2^31"}
NEEDS_BITSANDBYTES = "pact plan vs peak, 4-bit + checkpointing"
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


def config_and_tokenizer_only(folder: Path) -> Path:
    """A model folder with no weights: a small Llama config and the embedded model's tokenizer files."""
    from pact.models.loading import EMBEDDED_MODEL, load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    tokenizer.save_pretrained(folder)
    tiny_llama_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    assert not [f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin")]
    return folder


def test_the_cpu_run_lists_every_check_skips_only_the_gpu_ones_and_passes(tmp_path):
    model = config_and_tokenizer_only(tmp_path / "no-weights")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script must set it itself
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--quick",
                           "--model", str(model), "--random-weights"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert f"  {model} with random weights: saved" in "\n".join(lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("check ") and "| result" in line)
    assert [c.strip() for c in lines[header].split("|")] == ["check", "result", "figure", "limit"]
    cells = [[c.strip() for c in line.split("|")] for line in lines[header + 2: header + 2 + len(CHECKS)]]
    assert [row[0].split(" (")[0] for row in cells] == CHECKS, done.stdout
    results = {row[0].split(" (")[0]: row[1] for row in cells}
    for check in GPU_ONLY:
        assert results[check].startswith("skipped: no CUDA"), (check, results[check])
    assert results["cuda-only tests"].startswith("skipped: no CUDA (") and "0 failed" in cells[0][2]
    passing = set(CHECKS) - GPU_ONLY - {"cuda-only tests"}
    if not HAS_BITSANDBYTES:
        assert results[NEEDS_BITSANDBYTES].startswith("skipped: no bitsandbytes"), results[NEEDS_BITSANDBYTES]
        passing.remove(NEEDS_BITSANDBYTES)
    for check in passing:
        assert results[check].startswith("pass"), (check, results[check], done.stdout)
    kernel_errors = [float(part.rsplit(": ", 1)[1]) for row in cells if row[0].startswith("kernel: ") and row[1] == "pass"
                     for part in row[2].split("; ")]
    assert len(kernel_errors) >= 6 and max(kernel_errors) < 1e-2
    assert lines[-1].startswith(f"{len(CHECKS)} checks, 0 failed")
