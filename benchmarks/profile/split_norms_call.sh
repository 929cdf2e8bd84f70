#!/bin/bash
# The device call of the RMSNorms split over the GEMVs (docs/kernels.md "RMSNorm split over the GEMVs around it"):
# 1. the CUDA tests of the producer / consumer forms and of the decode step with them,
# 2. benchmarks/decode_silu_down.py --option split_norms (8B and 70B step at batch 1, side by side),
# 3. benchmarks/e2e.py and benchmarks/gpu_decode_check.py (split norms on by default at batch 1),
# 4. benchmarks/decode_leaveout.py at batch 1 (what each part costs in the graph now), in what time is left.
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; \
  echo "commit ${TEAL_QUANT_GIT_COMMIT:-unknown}"; } > "$OUT/run.log" 2>&1
timeout 110 python3 -m pytest -q -o addopts="" -p no:cacheprovider -n 12 tests/kernels/test_gemv_norm_forms.py \
    tests/kernels/test_decode_step_interpreted.py -k "norm" > "$OUT/tests.log" 2>&1
echo "tests exit $?" | tee -a "$OUT/run.log"; tail -4 "$OUT/tests.log" | tee -a "$OUT/run.log"
timeout 170 python3 benchmarks/decode_silu_down.py --out "$OUT" --option split_norms --down '' --max-batch 1 2>&1 \
    | tee -a "$OUT/run.log" | grep -v "^$" | grep -v Warn
timeout 190 python3 benchmarks/e2e.py --out "$OUT" --new-tokens 64 --warmup 4 --profile-steps 2 > "$OUT/e2e.log" 2>&1
echo "e2e exit $?" | tee -a "$OUT/run.log"; tail -3 "$OUT/e2e.log"
timeout 70 python3 benchmarks/gpu_decode_check.py --out /tmp/gdc --json "$OUT/gpu_decode_check.json" > "$OUT/gdc.log" 2>&1
echo "gpu_decode_check exit $?" | tee -a "$OUT/run.log"; tail -3 "$OUT/gdc.log"
timeout 60 python3 benchmarks/decode_leaveout.py --out "$OUT" --batches 1 2>&1 | grep -v Warn | tail -12
