"""Benchmark cases and harness shared by ``repa-fused bench`` and ``bench/`` (pytest-benchmark).

Every case is timed forward+backward (gradient to ``h``; ``y`` frozen, as an encoder's output is) for:
``eager`` (the loss as a trainer writes it, in the inputs' dtype: F.interpolate, F.normalize, torch.bmm),
``compile`` (``torch.compile`` of that same code), ``reference_fp32`` (the fp32 reference with PyTorch's
autograd, a labelled third row) and each fused backend available on the device, side by side in one
run, median of repeated runs. Speedups are against the first two.

Two times per variant: "fwd+bwd ms", one synchronised call timed with events, host work (Python,
autograd, launches) included; and, on a GPU, "GPU ms", the same call captured ten times in a CUDA graph
and replayed: the device's own time, which is what the loss costs inside a training step whose host runs
ahead of the GPU. Speedups are given for both.

Ceilings are measured in the same run: the device-to-device copy bandwidth (bytes read + written) and the
matmul rate (bf16 on a GPU). Each result (GPU time where there is one) is set against them with the
counted minimum work of its case:
* bytes: read h and y once, write grad h once;
* FLOPs (manifold term): the cheaper of the tiled algorithm, 4·B·N²·D (two similarity matrices halved by
  symmetry, then (ĤĤᵀ − ŶŶᵀ)Ĥ), and the Gram algorithm, 8·B·N·D² (ĤᵀĤ, ŶᵀŶ halved, ĤᵀŶ, then
  Ĥ(ĤᵀĤ) − Ŷ(ŶᵀĤ)).

On a CPU the cases keep their token grids (so N and the interpolation are those of the real models) and
scale the batch by 1/8 and the width by 1/8 (at least 1 and 64), which makes the whole run a minute or two.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import datetime
import json
import math
import platform
import statistics
import time
from typing import Callable, Optional

import torch

from .._version import __version__
from ..ops import api as functional
from ..ops import dispatch, reference
from .cases import BENCH_CASES, BENCH_CASES_BY_NAME, Case


CASES = BENCH_CASES
CASES_BY_NAME = BENCH_CASES_BY_NAME


def make_inputs(case: Case, device, dtype=torch.bfloat16, seed: int = 0):
    h, y = case.inputs(device, dtype, seed)
    return h.requires_grad_(True), y


MANIFOLD_WEIGHT = 3.0  # U-REPA's default weight, in every variant of a "urepa" case


def eager_loss(case: Case) -> Callable:
    """The reference math (fp32 whatever the inputs) with PyTorch's own autograd: the "reference_fp32" row."""
    grids = (case.h_grid, case.y_grid, case.target_grid)

    def loss(h, y):
        if case.loss == "urepa":
            terms = reference.urepa(h, y, *grids).mean(-1)
            return terms[0] + MANIFOLD_WEIGHT * terms[1]
        fn = reference.cosine_alignment if case.loss == "cosine" else reference.manifold
        return fn(h, y, *grids).mean()

    return loss


def trainer_loss(case: Case) -> Callable:
    """The loss as a trainer without this library writes it, in the inputs' dtype (what runs under bf16
    autocast): F.interpolate, F.normalize and torch.bmm on the bf16 tensors themselves."""
    import torch.nn.functional as F

    target = case.target_grid

    def on_target(x, grid):
        if tuple(grid) == tuple(target):
            return x
        batch, _, dim = x.shape
        image = x.transpose(1, 2).reshape(batch, dim, *grid)
        return F.interpolate(image, size=target, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)

    def loss(h, y):
        h_hat = F.normalize(on_target(h, case.h_grid), dim=-1)
        y_hat = F.normalize(on_target(y, case.y_grid), dim=-1)
        cosine = -(h_hat * y_hat).sum(-1).mean()
        if case.loss == "cosine":
            return cosine
        manifold = (torch.bmm(h_hat, h_hat.mT) - torch.bmm(y_hat, y_hat.mT)).square().mean()
        return manifold if case.loss == "manifold" else cosine + MANIFOLD_WEIGHT * manifold

    return loss


