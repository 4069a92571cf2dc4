"""Stage split of the one-pass manifold / U-REPA kernels on a GPU (bf16; analysis in docs/manifold.md).

python -m bench.tune.manifold [--cases sdxl_y sdxl_min hires_manifold sd15_min]
  per case and algorithm (tiled-symmetric, tiled-rows, gram; do_bench medians, host launches included):
  the forward with the gradient, its pre-pass and its loss+gradient core; then the backward passes: U-REPA's
  (the cosine backward carrying the manifold part), the cosine backward alone, and the manifold loss's.
"""

import argparse

import torch
from triton.testing import do_bench

from repa_fused.tools import bench as benchmarks
from repa_fused.kernels import cosine
from repa_fused.kernels import manifold as M


def ms(fn):
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def split(case, rate):
    h, y = benchmarks.make_inputs(case, "cuda")
    h = h.detach()
    grids = (case.h_grid, case.y_grid, case.target_grid)
    n, d, b = case.target_grid[0] * case.target_grid[1], case.dim, case.batch
    print(f"{case.name}: B={b} N={n} D={d} auto={M.choose_algorithm(n, d, grads=1, batch=b)}")
    for algorithm in ("tiled-symmetric", "tiled-rows", "gram"):
        work = M.algorithm_costs(n, d, grads=1)["gram" if algorithm == "gram" else "tiled"] * b
        t = ms(lambda: M.urepa_forward(h, y, *grids, needs_h=True, algorithm=algorithm))
        print(f"  forward+gradient {algorithm:15}: {t:.3f} ms ({work / t / 1e9:.0f} TFLOP/s on the "
              f"symmetric count, {100 * work / t / 1e9 / rate:.0f}% of mm)")
        sum_diff = algorithm == "gram"
        print(f"    pre-pass: {ms(lambda: M._prepare(h, y, *grids, sum_diff)):.3f} ms")
        prep = M._prepare(h, y, *grids, sum_diff)
        buf = M.part_like(h, case.target_grid)
        if sum_diff:
            core = lambda: M._gram_loss_and_grads(prep, [(0, buf)])
        else:
            core = lambda: M._tiled_loss_and_grads(prep, [(0, buf)], algorithm)
        print(f"    loss+grad core: {ms(core):.3f} ms")
        if algorithm == "tiled-symmetric":
            print(f"    loss only (symmetric tiles): {ms(lambda: M._tiled_loss(prep)):.3f} ms")
        del prep, buf
    out, saved, part_h, _ = M.urepa_forward(h, y, *grids, needs_h=True)
    grad = torch.ones(2, b, device="cuda")
    print(f"  urepa backward (cosine + the manifold part, one adjoint): "
          f"{ms(lambda: M.urepa_backward(grad, h, y, *grids, True, False, saved=saved, parts=(part_h, None))):.3f} ms")
    print(f"    cosine backward alone: "
          f"{ms(lambda: cosine.backward(grad[:1], h, y, *grids, True, False, saved=saved)):.3f} ms")
    print(f"  manifold backward (the part scaled, taken back): "
          f"{ms(lambda: M.manifold_backward(grad[1:], h, y, *grids, True, False, parts=(part_h, None))):.3f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["sdxl_y", "sdxl_min", "hires_manifold", "sd15_min"])
    args = parser.parse_args()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    rate = 2 * 8192**3 / ms(lambda: a @ a) / 1e9
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {rate:.0f} TFLOP/s")
    for name in args.cases:
        split(benchmarks.CASES_BY_NAME[name], rate)


if __name__ == "__main__":
    main()
