#!/bin/bash
# Round 13 device call 1 (docs/kernels.md "Round 13"), run from the repository root with OUT and GIT_COMMIT set:
# 1. the split-K sweep of the 8B q/o and qkv at batch 4, s0 / s50 / s70: the table's split-K shapes and round 13's
#    one-wave shapes (every candidate checked against float64 first); only those layers' batch 3-4 exact rules change,
#    each keeping its previous pick unless the new one is faster at every sparsity,
# 2. benchmarks/gemv.py on those layers at batch 1 and 4 with that table (device copy; every other row kept),
# 3. the split-K kernel shape tests on CUDA (round 13's candidates among them).
# Files back: run.log, gemv_sweep_h200.{json,md}, h200.json, gemv_h200.{json,md}.
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; echo "commit ${GIT_COMMIT}"; } \
    > "$OUT/run.log" 2>&1
LAYERS=q_o,qkv
timeout 170 python3 benchmarks/gemv_sweep.py --out "$OUT" --models 8B --layers $LAYERS --batches 4 --families splitk \
    --sparsities 0,50,70 --merge kernels/configs/h200.json --keep-unless-faster --table "$OUT/h200.json" --workers 14 \
    2>&1 | grep -v "^  " | tee -a "$OUT/run.log" | tail -12
if [ -s "$OUT/h200.json" ]; then cp "$OUT/h200.json" kernels/configs/h200.json; fi
timeout 90 python3 benchmarks/gemv.py --out "$OUT" --models 8B --layers $LAYERS --batches 1,4 --sparsities 0,50,70 \
    --det-sparsities '' --heads '' --keep-from benchmarks/results/gemv_h200.json --workers 14 2>&1 \
    | tee -a "$OUT/run.log" | grep -E "^\| 8B (q_o|qkv)" | tail -8
timeout 70 python3 -m pytest -q -o addopts="" -p no:cacheprovider -n 14 tests/kernels/test_splitk_kernel.py \
    -k "shapes" 2>&1 | tail -4 | tee -a "$OUT/run.log"
rm -f "$OUT"/*.log.tmp "$OUT/gemv_sweep_h200.log" "$OUT/gemv_h200.log"
