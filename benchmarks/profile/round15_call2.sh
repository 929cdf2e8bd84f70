#!/bin/bash
# Round 15 device call 2 (docs/kernels.md "Round 15"), from the repository root with OUT and GIT_COMMIT set, on the
# tree with round 15's kernel and the 70B batch-1 rules of call 1:
# 1. the batch-1 sweep of the 8B compacting layers (gate/up, down, fused gate/up) over gemv_sweep.py's CORE;
# 2. benchmarks/profile/shfl_call1.py (shfl against the scratch list, the current kernel) -> OUT/shfl;
# 3. benchmarks/gemv.py at batch 1 on the compacting layers with that table (every other row kept);
# 4. benchmarks/e2e.py (8B and 70B decode).
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; echo "commit ${GIT_COMMIT}"; } \
    > "$OUT/run.log" 2>&1
timeout 150 python3 benchmarks/gemv_sweep.py --out "$OUT" --models 8B --layers gate_up,down,gate_up_fused --batches 1 \
    --families core --no-dense --sparsities 0,50,70 --merge kernels/configs/h200.json --table "$OUT/h200.json" \
    --workers 14 2>&1 | grep -v "^  " | tee -a "$OUT/run.log" | tail -10
if [ -s "$OUT/h200.json" ]; then cp "$OUT/h200.json" kernels/configs/h200.json; fi
rm -f "$OUT"/gemv_sweep_h200.log "$OUT"/gemv_sweep_h200.md
mkdir -p "$OUT/shfl"
timeout 100 python3 benchmarks/profile/shfl_call1.py --out "$OUT/shfl" 2>&1 | grep -v "^  " | tail -22 >> "$OUT/run.log"
timeout 150 python3 benchmarks/gemv.py --out "$OUT" --models 70B,8B --layers q_o,qkv,gate_up,down,gate_up_fused \
    --batches 1 --sparsities 0,50,70 --det-sparsities '' --heads '' --keep-from benchmarks/results/gemv_h200.json \
    --workers 14 2>&1 | tee -a "$OUT/run.log" | grep -E "^\| (70B|8B) .* \| 1 \|" | tail -14
rm -f "$OUT"/*.log.tmp "$OUT/gemv_h200.log"
timeout 260 python3 benchmarks/e2e.py --out "$OUT" --new-tokens 64 --warmup 4 --profile-steps 2 2>&1 | tail -30
