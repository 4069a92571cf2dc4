"""Experiment (device): the band backward's column product in two bf16 products (bf16 gradients) against
tf32; error of each against the fp64 reference."""
import torch
from triton.testing import do_bench_cudagraph

from repa_fused import reference
from repa_fused.kernels import cosine

CASES = {"flux": (4, (64, 64), (37, 37), 1536, (37, 37)), "half": (4, (64, 64), (32, 32), 1024, (32, 32)),
         "up": (2, (32, 32), (37, 37), 1152, (37, 37)), "wide": (2, (37, 37), (24, 24), 3072, (24, 24))}

for case, (b, hg, yg, d, tg) in CASES.items():
    torch.manual_seed(0)
    h = torch.randn(b, hg[0] * hg[1], d, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(b, yg[0] * yg[1], d, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(1, b, device="cuda")
    saved = cosine.forward(h, y, hg, yg, tg)[1]
    ref = reference.loss_gradients("cosine", g.double(), h.double(), y.double(), hg, yg, tg, True, False)[0]
    for bf16 in (False, True):
        cosine._BF16_PRODUCT = bf16
        cosine._band_plan.cache_clear()
        grad = cosine.backward(g, h, y, hg, yg, tg, True, False, saved=saved)[0]
        err = ((grad.double() - ref).norm() / ref.norm()).item()
        t = do_bench_cudagraph(lambda: cosine.backward(g, h, y, hg, yg, tg, True, False, saved=saved), rep=60,
                               return_mode="median") * 1e3
        print(f"{case} band bf16 product={bf16}: {t:.1f} us, grad rel err vs fp64 {err:.2e}", flush=True)
cosine._BF16_PRODUCT = True
cosine._band_plan.cache_clear()
