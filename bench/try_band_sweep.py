"""Experiment (device): taller bands (fewer band edges, up to one program per column strip) and the
glue kernels of the whole autograd step (profiler)."""
import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench_cudagraph

import repa_fused as rf
from repa_fused.kernels import cosine

CASES = {"flux": (4, (64, 64), (37, 37), 1536, (37, 37)), "up": (2, (32, 32), (37, 37), 1152, (37, 37)),
         "half": (4, (64, 64), (32, 32), 1024, (32, 32))}


def ms(fn):
    return do_bench_cudagraph(fn, rep=100, return_mode="median")


def main():
    band_default = cosine._band_blocks
    for case, (b, hg, yg, d, tg) in CASES.items():
        h = torch.randn(b, hg[0] * hg[1], d, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(b, yg[0] * yg[1], d, device="cuda", dtype=torch.bfloat16)
        g = torch.full((1, b), 1.0 / b, device="cuda")
        grids = (hg, yg, tg)
        fwd_default = cosine._forward_blocks
        for cfg in [(8, 128, 4), (4, 256, 4), (2, 512, 4), (4, 256, 8), (8, 256, 8), (16, 128, 8), (4, 128, 2)]:
            cosine._forward_blocks = lambda dim, c=cfg: c
            cosine._forward_plan.cache_clear()
            print(f"{case} forward {cfg}: {ms(lambda: cosine.forward(h, y, *grids))*1e3:.1f} us", flush=True)
        cosine._forward_blocks = fwd_default
        cosine._forward_plan.cache_clear()
        saved = cosine.forward(h, y, *grids)[1]
        bwd = lambda: cosine.backward(g, h, y, *grids, True, False, saved=saved)
        for cfg in [(8, 16, 64, 4), (12, 16, 64, 4), (16, 16, 64, 4), (24, 16, 64, 4), (32, 16, 64, 4),
                    (64, 16, 64, 4), (16, 16, 32, 2), (32, 16, 32, 2), (64, 16, 32, 2), (16, 16, 128, 8),
                    (32, 16, 128, 8), (16, 32, 64, 4), (32, 32, 64, 8)]:
            cosine._band_blocks = lambda dim, c=cfg: c
            cosine._band_plan.cache_clear()
            try:
                print(f"{case} band {cfg}: {ms(bwd)*1e3:.1f} us", flush=True)
            except Exception as e:
                print(f"{case} band {cfg}: failed {type(e).__name__} {str(e)[:150]}")
        cosine._band_blocks = band_default
        cosine._band_plan.cache_clear()
    # Glue: every kernel of the flux fwd+bwd autograd step.
    b, hg, yg, d, tg = CASES["flux"]
    h = torch.randn(b, hg[0] * hg[1], d, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    y = torch.randn(b, yg[0] * yg[1], d, device="cuda", dtype=torch.bfloat16)

    def step():
        h.grad = None
        rf.cosine_alignment_loss(h, y, h_grid=hg, y_grid=yg, backend="triton").backward()
    for _ in range(3):
        step()
    print(f"flux whole step (graph replay): {ms(step)*1e3:.1f} us")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
