#!/bin/bash
# Round 8 device call (docs/kernels.md "Round 8"), run from the repository root with OUT set: the batch-1 sweep at
# s0/s50/s70 (every candidate checked against float64 on the GPU first) writing the table and its md, then
# benchmarks/gemv.py at batch 1 with that table (other batch sizes and the lm_heads kept), then the touched kernel
# tests on CUDA with the time left. 8 files come back: run.log, gemv_sweep_h200.{log,json,md}, h200.json,
# gemv_h200.{log,json,md}.
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; echo "commit ${GIT_COMMIT}"; } \
    > "$OUT/run.log" 2>&1
timeout 300 python3 benchmarks/gemv_sweep.py --out "$OUT" --batches 1 --families core --sparsities 0,50,70 --no-dense \
    --merge kernels/configs/h200.json --table "$OUT/h200.json" --workers 14 2>&1 | grep -v "^  " | tail -25
if [ -s "$OUT/h200.json" ]; then cp "$OUT/h200.json" kernels/configs/h200.json; fi
timeout 110 python3 benchmarks/gemv.py --out "$OUT" --batches 1 --sparsities 0,50,70 --det-sparsities '' --heads '' \
    --keep-from benchmarks/results/gemv_h200.json --workers 14 2>&1 | tail -16
timeout 30 python3 -m pytest -q -o addopts="" -p no:cacheprovider -x tests/kernels/test_triton_kernels.py \
    -k "test_core_kernel_h2" 2>&1 | tail -4 | tee -a "$OUT/run.log"
