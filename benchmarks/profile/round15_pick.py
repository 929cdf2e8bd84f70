"""Round 15: keep benchmarks/profile/round14_next.patch only if it measures faster than main's shfl.

    python benchmarks/profile/round15_pick.py MAIN_JSON NEXT_JSON   # exit 0: keep the patch, 1: revert it

Both files are benchmarks/profile/shfl_call1.py results of one device call (main's tree, then the patched tree). Each
run's shfl time is divided by the same run's scratch-list time (the untouched kernel: cancels drift between the runs);
the patch stays if the geometric mean of that ratio over every layer and sparsity is lower, and no check failed.
"""

from __future__ import annotations

import json
import math
import sys


def ratios(path: str) -> dict:
    res = json.load(open(path))
    out = {}
    for r in res["timings"]:
        if "shfl" in r:
            shfl = (r["shfl"] + r["shfl again"]) / 2
            scratch = (r["scratch"] + r["scratch again"]) / 2
            out[(r["model"], r["proj"], r["sp"])] = shfl / scratch
    return out


def main() -> int:
    main_r, next_r = ratios(sys.argv[1]), ratios(sys.argv[2])
    keys = sorted(set(main_r) & set(next_r))
    for k in keys:
        print(f"{k[0]} {k[1]:13s} s{k[2]:2d} shfl/scratch main {main_r[k]:.3f} next {next_r[k]:.3f}")
    gm = lambda rs: math.exp(sum(math.log(rs[k]) for k in keys) / len(keys))  # noqa: E731
    print(f"geomean shfl/scratch: main {gm(main_r):.4f}, next {gm(next_r):.4f}")
    return 0 if keys and gm(next_r) < gm(main_r) else 1


if __name__ == "__main__":
    sys.exit(main())
