"""One-shot GPU check: what only a GPU can show, in one table; sized for at most 5 minutes on one
GPU (not yet timed on one: no GPU was available when it was written).

Rows (check | result | figure | limit), each run by the project's own code:

* ``cuda-only tests``      -- the tests marked ``cuda`` (``pytest -m cuda``), in a subprocess: passed/failed/skipped;
* ``objective parity``     -- cached PACT (`cached_pact_loss`) on a tiny random Llama with LoRA, float32, the same
                              weights and rows on the CPU (PyTorch reference KL) and on the GPU (Triton kernel):
                              loss, CE, KL and the LoRA gradients;
* ``host syncs per step``  -- `pact train` on the tiny model's cache under `SyncCounter` / `StepSyncs` (with
                              ``torch.cuda.set_sync_debug_mode("error")`` inside each step on a GPU): host
                              syncs inside an optimizer step (0) and per step from one to the next (1 when it logs);
* ``kernel: ...``          -- the masked-KL kernel (`masked_kl_triton`) against a float64 oracle, loss and gradient:
                              ragged |S| (not a multiple of the column tile), float16, bfloat16, non-contiguous
                              inputs, masked rows holding NaN/inf, and N*|S| > 2^31 elements (GPU only);
* ``pact plan vs peak``    -- `pact plan`'s estimate against `torch.cuda.max_memory_allocated` of the same step on the
                              embedded model, or `--model` (on CPU: against the live tensor bytes of a real step of the
                              tiny model, the proxy tests/test_plan.py checks), in docs/memory.md's three settings:
                              as it is, with gradient checkpointing, and 4-bit weights with checkpointing (this one
                              needs bitsandbytes);
* ``bench_masked_kl``      -- `benchmarks/bench_masked_kl.py` (many calls per timed measurement), masked_kl vs eager;
* ``bench_train``          -- `benchmarks/bench_train.py`, bfloat16 on a GPU: `pact train` and cached PACT vs plain SFT,
                              on the embedded model or `--model`.

The tiny model borrows the tokenizer of `--model`. `--random-weights` gives `--model`'s architecture random weights
(drawn once, saved to the scratch folder): then the check needs only the model's `config.json` and tokenizer files,
for a GPU machine where the model's weights (the embedded model's package, say) cannot be installed; memory and step
time do not depend on the weights' values, and no row compares against the model's outputs.

Without a GPU (or with ``--cpu``) it runs on the CPU with ``TRITON_INTERPRET=1`` (set before Triton is imported, so
the kernel rows run the real kernel in Triton's interpreter) and small sizes, so the script keeps working; rows that
need a GPU say ``skipped: no CUDA``. ``--quick`` shrinks the benchmarks further (what tests/test_gpu_check.py runs).
Exit status 1 when any check fails.

    python benchmarks/gpu_check.py            # on a GPU machine
    python benchmarks/gpu_check.py --cpu --quick
    python benchmarks/gpu_check.py --model path/to/config-and-tokenizer --random-weights
"""

from __future__ import annotations

import os
import sys

# The device is chosen before torch and Triton are imported: `--cpu` hides the GPUs (this process and its
# subprocesses), and without CUDA Triton must run its interpreter, which it reads only when first imported.
if "--cpu" in sys.argv[1:]:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pact  # noqa: E402,F401 - before transformers (see pact._unshadow_hub_kernels)

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(__file__).resolve().parent
LARGE_ELEMENTS = 2**31  # the kernel's int32 offset limit the large case crosses
SKIP_NO_CUDA = "skipped: no CUDA"


@dataclass
class Row:
    """One line of the table; `details` (events, tracebacks, output tails) is printed under it when it fails."""

    check: str
    result: str
    figure: str
    limit: str
    details: str = ""


@dataclass
class Setup:
    """Where the checks run and how big: `device` ("cuda" or "cpu"), `quick` (smallest sizes), a scratch folder, and
    `model`, the model argument (`load_model`'s) of the plan and training-benchmark rows and the tokenizer's source."""

    device: str
    quick: bool
    scratch: Path
    model: str

    @property
    def on_gpu(self) -> bool:
        """Whether the checks run on a CUDA GPU."""
        return self.device == "cuda"


