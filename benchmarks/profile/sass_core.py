"""Compile the batch-1 kernel (``_sgemv_kernel``) for sm_90 on a machine without a GPU and report registers, spills,
shared memory and the instruction mix of its SASS (triton's bundled ptxas and cuobjdump; no device time).

    PYTHONPATH=<triton 3.6 site>:. python benchmarks/profile/sass_core.py '{"vec": 4, "warps": 4, "rows": 4,
        "k_range": 128, "evict_first": true, "h2": true}' [--m 1] [--n 28672 --k 8192] [--sass out.sass]

The specialization is that of a launch on the given layer at batch ``--m`` (1-4) with a 0-dim tensor threshold (int
arguments divisible by 16 and pointers 16-byte aligned, as triton specializes them). Besides the whole kernel's
instruction mix it reports each loop of the SASS (a backward branch): its static instructions, i.e. per step of
the row loop, and the mix inside it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def main() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import gemv_triton
    from kernels.dispatch import CoreShape

    ap = argparse.ArgumentParser()
    ap.add_argument("shape", help="CoreShape fields as JSON")
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--m", type=int, default=1, help="batch rows (M_P: the next power of two)")
    ap.add_argument("--t-mode", type=int, default=1)
    ap.add_argument("--sass", default=None)
    a = ap.parse_args()
    shape = CoreShape(**json.loads(a.shape))
    fn = gemv_triton._sgemv_kernel
    ptr = {"x_ptr": "*bf16", "t_ptr": "*fp32", "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16",
           "scr_i_ptr": "*i32", "scr_x_ptr": "*fp32", "ws_ptr": "*fp32", "lock_ptr": "*i32", "y_ptr": "*bf16"}
    ints = {"stride_xm", "t_stride_part", "M", "N", "K", "G", "stride_qk", "stride_sg", "stride_ym", "END0", "END1",
            "n_ksplit", "magic"}
    dense = shape.dense if not shape.pipe and shape.stages == 1 else 0
    m_p = triton.next_power_of_2(a.m)
    const = dict(M_P=m_p, KR=shape.k_range, T_MODE=a.t_mode, SPLIT=True, DET=False, ALIGNED=True,
                 OUT_DTYPE=triton.language.bfloat16, EMULATE=False, BITS=4, W=shape.warps, R=shape.rows, VEC=shape.vec,
                 F16=shape.f16, PIPE=shape.pipe, EVICT=shape.evict_first, STAGES=shape.stages, GROUPS=shape.groups,
                 DENSE=dense, H2=shape.h2, M=a.m)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in ptr:
            sig[name] = ptr[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "t_value":
            sig[name] = "fp32"
        else:
            assert name in ints, name
            sig[name] = "i32"
            if name not in ("t_stride_part", "magic"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=const, attrs=attrs)
    opts = {"num_warps": shape.warps, "num_stages": 1}
    if shape.maxnreg:
        opts["maxnreg"] = shape.maxnreg
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    res = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                         text=True).stdout
    sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    if a.sass:
        open(a.sass, "w").write(sass)
    ops = collections.Counter()
    code = []  # (address, opcode, branch target or None)
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(?:\.\S+)?\s*([^;]*)", line)
        if m:
            ops[m.group(3)] += 1
            target = re.match(r"(0x[0-9a-f]+)", m.group(4).strip()) if m.group(3) == "BRA" else None
            code.append((int(m.group(1), 16), m.group(3), int(target.group(1), 16) if target else None))
    print(json.dumps({**shape.__dict__, "m": a.m}), re.sub(r"\s+", " ", res.split("Function")[-1].strip())[:200])
    print("static SASS instructions:", sum(ops.values()), dict(ops.most_common(16)))
    for addr, op, target in code:  # loops: backward branches (the branch-to-self at the end excluded)
        if target is not None and target < addr:
            body = collections.Counter(o for a_, o, _ in code if target <= a_ <= addr)
            print(f"loop {target:#x}-{addr:#x}: {sum(body.values())} instructions", dict(body.most_common(20)))


if __name__ == "__main__":
    main()
