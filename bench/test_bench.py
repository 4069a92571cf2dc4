"""pytest-benchmark view of the same cases as ``repa-fused bench`` (repa_fused.tools.cases.BENCH_CASES).

    python -m pytest bench/ --benchmark-columns=median,iqr --benchmark-group-by=param:case

Forward+backward per call; eager, torch.compile and every fused backend available on the device. On a
CPU the cases are scaled as ``repa-fused bench`` scales them (B/8, D/8, same grids).
"""

import pytest
import torch

from repa_fused.tools import bench as benchmarks

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [c if DEVICE.type == "cuda" else c.scaled_for_cpu() for c in benchmarks.CASES]
VARIANTS = ["eager", "compile", "triton", "cpp"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_forward_backward(benchmark, case, variant):
    losses = benchmarks.variants(case, DEVICE)
    if variant not in losses:
        pytest.skip(f"{variant} is not available on {DEVICE}")
    loss = losses[variant]
    h, y = benchmarks.make_inputs(case, DEVICE)

    def step():
        h.grad = None
        loss(h, y).backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    step()  # compile / autotune outside the timed rounds
    benchmark.extra_info.update(case=case.name, device=benchmarks.device_name(DEVICE))
    benchmark(step)