def verdict(ok: bool) -> str:
    """`pass` or `FAIL`."""
    return "pass" if ok else "FAIL"


# --- the tiny model and its cache ----------------------------------------------------------------------------------

@dataclass
class TinyWorld:
    """A tiny random Llama with the tokenizer of `Setup.model`, saved to `model_dir`, and a float32 cache of demo
    rows."""

    model_dir: Path
    cache: Path


def tiny_world(setup: Setup, rows: int = 8, max_length: int = 96, num_safety: int = 50) -> TinyWorld:
    """Save a 2-layer random Llama (hidden 64) with the tokenizer of `setup.model` and build a float32 cache of `rows`
    demo rows with `num_safety` random safety tokens (about a third of the weights 0), as `pact-cache build` would."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pact.cache_tools import build_cache
    from pact.data.sources import demo_data_path
    from pact.data.chat import load_examples
    from pact.models.loading import load_model, load_tokenizer
    from pact.objective.safety_tokens import SafetyTokens

    model_dir, cache = setup.scratch / "tiny-model", setup.scratch / "tiny-cache"
    tokenizer = load_tokenizer(setup.model)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    examples, _ = load_examples(demo_data_path("benign"), loaded.tokenizer, max_length=max_length, limit=rows)
    generator = torch.Generator().manual_seed(0)
    ids = sorted(torch.randperm(config.vocab_size, generator=generator)[:num_safety].tolist())
    weights = [max(0.0, float(v) + 0.5) for v in torch.randn(num_safety, generator=generator)]
    safety = SafetyTokens(ids, weights, [loaded.tokenizer.decode([i]) for i in ids], {"made_by": "benchmarks/gpu_check.py"},
                          {"aligned_model": loaded.fingerprint, "base_model": loaded.fingerprint,
                           "tokenizer": loaded.tokenizer_fingerprint})
    build_cache(loaded, examples, safety, cache, dtype="float32", rows_per_shard=4, progress=False)
    return TinyWorld(model_dir, cache)


def random_weights_copy(model: str, target: Path) -> Path:
    """Save `model`'s architecture with random weights (seeded, float32) and its tokenizer to `target`: reads only
    the config and tokenizer, so a folder holding just those serves."""
    from transformers import AutoModelForCausalLM

    from pact.models.loading import load_tokenizer
    from pact.planning.architecture import load_architecture

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(load_architecture(model), dtype=torch.float32).save_pretrained(target)
    load_tokenizer(model).save_pretrained(target)
    return target


# --- CUDA-only tests ----------------------------------------------------------------------------------------------

def check_cuda_tests(setup: Setup) -> Row:
    """Run the tests marked `cuda` in a subprocess; without CUDA they all skip, and the row says how many there are.
    The tests import the installed pact, never the checkout's `pact/` folder that `python -m` in the root would put
    first (it lacks `pact.kernels` and `pact.cache_tools` where pact is installed from a wheel): PYTHONSAFEPATH."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs", str(ROOT / "tests")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONSAFEPATH": "1"})
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    ran = sum(counts.get(k, 0) for k in ("passed", "failed", "skipped", "error", "errors"))
    figure = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("passed", "failed", "skipped"))
    limit = "all pass (none skipped on a GPU)"
    if ran == 0 or done.returncode != 0:
        return Row("cuda-only tests", "FAIL", figure or "no summary", limit, done.stdout[-3000:] + done.stderr[-2000:])
    if not setup.on_gpu:
        return Row("cuda-only tests", f"{SKIP_NO_CUDA} ({ran} selected)", figure, limit)
    return Row("cuda-only tests", verdict(counts.get("passed", 0) == ran), figure, limit, done.stdout[-3000:])


# --- whole-objective parity, CPU vs GPU ---------------------------------------------------------------------------

def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64 (relative error in the max norm; inf if anything is non-finite)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not (torch.isfinite(actual).all() and torch.isfinite(expected).all()):
        return math.inf
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)