def backend_loss(case: Case, backend: str) -> Callable:
    kwargs = dict(h_grid=case.h_grid, y_grid=case.y_grid, align=case.align, backend=backend)
    if case.loss == "cosine":
        return lambda h, y: functional.cosine_alignment_loss(h, y, **kwargs)
    if case.loss == "manifold":
        return lambda h, y: functional.manifold_loss(h, y, **kwargs)
    return lambda h, y: functional.urepa_loss(h, y, manifold_weight=MANIFOLD_WEIGHT, **kwargs)[0]


def variants(case: Case, device: torch.device, backends: Optional[list[str]] = None,
             with_compile: bool = True, with_reference: bool = True) -> dict[str, Callable]:
    """The honest baselines first: ``eager`` and ``compile`` in the inputs' dtype (trainer_loss), then
    ``reference_fp32`` (this library's fp32 reference with PyTorch's autograd, labelled as such), then
    the fused backends. Speedups are taken against the first two."""
    out = {"eager": trainer_loss(case)}
    if with_compile:
        # A fresh start per case: the trainer loss is one code object, and past dynamo's recompile limit
        # (8 shapes) a further case would silently run eager under the "compile" label. (This also drops the
        # caller's own compiled functions: variants() is a benchmark's, not a library call.)
        torch.compiler.reset()
        out["compile"] = torch.compile(trainer_loss(case), dynamic=False)
    if with_reference:
        out["reference_fp32"] = eager_loss(case)
    for name in dispatch.available_backends(device):
        if name != "reference" and (backends is None or name in backends):
            out[name] = backend_loss(case, name)
    return out


