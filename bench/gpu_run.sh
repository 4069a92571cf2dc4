#!/usr/bin/env bash
# One device call: install, GPU tests, kernel tuning, benchmark, check. Logs go to $OUT (the device
# tool brings them back). Usage: bash bench/gpu_run.sh [tests] [tune] [bench CASES...] [check]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
step() { echo "== $1 ($(date +%T))"; }
step install
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
REPA_FUSED_NO_CPP=1 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || echo "editable install failed"
while [ $# -gt 0 ]; do
  case "$1" in
    tests) step tests
      timeout 240 python3 -m pytest -q -m cuda tests/test_triton_cosine.py tests/test_triton_manifold.py \
        2>&1 | tail -15 | tee "$OUT/cuda_tests.log"; shift ;;
    tune) step tune
      timeout 300 python3 bench/tune_cosine.py --sweep 2>&1 | tee "$OUT/tune_cosine.log" | tail -60; shift ;;
    bench) shift; cases=""
      while [ $# -gt 0 ] && [ "$1" != tests ] && [ "$1" != tune ] && [ "$1" != check ]; do cases="$cases $1"; shift; done
      for c in $cases; do step "bench $c"
        timeout 200 repa-fused bench --cases "$c" --reps 30 --json "$OUT/bench_$c.json" 2>&1 | tail -8; done ;;
    check) step check
      timeout 200 repa-fused check --device cuda -v 2>&1 | tail -30 | tee "$OUT/check_cuda.log"; shift ;;
    *) echo "unknown step $1"; shift ;;
  esac
done
step done