def objective_on(model, rows, safety, cfg, pad_id, device: str) -> dict[str, torch.Tensor]:
    """Cached PACT on `rows` with `model` moved to `device`: loss, CE, KL and the LoRA gradients (one flat vector)."""
    from pact.objective.loss import cached_pact_loss

    model = model.to(device)
    model.zero_grad(set_to_none=True)
    out = cached_pact_loss(model, rows, safety.id_tensor(device), safety.weight_tensor(device), cfg, pad_id)
    out.loss.backward()
    grads = torch.cat([p.grad.flatten().cpu() for n, p in sorted(model.named_parameters()) if "lora_" in n])
    return {"loss": out.loss.detach().cpu(), "ce": out.ce.detach().cpu(), "kl": out.kl.detach().cpu(), "lora grad": grads}


def check_objective_parity(setup: Setup, world: TinyWorld, rows_used: int = 4) -> Row:
    """The same LoRA model (random adapters, both A and B non-zero) and rows on the CPU and on the GPU, float32."""
    limit = "rel err <= 1e-4 (loss, CE, KL), <= 1e-3 (grad)"
    if not setup.on_gpu:
        return Row("objective parity cpu vs gpu", SKIP_NO_CUDA, "", limit)
    from peft import LoraConfig, get_peft_model

    from pact.cache_tools import CacheReader
    from pact.models.loading import load_model, pad_token_id
    from pact.objective.settings import ObjectiveArguments
    from pact.objective.safety_tokens import SafetyTokens

    reader = CacheReader(world.cache)
    rows = [reader[i] for i in range(rows_used)]
    safety = SafetyTokens(reader.manifest["safety_tokens"]["ids"], reader.manifest["safety_tokens"]["weights"], [])
    loaded = load_model(str(world.model_dir), device="cpu", dtype="float32")
    torch.manual_seed(0)
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    model.train()
    cfg, pad = ObjectiveArguments(), pad_token_id(loaded.tokenizer)
    cpu = objective_on(copy.deepcopy(model), rows, safety, cfg, pad, "cpu")
    gpu = objective_on(model, rows, safety, cfg, pad, setup.device)
    if not cpu["lora grad"].abs().max() > 0:
        return Row("objective parity cpu vs gpu", "FAIL", "the LoRA gradient is zero on the CPU: nothing to compare", limit)
    errors = {name: rel_err(gpu[name], cpu[name]) for name in cpu}
    ok = all(errors[n] <= 1e-4 for n in ("loss", "ce", "kl")) and errors["lora grad"] <= 1e-3
    figure = ", ".join(f"{name} {err:.1e}" for name, err in errors.items())
    return Row("objective parity cpu vs gpu", verdict(ok), figure, limit)


# --- host syncs of a training step --------------------------------------------------------------------------------

