#!/bin/bash
# Second device call of the split RMSNorms, after call 1 (split_norms_call.sh) measured the step 0.853x at 8B batch 1:
# the consumer's factor is a scalar at batch 1 (no [M_P] vector converted into every row tile) and the producer
# loads the old residual before the split-K counter. 1. CUDA tests; 2. the A/B on the 8B and 70B step; 3. the leave-out
# probes at batch 1; 4. only if the 8B A/B is faster: e2e and gpu_decode_check.
set -o pipefail
grep -q "NORM == 2" kernels/gemv_common.py || { echo "not the tree of call 2"; exit 3; }
timeout 100 python3 -m pytest -q -o addopts="" -p no:cacheprovider -n 12 tests/kernels/test_gemv_norm_forms.py \
    tests/kernels/test_decode_step_interpreted.py -k "norm" > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -3 "$OUT/tests.log"
timeout 150 python3 benchmarks/decode_silu_down.py --out "$OUT" --option split_norms --down '' --max-batch 1 2>&1 \
    | grep -v "^$" | grep -v Warn
timeout 45 python3 benchmarks/decode_leaveout.py --out "$OUT" --batches 1 2>&1 | grep -v Warn | tail -11
faster=$(python3 -c "import json; r=json.load(open('$OUT/decode_split_norms_h200.json')); print(int(r['models']['llama3-8b']['timings']['1']['speedup'] > 1.0))")
echo "split norms faster at 8B batch 1: $faster"
if [ "$faster" = "1" ]; then
  timeout 190 python3 benchmarks/e2e.py --out "$OUT" --new-tokens 64 --warmup 4 --profile-steps 2 > "$OUT/e2e.log" 2>&1
  echo "e2e exit $?"; grep -n 'targets' "$OUT/e2e.log" | tail -3
fi
