"""Benchmark the top-K distillation kernel (`kd_loss`) against eager and compiled PyTorch, side by side.

Methods, all measured in one run on the same inputs (forward, and forward +
backward with a random upstream gradient), for each of ``--loss``
(forward / reverse / jsd):

* ``eager``    -- `kd_loss_reference` run eagerly: the baseline;
* ``compiled`` -- `torch.compile` of the reference (its unvalidated body, so
                  the CPU teacher check causes no graph break);
* ``kd_loss``  -- the public entry point on CUDA, i.e. the Triton kernels.
                  It runs only on a GPU: on CPU `kd_loss` is the reference
                  itself (the Triton interpreter is far too slow to time and
                  is not the CPU product path), so a CPU run times the two
                  PyTorch methods and says that the kernel needs CUDA.

Reported per (loss, N, K): median time per call over ``--repeats``
measurements, each timing ``--calls`` calls back to back, the methods taking
turns in every repeat (warm-up runs, which include compilation, excluded), the
ratio to eager, peak memory above the inputs (GPU only), the bytes each method
saves for backward (all devices) and, on GPU, the achieved bandwidth of the
minimal traffic (fwd: read x, t; bwd: read x, t, write dx; plus per-row
vectors) as a percentage of ``--peak-bandwidth-gbs``. The timing, memory and
saved-bytes helpers are `bench_masked_kl.py`'s.

Defaults: N in {4096, 32768, 131072}, K in {20, 256, 1024} on GPU; on CPU N in
{1024, 4096}, K in {20, 256}: on 2 cores about two minutes the first time,
nearly all of it compiling, then seconds (inductor caches the graphs;
``--no-compile``: seconds).

    python benchmarks/bench_kd_loss.py                        # defaults for the device
    python benchmarks/bench_kd_loss.py --n 32768 --k 64 --loss jsd --beta 0.3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_masked_kl import DTYPES, peak_mb, saved_bytes, timed_side_by_side  # noqa: E402

from pact.kernels import HAS_TRITON, kd_loss, kd_loss_reference  # noqa: E402
from pact.kernels._checks import KD_LOSSES, check_kd_loss_inputs  # noqa: E402
from pact.kernels.kd_reference import kd_loss_reference_unchecked  # noqa: E402

GPU_DEFAULT_N = [4096, 32768, 131072]
CPU_DEFAULT_N = [1024, 4096]
GPU_DEFAULT_K = [20, 256, 1024]
CPU_DEFAULT_K = [20, 256]


def parse_args(argv=None):
    """Command-line flags; defaults depend on the device (see module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, nargs="+", default=None, help="rows (response positions)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="teacher top-K columns; default depends on device")
    p.add_argument("--loss", choices=KD_LOSSES, nargs="+", default=list(KD_LOSSES))
    p.add_argument("--beta", type=float, default=0.5, help="JSD skew")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="student dtype (default: bf16 GPU, fp32 CPU)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--masked-frac", type=float, default=0.0, help="fraction of rows masked out")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 20 GPU, 5 CPU)")
    p.add_argument("--calls", type=int, default=None, help="calls per timed measurement (default 20 GPU, 1 CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (compilation happens here)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--peak-bandwidth-gbs", type=float, default=4800.0, help="device peak bandwidth (H200: 4800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU: torch.set_num_threads (0 = leave as is)")
    args = p.parse_args(argv)
    on_gpu = torch.device(args.device).type == "cuda"
    defaults = {"n": GPU_DEFAULT_N if on_gpu else CPU_DEFAULT_N, "k": GPU_DEFAULT_K if on_gpu else CPU_DEFAULT_K,
                "dtype": "bfloat16" if on_gpu else "float32", "repeats": 20 if on_gpu else 5,
                "calls": 20 if on_gpu else 1}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.calls < 1 or args.repeats < 1:
        p.error("--calls and --repeats must be at least 1")
    return args


