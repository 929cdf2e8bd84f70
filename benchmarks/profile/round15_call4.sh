#!/bin/bash
# Round 15 device call 4: the 70B decode step side by side, round 15's kernel and table (this tree) against round
# 14's (ec152d7: benchmarks/profile/round15_back.patch reversed), in the order new, old, new (drift shows as a
# difference between the two new runs); benchmarks/e2e.py --only llama3-70b each, OUT/{new1,old,new2}.
set -o pipefail
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; echo "commit ${GIT_COMMIT}"; } \
    > "$OUT/run.log" 2>&1
run() {
    mkdir -p "$OUT/$1"
    timeout 170 python3 benchmarks/e2e.py --only llama3-70b --out "$OUT/$1" --new-tokens 64 --warmup 4 --profile-steps 2 \
        2>&1 | grep "^\[e2e\] llama3-70b:" | sed "s/^/$1 /" | tee -a "$OUT/run.log"
    rm -f "$OUT/$1/e2e_h200.md"
}
run new1
git apply -R benchmarks/profile/round15_back.patch && echo "round 14 tree" | tee -a "$OUT/run.log"
run old
git apply benchmarks/profile/round15_back.patch && echo "round 15 tree" | tee -a "$OUT/run.log"
run new2
