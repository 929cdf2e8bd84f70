#!/bin/bash
# Third device call of the split RMSNorms (docs/kernels.md "RMSNorm split over the GEMVs around it"): the consumer
# no longer keeps the norm factor and weight live in its row loops (the normalized x goes through the scratch list,
# as the SiLU form's in-place rows do): 8B gate/up 85 -> 71 registers, q/k/v 80 -> 72 (SASS, sm_90, triton 3.6).
set -o pipefail
grep -q "_scratch_x" kernels/gemv_triton.py || { echo "not the tree of call 3"; exit 3; }
timeout 60 python3 -m pytest -q -o addopts="" -p no:cacheprovider -n 12 tests/kernels/test_gemv_norm_forms.py \
    > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -2 "$OUT/tests.log"
timeout 120 python3 benchmarks/decode_silu_down.py --out "$OUT" --option split_norms --down '' --max-batch 1 \
    --models llama3-8b 2>&1 | grep -v "^$" | grep -v Warn
timeout 45 python3 benchmarks/decode_leaveout.py --out "$OUT" --batches 1 2>&1 | grep -v Warn | tail -11
