#!/bin/bash
# Round 14 device call 1 (docs/kernels.md "Round 14"), run from the repository root with OUT and GIT_COMMIT set:
# 1. the sweep at batch 1 of the compacting layers (70B q/o, qkv, gate/up, down; 8B gate/up, down, fused gate/up),
#    s0 / s50 / s70, over the round-14 candidates (gemv_sweep.py CORE: the picks without and with shfl and shfl
#    variants); only those layers' exact batch-1 rules change, picked by the geometric mean over the sparsities,
# 2. benchmarks/gemv.py on those layers at batch 1 with that table (every other row kept).
# Files back: run.log, gemv_sweep_h200.{json,md} (the 8B sweep's), h200.json, gemv_h200.{json,md}.
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; echo "commit ${GIT_COMMIT}"; } \
    > "$OUT/run.log" 2>&1
timeout 200 python3 benchmarks/gemv_sweep.py --out "$OUT" --models 70B --layers q_o,qkv,gate_up,down --batches 1 \
    --families core --no-dense --sparsities 0,50,70 --merge kernels/configs/h200.json --table "$OUT/h200.json" \
    --workers 14 2>&1 | grep -v "^  " | tee -a "$OUT/run.log" | tail -12
mv "$OUT/gemv_sweep_h200.json" "$OUT/gemv_sweep_70b.json" 2>/dev/null; mv "$OUT/gemv_sweep_h200.md" "$OUT/gemv_sweep_70b.md" 2>/dev/null
timeout 150 python3 benchmarks/gemv_sweep.py --out "$OUT" --models 8B --layers gate_up,down,gate_up_fused --batches 1 \
    --families core --no-dense --sparsities 0,50,70 --merge "$OUT/h200.json" --table "$OUT/h200_8b.json" \
    --workers 14 2>&1 | grep -v "^  " | tee -a "$OUT/run.log" | tail -12
if [ -s "$OUT/h200_8b.json" ]; then mv "$OUT/h200_8b.json" "$OUT/h200.json"; fi
if [ -s "$OUT/h200.json" ]; then cp "$OUT/h200.json" kernels/configs/h200.json; fi
timeout 150 python3 benchmarks/gemv.py --out "$OUT" --models 70B,8B --layers q_o,qkv,gate_up,down,gate_up_fused \
    --batches 1 --sparsities 0,50,70 --det-sparsities '' --heads '' --keep-from benchmarks/results/gemv_h200.json \
    --workers 14 2>&1 | tee -a "$OUT/run.log" | grep -E "^\| (70B|8B) .* \| 1 \|" | tail -14
rm -f "$OUT"/*.log.tmp "$OUT/gemv_sweep_h200.log" "$OUT/gemv_h200.log"
