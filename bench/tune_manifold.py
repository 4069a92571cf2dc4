"""Scratch benchmark of the manifold / U-REPA kernels on a GPU (results and analysis: notes/manifold.md).

python bench/tune_manifold.py [--sweep] [--accuracy] [--out DIR]
  bf16 fwd+bwd of the bench cases sdxl_y and hires_manifold: eager, torch.compile, triton (auto, tiled,
  gram), median ms (do_bench), peak extra memory, TFLOP/s against the 8192³ bf16 matmul of the same run;
  the kernel split (pre-pass, tiles, Gram products, adjoint); --sweep: tile configurations of the tiled
  kernels; --accuracy: Gram vs tiled vs fp64 as the cancellation ratio grows.
"""

import argparse
import dataclasses
import json
import os
import time

import torch
import triton
from triton.testing import do_bench

from repa_fused.tools import bench as benchmarks
from repa_fused.kernels import manifold as M


def ms(fn):
    return do_bench(fn, warmup=25, rep=150, return_mode="median")


def peak_mib(fn, h):
    h.grad = None  # the previous step's gradient is not part of this one's peak
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def matmul_tflops():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / ms(lambda: a @ b) / 1e9


def flops(case, algorithm):
    """FLOPs of the algorithm as implemented (h gradient only) and the cheaper one's minimum."""
    n = case.target_grid[0] * case.target_grid[1]
    impl = {"tiled": 8 * n * n * case.dim, "gram": 20 * n * case.dim**2}[algorithm] * case.batch
    return impl, case.min_flops()


def end_to_end(case, rate, results, with_compile=True):
    h, y = benchmarks.make_inputs(case, "cuda")
    n = case.target_grid[0] * case.target_grid[1]
    steps = {"eager": benchmarks.eager_loss(case)}
    if with_compile:
        steps["compile"] = torch.compile(benchmarks.eager_loss(case), dynamic=False)
    for algorithm in ("auto", "tiled", "gram"):
        steps[f"triton_{algorithm}"] = (algorithm, benchmarks.backend_loss(case, "triton"))
    times = {}
    for name, loss in steps.items():
        algorithm = None
        if isinstance(loss, tuple):
            algorithm, loss = loss
            M.ALGORITHM = algorithm

        def step():
            h.grad = None
            loss(h, y).backward()

        try:
            step()
            t = ms(step)
            mem = peak_mib(step, h)
        except Exception as exc:  # keep the rest of the run
            print(f"{case.name} {name}: FAILED {type(exc).__name__}: {exc}")
            continue
        finally:
            M.ALGORITHM = "auto"
        times[name] = t
        chosen = M.choose_algorithm(n, case.dim, backward=True) if algorithm == "auto" else algorithm
        row = {"case": case.name, "variant": name, "ms": t, "peak_extra_mib": mem}
        if algorithm:
            impl, minimum = flops(case, chosen)
            row.update(algorithm=chosen, tflops_impl=impl / t / 1e9, tflops_min=minimum / t / 1e9,
                       frac_of_matmul_min=minimum / t / 1e9 / rate)
        results.append(row)
    budget = (2 * h.numel() + y.numel()) * h.element_size() / 2**20
    for row in results:
        if row["case"] == case.name:
            row["vs_eager"] = times.get("eager", float("nan")) / row["ms"]
            row["vs_compile"] = times.get("compile", float("nan")) / row["ms"]
            row["mem_budget_ratio"] = row["peak_extra_mib"] / budget


def stage_inputs(case):
    """(h, y, grids, the pre-pass output, an upstream gradient, a gradient buffer) of one case."""
    h, y = benchmarks.make_inputs(case, "cuda")
    grids = (case.h_grid, case.y_grid, case.target_grid)
    prep = M._prepare(h.detach(), y, *grids)
    b, n, d = prep.shape
    return h, y, grids, prep, torch.rand(2, b, device="cuda"), torch.empty(b, n, d, device="cuda", dtype=h.dtype)


def kernel_split(case, results):
    """Each stage alone: where the time goes (and what a fused-interpolation variant could save)."""
    h, y, grids, prep, grad, out = stage_inputs(case)
    b, n, d = prep.shape
    stages = {
        "prepass": lambda: M._prepare(h.detach(), y, *grids),
        "tiled_fwd": lambda: M._tiled_loss(prep),
        "gram_fwd": lambda: M._gram_loss(prep),
        "tiled_bwd": lambda: M._tiled_backward(prep, grad, out, None),
        "gram_bwd": lambda: M._gram_backward(prep, grad, out, None),
    }
    if case.h_grid != case.target_grid:
        stages["adjoint"] = lambda: M._adjoint(out, h, case.h_grid, case.target_grid)
    for name, fn in stages.items():
        try:
            fn()
            t = ms(fn)
        except Exception as exc:
            print(f"{case.name} {name}: FAILED {type(exc).__name__}: {exc}")
            continue
        row = {"case": case.name, "stage": name, "ms": t}
        if name in ("tiled_fwd", "tiled_bwd"):
            row["tflops"] = (2 if name == "tiled_fwd" else 6) * b * n * n * d / t / 1e9
        if name in ("gram_fwd", "gram_bwd"):
            row["tflops"] = (8 if name == "gram_fwd" else 12) * b * n * d * d / t / 1e9
        if name == "prepass":
            moved = (h.numel() + y.numel()) * 2 + prep.z.numel() * 2
            row["gbps"] = moved / t / 1e6
        results.append(row)


PANEL_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4),
                 (128, 64, 64, 8, 3)]
PROD_CONFIGS = [(64, 128, 8, 3), (64, 256, 8, 3), (64, 128, 8, 4), (128, 128, 8, 3), (32, 256, 8, 4)]
VEC_CONFIGS = [(16, 128, 4), (8, 256, 4), (32, 128, 8), (16, 256, 8), (4, 512, 4)]


