#!/bin/bash
# Round 11 device call 1 (docs/kernels.md "Round 11"), run from the repository root with OUT and GIT_COMMIT set:
# 1. the batch-1 sweep of the table's picks + preload with lookahead + preload shapes for 8B gate/up and down (every
#    candidate checked against float64 first), writing a table whose batch-1 rules come from it; an exact rule keeps
#    the previous pick unless the new one was faster at s0 and at s50 (--keep-unless-faster),
# 2. benchmarks/gemv.py at batch 1 with that table (device copy; other batches kept from the last run),
# 3. the kernel tests that cover what round 11 changed, on CUDA.
# Files back: run.log, gemv_sweep_h200.{json,md}, h200.json, gemv_h200.{json,md}.
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; echo "commit ${GIT_COMMIT}"; } \
    > "$OUT/run.log" 2>&1
timeout 150 python3 benchmarks/gemv_sweep.py --out "$OUT" --batches 1 --families core --sparsities 0,50 --no-dense \
    --merge kernels/configs/h200.json --keep-unless-faster --table "$OUT/h200.json" --workers 14 2>&1 | grep -v "^  " \
    | tee -a "$OUT/run.log" | tail -14
if [ -s "$OUT/h200.json" ]; then cp "$OUT/h200.json" kernels/configs/h200.json; fi
timeout 110 python3 benchmarks/gemv.py --out "$OUT" --batches 1 --sparsities 0,50,70 --det-sparsities '' --heads '' \
    --keep-from benchmarks/results/gemv_h200.json --workers 14 2>&1 | tee -a "$OUT/run.log" | tail -14
timeout 60 python3 -m pytest -q -o addopts="" -p no:cacheprovider -n 8 tests/kernels/test_triton_kernels.py \
    tests/kernels/test_dispatch.py -k "lo2 or lo3 or lo5 or lo64 or pr1 or pr2 or test_dispatch" 2>&1 | tail -4 \
    | tee -a "$OUT/run.log"
rm -f "$OUT"/*.log.tmp "$OUT/gemv_sweep_h200.log" "$OUT/gemv_h200.log"
