"""Tuning bench of the fused cosine kernels on a GPU (results and history: docs/cosine.md).

    python -m bench.tune.cosine [--sweep] [--cases NAME ...]   # from the repository root

Per case, bf16, fwd+bwd with the gradient to h: eager, torch.compile and triton (do_bench median, events
around a synchronised call, peak memory), then the GPU time of the forward and the backward kernels alone
(CUDA-graph replay) against the copy bandwidth measured in the same process; the host cost of a call
(launches, a tiny input's fwd+bwd). ``--sweep`` times the kernels under other tile configs, passed to
``cosine.forward``/``cosine.backward`` as a :class:`CosineTiles` (kernel time alone).

Cases are ``repa_fused.tools.cases.BENCH_CASES`` by name (default: the cosine ones); the kernels run on
any case's geometry, e.g. ``sdxl_y`` (h upsampled 32² → 37²) takes the hand-pipelined band loop.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench, do_bench_cudagraph

import repa_fused as rf
from repa_fused.kernels import cosine
from repa_fused.kernels.cosine import CosineTiles
from repa_fused.ops import reference
from repa_fused.tools import bench as benchmarks
from repa_fused.tools.cases import BENCH_CASES, BENCH_CASES_BY_NAME, Case

DEFAULT_CASES = [case.name for case in BENCH_CASES if case.loss == "cosine"]

# Tile configs the sweep tries (the defaults of kernels/cosine.py are among them).
FORWARD_TILES = [(8, 128, 4), (16, 128, 4), (8, 128, 2), (4, 256, 4), (16, 64, 4), (32, 64, 4)]  # T, D, warps
IDENTITY_TILES = [(8, 256, 4), (16, 128, 4), (4, 256, 2)]  # BLOCK_J, BLOCK_D, warps
BAND_TILES = [(8, 16, 64, 4, 1), (8, 16, 128, 4, 3), (8, 16, 64, 4, 3), (12, 16, 64, 4, 1),  # rows, J, D,
              (8, 32, 64, 4, 1), (8, 16, 128, 4, 2)]                                          # warps, stages


def inputs(case: Case, dtype=torch.bfloat16):
    """(h requiring grad, y) of the case on the GPU."""
    return benchmarks.make_inputs(case, "cuda", dtype)


def unit_grad(case: Case) -> torch.Tensor:
    """The (1, B) upstream gradient of the per-sample losses that a batch mean hands the backward."""
    return torch.full((1, case.batch), 1.0 / case.batch, device="cuda")


def min_bytes(h, y):
    return 2 * h.numel() * h.element_size() + y.numel() * y.element_size()


def median_ms(fn):
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def graph_ms(fn):
    """GPU time alone: the call captured in a CUDA graph and replayed (no host overhead)."""
    return do_bench_cudagraph(fn, rep=100, return_mode="median")


def events_ms(fn, reps=100):
    """``repa-fused bench``'s wall time: events around each synchronised call (host included)."""
    return statistics.median(benchmarks.time_ms(fn, torch.device("cuda"), reps, warmup=5))


def copy_gbps():
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def fwd_bwd(loss, h, y):
    def step():
        h.grad = None
        loss(h, y).backward()
    return step


def compare(cases, copy):
    print(f"{'case':12} {'variant':8} {'do_bench ms':>11} {'events ms':>10} {'vs eager':>9} {'vs compile':>10} "
          f"{'GB/s':>7} {'% copy':>7} {'peak MiB':>9} {'grad MiB':>9}")
    for case in cases:
        h, y = inputs(case)
        grids = case.grids()
        eager = lambda h, y: reference.cosine_alignment(h, y, *grids).mean()
        variants = {"eager": eager, "compile": torch.compile(eager, dynamic=False),
                    "triton": lambda h, y: rf.cosine_alignment_loss(h, y, h_grid=case.h_grid, y_grid=case.y_grid,
                                                                    align=case.align, backend="triton")}
        res = {}
        for name, loss in variants.items():
            step = fwd_bwd(loss, h, y)
            ms, ev = median_ms(step), events_ms(step)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            res[name] = ms
            gbps = min_bytes(h, y) / ms / 1e6
            print(f"{case.name:12} {name:8} {ms:11.4f} {ev:10.4f} {res['eager'] / ms:8.2f}x "
                  f"{res.get('compile', ms) / ms:9.2f}x {gbps:7.0f} {100 * gbps / copy:6.1f}% {peak:9.1f} "
                  f"{h.numel() * h.element_size() / 2**20:9.1f}")
        # Kernel split: forward alone, backward alone (on the scalars the forward saved).
        with torch.no_grad():
            fw = graph_ms(lambda: cosine.forward(h, y, *grids))
            saved = cosine.forward(h, y, *grids)[1]
            g = unit_grad(case)
            bw = graph_ms(lambda: cosine.backward(g, h, y, *grids, True, False, saved=saved))
        try:
            full = graph_ms(fwd_bwd(variants["triton"], h, y))
        except Exception as error:  # capture of autograd may be refused
            full = float("nan")
            print("       (full-step graph capture failed:", type(error).__name__, error, ")")
        print(f"       GPU time of the whole triton fwd+bwd step (graph replay): {full:.4f} ms = "
              f"{min_bytes(h, y) / full / 1e6:.0f} GB/s of minimum bytes, "
              f"{min_bytes(h, y) / full / 1e6 / copy * 100:.1f}% of copy")
        rd = (h.numel() * h.element_size() + y.numel() * y.element_size()) / 1e6
        wr = h.numel() * h.element_size() / 1e6
        print(f"       GPU time (graph replay): forward {fw:.4f} ms ({rd / fw:.0f} GB/s of reads), backward "
              f"{bw:.4f} ms ({(rd + wr) / bw:.0f} GB/s read+write)")


