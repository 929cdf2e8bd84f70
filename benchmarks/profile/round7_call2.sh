#!/bin/bash
# Round 7, second device call (docs/kernels.md): the touched kernel tests on CUDA, the batch-1 launch-shape sweep
# (h2 candidates beside today's shapes, every candidate checked against float64 first; dense-threshold rules for the
# python-float-0 calls and the lm_head shapes; rewrites kernels/configs/h200.json), then benchmarks/gemv.py on batch
# 1, 4 and 16 at s0/s50/s70 with the lm_heads (batch 2 and 8 rows kept from the previous result file).
# Usage (device, repo root, PYTHONPATH set): bash benchmarks/profile/round7_call2.sh OUTDIR
set -u
OUT=${1:?outdir}
T0=$(date +%s)
timeout 120 python3 -m pytest -q -x -n 8 -p no:cacheprovider tests/kernels/test_dispatch.py tests/kernels/test_triton_kernels.py \
  -k "dispatch or h2 or groups_and_dense or cuda_graph or deterministic" >"$OUT/pytest.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - T0 )) s: $(tail -1 "$OUT/pytest.log")"
T0=$(date +%s)
timeout 300 python3 benchmarks/gemv_sweep.py --out "$OUT" --batches 1 --families core --merge kernels/configs/h200.json \
  --table kernels/configs/h200.json --workers 14 >"$OUT/sweep_stdout.log" 2>&1
echo "sweep rc=$? in $(( $(date +%s) - T0 )) s"
grep -E "FAILED|correctness|best|timings|table" "$OUT/gemv_sweep_h200.log" | tail -40
cp kernels/configs/h200.json "$OUT/h200.json"
T0=$(date +%s)
timeout 240 python3 benchmarks/gemv.py --out "$OUT" --batches 1,4,16 --sparsities 0,50,70 --det-sparsities "" \
  --keep-from benchmarks/results/gemv_h200.json >"$OUT/gemv_stdout.log" 2>&1
echo "gemv rc=$? in $(( $(date +%s) - T0 )) s"
grep -A40 "^## Summary" "$OUT/gemv_h200.md" | head -60
grep -A8 "lm_head, batch 1" "$OUT/gemv_h200.md"
rm -f "$OUT/sweep_stdout.log"
