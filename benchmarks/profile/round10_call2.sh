#!/bin/bash
# Round 10 device call 2 (docs/kernels.md "Round 10"), run from the repository root with OUT and GIT_COMMIT set:
# 1. the leave-out probes on the table's new batch-1 picks of the small layers (benchmarks/gemv_probe_small.py),
# 2. the kernel tests that cover what round 10 changed, on CUDA,
# 3. benchmarks/gemv.py at batch 1 with the committed table (batch 4 kept from call 1, the rest from earlier).
# Files back: run.log, gemv_probe_small_h200.{json,md}, gemv_h200.{json,md}.
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; echo "commit ${GIT_COMMIT}"; } \
    > "$OUT/run.log" 2>&1
timeout 170 python3 benchmarks/gemv_probe_small.py --out "$OUT" --workers 14 2>&1 | grep -v "^  " | tee -a "$OUT/run.log" | tail -12
timeout 120 python3 -m pytest -q -o addopts="" -p no:cacheprovider -n 8 tests/kernels/test_triton_kernels.py \
    tests/kernels/test_dispatch.py -k "pr1 or pr2 or test_sparse_gemv or h2_scale or dispatch or preload" 2>&1 \
    | tail -6 | tee -a "$OUT/run.log"
timeout 150 python3 benchmarks/gemv.py --out "$OUT" --batches 1 --sparsities 0,50,70 --det-sparsities '' --heads '' \
    --keep-from benchmarks/results/gemv_h200.json --workers 14 2>&1 | tee -a "$OUT/run.log" | tail -26
rm -f "$OUT/gemv_h200.log"
