"""Round 15 device call 5: which kernel and table decode the 70B step fastest, then the results of the winner.

    GIT_COMMIT=... python benchmarks/profile/round15_call5.py OUT

Variants (benchmarks/e2e.py --only llama3-70b each, in this order): A round 15 kernel + round 15 table (this tree),
B round 15 kernel + round 14 table (round15_t14.json: ec152d7's), C round 14 kernel (round15_kernel.patch reversed)
+ round 14 table, D round 15 kernel + round 14 table with round 15's 70B q/o and qkv rules (v2 pipe shfl). The
fastest (ours tok/s) is left in the tree; then benchmarks/e2e.py (every model) and benchmarks/gemv.py at
batch 1 write OUT's result files.

Run once (stop 30, docs/kernels.md round 15 item 5); its inputs round15_t14.json and round15_kernel.patch were removed
after it: `git show ff6530b:benchmarks/profile/round15_t14.json` (and the patch) bring them back.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

OUT = Path(sys.argv[1])
TABLE = Path("kernels/configs/h200.json")
PROFILE = Path("benchmarks/profile")
T15 = json.loads(TABLE.read_text())
T14 = json.loads((PROFILE / "round15_t14.json").read_text())
QO_QKV = (67108864, 83886080)  # weight bytes of the 70B q/o and qkv rules (m 1)


def table_d() -> dict:
    t = json.loads(json.dumps(T14))
    for i, rule in enumerate(t["rules"]):
        if rule.get("m") == [1, 1] and rule.get("weight", [0])[0] in QO_QKV and "dense_threshold" not in rule:
            t["rules"][i] = T15["rules"][i]
    return t


def set_tree(kernel: int, table: dict) -> None:
    patched = subprocess.run(["git", "apply", "-R", "--check", str(PROFILE / "round15_kernel.patch")],
                             capture_output=True).returncode == 0  # reversible: the round 15 kernel is in place
    if kernel == 14 and patched:
        subprocess.run(["git", "apply", "-R", str(PROFILE / "round15_kernel.patch")], check=True)
    if kernel == 15 and not patched:
        subprocess.run(["git", "apply", str(PROFILE / "round15_kernel.patch")], check=True)
    TABLE.write_text(json.dumps(table, indent=1))


def e2e(name: str, only: bool, limit: int) -> float:
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    cmd = ["python3", "benchmarks/e2e.py", "--out", str(d), "--new-tokens", "64", "--warmup", "4", "--profile-steps", "2"]
    subprocess.run(["timeout", str(limit)] + cmd + (["--only", "llama3-70b"] if only else []), capture_output=True)
    try:
        res = json.loads((d / "e2e_h200.json").read_text())
    except OSError:
        return 0.0
    found = []

    def walk(o):
        if isinstance(o, dict):
            if o.get("variant") == "ours" and o.get("layers") == 80 and o.get("batch") == 1:
                found.append(o["tokens_per_s"])
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(res)
    return found[0] if found else 0.0


def main() -> None:
    variants = {"A": (15, T15), "B": (15, T14), "C": (14, T14), "D": (15, table_d())}
    log = open(OUT / "run.log", "a")
    got = {}
    for name in ("A", "B", "C", "D"):
        kernel, table = variants[name[0]]
        set_tree(kernel, table)
        got[name] = e2e(name, True, 120)
        (OUT / name / "e2e_h200.md").unlink(missing_ok=True)
        print(f"{name}: 70B ours {got[name]:.2f} tok/s", file=log, flush=True)
        print(f"{name}: 70B ours {got[name]:.2f} tok/s", flush=True)
    best = max("ABCD", key=lambda n: got[n])
    print(f"best {best}", file=log, flush=True)
    print(f"best {best}", flush=True)
    kernel, table = variants[best]
    set_tree(kernel, table)
    shutil.copy(TABLE, OUT / "h200.json")
    shutil.copy("kernels/gemv_triton.py", OUT / "gemv_triton.py")
    e2e("final", False, 200)
    subprocess.run(["timeout", "100", "python3", "benchmarks/gemv.py", "--out", str(OUT / "final"), "--models", "70B,8B",
                    "--layers", "q_o,qkv,gate_up,down,gate_up_fused", "--batches", "1", "--sparsities", "0,50,70",
                    "--det-sparsities", "", "--heads", "", "--keep-from", "benchmarks/results/gemv_h200.json",
                    "--workers", "14"], capture_output=True)
    for f in (OUT / "final").glob("*.log*"):
        f.unlink()


if __name__ == "__main__":
    main()
