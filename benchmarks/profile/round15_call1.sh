#!/bin/bash
# Round 15 device call 1 (docs/kernels.md "Round 15"), from the repository root with OUT and GIT_COMMIT set:
# 1. benchmarks/profile/shfl_call1.py on main's tree (OUT/main), then with benchmarks/profile/round14_next.patch
#    applied (OUT/next); round15_pick.py keeps the patch only if its shfl/scratch ratio is lower;
# 2. the batch-1 sweep of the 70B compacting layers over gemv_sweep.py's CORE (with shfl candidates) on that tree.
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; echo "commit ${GIT_COMMIT}"; } \
    > "$OUT/run.log" 2>&1
mkdir -p "$OUT/main" "$OUT/next"
timeout 120 python3 benchmarks/profile/shfl_call1.py --out "$OUT/main" 2>&1 | grep -v "^  " | tail -24 | tee -a "$OUT/run.log"
git apply benchmarks/profile/round14_next.patch && echo "patch applied" | tee -a "$OUT/run.log"
timeout 120 python3 benchmarks/profile/shfl_call1.py --out "$OUT/next" 2>&1 | grep -v "^  " | tail -24 | tee -a "$OUT/run.log"
if python3 benchmarks/profile/round15_pick.py "$OUT/main/gemv_shfl_h200.json" "$OUT/next/gemv_shfl_h200.json" \
    | tee -a "$OUT/run.log"; then echo "KEEP patch" | tee -a "$OUT/run.log"
else git apply -R benchmarks/profile/round14_next.patch; echo "REVERT patch" | tee -a "$OUT/run.log"; fi
timeout 230 python3 benchmarks/gemv_sweep.py --out "$OUT" --models 70B --layers q_o,qkv,gate_up,down --batches 1 \
    --families core --no-dense --sparsities 0,50,70 --merge kernels/configs/h200.json --table "$OUT/h200.json" \
    --workers 14 2>&1 | grep -v "^  " | tee -a "$OUT/run.log" | tail -14
