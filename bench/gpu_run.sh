#!/usr/bin/env bash
# One device call: install, GPU tests, kernel tuning, benchmark, check. Logs go to $OUT (the device
# tool brings them back). Usage: bash bench/gpu_run.sh [tests] [tune] [split] [ncu] [bench CASES...] [check]
# (CHECK_ARGS, e.g. "--backends triton", and CHECK_TIMEOUT pass on to the check step)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
step() { echo "== $1 ($(date +%T))"; }
step install
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
REPA_FUSED_NO_CPP=1 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || echo "editable install failed"
while [ $# -gt 0 ]; do
  case "$1" in
    tests) step tests
      timeout 240 python3 -m pytest -q -m cuda tests/ops/test_triton_cosine.py tests/ops/test_triton_manifold.py \
        2>&1 | tail -15 | tee "$OUT/cuda_tests.log"; shift ;;
    tune) step tune
      timeout 300 python3 -m bench.tune.cosine --sweep 2>&1 | tee "$OUT/tune_cosine.log" | tail -60; shift ;;
    split) step split  # eager / compile / triton and the forward-backward split, no sweep
      timeout 200 python3 -m bench.tune.cosine 2>&1 | tee "$OUT/split_cosine.log" | tail -25; shift ;;
    bench) shift; cases=""
      while [ $# -gt 0 ] && [ "$1" != tests ] && [ "$1" != tune ] && [ "$1" != split ] && [ "$1" != ncu ] && [ "$1" != check ]; do
        cases="$cases $1"; shift; done
      for c in $cases; do step "bench $c"
        timeout 200 repa-fused bench --cases "$c" --reps 30 --json "$OUT/bench_$c.json" 2>&1 | tail -8; done ;;
    ncu) step "ncu flux"  # hardware counters of the forward and band kernels (Firecracker machines)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      if [ -z "$NCU" ]; then echo "ncu: Nsight Compute not found on this machine"; shift; continue; fi
      timeout 300 "$NCU" --clock-control none -k regex:cosine_ --launch-skip 4 --launch-count 2 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
        --section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats \
        python3 -m bench.tune.profile_cosine flux_1024 > "$OUT/ncu_flux.txt" 2>&1; echo "ncu exit $?"
      grep -E "^  cosine_|Duration|DRAM Throughput|L2 Hit|L1/TEX Hit|Achieved Occupancy|Theoretical Occ|Registers Per|Warp Cycles Per Issued|Issued Warp|No Eligible|Eligible Warps|Waves Per SM|Mem Busy|Max Bandwidth" \
        "$OUT/ncu_flux.txt" | head -60; shift ;;
    check) step check
      timeout "${CHECK_TIMEOUT:-400}" repa-fused check --device cuda -v ${CHECK_ARGS:-} > "$OUT/check_cuda.log" 2>&1; echo "exit $?" >> "$OUT/check_cuda.log"
      grep -v "^  " "$OUT/check_cuda.log" | tail -40; shift ;;
    *) echo "unknown step $1"; shift ;;
  esac
done
step done