def check_host_syncs(setup: Setup, world: TinyWorld, steps: int = 4) -> Row:
    """`pact train` (LoRA, 2 micro-batches per step, a log every second step) inside a `SyncCounter` of the training
    device; on a GPU `set_sync_debug_mode("error")` within each step also stops on a sync no operator shows."""
    from pact.training.arguments import PactTrainingArguments
    from pact.training.train import train
    from pact.training.trainer import PactTrainer

    sys.path.insert(0, str(ROOT / "tests"))  # the sync counter is test tooling, kept out of the package
    from sync_counter import StepSyncs, SyncCounter

    counter = SyncCounter(setup.device)
    recorder = StepSyncs(counter, cuda_sync_debug="error" if setup.on_gpu else None)

    class Counted(PactTrainer):
        """`PactTrainer` with the step recorder attached."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(recorder)

    args = PactTrainingArguments(cache=str(world.cache), output_dir=str(setup.scratch / "sync-run"), max_steps=steps,
                                 per_device_train_batch_size=2, gradient_accumulation_steps=2, logging_steps=2,
                                 save_steps=0, learning_rate=1e-3, seed=0, train_device=setup.device, disable_tqdm=True)
    with counter:
        train(args, trainer_class=Counted)
    # Step 1 alone also makes once-per-run reads (on CPU, the masked-KL check of the weights); steps 2.. are steady.
    steady = recorder.steps[1:]
    inner = max(s.inner.syncs for s in steady)
    logged = [s.whole.syncs for s in steady if s.logged]
    quiet = [s.whole.syncs for s in steady if not s.logged]
    blocking = sum(s.whole.blocking_copies for s in steady)
    ok = len(recorder.steps) == steps and inner == 0 and set(logged) == {1} and set(quiet) == {0} and blocking == 0
    figure = (f"in a step {inner}; per logged step {max(logged, default=0)}, other steps {max(quiet, default=0)}; "
              f"blocking copies {blocking}")
    details = "\n".join(f"step {s.step}: {s.whole.describe()}" for s in recorder.steps)
    return Row("host syncs per step", verdict(ok) + ("" if setup.on_gpu else " (cpu proxy)"), figure,
               "0 in a step; 1 per logged step, 0 otherwise; 0 blocking", details)


# --- the kernel against float64 -----------------------------------------------------------------------------------

def kl_float64(z, r, w, mask, temperature):
    """The textbook PACT KL in float64 (the oracle; nothing shared with the kernel or its reference):
    q = normalize(softmax(r / T) * w), loss = T^2 * sum q (log q - log_softmax(z / T)), times the mask."""
    z, r, w = z.double(), r.detach().double(), w.detach().double()
    target = torch.softmax(r / temperature, dim=-1) * w
    q = target / target.sum(dim=-1, keepdim=True)
    log_p = torch.log_softmax(z / temperature, dim=-1)
    log_q = torch.log(torch.where(q > 0, q, torch.ones_like(q)))
    terms = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))
    return temperature**2 * terms.sum(dim=-1) * mask.double()


def oracle(z, r, w, mask, temperature, upstream):
    """Float64 loss and gradient of (loss * upstream).sum() with respect to z, on the CPU."""
    z64 = z.detach().cpu().double().requires_grad_(True)
    loss = kl_float64(z64, r.cpu(), w.cpu(), mask.cpu(), temperature)
    (loss * upstream.cpu().double()).sum().backward()
    return loss.detach(), z64.grad


def kernel_run(z, r, w, mask, temperature, upstream):
    """Forward and backward through the Triton kernel (`masked_kl_triton`, interpreted on CPU tensors)."""
    from pact.kernels import masked_kl_triton

    leaf = z.detach().requires_grad_(True)  # a new leaf with z's storage and strides
    loss = masked_kl_triton(leaf, r, w, mask, temperature)
    (loss * upstream).sum().backward()
    return loss.detach(), leaf.grad


def random_inputs(n: int, s: int, dtype, device: str, seed: int):
    """Logits of scale 3 in `dtype`, weights with about a third zero, a mask with about a quarter of the rows off, a
    random upstream gradient."""
    generator = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, s, generator=generator) * 3).to(device=device, dtype=dtype)
    r = (torch.randn(n, s, generator=generator) * 3).to(device=device, dtype=dtype)
    w = torch.rand(s, generator=generator)
    w[torch.rand(s, generator=generator) < 0.3] = 0.0
    w[0] = 1.0
    mask = torch.rand(n, generator=generator) > 0.25
    mask[0] = True
    upstream = torch.rand(n, generator=generator) + 0.1
    return z, r, w.to(device), mask.to(device), upstream.to(device)


def kernel_errors(z, r, w, mask, upstream, temperature: float = 2.0) -> tuple[float, float]:
    """Relative errors (max norm) of the kernel's loss and gradient against the float64 oracle."""
    loss, grad = kernel_run(z, r, w, mask, temperature, upstream)
    want_loss, want_grad = oracle(z, r, w, mask, temperature, upstream)
    return rel_err(loss, want_loss), rel_err(grad, want_grad)


def kernel_row(name: str, cases: list[tuple[str, tuple[float, float]]], rtol: float) -> Row:
    """One table row from (label, (loss err, grad err)) cases against one tolerance."""
    worst = max(max(errs) for _, errs in cases)
    figure = "; ".join(f"{label}: {max(errs):.1e}" for label, errs in cases)
    return Row(f"kernel: {name}", verdict(worst <= rtol), figure, f"rel err <= {rtol:g} (loss, grad)")


