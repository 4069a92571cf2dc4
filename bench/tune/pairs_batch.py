"""pairs="batch" at SDXL's shape: the fused path against the eager loss a trainer writes and its torch.compile.

Shape: B=16, h on 32×32 (the UNet mid block), y on 37×37 (DINOv2 at 518), align "min" (N = 1024 target
tokens), D=1536, bf16. The batch manifold loss compares all B·N = 16 384 tokens with each other:
(1/(B·N)²) Σ (ĥ_r·ĥ_c − ŷ_r·ŷ_c)². Eager builds two (B·N)² similarity matrices (512 MiB each in bf16);
the fused path never does (the backend's per-image manifold op on the tokens viewed as one image).

Rows: fused (triton, or the backend given), eager bf16 (the trainer's loss in the input dtype), compile
(torch.compile of it), and the fp32 reference (labelled, not a baseline). Each: forward+backward GPU time
by CUDA-graph replay where the variant can be captured (else CUDA events around eager calls: "timing"
says which), host-inclusive time, peak extra memory, and the relative RMSE of loss and gradient against
an fp64 Gram computation. Counted work (docs/pairs_irepa_encoders.md): eager does 2·(B·N)²·D FLOPs per
similarity matrix and pass; the Gram form 20·B·N·D² forward + backward (the floor "tflops_counted_gram"
divides by).

    python bench/tune/pairs_batch.py --json $OUT/pairs_batch.json  # < 3 min on an H100/H200
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import repa_fused as rf

from repa_fused.tools import bench as timing

B, H_GRID, Y_GRID, D = 16, (32, 32), (37, 37), 1536


def eager_batch(h, y):
    """The loss as a trainer writes it, in the input dtype: resample, normalise, two (B·N)² matrices."""
    batch, _, dim = y.shape
    image = y.transpose(1, 2).reshape(batch, dim, *Y_GRID)
    y_t = F.interpolate(image, size=H_GRID, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    h_hat = F.normalize(h, dim=-1).reshape(-1, dim)
    y_hat = F.normalize(y_t, dim=-1).reshape(-1, dim)
    return (h_hat @ h_hat.T - y_hat @ y_hat.T).float().square().mean()


def reference_fp32(h, y):
    return rf.manifold_loss(h, y, pairs="batch", backend="reference")


def exact_fp64(h, y):
    """Loss and ∂/∂h in fp64 by the Gram form (no (B·N)² matrix; fp64 leaves no cancellation concern)."""
    h64 = h.detach().double().requires_grad_()
    h_hat = F.normalize(h64, dim=-1).reshape(-1, D)
    y_t = F.interpolate(y.double().transpose(1, 2).reshape(B, D, *Y_GRID), size=H_GRID, mode="bilinear",
                        align_corners=False).flatten(2).transpose(1, 2)
    y_hat = F.normalize(y_t, dim=-1).reshape(-1, D)
    gram = (h_hat.T @ h_hat).square().sum() + (y_hat.T @ y_hat).square().sum() - 2 * (h_hat.T @ y_hat).square().sum()
    loss = gram / h_hat.shape[0] ** 2
    loss.backward()
    return loss.detach(), h64.grad


def rel_rmse(ref, out):
    ref, out = ref.double(), out.double()
    return float((ref - out).square().mean().sqrt() / ref.square().mean().sqrt().clamp_min(1e-300))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    # The ceilings first: a variant whose graph capture fails can leave the CUDA generator unusable.
    environment, ceilings = timing.environment(device), timing.measure_ceilings(device)
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(B, H_GRID[0] * H_GRID[1], D, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    y = torch.randn(B, Y_GRID[0] * Y_GRID[1], D, device=device, generator=g).to(torch.bfloat16)
    # y correlated with h, as late in training, so that the loss is not dominated by noise
    y = (0.5 * y.float() + F.interpolate(h.detach().float().transpose(1, 2).reshape(B, D, *H_GRID), size=Y_GRID,
                                         mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
         ).to(torch.bfloat16)
    exact_loss, exact_grad = exact_fp64(h, y)

    def fused(h, y):
        return rf.manifold_loss(h, y, h_grid=H_GRID, y_grid=Y_GRID, align="min", pairs="batch",
                                backend=args.backend)

    variants = {f"fused ({args.backend})": fused, "eager bf16": eager_batch, "reference fp32": reference_fp32}
    if not args.no_compile:
        variants["compile bf16"] = torch.compile(eager_batch)
    n = B * H_GRID[0] * H_GRID[1]
    flops_eager = 2 * 2 * n * n * D * 3  # two similarity matrices, forward + 2× backward
    flops_gram = 20 * n * D * D  # forward 8·n·D², backward 12·n·D² (kernels/manifold.py)
    rows = []
    for name, loss_fn in variants.items():
        def step():
            h.grad = None
            loss_fn(h, y).backward()

        row = {"variant": name}
        try:
            h.grad = None  # the previous variant's timed steps leave their gradient
            loss = loss_fn(h, y)
            loss.backward()
            row["loss_rel_err"] = rel_rmse(exact_loss, loss.detach())
            row["grad_rel_rmse"] = rel_rmse(exact_grad, h.grad)
            host = timing.time_ms(step, device, reps=args.reps)
            row["ms"] = statistics.median(host)
            gpu = timing.graph_time_ms(step, device, args.reps)
            row["gpu_ms"], row["timing"] = (gpu, "cuda graph") if gpu is not None else (row["ms"], "cuda events")
            row["peak_extra_mib"] = timing.peak_extra_mib(step, device)
            row["tflops_counted_gram"] = flops_gram / row["gpu_ms"] / 1e9
        except Exception as error:  # noqa: BLE001 - an OOM or a compile failure is a result: record it, go on
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = {"bench": "pairs_batch", "shape": {"B": B, "h_grid": H_GRID, "y_grid": Y_GRID, "D": D,
                                                "align": "min", "dtype": "bfloat16"},
              "environment": environment, "ceilings": ceilings,
              "flops": {"eager_fwd_bwd": flops_eager, "gram_fwd_bwd": flops_gram}, "rows": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
