#!/bin/bash
# The device call of the SiLU-in-down-GEMV work (docs/kernels.md "SiLU-and-mul inside the down GEMV"), run from the
# repository root with OUT and TEAL_QUANT_GIT_COMMIT set, after the wheel install and the kernels link:
# 1. the CUDA tests of the SiLU form (every family's x loads against silu_mul + GEMV, bit-equal, and float64; the
#    decode step with and without it, bit-equal; silu_mul itself),
# 2. benchmarks/decode_silu_down.py: the decode step A/B (8B batch 1, 4, 16; 70B batch 1), the down GEMV alone,
#    the greedy tokens / logits bit-equality.
# Files back: run.log, tests.log, decode_silu_down_h200.{json,md}.
set -o pipefail
grep -q "SILU" kernels/gemv_common.py || { echo "this is not the silu branch's tree" | tee "$OUT/run.log"; exit 3; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; \
  echo "commit ${TEAL_QUANT_GIT_COMMIT:-unknown}"; } > "$OUT/run.log" 2>&1
timeout 100 python3 -m pytest -q -o addopts="" -p no:cacheprovider -n 14 tests/kernels/test_silu_gemv.py \
    tests/kernels/test_decode_step_interpreted.py tests/kernels/test_elementwise.py -k "silu" > "$OUT/tests.log" 2>&1
echo "tests exit $?" | tee -a "$OUT/run.log"; tail -4 "$OUT/tests.log" | tee -a "$OUT/run.log"
timeout 230 python3 benchmarks/decode_silu_down.py --out "$OUT" 2>&1 | tee -a "$OUT/run.log" | grep -v "^$"
