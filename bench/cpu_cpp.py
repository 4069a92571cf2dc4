"""The C++ backend against the eager reference on CPU: forward+backward time and peak extra memory.

    python bench/cpu_cpp.py                 # table, and bench/results/cpu_cpp.json
    python bench/cpu_cpp.py --reps 15 --dtype float32
    python bench/cpu_cpp.py --calibrate     # tiled vs Gram manifold path, one thread (the cost model's data)

Cases: the CPU-scaled cases of ``repa-fused bench`` with N ≥ 1024 (batch/8, width/8, real token grids),
plus two wider ones. Every variant computes the loss and the gradient to h (y frozen, as an encoder's
output is), from bf16 inputs by default:
* ``eager``: the reference math under PyTorch autograd (what a trainer without this library runs);
* ``reference``: the reference backend through the custom op (explicit gradients, no autograd graph);
* ``cpp``: the C++ backend through the public API.

Time: one process, the variants interleaved run by run (the 2 cores are shared with other work, so noise
hits every variant alike), median of ``--reps`` runs after two warm-ups.
Memory: a fresh subprocess per (case, variant). glibc is told to map every block of 64 KiB or more on its
own and unmap it on free (mallopt), so the resident set follows the live allocations; after one warm-up
call the peak RSS is reset through /proc/self/clear_refs, and the peak extra memory is VmHWM after the call
minus VmRSS before it: the inputs are excluded, everything the call allocates (the gradient of h
included, thread-local workspaces and MKL's buffers too) is counted.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import repa_fused as rf
from repa_fused.ops import cpp, reference
from repa_fused.ops.grids import resolve_grids

# name: (loss, B, h_grid, y_grid, D, align)
CASES = {
    "flux_1024": ("cosine", 1, (64, 64), (37, 37), 192, "min"),     # repa-fused bench, CPU-scaled
    "sdxl_min": ("urepa", 2, (32, 32), (37, 37), 192, "min"),
    "sdxl_y": ("urepa", 2, (32, 32), (37, 37), 192, "y"),
    "hires_manifold": ("manifold", 1, (64, 64), (64, 64), 128, "min"),
    "urepa_d256": ("urepa", 2, (32, 32), (37, 37), 256, "y"),       # wider: the tiled path (N < 3D)...
    "cosine_b4_d384": ("cosine", 4, (64, 64), (37, 37), 384, "min"),
}
VARIANTS = ("eager", "reference", "cpp")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_cpp.json")


def make_inputs(name: str, dtype: torch.dtype):
    _, b, h_grid, y_grid, d, _ = CASES[name]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(b, h_grid[0] * h_grid[1], d, generator=g).to(dtype).requires_grad_(True)
    y = torch.randn(b, y_grid[0] * y_grid[1], d, generator=g).to(dtype)
    return h, y


def step_fn(name: str, variant: str, h: torch.Tensor, y: torch.Tensor):
    """One forward+backward (gradient to h) of the case's loss; h.grad is cleared each time."""
    loss, _, h_grid, y_grid, _, align = CASES[name]
    grids = resolve_grids(h.shape[1], y.shape[1], h_grid, y_grid, align)

    def value():
        if variant == "eager":
            terms = reference.LOSSES[loss](h, y, *grids).mean(-1)
            return terms[0] + 3.0 * terms[1] if loss == "urepa" else terms[0]
        kw = dict(h_grid=h_grid, y_grid=y_grid, align=align, backend=variant)
        if loss == "urepa":
            return rf.urepa_loss(h, y, manifold_weight=3.0, **kw)[0]
        fn = rf.cosine_alignment_loss if loss == "cosine" else rf.manifold_loss
        return fn(h, y, **kw)

    def step():
        value().backward()
        h.grad = None

    return step


def exact_rss() -> None:
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 0)
    libc.malloc_trim(0)


def status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure_memory_here(name: str, variant: str, dtype: torch.dtype) -> float:
    """Peak extra MiB of one call (run in a fresh process: see the module docstring)."""
    exact_rss()
    h, y = make_inputs(name, dtype)
    step = step_fn(name, variant, h, y)
    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    base = status_mib("VmRSS")
    step()
    return status_mib("VmHWM") - base