# --------------------------------------------------------------------------------------------------
# Timing and memory.


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], None], device: torch.device, reps: int, warmup: int = 3,
            before: Callable[[], None] = lambda: None) -> list[float]:
    """Per-call times in ms (CUDA events on a GPU, perf_counter on a CPU), after ``warmup`` calls.
    ``before()`` runs untimed ahead of every call (e.g. to evict a file cache)."""
    for _ in range(warmup):
        before()
        fn()
    times = []
    for _ in range(reps):
        before()
        _synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def graph_time_ms(fn: Callable[[], None], device: torch.device, reps: int, calls: int = 10) -> Optional[float]:
    """GPU time per call: ``calls`` calls captured in one CUDA graph, median over ``reps`` replays.

    Graph replay removes the host (Python, autograd, launches) from the measurement: what is left is the
    work a training step pays on the GPU when its host runs ahead, as it does in a real step.
    """
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        times = time_ms(graph.replay, device, reps=max(5, reps // 5), warmup=2)
        del graph
        return statistics.median(times) / calls
    except RuntimeError:  # something in the variant cannot be captured
        torch.cuda.synchronize(device)
        return None


def _rss_mib(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=None)
def _exact_cpu_rss() -> bool:
    """Make glibc map every block of 64 KiB or more on its own and unmap it on free, so that the resident
    set follows what is allocated (by default freed memory stays cached in the process and hides peaks)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 64 * 1024) == 1 and libc.mallopt(m_trim_threshold, 0) == 1
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def peak_extra_mib(fn: Callable[[], None], device: torch.device) -> Optional[float]:
    """Peak memory of one call above what was allocated before it (inputs included in the baseline).

    CUDA: the caching allocator's peak. CPU (Linux): the process's peak RSS, reset through
    /proc/self/clear_refs before the call; None where that is not available.
    """
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not _exact_cpu_rss():
        return None
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return None
    base = _rss_mib("VmRSS")
    fn()
    peak = _rss_mib("VmHWM")
    return None if base is None or peak is None else max(peak - base, 0.0)


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """Copy bandwidth (GB/s, bytes read + written) and matmul rate (TFLOP/s) on this device."""
    n_copy = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.randn(n_copy // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = statistics.median(time_ms(lambda: dst.copy_(src), device, reps=20 if device.type == "cuda" else 5))
    # The matmul the losses run: bf16 tensor cores on a GPU; fp32 on a CPU, where every backend upcasts.
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    mm_ms = statistics.median(time_ms(lambda: a @ b, device, reps=10 if device.type == "cuda" else 3))
    return {"copy_gbps": 2 * n_copy / copy_ms / 1e6, "matmul_tflops": 2 * size**3 / mm_ms / 1e9,
            "matmul_dtype": str(dtype).replace("torch.", "")}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device), "torch": torch.__version__, "triton": triton_version,
        "repa_fused": __version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_case(case: Case, device: torch.device, reps: int, backends: Optional[list[str]] = None,
             with_compile: bool = True, dtype=torch.bfloat16, ceilings: Optional[dict] = None,
             with_reference: bool = True) -> list[dict]:
    h, y = make_inputs(case, device, dtype)
    rows = []
    for variant, loss in variants(case, device, backends, with_compile, with_reference).items():
        def step():
            h.grad = None
            loss(h, y).backward()

        try:
            times = time_ms(step, device, reps=reps)
        except Exception as error:  # noqa: BLE001 - e.g. torch.compile without a C++ compiler: say so, go on
            rows.append({"case": case.name, "loss": case.loss, "variant": variant, "ms": None, "gpu_ms": None,
                         "peak_extra_mib": None, "error": f"{type(error).__name__}: {error}"[:300]})
            h.grad = None
            continue
        ms = statistics.median(times)
        h.grad = None  # the baseline holds no gradient: the peak counts the new one
        peak = peak_extra_mib(step, device)
        gpu_ms = graph_time_ms(step, device, reps)
        row = {
            "case": case.name, "loss": case.loss, "variant": variant, "batch": case.batch,
            "h_grid": list(case.h_grid), "y_grid": list(case.y_grid), "target_grid": list(case.target_grid),
            "dim": case.dim, "align": case.align, "dtype": str(dtype).replace("torch.", ""),
            "ms": ms, "ms_min": min(times), "ms_max": max(times), "reps": reps, "gpu_ms": gpu_ms, "peak_extra_mib": peak,
            "grad_h_mib": h.numel() * h.element_size() / 2**20,
            "inputs_mib": (h.numel() * h.element_size() + y.numel() * y.element_size()) / 2**20,
        }
        rows.append(row)
        h.grad = None
    for key, suffix in (("ms", ""), ("gpu_ms", "_gpu")):
        by_variant = {row["variant"]: row[key] for row in rows}
        for row in rows:
            mine = row[key]
            for base in ("eager", "compile"):
                theirs = by_variant.get(base)
                row[f"speedup_vs_{base}{suffix}"] = theirs / mine if theirs and mine else None
    for row in rows:  # work over time: on the GPU the graph-replay time, the cost inside a training step
        ms = row["gpu_ms"] or row["ms"]
        if ms is None:
            continue
        row["gbps"] = case.min_bytes(h.element_size()) / ms / 1e6
        row["tflops"] = case.min_flops() / ms / 1e9
        if ceilings:
            row["pct_copy_bw"] = 100 * row["gbps"] / ceilings["copy_gbps"]
            row["pct_matmul"] = 100 * row["tflops"] / ceilings["matmul_tflops"]
    return rows


def run(device=None, cases: Optional[list[str]] = None, reps: Optional[int] = None,
        backends: Optional[list[str]] = None, with_compile: bool = True, full_size: bool = False,
        log: Callable[[str], None] = lambda message: None) -> dict:
    """Run the benchmark; returns {"environment", "ceilings", "results": [row, ...]}."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    selected = [CASES_BY_NAME[name] for name in cases] if cases else CASES
    if device.type != "cuda" and not full_size:
        selected = [case.scaled_for_cpu() for case in selected]
    reps = reps or (50 if device.type == "cuda" else 5)
    if device.type == "cpu":
        _exact_cpu_rss()  # before the first allocation, so no cached block hides a peak
    ceilings = measure_ceilings(device)
    results = []
    for case in selected:
        log(f"{case.name}: B={case.batch} {case.h_grid}->{case.target_grid}<-{case.y_grid} D={case.dim}")
        results.extend(run_case(case, device, reps, backends, with_compile, ceilings=ceilings))
    return {"environment": environment(device), "ceilings": ceilings, "cpu_scaled": device.type != "cuda"
            and not full_size, "results": results}


# --------------------------------------------------------------------------------------------------
# Output.

# Runs of one variant that spread wider than this fraction of their median are flagged: a timing to
# repeat, not to quote (a busy machine, a frequency change).
SPREAD_WARNING = 0.2

COLUMNS = [("case", "{}"), ("variant", "{}"), ("ms", "{:.3f}"), ("ms_spread", "{}"), ("speedup_vs_eager", "{:.2f}x"),
           ("speedup_vs_compile", "{:.2f}x"), ("gpu_ms", "{:.3f}"), ("speedup_vs_eager_gpu", "{:.2f}x"),
           ("speedup_vs_compile_gpu", "{:.2f}x"), ("peak_extra_mib", "{:.1f}"), ("gbps", "{:.3g}"),
           ("pct_copy_bw", "{:.0f}%"), ("tflops", "{:.3g}"), ("pct_matmul", "{:.0f}%")]
HEADERS = {"ms": "fwd+bwd ms", "ms_spread": "min..max", "speedup_vs_eager": "vs eager", "speedup_vs_compile": "vs compile",
           "gpu_ms": "GPU ms", "speedup_vs_eager_gpu": "GPU vs eager", "speedup_vs_compile_gpu": "GPU vs compile",
           "peak_extra_mib": "peak MiB", "gbps": "GB/s", "pct_copy_bw": "% copy", "tflops": "TFLOP/s",
           "pct_matmul": "% mm"}


def _cell(row: dict, key: str, fmt: str) -> str:
    if key == "ms_spread":
        return "-" if row.get("ms_max") is None else f"{row['ms_min']:.3g}..{row['ms_max']:.3g}"
    value = row.get(key)
    if value is None or (key in ("tflops", "pct_matmul") and row["loss"] == "cosine"):
        return "-"
    return fmt.format(value)


def format_table(report: dict, markdown: bool = False) -> str:
    env, ceil = report["environment"], report["ceilings"]
    header = [HEADERS.get(key, key) for key, _ in COLUMNS]
    body = [[_cell(row, key, fmt) for key, fmt in COLUMNS] for row in report["results"]]
    title = (f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}\n"
             f"copy {ceil['copy_gbps']:.0f} GB/s, {ceil['matmul_dtype']} matmul {ceil['matmul_tflops']:.3g} TFLOP/s"
             + (" | CPU-scaled cases (B/8, D/8)" if report.get("cpu_scaled") else ""))
    errors = [f"{row['case']} {row['variant']} failed: {row['error']}" for row in report["results"] if row.get("error")]
    errors += spread_warnings(report)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return title + "\n\n" + "\n".join(lines + errors)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    fmt_line = lambda cells: "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in
                                       enumerate(zip(cells, widths)))
    return "\n".join([title, fmt_line(header), fmt_line(["-" * w for w in widths])] + [fmt_line(r) for r in body]
                     + errors)


