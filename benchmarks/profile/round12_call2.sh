#!/bin/bash
# Round 12 device call 2 (docs/kernels.md "Round 12"), run from the repository root with OUT and GIT_COMMIT set:
# 1. leave-out probes of the 8B MLP layers at batch 1 with the table's picks (benchmarks/gemv_probe_small.py --layers
#    mlp: no counter tail, stores, no unpack/FMA, no weights, joined reduction, PDL, the empty kernel of the grid),
# 2. the kernel tests of what round 12 changed that call 1's 100-s limit cut (loads_first, the folded row load of the
#    in-place loop and preload 2), on CUDA.
# Files back: run.log, gemv_probe_mlp_h200.{json,md}.
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; echo "commit ${GIT_COMMIT}"; } \
    > "$OUT/run.log" 2>&1
timeout 200 python3 benchmarks/gemv_probe_small.py --out "$OUT" --layers mlp --workers 14 2>&1 | tee -a "$OUT/run.log" \
    | tail -12
timeout 230 python3 -m pytest -q -o addopts="" -p no:cacheprovider -n 14 tests/kernels/test_triton_kernels.py \
    -k "lo1 or pr2 or de100 or de60" 2>&1 | tail -4 | tee -a "$OUT/run.log"
