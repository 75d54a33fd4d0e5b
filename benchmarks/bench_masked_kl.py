"""Benchmark the masked-KL kernel against eager and compiled PyTorch, side by side.

Methods, all measured in one run on the same inputs (forward, and forward +
backward with a random upstream gradient):

* ``eager``    -- `masked_kl_reference` run eagerly on the [N, S] columns: the
                  issue's baseline (with ``--vocab V`` every method first
                  gathers the S safety-token columns from [N, V] student
                  logits, as the online objective does);
* ``compiled`` -- `torch.compile` of the reference (its unvalidated body, so
                  the CPU weight check causes no graph break);
* ``masked_kl`` -- the public entry point: the Triton kernels on CUDA. On CPU
                  it dispatches to the reference, so there it matches
                  ``eager`` by construction (the Triton interpreter is far too
                  slow to time and is not the CPU product path).

Reported per (N, S): median time per call over ``--repeats`` measurements, each
timing ``--calls`` calls back to back (one call of a small kernel would time the
launch and the timer, not the work), the methods taking turns in every repeat
(warm-up runs, which include compilation, excluded), the ratio to eager, peak memory above the
inputs (``torch.cuda.max_memory_allocated`` on GPU; not measured on CPU), the
bytes each method saves for backward (all devices, via saved-tensor hooks)
and, on GPU, the achieved bandwidth of the minimal traffic
(fwd: read z, r; bwd: read z, r, write dz; plus per-row vectors) as a
percentage of ``--peak-bandwidth-gbs``.

Defaults: N in {4096, 32768, 131072}, S in {50, 512} on GPU; on CPU the
default N is {1024, 4096, 16384} so the run finishes in a few minutes.

    python benchmarks/bench_masked_kl.py                       # defaults for the device
    python benchmarks/bench_masked_kl.py --n 4096 --s 50 512 --vocab 49152
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from pact.kernels import HAS_TRITON, masked_kl, masked_kl_reference
from pact.kernels._checks import check_masked_kl_inputs
from pact.kernels.reference import masked_kl_reference_unchecked

GPU_DEFAULT_N = [4096, 32768, 131072]
CPU_DEFAULT_N = [1024, 4096, 16384]
DEFAULT_S = [50, 512]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    """Command-line flags; defaults depend on the device (see module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, nargs="+", default=None, help="rows (token positions); default depends on device")
    p.add_argument("--s", type=int, nargs="+", default=DEFAULT_S, help="safety-token counts |S|")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="logit dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--masked-frac", type=float, default=0.0, help="fraction of rows masked out")
    p.add_argument("--vocab", type=int, default=0, help="if > 0, gather S columns from [N, V] student logits first")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 20 GPU, 5 CPU)")
    p.add_argument("--calls", type=int, default=None, help="calls per timed measurement (default 20 GPU, 1 CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (compilation happens here)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--peak-bandwidth-gbs", type=float, default=4800.0, help="device peak bandwidth (H200: 4800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU: torch.set_num_threads (0 = leave as is); "
                   "1 gives steadier numbers on a shared machine")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    on_gpu = dev.type == "cuda"
    if args.n is None:
        args.n = GPU_DEFAULT_N if on_gpu else CPU_DEFAULT_N
    if args.dtype is None:
        args.dtype = "bfloat16" if on_gpu else "float32"
    if args.repeats is None:
        args.repeats = 20 if on_gpu else 5
    if args.calls is None:
        args.calls = 20 if on_gpu else 1
    if args.calls < 1 or args.repeats < 1:
        p.error("--calls and --repeats must be at least 1")
    return args


