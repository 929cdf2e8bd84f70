#!/bin/bash
# Round 12 device call 1 (docs/kernels.md "Round 12"), run from the repository root with OUT and GIT_COMMIT set:
# 1. the sweep of the 8B gate_up, down and fused gate_up (the decoder's launch) at batch 1 and 4, s0 / s50 / s70: the
#    table's picks and the loads_first shapes (every candidate checked against float64 first); only those layers'
#    exact rules change, each keeping its previous pick unless the new one is faster at every sparsity,
# 2. benchmarks/gemv.py on those layers and batches with that table (device copy; every other row kept),
# 3. the kernel tests of what round 12 changed (loads_first, the folded row load of the in-place loop and preload 2),
#    on CUDA.
# Files back: run.log, gemv_sweep_h200.{json,md}, h200.json, gemv_h200.{json,md}.
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; echo "commit ${GIT_COMMIT}"; } \
    > "$OUT/run.log" 2>&1
LAYERS=gate_up,down,gate_up_fused
timeout 300 python3 benchmarks/gemv_sweep.py --out "$OUT" --models 8B --layers $LAYERS --batches 1,4 --families core \
    --sparsities 0,50,70 --merge kernels/configs/h200.json --keep-unless-faster --table "$OUT/h200.json" --workers 14 \
    2>&1 | grep -v "^  " | tee -a "$OUT/run.log" | tail -22
if [ -s "$OUT/h200.json" ]; then cp "$OUT/h200.json" kernels/configs/h200.json; fi
timeout 140 python3 benchmarks/gemv.py --out "$OUT" --models 8B --layers $LAYERS --batches 1,4 --sparsities 0,50,70 \
    --det-sparsities '' --heads '' --keep-from benchmarks/results/gemv_h200.json --workers 14 2>&1 \
    | tee -a "$OUT/run.log" | grep -E "^8B|^\| 8B (gate_up|down)|kernel variants" | tail -40
timeout 100 python3 -m pytest -q -o addopts="" -p no:cacheprovider -n 12 tests/kernels/test_triton_kernels.py \
    tests/kernels/test_dispatch.py -k "lo1 or pr2 or de100 or de60 or test_dispatch or fused" 2>&1 | tail -4 \
    | tee -a "$OUT/run.log"
rm -f "$OUT"/*.log.tmp "$OUT/gemv_sweep_h200.log" "$OUT/gemv_h200.log"