def make_inputs(N, K, dtype, device, masked_frac, seed):
    """Student logits and tail (with grad), teacher top-K log-probs and tail (float32), mask, upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(N, K, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    student_tail = (torch.randn(N, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    teacher = torch.log_softmax(torch.randn(N, K + 1, generator=gen) * 3, dim=1).to(device)
    mask = (torch.rand(N, generator=gen) >= masked_frac).to(device)
    upstream = torch.rand(N, generator=gen).to(device)
    return student, student_tail, teacher[:, :K], teacher[:, K], mask, upstream


def minimal_bytes(N, K, itemsize, active_frac):
    """Bytes a perfect fused fwd+bwd must move: fwd reads x, t; bwd reads x, t and writes dx; plus per-row vectors."""
    rows = N * active_frac
    fwd_row = 1 + itemsize + 4 + 4 + 20  # read mask, student and teacher tails; write loss, 5 statistics
    bwd_row = 1 + 20 + 4 + itemsize + 4 + itemsize  # read mask, statistics, upstream, both tails; write the tail's grad
    return 2 * rows * K * (itemsize + 4) + N * K * itemsize + N * (fwd_row + bwd_row)


def bench_config(args, loss, N, K, device, methods):
    """{method: {fwd, all, peak, saved}} (or {error}) for one (loss, N, K)."""
    x, xt, t, tt, mask, upstream = make_inputs(N, K, DTYPES[args.dtype], device, args.masked_frac, args.seed)
    T = args.temperature
    inputs_ptrs = {v.untyped_storage().data_ptr() for v in (x, xt, t, mask)}
    check_kd_loss_inputs(x, xt, t, tt, mask, T, loss, args.beta)  # validate once; the compiled calls skip it
    fwd, fwd_bwd, results = {}, {}, {}
    for name, fn in methods.items():
        def forward(fn=fn):
            return fn(x, xt, t, tt, mask, T, loss=loss, beta=args.beta)

        def step(forward=forward):
            x.grad = xt.grad = None
            forward().backward(upstream)

        try:  # warm up (compiles) here, so a method that cannot run is reported, not fatal
            with torch.no_grad():
                forward()
            step()
            fwd[name], fwd_bwd[name] = forward, step
        except Exception as exc:  # e.g. torch.compile without a working C++ compiler
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
    with torch.no_grad():
        t_fwd = timed_side_by_side(fwd, device, args.warmup, args.repeats, args.calls)
    t_all = timed_side_by_side(fwd_bwd, device, args.warmup, args.repeats, args.calls)
    for name, step in fwd_bwd.items():
        x.grad = xt.grad = None
        peak = peak_mb(step, device)
        saved = saved_bytes(fwd[name], inputs_ptrs)
        results[name] = {"fwd": t_fwd[name], "all": t_all[name], "peak": peak, "saved": saved}
    return {name: results[name] for name in methods}


def main(argv=None):
    """Run the grid and print one table of side-by-side ratios (relative to eager)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if on_gpu else f"cpu, {torch.get_num_threads()} threads"
    print(f"device={device} ({where})"
          f" dtype={args.dtype} T={args.temperature} beta={args.beta} masked_frac={args.masked_frac}"
          f" repeats={args.repeats} calls={args.calls} warmup={args.warmup}")
    with_kernel = on_gpu and HAS_TRITON
    if not with_kernel:
        reason = "triton is not installed" if on_gpu else "this is a CPU run"
        print(f"note: the kd_loss kernel needs CUDA and Triton ({reason}): timing the PyTorch reference only"
              " (eager and compiled); peak memory is measured on GPU only (saved-for-backward bytes everywhere).")

    header = (f"{'loss':>7} {'N':>7} {'K':>5} {'method':>9} {'fwd ms':>9} {'fwd+bwd ms':>11} {'x eager':>8}"
              f" {'peak MiB':>9} {'mem x eager':>11} {'saved MiB':>10}")
    if on_gpu:
        header += f" {'GB/s':>8} {'%peak':>6}"
    print(header)
    print("-" * len(header))
    for loss in args.loss:
        for K in args.k:
            for N in args.n:
                torch._dynamo.reset()  # fresh compiled graph per shape, no recompile-limit surprises
                methods = {"eager": kd_loss_reference}
                if not args.no_compile:
                    methods["compiled"] = torch.compile(kd_loss_reference_unchecked, dynamic=False)
                if with_kernel:
                    methods["kd_loss"] = kd_loss
                res = bench_config(args, loss, N, K, device, methods)
                base = res.get("eager", {})
                for name, r in res.items():
                    if "error" in r:
                        print(f"{loss:>7} {N:>7} {K:>5} {name:>9}  n/a ({r['error']})")
                        continue
                    speed = base["all"] / r["all"] if "all" in base else float("nan")
                    peak = f"{r['peak']:9.1f}" if r["peak"] is not None else f"{'n/a':>9}"
                    has_peaks = r["peak"] is not None and base.get("peak")
                    mem = f"{r['peak'] / base['peak']:11.2f}" if has_peaks else f"{'n/a':>11}"
                    line = (f"{loss:>7} {N:>7} {K:>5} {name:>9} {r['fwd']:9.3f} {r['all']:11.3f} {speed:8.2f}"
                            f" {peak} {mem} {r['saved'] / 2**20:10.2f}")
                    if on_gpu:
                        itemsize = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
                        gbs = minimal_bytes(N, K, itemsize, 1.0 - args.masked_frac) / (r["all"] * 1e-3) / 1e9
                        line += f" {gbs:8.1f} {100 * gbs / args.peak_bandwidth_gbs:6.1f}"
                    print(line, flush=True)
    print("x eager: eager time / method time (higher is faster);"
          " mem x eager: method peak / eager peak (lower is leaner).")
    if on_gpu:
        print(f"GB/s: minimal fwd+bwd traffic / measured fwd+bwd time, % of"
              f" --peak-bandwidth-gbs={args.peak_bandwidth_gbs:g}.")


if __name__ == "__main__":
    main()