def spread_warnings(report: dict) -> list[str]:
    """One line per variant whose timed runs disagree by more than SPREAD_WARNING of their median."""
    lines = []
    for row in report["results"]:
        if row.get("ms_max") is None or not row.get("ms"):
            continue
        spread = (row["ms_max"] - row["ms_min"]) / row["ms"]
        if spread > SPREAD_WARNING:
            lines.append(f"warning: {row['case']} {row['variant']}: its {row['reps']} runs disagree by "
                         f"{100 * spread:.0f}% of the median (min {row['ms_min']:.3g}, median {row['ms']:.3g}, "
                         f"max {row['ms_max']:.3g} ms): rerun before quoting it")
    return lines


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as out:
        json.dump(report, out, indent=2)


def write_csv(report: dict, path: str) -> None:
    import csv

    keys = list(dict.fromkeys(k for row in report["results"] for k in row)) + ["device", "torch", "triton", "date"]
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=keys)
        writer.writeheader()
        for row in report["results"]:
            writer.writerow({**row, **{k: report["environment"][k] for k in ("device", "torch", "triton", "date")}})


def plot(report: dict, path: str) -> None:
    """Bar chart of fwd+bwd time per case and variant (log scale); needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(row["case"] for row in report["results"]))
    names = list(dict.fromkeys(row["variant"] for row in report["results"]))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.6 * len(cases) + 2, 4))
    for i, name in enumerate(names):
        ms = [next((r["ms"] for r in report["results"] if r["case"] == c and r["variant"] == name), math.nan)
              for c in cases]
        ax.bar([x + i * width for x in range(len(cases))], ms, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("forward+backward ms")
    ax.set_title(report["environment"]["device"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