def sweep(case, results):
    """One field group at a time around the default (the others at their defaults)."""
    h, y, grids, prep, grad, out = stage_inputs(case)
    b, n, d = prep.shape
    default = M.CONFIG
    groups = [("panel", PANEL_CONFIGS, ("panel_block_m", "panel_block_n", "panel_block_k", "panel_warps",
                                         "panel_stages"), lambda: M._tiled_backward(prep, grad, out, None),
               6 * b * n * n * d),
              ("prod", PROD_CONFIGS, ("prod_block_k", "prod_block_d", "prod_warps", "prod_stages"),
               lambda: M._tiled_backward(prep, grad, out, None), 6 * b * n * n * d),
              ("vec", VEC_CONFIGS, ("vec_block_t", "vec_block_d", "vec_warps"),
               lambda: M._prepare(h.detach(), y, *grids), None)]
    for kernel, configs, fields, fn, work in groups:
        for config in configs:
            M.CONFIG = dataclasses.replace(default, **dict(zip(fields, config)))
            try:
                fn()
                t = ms(fn)
                row = {"case": case.name, "kernel": kernel, "config": config, "ms": t}
                if work:
                    row["tflops"] = work / t / 1e9
                results.append(row)
            except Exception as exc:
                print(f"{kernel} {config}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
        M.CONFIG = default


def accuracy(results, grid=(64, 64), dim=1024, batch=2):
    """Relative error of the loss and of the h-gradient (through the normaliser) of tiled and Gram
    against fp64 on the same bf16 Ĥ, Ŷ, as the cancellation ratio (‖ĤᵀĤ‖² + ‖ŶᵀŶ‖²)/‖S_h − S_y‖² grows:
    y = h + σ·noise (aligned features), with and without a shared component (real features have one)."""
    n = grid[0] * grid[1]
    for shared in (0.0, 2.0):
        for sigma in (3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003):
            g = torch.Generator(device="cuda").manual_seed(0)
            h = torch.randn(batch, n, dim, device="cuda", generator=g)
            h = h + shared * torch.randn(batch, 1, dim, device="cuda", generator=g)
            y = (h + sigma * torch.randn(batch, n, dim, device="cuda", generator=g)).bfloat16()
            h = h.bfloat16()
            prep = M._prepare(h, y, grid, grid, grid)
            z = prep.z.double()
            hh, yy = z[..., :dim], z[..., dim:]
            diff = hh @ hh.mT - yy @ yy.mT
            loss64 = diff.square().sum((1, 2)) / n**2
            same = (hh.mT @ hh).square().sum((1, 2)) + (yy.mT @ yy).square().sum((1, 2))
            ratio = (same / (loss64 * n**2)).max().item()
            grad64 = (4.0 / n**2) * diff @ hh
            rnorm = prep.stats[:, 0].double().unsqueeze(-1)
            grad64 = (grad64 - (grad64 * hh).sum(-1, keepdim=True) * hh) * rnorm
            del diff
            tiled = M._tiled_loss(prep).double()
            gram_g = M._bmm_f32(prep.z.mT, prep.z)
            fro = [torch.linalg.vector_norm(blk, dim=(1, 2)).double().square()
                   for blk in (gram_g[:, :dim, :dim], gram_g[:, dim:, dim:], gram_g[:, :dim, dim:])]
            gram = (fro[0] + fro[1] - 2 * fro[2]) / n**2
            del gram_g
            grad = torch.ones(1, batch, device="cuda")
            row = {"shared": shared, "sigma": sigma, "ratio": ratio,
                   "loss_rel_err_tiled": ((tiled - loss64).abs() / loss64).max().item(),
                   "loss_rel_err_gram": ((gram - loss64).abs() / loss64).max().item()}
            for algorithm, fn in (("tiled", M._tiled_backward), ("gram", M._gram_backward)):
                out = torch.empty(batch, n, dim, device="cuda", dtype=torch.float32)
                fn(prep, grad, out, None)
                row[f"grad_rel_err_{algorithm}"] = ((out.double() - grad64).norm() / grad64.norm()).item()
            results.append(row)
            print({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)


def profile(case):
    """Where a training step's time goes: device time per kernel, and the host's time per step."""
    h, y = benchmarks.make_inputs(case, "cuda")
    loss = benchmarks.backend_loss(case, "triton")

    def step():
        h.grad = None
        loss(h, y).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    host = (time.perf_counter() - t0) / 20 * 1e3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 20 * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"{case.name}: host {host:.3f} ms/step (enqueue), wall {wall:.3f} ms/step")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-split", action="store_true")
    parser.add_argument("--cases", default="sdxl_y,hires_manifold")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "e2e": [], "split": [], "sweep": [], "accuracy": []}
    report["matmul_tflops"] = rate = matmul_tflops()
    print(f"{report['gpu']} torch {torch.__version__} triton {triton.__version__}: bf16 matmul {rate:.0f} "
          "TFLOP/s", flush=True)
    cases = [benchmarks.CASES_BY_NAME[c] for c in args.cases.split(",")]
    if args.profile:
        for case in cases:
            profile(case)
    for case in cases:
        if not args.no_split:
            kernel_split(case, report["split"])
        if args.sweep and case.name == "sdxl_y":  # the tiled kernels' case (hires_manifold takes Gram)
            sweep(case, report["sweep"])
    if args.accuracy:
        accuracy(report["accuracy"])
    for case in cases if not args.no_e2e else []:
        end_to_end(case, rate, report["e2e"], not args.no_compile)
    with open(os.path.join(args.out, "manifold_bench.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    for section in ("sweep", "split", "e2e"):
        print(f"--- {section}")
        for row in report[section]:
            print({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
