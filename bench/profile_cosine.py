"""Run the fused cosine kernels of one case a few times, for a profiler (Nsight Compute) to read, e.g.
ncu --clock-control none -k regex:_cosine --launch-skip 4 --launch-count 2 python3 bench/profile_cosine.py flux
(bench/gpu_run.sh's ncu step)."""
import argparse

import torch

from repa_fused.kernels import cosine
from tune_cosine import CASES, inputs

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", nargs="?", default="flux", choices=sorted(CASES))
    case = parser.parse_args().case
    b, hg, yg, d, tg = CASES[case]
    h, y = inputs(case)
    g = torch.full((1, b), 1.0 / b, device="cuda")
    with torch.no_grad():
        for _ in range(4):
            saved = cosine.forward(h, y, hg, yg, tg)[1]
            cosine.backward(g, h, y, hg, yg, tg, True, False, saved=saved)
    torch.cuda.synchronize()
