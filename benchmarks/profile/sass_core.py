"""Compile a sparse-GEMV kernel for sm_90 on a machine without a GPU and report registers, spills, shared memory and
the instruction mix of its SASS (triton's bundled ptxas and cuobjdump; no device time).

    PYTHONPATH=<triton 3.6 site>:. python benchmarks/profile/sass_core.py '{"vec": 4, "warps": 4, "rows": 4,
        "k_range": 128, "evict_first": true, "h2": true}' [--m 1] [--n 28672 --k 8192] [--sass out.sass]
    PYTHONPATH=<triton 3.6 site>:. python benchmarks/profile/sass_core.py '{"kernel": "splitk", "block_n": 64,
        "stages": 3, "programs": 2112}' --m 4

The JSON names a ``CoreShape`` (kernels/gemv_triton.py, the default) or, with ``"kernel": "splitk"``, a
``SplitKShape`` (kernels/gemv_splitk_triton.py). The specialization is that of a launch on the given layer at batch
``--m`` (1-16; the core kernel takes 1-4) with a 0-dim tensor threshold (int arguments divisible by 16 and pointers
16-byte aligned, as triton specializes them). Besides the whole kernel's instruction mix it reports the main loop
(the longest backward branch: one step of the row loop, or one K-step), the code before it and after it up to the
first EXIT (where every program but the last of a column tile ends), and from these an estimate of the instructions
one thread issues per program that is not the last (prologue + steps x loop + epilogue, branches inside counted
whole) and per weight of W it covers (weights = the program's rows x columns / its threads).
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

PTR = {"x_ptr": "*bf16", "t_ptr": "*fp32", "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16",
       "scr_i_ptr": "*i32", "scr_x_ptr": "*fp32", "ws_ptr": "*fp32", "lock_ptr": "*i32", "y_ptr": "*bf16",
       "u_ptr": "*bf16", "clear_ptr": "*fp32"}
INTS = {"stride_xm", "t_stride_part", "M", "N", "K", "G", "stride_qk", "stride_sg", "stride_ym", "END0", "END1",
        "n_ksplit", "magic", "KR"}
NOT_DIVISIBLE = ("t_stride_part", "magic", "M", "KR")


def core_spec(shape, a):
    """(kernel, constexprs, num_warps, steps per program, weights per thread per program) of a core launch."""
    import triton

    from kernels import gemv_triton

    dense = 100 if shape.preload else shape.dense if not shape.pipe and shape.stages == 1 else 0
    const = dict(M_P=triton.next_power_of_2(a.m), KR=shape.k_range, T_MODE=a.t_mode, SPLIT=True, DET=False,
                 ALIGNED=True, OUT_DTYPE=triton.language.bfloat16, EMULATE=False, BITS=4, W=shape.warps, R=shape.rows,
                 VEC=shape.vec, F16=shape.f16, PIPE=shape.pipe, EVICT=shape.evict_first, STAGES=shape.stages,
                 GROUPS=shape.groups, DENSE=dense, H2=shape.h2, PRELOAD=shape.preload,
                 LOOKAHEAD=shape.lookahead, LOADS_FIRST=shape.loads_first, SHFL=shape.shfl, SILU=False, ACC=False, CLEAR=False)
    steps = shape.k_range * shape.groups // (shape.warps * shape.rows)  # all rows (compacted: at most this)
    weights = shape.k_range * shape.groups * 32 * shape.vec * 8 / (32 * shape.warps)
    return gemv_triton._sgemv_kernel, const, shape.warps, steps, weights


def splitk_spec(shape, a):
    import triton

    from kernels import gemv_splitk_triton as sk

    m_p = triton.next_power_of_2(a.m)
    const = dict(M_P=m_p, T_MODE=a.t_mode, SPLIT=True, DET=False, ALIGNED=True, OUT_DTYPE=triton.language.bfloat16,
                 EMULATE=False, BITS=4, M_D=max(8 if shape.swap else 16, m_p), BLOCK_N=shape.block_n,
                 BLOCK_K=shape.block_k, STAGES=shape.stages, SWAP=shape.swap, SKIP=shape.skip,
                 PREFETCH=shape.prefetch, FAST=True, BF16=True, DOT_DTYPE=triton.language.bfloat16, SUM_DOT=shape.sum_dot)
    kr = sk.k_range_for(shape, triton.cdiv(a.n, shape.block_n), a.k)
    steps = kr // shape.block_k
    weights = kr * shape.block_n / (32 * shape.warps)
    return sk._sgemv_splitk_kernel, const, shape.warps, steps, weights


def main() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.dispatch import shape_from_dict

    ap = argparse.ArgumentParser()
    ap.add_argument("shape", help="CoreShape fields as JSON, or a SplitKShape with \"kernel\": \"splitk\"")
    ap.add_argument("--m", type=int, default=1, help="batch rows (M_P: the next power of two)")
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--t-mode", type=int, default=1)
    ap.add_argument("--sass", default=None)
    ap.add_argument("--ttgir", default=None, help="write triton's GPU IR (layouts, conversions) here")
    ap.add_argument("--const", default="{}", help="more constexprs as JSON, e.g. '{\"SILU\": true}'")
    a = ap.parse_args()
    d = json.loads(a.shape)
    shape = shape_from_dict({"kernel": "core", **d})
    fn, const, warps, steps, weights = (splitk_spec if shape.kernel == "splitk" else core_spec)(shape, a)
    const["M"] = a.m
    const.update(json.loads(a.const))
    const.setdefault("PDL", 0)  # programmatic dependent launch off (kernels/pdl_triton.py)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in PTR:
            sig[name] = PTR[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "t_value":
            sig[name] = "fp32"
        else:
            assert name in INTS, name
            sig[name] = "i32"
            if name not in NOT_DIVISIBLE:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=const, attrs=attrs)
    opts = {"num_warps": warps, "num_stages": const.get("STAGES", 1) if shape.kernel == "splitk" else 1}
    if shape.maxnreg:
        opts["maxnreg"] = shape.maxnreg
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    if a.ttgir:
        with open(a.ttgir, "w") as f:
            f.write(k.asm["ttgir"])
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
    print(json.dumps({**shape.__dict__, "kernel": shape.kernel, "m": a.m, "n": a.n, "k": a.k}),
          re.sub(r"\s+", " ", res.split("Function")[-1].strip())[:200], f"shared memory (with triton's dynamic "
          f"part) {k.metadata.shared} bytes")
    print("static SASS instructions:", sum(ops.values()), dict(ops.most_common(16)),
          "local loads/stores:", ops["LDL"] + ops["STL"])
    loops = [(addr - target, target, addr) for addr, op, target in code if target is not None and target < addr]
    for _, lo, hi in loops:  # loops: backward branches
        body = collections.Counter(o for a_, o, _ in code if lo <= a_ <= hi)
        print(f"loop {lo:#x}-{hi:#x}: {sum(body.values())} instructions", dict(body.most_common(20)))
    if loops:
        _, lo, hi = max(loops)
        exit_at = next((a_ for a_, o, _ in code if o == "EXIT" and a_ > hi), code[-1][0])
        pro = sum(1 for a_, _, _ in code if a_ < lo)
        body = sum(1 for a_, _, _ in code if lo <= a_ <= hi)
        epi = sum(1 for a_, _, _ in code if hi < a_ <= exit_at)
        total = pro + steps * body + epi
        print(f"main loop: {body} per step; before it {pro}, after it to the first EXIT {epi}; per program (not the "
              f"last) at {steps} steps ~{total} per thread for {weights:.0f} weights: {total / weights:.2f} per weight "
              f"(loop alone {steps * body / weights:.2f})")


if __name__ == "__main__":
    main()