def check_kernel_ragged(setup: Setup) -> Row:
    """|S| not a multiple of the column tile: one ragged tile (S=129) and the two-pass loop (S=1500, 4097 on a GPU)."""
    n, sizes = (4099, (129, 1500, 4097)) if setup.on_gpu else (13, (129, 1500))
    cases = [(f"N={n} S={s}", kernel_errors(*random_inputs(n, s, torch.float32, setup.device, seed=s))) for s in sizes]
    return kernel_row("ragged S, fp32", cases, 1e-5)


def check_kernel_half(setup: Setup, dtype, rtol: float) -> Row:
    """float16 or bfloat16 logits (arithmetic in float32, the gradient rounded to the dtype)."""
    n, sizes = (8192, (50, 512)) if setup.on_gpu else (9, (50, 77))
    cases = [(f"N={n} S={s}", kernel_errors(*random_inputs(n, s, dtype, setup.device, seed=s + 1))) for s in sizes]
    return kernel_row(str(dtype).removeprefix("torch."), cases, rtol)


def check_kernel_noncontiguous(setup: Setup) -> Row:
    """A transposed student, a strided column slice as target, weights and mask with stride 2 (no copies made)."""
    n, s = (4096, 300) if setup.on_gpu else (7, 30)
    generator = torch.Generator().manual_seed(9)
    z = (torch.randn(s, n, generator=generator) * 2).to(setup.device).t()
    r = (torch.randn(n, 2 * s + 1, generator=generator) * 2).to(setup.device)[:, 1::2][:, :s]
    w = (torch.rand(2 * s, generator=generator) + 0.1).to(setup.device)[::2]
    mask = (torch.rand(2 * n, generator=generator) > 0.3).to(setup.device)[::2]
    upstream = (torch.rand(n, generator=generator) + 0.5).to(setup.device)
    assert not any(t.is_contiguous() for t in (z, r, w, mask)), "the inputs must be non-contiguous"
    return kernel_row("non-contiguous", [(f"N={n} S={s}", kernel_errors(z, r, w, mask, upstream))], 1e-5)


def check_kernel_masked_garbage(setup: Setup) -> Row:
    """Masked rows holding NaN, +-inf and a NaN upstream gradient: loss and gradient exactly 0 there, the live rows
    as the oracle computes them without the garbage rows."""
    n, s = (4096, 64) if setup.on_gpu else (11, 24)
    z, r, w, mask, upstream = random_inputs(n, s, torch.float32, setup.device, seed=5)
    mask[1::3] = False
    dead = (~mask).nonzero().flatten()
    z[dead[0::2]] = float("nan")
    z[dead[1::2], 0] = float("inf")
    r[dead[1::2]] = -float("inf")
    upstream[dead[0]] = float("nan")
    loss, grad = kernel_run(z, r, w, mask, 2.0, upstream)
    zeros = bool((loss[~mask] == 0).all() and (grad[~mask] == 0).all())
    live = mask.clone()
    want_loss, want_grad = oracle(z[live], r[live], w, torch.ones(int(live.sum())), 2.0, upstream[live])
    errs = (rel_err(loss[live], want_loss), rel_err(grad[live], want_grad))
    row = kernel_row("masked NaN/inf rows", [(f"N={n} S={s}, masked rows exactly 0: {'yes' if zeros else 'NO'}", errs)], 1e-5)
    if not zeros:
        row.result = "FAIL"
    return row


