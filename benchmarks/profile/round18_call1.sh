#!/bin/bash
# Round 18 device call 1 (docs/kernels.md "Next steps" after round 17), from the repository root with OUT and
# GIT_COMMIT set and the wheels of .whl installed (pydantic, rich, gemlite):
# 1. the whole kernel test suite on CUDA (last run at 51bc4d8, before rounds 14-15's shfl kernels) -> OUT/kernel_tests.txt;
# 2. the batch-1 sweep of the calls the step makes in its own form (q/k/v, o_proj, down) with gemv_sweep.py
#    --form step, merged into the current table -> OUT/h200.json (kept only if step_sweep.py agrees in call 2);
# 3. benchmarks/gemv.py at batch 1 and 4 on those layers with the current table: the plain call against `ours_step`.
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; echo "commit ${GIT_COMMIT}"; } \
    > "$OUT/run.log" 2>&1
timeout 290 python3 -m pytest -q -o addopts="" -p no:cacheprovider -n 15 tests/kernels -rf 2>&1 | tail -15 \
    > "$OUT/kernel_tests.txt"
tail -3 "$OUT/kernel_tests.txt"
timeout 150 python3 benchmarks/gemv_sweep.py --out "$OUT" --form step --models 70B,8B --layers q_o,qkv,down --batches 1 \
    --families core --no-dense --sparsities 0,50,70 --merge kernels/configs/h200.json --table "$OUT/h200.json" \
    --workers 14 2>&1 | grep -v "^  " | tee -a "$OUT/run.log" | tail -10
rm -f "$OUT"/gemv_sweep_h200.log
timeout 130 python3 benchmarks/gemv.py --out "$OUT" --models 70B,8B --layers q_o,qkv,down --batches 1,4 \
    --sparsities 0,50,70 --det-sparsities '' --heads '' --keep-from benchmarks/results/gemv_h200.json --workers 14 \
    2>&1 | tee -a "$OUT/run.log" | grep -A20 "decode step's form" | tail -20
rm -f "$OUT/gemv_h200.log"
