#!/bin/bash
# Round 15 device call 3 (docs/kernels.md "Round 15"), from the repository root with OUT and GIT_COMMIT set:
# 1. benchmarks/profile/shfl_call1.py on the tree (OUT/b), then with benchmarks/profile/round15_c.patch applied
#    (OUT/c: the compacted loop without the all-loads-first dependency, the in-place loop keeps it); round15_pick.py
#    keeps the patch only if its shfl/scratch ratio is lower;
# 2. benchmarks/gemv.py at batch 1 on the compacting layers, then benchmarks/e2e.py, on that tree.
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; echo "commit ${GIT_COMMIT}"; } \
    > "$OUT/run.log" 2>&1
mkdir -p "$OUT/b" "$OUT/c"
timeout 100 python3 benchmarks/profile/shfl_call1.py --out "$OUT/b" 2>&1 | grep -v "^  " | tail -22 >> "$OUT/run.log"
rm -f "$OUT/b/gemv_shfl_h200.md"
git apply benchmarks/profile/round15_c.patch && echo "patch applied" | tee -a "$OUT/run.log"
timeout 100 python3 benchmarks/profile/shfl_call1.py --out "$OUT/c" 2>&1 | grep -v "^  " | tail -22 >> "$OUT/run.log"
rm -f "$OUT/c/gemv_shfl_h200.md"
if python3 benchmarks/profile/round15_pick.py "$OUT/b/gemv_shfl_h200.json" "$OUT/c/gemv_shfl_h200.json" \
    | tee -a "$OUT/run.log"; then echo "KEEP patch" | tee -a "$OUT/run.log"
else git apply -R benchmarks/profile/round15_c.patch; echo "REVERT patch" | tee -a "$OUT/run.log"; fi
timeout 120 python3 benchmarks/gemv.py --out "$OUT" --models 70B,8B --layers q_o,qkv,gate_up,down,gate_up_fused \
    --batches 1 --sparsities 0,50,70 --det-sparsities '' --heads '' --keep-from benchmarks/results/gemv_h200.json \
    --workers 14 2>&1 | tee -a "$OUT/run.log" | grep -E "^\| (70B|8B) .* \| 1 \|" | tail -14
rm -f "$OUT"/*.log.tmp "$OUT/gemv_h200.log"
timeout 240 python3 benchmarks/e2e.py --out "$OUT" --new-tokens 64 --warmup 4 --profile-steps 2 2>&1 | grep "^\[e2e\]"