def check_kernel_large(setup: Setup, s: int = 64, edge_rows: int = 1024) -> Row:
    """N*|S| > 2^31 elements (bfloat16, about 4.3 GB per [N, S] tensor): the first and last rows against float64, so
    offsets past the int32 range are exercised."""
    n = LARGE_ELEMENTS // s + 4096
    limit = "rel err <= 1e-2 (bf16)"
    if not setup.on_gpu:
        return Row("kernel: N*S > 2^31", f"{SKIP_NO_CUDA} (needs 3 x {n * s * 2 / 1e9:.1f} GB; the interpreter would "
                   "take hours)", f"N={n} S={s}", limit)
    from pact.kernels import masked_kl_triton

    device = setup.device
    generator = torch.Generator(device=device).manual_seed(0)
    z = (torch.randn(n, s, generator=generator, device=device, dtype=torch.bfloat16) * 3).requires_grad_(True)
    r = torch.randn(n, s, generator=generator, device=device, dtype=torch.bfloat16) * 3
    w = torch.rand(s, generator=generator, device=device)
    mask = torch.rand(n, generator=generator, device=device) > 0.25
    upstream = torch.rand(n, generator=generator, device=device) + 0.1
    loss = masked_kl_triton(z, r, w, mask, 2.0)
    (loss * upstream).sum().backward()
    cases = []
    for label, rows in (("first rows", slice(0, edge_rows)), ("last rows", slice(n - edge_rows, n))):
        want_loss, want_grad = oracle(z[rows], r[rows], w, mask[rows], 2.0, upstream[rows])
        cases.append((f"{label} of N={n} S={s}", (rel_err(loss[rows], want_loss), rel_err(z.grad[rows], want_grad))))
    del z, r, loss
    if setup.on_gpu:
        torch.cuda.empty_cache()
    return kernel_row("N*S > 2^31", cases, 1e-2)


# --- pact plan against a measured step ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanSetting:
    """A setting of the plan check: gradient checkpointing, and the weights quantised by bitsandbytes or not."""

    label: str
    gradient_checkpointing: bool = False
    quantization: str | None = None

    @property
    def check(self) -> str:
        """The row's name."""
        return "pact plan vs peak" + (f", {self.label}" if self.label else "")


PLAN_SETTINGS = (PlanSetting(""), PlanSetting("checkpointing", True),
                 PlanSetting("4-bit + checkpointing", True, "4bit"))


def check_plan(setup: Setup, world: TinyWorld, setting: PlanSetting) -> Row:
    """`pact plan`'s peak of each variant against the same step measured, in one setting: on a GPU `setup.model` in
    bfloat16 (LoRA r=8, batch 4 x 256) against `torch.cuda.max_memory_allocated`; on CPU the tiny model in float32
    against the live tensor bytes of the real step. 4-bit weights need bitsandbytes (skipped without it)."""
    from pact.training.arguments import PactTrainingArguments
    from pact.models.loading import load_model
    from pact.planning.step import KD_VARIANTS, REFERENCE_VARIANTS, VARIANTS, measure_step, synthetic_rows
    from pact.planning.arguments import PlanArguments
    from pact.planning.architecture import frozen_reference
    from pact.planning.plan import plan
    from pact.models.quantization import INSTALL
    from pact.training.train import _student

    model = setup.model if setup.on_gpu else str(world.model_dir)
    name = setting.check + (f" ({Path(model).name})" if setup.on_gpu else " (tiny)")
    limit = "0.9 .. 1.1"
    if setting.quantization and importlib.util.find_spec("bitsandbytes") is None:
        return Row(name, f"skipped: no bitsandbytes ({INSTALL})", "", limit)
    dtype = "bfloat16" if setup.on_gpu else "float32"
    batch, length = (4, 256) if setup.on_gpu else (2, 64)
    quantized = {"load_in_4bit": setting.quantization == "4bit", "load_in_8bit": setting.quantization == "8bit"}
    args = PlanArguments(model=model, dtype=dtype, per_device_train_batch_size=batch, max_length=length,
                         prompt_length=16, gpu_memory="1TiB", gradient_checkpointing=setting.gradient_checkpointing,
                         **quantized)
    planned = {variant: value.peak_bytes for variant, value in plan(args).variants.items()}
    training = PactTrainingArguments(output_dir=str(setup.scratch / "plan-run"), train_device=setup.device, dtype=dtype,
                                     gradient_checkpointing=setting.gradient_checkpointing, **quantized)

    def loaded():
        return load_model(model, device=setup.device, dtype=dtype, quantization=setting.quantization)

    student = _student(loaded(), training)
    shape = (batch, length, args.prompt_length, student.config.vocab_size, args.safety_tokens)
    rows, kd_rows = synthetic_rows(*shape), synthetic_rows(*shape, kd_top_k=args.kd_top_k)
    measured, reference = {}, None
    # The reference (or teacher) is on the device only for the variants that use it, measured last.
    for variant in [v for v in VARIANTS if v not in REFERENCE_VARIANTS] + list(REFERENCE_VARIANTS):
        if variant in REFERENCE_VARIANTS and reference is None:
            reference = frozen_reference(loaded().model)
        step_rows = kd_rows if variant in KD_VARIANTS else rows
        if setup.on_gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            measure_step(student, step_rows, variant, reference, args.ce_chunk_size)
            torch.cuda.synchronize()
            measured[variant] = torch.cuda.max_memory_allocated()
        else:
            measured[variant] = measure_step(student, step_rows, variant, reference, args.ce_chunk_size).total
    del student, reference
    if setup.on_gpu:
        torch.cuda.empty_cache()
    ratios = {variant: planned[variant] / measured[variant] for variant in VARIANTS}
    ok = all(0.9 <= ratio <= 1.1 for ratio in ratios.values())
    against = "max_memory_allocated" if setup.on_gpu else "live bytes, cpu proxy"
    figure = f"plan / {against}: " + ", ".join(f"{variant} {ratio:.3f} ({measured[variant] / 2**20:.0f} MiB)"
                                                 for variant, ratio in ratios.items())
    return Row(name, verdict(ok), figure, limit)