def measure_memory(name: str, variant: str, dtype: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, variant, "--dtype", dtype],
                         check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_times(name: str, dtype: torch.dtype, reps: int) -> dict[str, float]:
    h, y = make_inputs(name, dtype)
    steps = {v: step_fn(name, v, h, y) for v in VARIANTS}
    for step in steps.values():
        for _ in range(2):
            step()
    times = {v: [] for v in VARIANTS}
    for _ in range(reps):
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            times[variant].append(1e3 * (time.perf_counter() - start))
    return {v: statistics.median(t) for v, t in times.items()}


def environment() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "python": platform.python_version()}


def run(reps: int, dtype: str, cases: list[str]) -> dict:
    rows = []
    for name in cases:
        times = measure_times(name, getattr(torch, dtype), reps)
        memory = {v: measure_memory(name, v, dtype) for v in VARIANTS}
        loss, b, h_grid, y_grid, d, align = CASES[name]
        target = resolve_grids(h_grid[0] * h_grid[1], y_grid[0] * y_grid[1], h_grid, y_grid, align)[2]
        # The gradient of h is an output every variant must allocate: also compare what lies beyond it.
        grad = b * h_grid[0] * h_grid[1] * d * getattr(torch, dtype).itemsize / 2**20
        rows.append({"case": name, "loss": loss, "B": b, "h_grid": h_grid, "y_grid": y_grid, "D": d,
                     "align": align, "N": target[0] * target[1], "ms": times, "peak_extra_mib": memory,
                     "grad_h_mib": grad,
                     "time_ratio_cpp_vs_eager": times["cpp"] / times["eager"],
                     "memory_ratio_cpp_vs_eager": memory["cpp"] / memory["eager"],
                     "memory_ratio_beyond_grad": max(memory["cpp"] - grad, 0) / (memory["eager"] - grad)})
        print(format_row(rows[-1]), flush=True)
    return {"environment": environment(), "dtype": dtype, "reps": reps, "rows": rows}


def format_row(row: dict) -> str:
    ms, mib = row["ms"], row["peak_extra_mib"]
    return (f"{row['case']:<15} {row['loss']:<8} B={row['B']} N={row['N']:<5} D={row['D']:<4} | "
            + " ".join(f"{v} {ms[v]:7.1f} ms {mib[v]:6.1f} MiB |" for v in VARIANTS)
            + f" cpp/eager: time {row['time_ratio_cpp_vs_eager']:.2f}, memory {row['memory_ratio_cpp_vs_eager']:.2f}"
            f" ({row['memory_ratio_beyond_grad']:.2f} beyond grad h {row['grad_h_mib']:.1f} MiB)")


def calibrate() -> None:
    """Tiled vs Gram manifold path on one thread (thread CPU time, robust to other work on the cores)."""
    torch.set_num_threads(1)
    ext = cpp.extension()
    print("N      D    N/D   tiled ms (fwd+bwd)   gram ms (fwd+bwd)   auto")
    for n_side, d in [(24, 256), (32, 256), (37, 512), (37, 256), (32, 192), (37, 192), (37, 128), (64, 128)]:
        grid = [n_side, n_side]
        h = torch.randn(1, n_side * n_side, d, dtype=torch.bfloat16)
        y = torch.randn(1, n_side * n_side, d, dtype=torch.bfloat16)
        result = {}
        for method in ("tiled", "gram"):
            def call():
                ext.forward("urepa", h, y, grid, grid, grid, method)
                ext.backward("urepa", torch.ones(2, 1), h, y, grid, grid, grid, True, False, method)
            call()
            samples = []
            for _ in range(5):
                start = time.thread_time()
                call()
                samples.append(1e3 * (time.thread_time() - start))
            result[method] = statistics.median(samples)
        n = n_side * n_side
        print(f"{n:<6} {d:<4} {n / d:5.1f} {result['tiled']:12.1f} {result['gram']:20.1f}"
              f"   {'gram' if n >= 3 * d else 'tiled'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", default=RESULTS, help="where to write the results")
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--memory-child", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(measure_memory_here(*args.memory_child, getattr(torch, args.dtype)))
        return
    if cpp.extension() is None:
        sys.exit("the C++ extension is not built: pip install --no-build-isolation -e .")
    if args.calibrate:
        calibrate()
        return
    report = run(args.reps, args.dtype, args.cases)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as out:
        json.dump(report, out, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
