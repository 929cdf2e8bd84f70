#!/bin/bash
# The second device call of the SiLU-in-down-GEMV work (docs/kernels.md "SiLU-and-mul inside the down GEMV"), after
# call 1 (silu_down_call.sh) found the 70B down slower fused: the in-place rows now read the SiLU product from the
# scratch list instead of recomputing it, and split-K left SILU_FAMILIES. Run like call 1:
# 1. benchmarks/decode_silu_down.py on the 70B step at batch 1 and the 70B / 8B down GEMV alone at batch 1,
# 2. the CUDA tests of the SiLU form and of the decode step with / without it (in what time is left).
# Files back: run.log, tests.log, decode_silu_down_h200_run2.{json,md}.
set -o pipefail
grep -q "SILU and PRELOAD == 0" kernels/gemv_triton.py || { echo "not the tree of call 2" | tee "$OUT/run.log"; exit 3; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; \
  echo "commit ${TEAL_QUANT_GIT_COMMIT:-unknown}"; } > "$OUT/run.log" 2>&1
timeout 100 python3 benchmarks/decode_silu_down.py --out "$OUT" --models llama3-70b --down 70B,8B --max-batch 1 \
    --stem decode_silu_down_h200_run2 2>&1 | tee -a "$OUT/run.log" | grep -v "^$"
timeout 75 python3 -m pytest -q -o addopts="" -p no:cacheprovider -n 14 tests/kernels/test_silu_gemv.py \
    tests/kernels/test_decode_step_interpreted.py -k "silu" > "$OUT/tests.log" 2>&1
echo "tests exit $?" | tee -a "$OUT/run.log"; tail -4 "$OUT/tests.log" | tee -a "$OUT/run.log"
