"""The fused manifold / U-REPA losses against torch.compile of the trainer's loss across the issue-15
shape range (B 1–32, N 16–16384, D 64–1536), bf16, forward+backward with the gradient to h, GPU time by
CUDA-graph replay, all variants in one process (repa_fused.tools.bench.run_case without the fp32
reference).

python -m bench.tune.manifold_vs_compile --out DIR [--reps 10]
writes DIR/manifold_vs_compile.json and prints one line per shape.
"""

import argparse
import os

import torch

from repa_fused.tools import bench as benchmarks
from repa_fused.tools.cases import Case

# (loss, B, h grid, y grid, D): corners and middles of the range; U-REPA rows resample as SD1.5/SDXL do.
SHAPES = [
    ("manifold", 1, (4, 4), (4, 4), 64),
    ("manifold", 32, (4, 4), (4, 4), 1536),
    ("manifold", 4, (8, 8), (8, 8), 384),
    ("manifold", 32, (16, 16), (16, 16), 768),
    ("manifold", 4, (16, 16), (16, 16), 1024),
    ("manifold", 1, (32, 32), (32, 32), 64),
    ("manifold", 8, (32, 32), (32, 32), 1536),
    ("manifold", 4, (64, 64), (64, 64), 384),
    ("manifold", 2, (96, 96), (96, 96), 768),
    ("manifold", 1, (128, 128), (128, 128), 64),
    ("manifold", 1, (128, 128), (128, 128), 1536),
    ("urepa", 1, (8, 8), (16, 16), 768),
    ("urepa", 32, (8, 8), (37, 37), 1536),
    ("urepa", 4, (32, 32), (37, 37), 1024),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for loss, batch, h_grid, y_grid, dim in SHAPES:
        case = Case(batch, h_grid, y_grid, dim, "min", f"{loss}-B{batch}-{h_grid[0]}x{h_grid[1]}"
                    f"-{y_grid[0]}x{y_grid[1]}-D{dim}", loss)
        result = benchmarks.run_case(case, device, args.reps, backends=["triton"], with_reference=False)
        by_variant = {r["variant"]: r for r in result}
        fused, compiled = by_variant.get("triton", {}), by_variant.get("compile", {})
        ratio = (compiled.get("gpu_ms") or 0) / fused["gpu_ms"] if fused.get("gpu_ms") else None
        print(f"{case.name:40} eager {by_variant['eager'].get('gpu_ms')} compile {compiled.get('gpu_ms')} "
              f"triton {fused.get('gpu_ms')} ms: {ratio and f'{ratio:.2f}x compile'}", flush=True)
        rows += result
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    benchmarks.write_json({"environment": benchmarks.environment(device), "results": rows},
                          os.path.join(args.out, "manifold_vs_compile.json"))


if __name__ == "__main__":
    main()
