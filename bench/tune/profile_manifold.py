"""Run one case's fused U-REPA / manifold step (forward with the gradient, then backward) a few times,
for a profiler (Nsight Compute) to read, e.g.

    ncu --clock-control none -k "regex:manifold_|cosine_bwd" --launch-skip 6 --launch-count 6 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        python3 -m bench.tune.profile_manifold sdxl_y

Cases: repa_fused.tools.cases.BENCH_CASES by name.
"""

import argparse

import torch

from repa_fused.tools import bench as benchmarks
from repa_fused.tools.cases import BENCH_CASES_BY_NAME


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.tune.profile_manifold", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", nargs="?", default="sdxl_y", choices=sorted(BENCH_CASES_BY_NAME))
    case = BENCH_CASES_BY_NAME[parser.parse_args(argv).case]
    h, y = benchmarks.make_inputs(case, "cuda")
    loss = benchmarks.backend_loss(case, "triton")
    for _ in range(4):
        h.grad = None
        loss(h, y).backward()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