# --- the benchmarks -----------------------------------------------------------------------------------------------

def run_script(name: str, arguments: list[str], timeout: int) -> subprocess.CompletedProcess:
    """Run `benchmarks/<name>` with this Python and the inherited environment (device choice included)."""
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *arguments], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})


def check_bench_masked_kl(setup: Setup) -> Row:
    """`bench_masked_kl.py` on a small grid (many calls per timed measurement); the figure is masked_kl's speed-up
    over eager PyTorch, forward + backward, at each size."""
    if setup.on_gpu:
        arguments = ["--n", "131072", "--s", "50", "512", "--repeats", "10", "--calls", "20"]
    else:
        arguments = ["--n", "256" if setup.quick else "4096", "--s", "50", "--repeats", "2", "--warmup", "1",
                     "--calls", "2", "--no-compile"]
    done = run_script("bench_masked_kl.py", arguments, timeout=200)
    speedups = [f"N={parts[0]} S={parts[1]} x{parts[5]}" for parts in (line.split() for line in done.stdout.splitlines())
                if len(parts) >= 6 and parts[2] == "masked_kl"]
    ok = done.returncode == 0 and bool(speedups)
    limit = "runs; masked_kl x eager > 1 on a GPU" if setup.on_gpu else "runs (on CPU masked_kl is the reference)"
    if setup.on_gpu and ok:
        ok = all(float(s.rsplit("x", 1)[1]) > 1.0 for s in speedups)
    return Row("bench_masked_kl", verdict(ok), "masked_kl x eager: " + ", ".join(speedups), limit,
               done.stdout[-3000:] + done.stderr[-3000:])


def check_bench_train(setup: Setup, world: TinyWorld) -> Row:
    """`bench_train.py`: on a GPU `setup.model` in bfloat16 on a cache it builds; on CPU the tiny model's cache in
    float32 (with `--quick`, only `pact train`, the variant most likely to break). The figure is step time / plain SFT."""
    if setup.on_gpu:
        arguments = ["--device", "cuda", "--dtype", "bfloat16", "--rows", "32", "--batch-size", "4", "--steps", "6",
                     "--model", setup.model]
    else:
        arguments = ["--cache", str(world.cache), "--rows", "8", "--batch-size", "2", "--steps", "2", "--warmup", "1"]
        if setup.quick:
            arguments += ["--variants", "pact-train"]
    done = run_script("bench_train.py", arguments, timeout=240)
    ratios = {parts[0]: parts[4] for parts in (line.split() for line in done.stdout.splitlines())
              if len(parts) == 6 and parts[0] in ("sft", "online-separate", "online-adapter", "cached", "pact-train")}
    ok = done.returncode == 0 and "pact-train" in ratios
    figure = "step time / SFT: " + ", ".join(f"{name} {ratio}" for name, ratio in ratios.items())
    return Row("bench_train" + (" (bf16)" if setup.on_gpu else ""), verdict(ok), figure, "runs",
               done.stdout[-3000:] + done.stderr[-3000:])


