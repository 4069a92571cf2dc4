"""N-scaling sweep of the fused manifold loss (issue 15): N = 16², 32², 64², 96², 128² tokens, B = 4,
D = 1024, bf16, forward+backward with the gradient to h. Fused (triton) against eager in the inputs'
dtype and its torch.compile (repa_fused.tools.bench.trainer_loss), GPU time by CUDA-graph replay and peak
extra memory; the fused cost should follow the cheaper of N²·D and N·D² (the tiled and Gram paths).

python -m bench.tune.manifold_scaling --out DIR [--sides 16 32 64 96 128] [--reps 20]
writes DIR/manifold_scaling.json and DIR/manifold_scaling.png.
"""

import argparse
import os

import torch

from repa_fused.tools import bench as benchmarks
from repa_fused.tools.cases import Case


def sweep(sides, reps, device):
    ceilings = benchmarks.measure_ceilings(device)
    rows = []
    for side in sides:
        case = Case(4, (side, side), (side, side), 1024, "min", f"n{side}x{side}", "manifold")
        print(f"{case.name}: N = {side * side}", flush=True)
        for row in benchmarks.run_case(case, device, reps, backends=["triton"], ceilings=ceilings,
                                       with_reference=False):
            row["n_tokens"] = side * side
            rows.append(row)
            print(f"  {row['variant']:8} gpu {row.get('gpu_ms')} ms  peak {row.get('peak_extra_mib')} MiB"
                  f"  {row.get('error', '')}", flush=True)
        torch.cuda.empty_cache()
    return {"environment": benchmarks.environment(device), "ceilings": ceilings, "results": rows}


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in dict.fromkeys(r["variant"] for r in report["results"]):
        rows = [r for r in report["results"] if r["variant"] == variant and r.get("gpu_ms")]
        ns = [r["n_tokens"] for r in rows]
        ax_t.plot(ns, [r["gpu_ms"] for r in rows], "o-", label=variant)
        ax_m.plot(ns, [r["peak_extra_mib"] for r in rows], "o-", label=variant)
    # The counted minimum work (cheaper of 4·B·N²·D and 8·B·N·D²) at the measured bf16 matmul rate.
    fused = [r for r in report["results"] if r["variant"] == "triton" and r.get("gpu_ms")]
    rate = report["ceilings"]["matmul_tflops"]
    if fused:
        ax_t.plot([r["n_tokens"] for r in fused],
                  [min(4 * 4 * r["n_tokens"] ** 2 * 1024, 8 * 4 * r["n_tokens"] * 1024**2) / rate / 1e9
                   for r in fused], "k--", label="min FLOPs at bf16 matmul rate")
    for ax, label in ((ax_t, "GPU ms (graph replay), fwd+bwd"), (ax_m, "peak extra MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N tokens (B = 4, D = 1024, bf16)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"manifold loss scaling, {report['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--sides", type=int, nargs="+", default=[16, 32, 64, 96, 128])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    report = sweep(args.sides, args.reps, torch.device("cuda"))
    os.makedirs(args.out, exist_ok=True)
    benchmarks.write_json(report, os.path.join(args.out, "manifold_scaling.json"))
    try:
        plot(report, os.path.join(args.out, "manifold_scaling.png"))
    except ImportError as error:
        print(f"no plot: {error}")


if __name__ == "__main__":
    main()
