#!/bin/bash
# Round 9 device call (docs/kernels.md "Round 9"), run from the repository root with OUT set: the batch-2/4 sweep of
# the CUDA-core kernel with h2 (CORE_BATCHED) against the split-K candidates at s0/s50 (every candidate checked
# against float64 on the GPU first), writing a table whose batch-2 and batch 3-4 rules come from it (the other
# classes kept) and its md; then benchmarks/gemv.py at batch 2 and 4 with that table (the device copy only; other
# batch sizes and the lm_heads kept from the last run); then the h2 kernel tests on CUDA. 8 files come back:
# run.log, gemv_sweep_h200.{log,json,md}, h200.json, gemv_h200.{log,json,md}.
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; echo "commit ${GIT_COMMIT}"; } \
    > "$OUT/run.log" 2>&1
timeout 400 python3 benchmarks/gemv_sweep.py --out "$OUT" --batches 2,4 --families core,splitk --sparsities 0,50 --no-dense \
    --merge kernels/configs/h200.json --table "$OUT/h200.json" --workers 14 2>&1 | grep -v "^  " | tail -25
if [ -s "$OUT/h200.json" ]; then cp "$OUT/h200.json" kernels/configs/h200.json; fi
timeout 120 python3 benchmarks/gemv.py --out "$OUT" --batches 2,4 --sparsities 0,50,70 --det-sparsities '' --heads '' \
    --keep-from benchmarks/results/gemv_h200.json --workers 14 2>&1 | tail -16
timeout 50 python3 -m pytest -q -o addopts="" -p no:cacheprovider -x tests/kernels/test_triton_kernels.py \
    -k "test_core_kernel_h2" 2>&1 | tail -4 | tee -a "$OUT/run.log"