# --- the table ----------------------------------------------------------------------------------------------------

def guarded(name: str, check, *args) -> Row:
    """Run one check, printing its time as it ends; an exception is that check's failure (with its traceback in the
    details), not the script's end."""
    started = time.perf_counter()
    try:
        row = check(*args)
    except Exception as err:  # noqa: BLE001 - every failure becomes a FAIL row, reported with its traceback
        row = Row(name, "FAIL", f"{type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}", "",
                  traceback.format_exc())
    print(f"  {name}: {row.result} ({time.perf_counter() - started:.0f} s)", flush=True)
    return row


def render(rows: list[Row]) -> str:
    """The rows as one plain-text table (check | result | figure | limit)."""
    table = [("check", "result", "figure", "limit")] + [(r.check, r.result, r.figure, r.limit) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(4)]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def parse_args(argv=None):
    """Command-line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is (Triton interpreter)")
    parser.add_argument("--quick", action="store_true", help="the smallest benchmark settings (what the tests run)")
    parser.add_argument("--model", default=None,
                        help="model of the plan and training-benchmark rows, and the tiny model's tokenizer: a model "
                             "directory, a hub id or the embedded model's name (default: the embedded model)")
    parser.add_argument("--random-weights", action="store_true",
                        help="use --model's architecture with random weights: only its config.json and tokenizer "
                             "files are read (memory and step time do not depend on the weights)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run every check, print the table (and the details of failed rows), return the exit status."""
    from transformers.utils import logging

    from pact.models.loading import EMBEDDED_MODEL

    args = parse_args(argv)
    logging.disable_progress_bar()  # model loading's bars; the checks print their own progress
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads, TRITON_INTERPRET=1)"
    print(f"gpu_check on {name}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        setup = Setup(device, args.quick, Path(scratch), args.model or EMBEDDED_MODEL)
        if args.random_weights:
            copy_to = setup.scratch / f"{Path(setup.model).name}-random-weights"
            setup.model = str(random_weights_copy(setup.model, copy_to))
            print(f"  {args.model or EMBEDDED_MODEL} with random weights: saved ({time.perf_counter() - started:.0f} s)",
                  flush=True)
        world = tiny_world(setup)
        print(f"  tiny model and its cache: built ({time.perf_counter() - started:.0f} s)", flush=True)
        rows = [
            guarded("cuda-only tests", check_cuda_tests, setup),
            guarded("objective parity cpu vs gpu", check_objective_parity, setup, world),
            guarded("host syncs per step", check_host_syncs, setup, world),
            guarded("kernel: ragged S, fp32", check_kernel_ragged, setup),
            guarded("kernel: float16", check_kernel_half, setup, torch.float16, 1e-3),
            guarded("kernel: bfloat16", check_kernel_half, setup, torch.bfloat16, 1e-2),
            guarded("kernel: non-contiguous", check_kernel_noncontiguous, setup),
            guarded("kernel: masked NaN/inf rows", check_kernel_masked_garbage, setup),
            guarded("kernel: N*S > 2^31", check_kernel_large, setup),
            *(guarded(setting.check, check_plan, setup, world, setting) for setting in PLAN_SETTINGS),
            guarded("bench_masked_kl", check_bench_masked_kl, setup),
            guarded("bench_train", check_bench_train, setup, world),
        ]
    print(render(rows))
    failed = [row for row in rows if row.result.startswith("FAIL")]
    for row in failed:
        print(f"\n--- {row.check}: details\n{row.details.rstrip()}")
    print(f"\n{len(rows)} checks, {len(failed)} failed, {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