def make_inputs(N, S, V, dtype, device, masked_frac, seed):
    """Random logits shaped like PACT's: student (optionally full-vocab) with grad, cached target, weights, mask."""
    gen = torch.Generator().manual_seed(seed)
    width = V if V > 0 else S
    student = (torch.randn(N, width, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    target = (torch.randn(N, S, generator=gen) * 3).to(device=device, dtype=dtype)
    w = torch.rand(S, generator=gen)
    w[torch.rand(S, generator=gen) < 0.3] = 0.0
    w[0] = 1.0
    mask = (torch.rand(N, generator=gen) >= masked_frac).to(device)
    ids = torch.randperm(V, generator=gen)[:S].sort().values.to(device) if V > 0 else None
    upstream = torch.rand(N, generator=gen).to(device)
    return student, target, w.to(device), mask, ids, upstream


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, calls):
    """Wall time per call in ms of `calls` fn() calls run back to back (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def timed_side_by_side(fns, device, warmup, repeats, calls):
    """Median ms per call of each named fn over `repeats` measurements of `calls` calls, warm-up excluded; the fns take
    turns in every repeat.

    Interleaving (round robin) rather than timing one method after another
    keeps the ratios fair when the machine's load drifts during the run.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_calls(fn, device, calls))
    return {name: statistics.median(ts) for name, ts in times.items()}


def saved_bytes(fn_forward, exclude):
    """Bytes of distinct storages saved for backward by one forward, excluding the inputs' own storages."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn_forward()
    del out
    return sum(seen.values())


def peak_mb(fn, device):
    """Peak CUDA memory above what was allocated before fn() ran, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def minimal_bytes(N, S, itemsize, active_frac):
    """Bytes a perfect fused fwd+bwd must move: fwd reads z, r; bwd reads z, r and writes dz; plus per-row vectors."""
    rows = N * active_frac
    per_row_vectors = N * (1 + 4 + 16) + N * (1 + 16 + 4)  # fwd: mask, loss, stats; bwd: mask, stats, upstream
    return 4 * rows * S * itemsize + N * S * itemsize + per_row_vectors


def bench_config(args, N, S, device, dtype, methods):
    student, target, w, mask, ids, upstream = make_inputs(
        N, S, args.vocab, dtype, device, args.masked_frac, args.seed
    )
    T = args.temperature
    inputs_ptrs = {t.untyped_storage().data_ptr() for t in (student, target, w, mask)}
    z0 = (student[:, ids] if ids is not None else student).detach()
    check_masked_kl_inputs(z0, target, w, mask, T)  # validate once; the compiled calls skip it
    del z0
    fwd, fwd_bwd, results = {}, {}, {}
    for name, fn in methods.items():
        def forward(fn=fn):
            z = student[:, ids] if ids is not None else student
            return fn(z, target, w, mask, T)

        def step(forward=forward):
            student.grad = None
            forward().backward(upstream)

        try:  # warm up (compiles) here, so a method that cannot run is reported, not fatal
            with torch.no_grad():
                forward()
            step()
            fwd[name], fwd_bwd[name] = forward, step
        except Exception as exc:  # e.g. torch.compile without a working C++ compiler
            results[name] = dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
        student.grad = None

    with torch.no_grad():
        t_fwd = timed_side_by_side(fwd, device, args.warmup, args.repeats, args.calls)
    t_all = timed_side_by_side(fwd_bwd, device, args.warmup, args.repeats, args.calls)
    for name in fwd_bwd:
        student.grad = None
        peak = peak_mb(fwd_bwd[name], device)
        student.grad = None
        saved = saved_bytes(fwd[name], inputs_ptrs)
        results[name] = dict(fwd=t_fwd[name], all=t_all[name], peak=peak, saved=saved)
    student.grad = None
    return {name: results[name] for name in methods}


def main(argv=None):
    """Run the grid and print one table of side-by-side ratios (relative to eager)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    on_gpu = device.type == "cuda"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if on_gpu and not HAS_TRITON:
        print("warning: triton is not installed, masked_kl falls back to the PyTorch reference", file=sys.stderr)

    print(f"device={device} ({torch.cuda.get_device_name(device) if on_gpu else 'cpu, %d threads' % torch.get_num_threads()})"
          f" dtype={args.dtype} T={args.temperature} masked_frac={args.masked_frac}"
          f" vocab_gather={'V=%d' % args.vocab if args.vocab else 'off'} repeats={args.repeats} calls={args.calls}"
          f" warmup={args.warmup}")
    if not on_gpu:
        print("note: CPU run -- default N is reduced to %s so it finishes in a few minutes; masked_kl dispatches"
              " to the PyTorch reference on CPU (so it equals eager); peak memory is not measured on CPU"
              " (saved-for-backward bytes are)." % (CPU_DEFAULT_N,))

    header = (f"{'N':>7} {'S':>5} {'method':>10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'x eager':>8}"
              f" {'peak MiB':>9} {'mem x eager':>11} {'saved MiB':>10}")
    if on_gpu:
        header += f" {'GB/s':>8} {'%peak':>6}"
    print(header)
    print("-" * len(header))
    for S in args.s:
        for N in args.n:
            torch._dynamo.reset()  # fresh compiled graph per shape, no recompile-limit surprises
            methods = {"eager": masked_kl_reference}
            if not args.no_compile:
                methods["compiled"] = torch.compile(masked_kl_reference_unchecked, dynamic=False)
            methods["masked_kl"] = masked_kl
            res = bench_config(args, N, S, device, dtype, methods)
            base = res.get("eager", {})
            for name, r in res.items():
                if "error" in r:
                    print(f"{N:>7} {S:>5} {name:>10}  n/a ({r['error']})")
                    continue
                speed = base["all"] / r["all"] if "all" in base else float("nan")
                peak = f"{r['peak']:9.1f}" if r["peak"] is not None else f"{'n/a':>9}"
                mem_ratio = (
                    f"{r['peak'] / base['peak']:11.2f}" if r["peak"] is not None and base.get("peak") else f"{'n/a':>11}"
                )
                line = (f"{N:>7} {S:>5} {name:>10} {r['fwd']:9.3f} {r['all']:11.3f} {speed:8.2f}"
                        f" {peak} {mem_ratio} {r['saved'] / 2**20:10.2f}")
                if on_gpu:
                    nbytes = minimal_bytes(N, S, torch.empty((), dtype=dtype).element_size(), 1.0 - args.masked_frac)
                    gbs = nbytes / (r["all"] * 1e-3) / 1e9
                    line += f" {gbs:8.1f} {100 * gbs / args.peak_bandwidth_gbs:6.1f}"
                print(line, flush=True)
    print("x eager: eager time / method time (higher is faster); mem x eager: method peak / eager peak (lower is leaner).")
    if on_gpu:
        print("GB/s: minimal fwd+bwd traffic / measured fwd+bwd time, %% of --peak-bandwidth-gbs=%g." % args.peak_bandwidth_gbs)


if __name__ == "__main__":
    main()
