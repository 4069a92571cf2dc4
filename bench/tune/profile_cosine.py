"""Run the fused cosine kernels of one case a few times, for a profiler (Nsight Compute) to read, e.g.

    ncu --clock-control none -k regex:cosine_ --launch-skip 4 --launch-count 2 \
        python3 -m bench.tune.profile_cosine flux_1024

(bench/gpu_run.sh's ncu step). Cases: repa_fused.tools.cases.BENCH_CASES by name.
"""

import argparse

import torch

from repa_fused.kernels import cosine
from repa_fused.tools.cases import BENCH_CASES_BY_NAME

from .cosine import inputs, unit_grad


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.tune.profile_cosine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", nargs="?", default="flux_1024", choices=sorted(BENCH_CASES_BY_NAME))
    case = BENCH_CASES_BY_NAME[parser.parse_args(argv).case]
    h, y = inputs(case)
    g = unit_grad(case)
    with torch.no_grad():
        for _ in range(4):
            saved = cosine.forward(h, y, *case.grids())[1]
            cosine.backward(g, h, y, *case.grids(), True, False, saved=saved)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
