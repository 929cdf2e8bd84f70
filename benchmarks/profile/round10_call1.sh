#!/bin/bash
# Round 10 device call 1 (docs/kernels.md "Round 10"), run from the repository root with OUT and GIT_COMMIT set:
# 1. the small-layer probes and preload candidates (benchmarks/gemv_probe_small.py: float64 checks first),
# 2. the batch-1 and batch-4 sweep of the table's picks + the preload shapes (split-K: the table's shapes only),
#    every candidate checked against float64 first, writing a table whose batch 1 and 3-4 rules come from it,
# 3. benchmarks/gemv.py at batch 1 and 4 with that table (device copy; other batches kept from the last run).
# 8 files come back: run.log, gemv_probe_small_h200.{json,md}, gemv_sweep_h200.{json,md}, h200.json,
# gemv_h200.{json,md}.
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; echo "commit ${GIT_COMMIT}"; } \
    > "$OUT/run.log" 2>&1
timeout 220 python3 benchmarks/gemv_probe_small.py --out "$OUT" --workers 14 2>&1 | grep -v "^  " | tee -a "$OUT/run.log" | tail -30
timeout 200 python3 benchmarks/gemv_sweep.py --out "$OUT" --batches 1,4 --families core,splitk --sparsities 0,50 --no-dense \
    --splitk-in-table --merge kernels/configs/h200.json --table "$OUT/h200.json" --workers 14 2>&1 | grep -v "^  " \
    | tee -a "$OUT/run.log" | tail -25
if [ -s "$OUT/h200.json" ]; then cp "$OUT/h200.json" kernels/configs/h200.json; fi
timeout 150 python3 benchmarks/gemv.py --out "$OUT" --batches 1,4 --sparsities 0,50,70 --det-sparsities '' --heads '' \
    --keep-from benchmarks/results/gemv_h200.json --workers 14 2>&1 | tee -a "$OUT/run.log" | tail -42
rm -f "$OUT"/*.log.tmp "$OUT/gemv_sweep_h200.log" "$OUT/gemv_h200.log"
