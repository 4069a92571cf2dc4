"""Run the fused cosine kernels of one case a few times, for a profiler (Nsight Compute) to read:
    ncu --clock-control none -k regex:_cosine --launch-skip 4 --launch-count 2 --section ... \
        python3 bench/profile_cosine.py [flux|sit|up]"""
import sys

import torch

from repa_fused.kernels import cosine

CASES = {"sit": (32, (16, 16), (16, 16), 768, (16, 16)), "flux": (4, (64, 64), (37, 37), 1536, (37, 37)),
         "up": (2, (32, 32), (37, 37), 1152, (37, 37))}

if __name__ == "__main__":
    b, hg, yg, d, tg = CASES[sys.argv[1] if len(sys.argv) > 1 else "flux"]
    h = torch.randn(b, hg[0] * hg[1], d, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(b, yg[0] * yg[1], d, device="cuda", dtype=torch.bfloat16)
    g = torch.full((1, b), 1.0 / b, device="cuda")
    for _ in range(4):
        saved = cosine.forward(h, y, hg, yg, tg)[1]
        cosine.backward(g, h, y, hg, yg, tg, True, False, saved=saved)
    torch.cuda.synchronize()
