"""Scratch benchmark of the fused cosine kernels on a GPU (see notes/cosine.md for the results).

python bench/tune_cosine.py [--sweep]   # bf16 fwd+bwd: eager, torch.compile, triton; copy bandwidth;
                                        # kernel-level split; block-size sweep; eager per-call overhead
"""

import argparse
import statistics
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench, do_bench_cudagraph

import repa_fused as rf
from repa_fused.ops import reference
from repa_fused.tools import bench as benchmarks
from repa_fused.kernels import cosine

CASES = {  # name: (B, h_grid, y_grid, D, target)
    "sit": (32, (16, 16), (16, 16), 768, (16, 16)),
    "flux": (4, (64, 64), (37, 37), 1536, (37, 37)),
    "up": (2, (32, 32), (37, 37), 1152, (37, 37)),  # h upsampled to the encoder grid
}


def inputs(case, dtype=torch.bfloat16):
    b, hg, yg, d, _ = CASES[case]
    h = torch.randn(b, hg[0] * hg[1], d, device="cuda", dtype=dtype).requires_grad_(True)
    y = torch.randn(b, yg[0] * yg[1], d, device="cuda", dtype=dtype)
    return h, y


def min_bytes(h, y):
    return 2 * h.numel() * h.element_size() + y.numel() * y.element_size()


def median_ms(fn):
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def graph_ms(fn):
    """GPU time alone: the call captured in a CUDA graph and replayed (no host overhead)."""
    return do_bench_cudagraph(fn, rep=100, return_mode="median")


def events_ms(fn, reps=100):
    """The lead's harness: events around each call, synchronised (includes host overhead)."""
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


def compare(copy):
    print(f"{'case':6} {'variant':8} {'do_bench ms':>11} {'events ms':>10} {'vs eager':>9} {'vs compile':>10} "
          f"{'GB/s':>7} {'% copy':>7} {'peak MiB':>9} {'grad MiB':>9}")
    for case in CASES:
        b, hg, yg, d, tg = CASES[case]
        h, y = inputs(case)
        grids = (hg, yg, tg)
        eager = lambda h, y: reference.cosine_alignment(h, y, *grids).mean()
        variants = {"eager": eager, "compile": torch.compile(eager, dynamic=False),
                    "triton": lambda h, y: rf.cosine_alignment_loss(h, y, h_grid=hg, y_grid=yg, backend="triton")}
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
            print(f"{case:6} {name:8} {ms:11.4f} {ev:10.4f} {res['eager'] / ms:8.2f}x "
                  f"{res.get('compile', ms) / ms:9.2f}x {gbps:7.0f} {100 * gbps / copy:6.1f}% {peak:9.1f} "
                  f"{h.numel() * h.element_size() / 2**20:9.1f}")
        # Kernel split: forward alone, backward alone (on the scalars the forward saved).
        with torch.no_grad():
            fw = graph_ms(lambda: cosine.forward(h, y, *grids))
            saved = cosine.forward(h, y, *grids)[1]
            g = torch.full((1, b), 1.0 / b, device="cuda")
            bw = graph_ms(lambda: cosine.backward(g, h, y, *grids, True, False, saved=saved))
        try:
            full = graph_ms(fwd_bwd(variants["triton"], h, y))
        except Exception as error:  # capture of autograd may be refused
            full = float("nan")
            print("       (full-step graph capture failed:", type(error).__name__, error, ")")
        print(f"       GPU time of the whole triton fwd+bwd step (graph replay): {full:.4f} ms = "
              f"{min_bytes(h, y) / full / 1e6:.0f} GB/s of minimum bytes, {min_bytes(h, y) / full / 1e6 / copy * 100:.1f}% of copy")
        rd = (h.numel() * h.element_size() + y.numel() * y.element_size()) / 1e6
        wr = h.numel() * h.element_size() / 1e6
        print(f"       GPU time (graph replay): forward {fw:.4f} ms ({rd / fw:.0f} GB/s of reads), backward {bw:.4f} ms "
              f"({(rd + wr) / bw:.0f} GB/s read+write)")


def sweep():
    """Block sizes of the forward and of the backward that the case takes (identity or band); kernel time only."""
    fwd_default, identity_default, band_default = cosine._forward_blocks, cosine._identity_blocks, cosine._band_blocks
    for case in CASES:
        b, hg, yg, d, tg = CASES[case]
        h, y = inputs(case)
        grids = (hg, yg, tg)
        g = torch.full((1, b), 1.0 / b, device="cuda")
        with torch.no_grad():
            for bt, bd, w in [(16, 128, 4), (8, 128, 4), (8, 128, 2), (4, 256, 4), (16, 64, 4), (32, 64, 4)]:
                cosine._forward_blocks = lambda dim, c=(bt, bd, w): c
                cosine._forward_plan.cache_clear()
                ms = graph_ms(lambda: cosine.forward(h, y, *grids))
                print(f"{case} forward BLOCK_T={bt} BLOCK_D={bd} warps={w}: {ms:.4f} ms")
            cosine._forward_blocks = fwd_default
            cosine._forward_plan.cache_clear()
            saved = cosine.forward(h, y, *grids)[1]
            bwd = lambda: cosine.backward(g, h, y, *grids, True, False, saved=saved)
            if hg == tg:
                for bj, bd, w in [(8, 256, 4), (16, 128, 4), (4, 256, 2)]:
                    cosine._identity_blocks = lambda dim, c=(bj, bd, w): c
                    cosine._identity_plan.cache_clear()
                    print(f"{case} backward identity BLOCK_J={bj} BLOCK_D={bd} warps={w}: {graph_ms(bwd):.4f} ms")
                cosine._identity_blocks = identity_default
                cosine._identity_plan.cache_clear()
                continue
            # (BAND_ROWS, BLOCK_J, BLOCK_D, warps, STAGES)
            for cfg in [(8, 16, 64, 4, 1), (8, 16, 128, 4, 3), (8, 16, 64, 4, 3), (12, 16, 64, 4, 1),
                        (8, 32, 64, 4, 1), (8, 16, 128, 4, 2)]:
                cosine._band_blocks = lambda dim, rows_down, c=cfg: c
                cosine._band_plan.cache_clear()
                print(f"{case} backward band {cfg}: {graph_ms(bwd):.4f} ms")
            cosine._band_blocks = band_default
            cosine._band_plan.cache_clear()


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

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    copy = copy_gbps()
    print(f"copy bandwidth {copy:.0f} GB/s (read + write, 1 GiB fp32)")
    host_breakdown()
    overhead()
    compare(copy)
    if args.sweep:
        sweep()