def sweep(cases):
    """Tile configs of the forward and of the backward the case takes (identity or band); kernel time only."""
    for case in cases:
        h, y = inputs(case)
        grids = case.grids()
        g = unit_grad(case)
        with torch.no_grad():
            for tiles in FORWARD_TILES:
                ms = graph_ms(lambda: cosine.forward(h, y, *grids, tiles=CosineTiles(forward=tiles)))
                print(f"{case.name} forward (BLOCK_T, BLOCK_D, warps)={tiles}: {ms:.4f} ms")
            saved = cosine.forward(h, y, *grids)[1]
            if tuple(case.h_grid) == case.target_grid:
                configs = [("identity", CosineTiles(identity=tiles)) for tiles in IDENTITY_TILES]
            else:
                configs = [("band", CosineTiles(band=tiles)) for tiles in BAND_TILES]
            for kind, tiles in configs:
                bwd = lambda: cosine.backward(g, h, y, *grids, True, False, saved=saved, tiles=tiles)
                print(f"{case.name} backward {kind} {getattr(tiles, kind)}: {graph_ms(bwd):.4f} ms")


@triton.jit
def _noop1(x):
    tl.store(x, 1.0)


@triton.jit
def _noop30(x, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
            a21, a22, a23, a24, a25, a26, a27, a28, a29):
    tl.store(x, 1.0)


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def host_breakdown():
    """What a call costs on this host (us): the floor of every eager variant on small inputs."""
    x = torch.zeros(4, device="cuda")
    ints = list(range(3, 32))
    h = torch.randn(1, 4, 8, device="cuda")
    y = torch.randn(1, 4, 8, device="cuda")
    grids = ((2, 2), (2, 2), (2, 2))
    saved = cosine.forward(h, y, *grids)[1]
    g = torch.ones(1, 1, device="cuda")
    rows = {
        "python loop 1e5 adds": lambda: sum(range(100000)),
        "torch x.add_(1) (one launch)": lambda: x.add_(1),
        "torch.empty(4)": lambda: torch.empty(4, device="cuda"),
        "triton launch, 1 arg": lambda: _noop1[(1,)](x),
        "triton launch, 30 args": lambda: _noop30[(1,)](x, *ints),
        "cosine.forward tiny": lambda: cosine.forward(h, y, *grids),
        "cosine.backward tiny": lambda: cosine.backward(g, h, y, *grids, True, False, saved=saved),
        "functional fwd tiny, no grad": lambda: rf.cosine_alignment_loss(h, y, backend="triton"),
    }
    for name, fn in rows.items():
        with torch.no_grad():
            print(f"host {name:34} {host_us(fn):8.1f} us")


def overhead():
    """Host time of one eager fwd+bwd on a tiny input (GPU work negligible): triton vs reference."""
    h = torch.randn(1, 4, 8, device="cuda").requires_grad_(True)
    y = torch.randn(1, 4, 8, device="cuda")
    for backend in ("triton", "reference"):
        step = fwd_bwd(lambda h, y: rf.cosine_alignment_loss(h, y, backend=backend), h, y)
        print(f"tiny input fwd+bwd host overhead, {backend}: {host_us(step, n=200):.1f} us/call")
    eager = lambda h, y: reference.cosine_alignment(h, y, (2, 2), (2, 2), (2, 2)).mean()
    print(f"tiny input fwd+bwd host overhead, plain eager autograd: {host_us(fwd_bwd(eager, h, y), n=200):.1f} us/call")


def parse_cases(parser: argparse.ArgumentParser, names: list[str]) -> list[Case]:
    unknown = [name for name in names if name not in BENCH_CASES_BY_NAME]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {sorted(BENCH_CASES_BY_NAME)}")
    return [BENCH_CASES_BY_NAME[name] for name in names]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.tune.cosine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time the kernels under other tile configs")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="NAME",
                        help=f"BENCH_CASES by name (default: {' '.join(DEFAULT_CASES)}; all: "
                             f"{' '.join(BENCH_CASES_BY_NAME)})")
    args = parser.parse_args(argv)
    cases = parse_cases(parser, args.cases)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    copy = copy_gbps()
    print(f"copy bandwidth {copy:.0f} GB/s (read + write, 1 GiB fp32)")
    host_breakdown()
    overhead()
    compare(cases, copy)
    if args.sweep:
        sweep(cases)


if __name__ == "__main__":
    main()
