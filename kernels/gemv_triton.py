"""Batch-1 sparse GEMV on CUDA cores (``_sgemv_kernel``): y = (x * (|x| > t)) @ W^T, one launch, M <= 4 (``h2``: the
products summed in fp16 pairs, at M = 2..4 with the unpack shared by the batch rows; docs/kernels.md rounds 7 and 9).

Shapes and layout: kernels/reference.py (the pure-torch twin) and docs/kernels.md. A program owns
BLOCK_N = 32 * VEC * (32 // BITS) columns (each thread VEC int32 words = 4 * VEC bytes of a row) and the KR rows
k0 = pid_k * KR ... inside one quantization group (kernels/gemv_common.py: tile, threshold + compaction, split-K).
It
1. issues the loads of its scales / zeros (independent of x),
2. thresholds and compacts its K-range (union over the M rows) into the shared scratch list (``shfl``, batch 1: into
   registers, one slot per lane, read back with warp shuffles),
3. walks the compacted rows: its W warps take slots w, w + W, ...; R rows per warp per step are unrolled so their
   16-byte loads are in flight together; slots past the end read a valid row with x = 0, so the loop has no load
   predicates. int4 values are unpacked two per LOP3 into fp16 pairs ``1024 + q * {1, 16}`` and converted to fp32
   (``_unpack8_f16``; the fp32 exponent trick ``_unpack`` is the alternative, exact for fp32 x), accumulated per
   value position J in fp32 registers (FMA chains, no shuffles),
4. reduces over its warps, interleaves the eight per-value accumulators back to columns, removes the offsets
   (1024 * sum x) and applies zero point and scale once: ``y = s * (sum_k x_k q_k - z * sum_k x_k)``,
5. hands its partial to the split-K reduction (atomics, or ordered slots in deterministic mode).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import CORE_MAX_M, CoreShape
from .gemv_common import (
    GemvProblem,
    compact_rows,
    load_x,
    prepare,
    program_tile,
    reduce_split_k,
    threshold_rows,
    tile_qparams,
)
from .pdl_triton import wait_previous_kernel

FP32_MAGIC = 0x4B000000  # 2^23 as fp32 bits: OR-ing a value below 2^23 into its mantissa gives 2^23 + value


@triton.jit
def _unpack8_f16(wd, EMULATE: tl.constexpr):
    """The eight nibbles of each int32 word as fp32 ``1024 + q * f_J`` (f_J = 1 for even J, 16 for odd J), exact.
    Two nibbles per LOP3: ``(w & 0x000F000F) | 0x64006400`` is the fp16 pair (1024 + q0, 1024 + q4), with mask
    0x00F000F0 (1024 + 16 q1, 1024 + 16 q5), and the same on ``w >> 8`` for nibbles 2, 6, 3, 7; each half then takes
    one conversion (cvt.f32.f16). Per word: 1 SHF + 4 LOP3 + 8 CVT, against 1 SHF + 8 LOP3 + 8 FADD for the fp32
    exponent trick. The 1024 offsets are removed once per program (sum of x). EMULATE (the interpreter, which has
    no inline PTX): the same values computed with integer ops."""
    if EMULATE:
        v0 = (1024 + (wd & 15)).to(tl.float32)
        v1 = (1024 + (wd & 0xF0)).to(tl.float32)
        v2 = (1024 + ((wd >> 8) & 15)).to(tl.float32)
        v3 = (1024 + ((wd >> 8) & 0xF0)).to(tl.float32)
        v4 = (1024 + ((wd >> 16) & 15)).to(tl.float32)
        v5 = (1024 + ((wd >> 16) & 0xF0)).to(tl.float32)
        v6 = (1024 + ((wd >> 24) & 15)).to(tl.float32)
        v7 = (1024 + ((wd >> 24) & 0xF0)).to(tl.float32)
    else:
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, t2, t3, w8;
            .reg .b16 l0, h0, l1, h1, l2, h2, l3, h3;
            shr.u32 w8, $8, 8;
            lop3.b32 t0, $8, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 t1, $8, 0x00F000F0, 0x64006400, 0xEA;
            lop3.b32 t2, w8, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 t3, w8, 0x00F000F0, 0x64006400, 0xEA;
            mov.b32 {l0, h0}, t0;
            mov.b32 {l1, h1}, t1;
            mov.b32 {l2, h2}, t2;
            mov.b32 {l3, h3}, t3;
            cvt.f32.f16 $0, l0;
            cvt.f32.f16 $4, h0;
            cvt.f32.f16 $1, l1;
            cvt.f32.f16 $5, h1;
            cvt.f32.f16 $2, l2;
            cvt.f32.f16 $6, h2;
            cvt.f32.f16 $3, l3;
            cvt.f32.f16 $7, h3;
            }""",
            constraints="=f,=f,=f,=f,=f,=f,=f,=f,r",
            args=[wd],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True,
            pack=1,
        )
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def _h2_half(c, HI: tl.constexpr):
    """The low (HI False) or high fp16 of int32 bit patterns of fp16 pairs, as fp16."""
    bits = (c >> 16) if HI else c
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _h2_pack(lo, hi):
    """Two fp16 tensors -> int32 bit patterns of the pairs (lo, hi)."""
    lb = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hb = hi.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lb | (hb << 16)


@triton.jit
def _h2_split(c):
    """int32 bit patterns of fp16 pairs -> (low, high) as fp32."""
    return _h2_half(c, False).to(tl.float32), _h2_half(c, True).to(tl.float32)


@triton.jit
def _fma8_h2(wd, x2, c0, c1, c2, c3, EMULATE: tl.constexpr):
    """c_i += x * q for the eight nibbles of each int32 word, two per instruction (HFMA2 on fp16 pairs): c0 holds the
    pair (q0, q4), c1 (q1, q5), c2 (q2, q6), c3 (q3, q7); x2 is the pair (x, x). ``(w & 0x000F000F) | 0x64006400``
    is (1024 + q0, 1024 + q4) and ``(w & 0x00F000F0) | 0x54005400`` is (64 + q1, 64 + q5) (the nibble sits 4 bits up
    in the mantissa of 64); one HSUB2 each makes q exact, one HFMA2 adds x * q. Per word: 1 SHF + 4 LOP3 + 4 HSUB2 +
    4 HFMA2 = 13 instructions for 8 weights (the fp16-pair unpack into fp32: 21). EMULATE (the interpreter): the same
    values with integer ops and fp16 arithmetic (a product and a sum rounded separately, not fused)."""
    if EMULATE:
        xh = _h2_half(x2, False)
        c0 = _h2_pack(_h2_half(c0, False) + (wd & 15).to(tl.float16) * xh,
                      _h2_half(c0, True) + ((wd >> 16) & 15).to(tl.float16) * xh)
        c1 = _h2_pack(_h2_half(c1, False) + ((wd >> 4) & 15).to(tl.float16) * xh,
                      _h2_half(c1, True) + ((wd >> 20) & 15).to(tl.float16) * xh)
        c2 = _h2_pack(_h2_half(c2, False) + ((wd >> 8) & 15).to(tl.float16) * xh,
                      _h2_half(c2, True) + ((wd >> 24) & 15).to(tl.float16) * xh)
        c3 = _h2_pack(_h2_half(c3, False) + ((wd >> 12) & 15).to(tl.float16) * xh,
                      _h2_half(c3, True) + ((wd >> 28) & 15).to(tl.float16) * xh)
    else:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 w8, t0, t1, t2, t3, m1024, m64;
            mov.b32 m1024, 0x64006400;
            mov.b32 m64, 0x54005400;
            shr.u32 w8, $8, 8;
            lop3.b32 t0, $8, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 t1, $8, 0x00F000F0, 0x54005400, 0xEA;
            lop3.b32 t2, w8, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 t3, w8, 0x00F000F0, 0x54005400, 0xEA;
            sub.f16x2 t0, t0, m1024;
            sub.f16x2 t1, t1, m64;
            sub.f16x2 t2, t2, m1024;
            sub.f16x2 t3, t3, m64;
            fma.rn.f16x2 $0, t0, $9, $4;
            fma.rn.f16x2 $1, t1, $9, $5;
            fma.rn.f16x2 $2, t2, $9, $6;
            fma.rn.f16x2 $3, t3, $9, $7;
            }""",
            constraints="=r,=r,=r,=r,r,r,r,r,r,r",
            args=[c0, c1, c2, c3, wd, x2],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True,
            pack=1,
        )
    return c0, c1, c2, c3


@triton.jit
def _unpack4_h2(wd, EMULATE: tl.constexpr):
    """The eight nibbles of each int32 word as four exact fp16 pairs (int32 bit patterns): (q0, q4), (q1, q5),
    (q2, q6), (q3, q7). The unpack half of ``_fma8_h2`` (1 SHF + 4 LOP3 + 4 HSUB2 per word), for M_P > 1: computed
    once per word and shared by the batch rows, each of which adds 4 HFMA2 (``_fma4_h2``)."""
    if EMULATE:
        p0 = _h2_pack((wd & 15).to(tl.float16), ((wd >> 16) & 15).to(tl.float16))
        p1 = _h2_pack(((wd >> 4) & 15).to(tl.float16), ((wd >> 20) & 15).to(tl.float16))
        p2 = _h2_pack(((wd >> 8) & 15).to(tl.float16), ((wd >> 24) & 15).to(tl.float16))
        p3 = _h2_pack(((wd >> 12) & 15).to(tl.float16), ((wd >> 28) & 15).to(tl.float16))
    else:
        p0, p1, p2, p3 = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 w8, m1024, m64;
            mov.b32 m1024, 0x64006400;
            mov.b32 m64, 0x54005400;
            shr.u32 w8, $4, 8;
            lop3.b32 $0, $4, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 $1, $4, 0x00F000F0, 0x54005400, 0xEA;
            lop3.b32 $2, w8, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 $3, w8, 0x00F000F0, 0x54005400, 0xEA;
            sub.f16x2 $0, $0, m1024;
            sub.f16x2 $1, $1, m64;
            sub.f16x2 $2, $2, m1024;
            sub.f16x2 $3, $3, m64;
            }""",
            constraints="=r,=r,=r,=r,r",
            args=[wd],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True,
            pack=1,
        )
    return p0, p1, p2, p3


@triton.jit
def _fma4_h2(p0, p1, p2, p3, x2, c0, c1, c2, c3, EMULATE: tl.constexpr):
    """c_i += x * p_i on fp16 pairs (4 HFMA2); p_i from ``_unpack4_h2`` broadcast over the batch rows of c_i and
    x2 (the pair (x, x) of each row). EMULATE: fp16 product and sum rounded separately, as in ``_fma8_h2``."""
    if EMULATE:
        xh = _h2_half(x2, False)
        c0 = _h2_pack(_h2_half(c0, False) + _h2_half(p0, False) * xh, _h2_half(c0, True) + _h2_half(p0, True) * xh)
        c1 = _h2_pack(_h2_half(c1, False) + _h2_half(p1, False) * xh, _h2_half(c1, True) + _h2_half(p1, True) * xh)
        c2 = _h2_pack(_h2_half(c2, False) + _h2_half(p2, False) * xh, _h2_half(c2, True) + _h2_half(p2, True) * xh)
        c3 = _h2_pack(_h2_half(c3, False) + _h2_half(p3, False) * xh, _h2_half(c3, True) + _h2_half(p3, True) * xh)
    else:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            asm="""{
            fma.rn.f16x2 $0, $4, $8, $9;
            fma.rn.f16x2 $1, $5, $8, $10;
            fma.rn.f16x2 $2, $6, $8, $11;
            fma.rn.f16x2 $3, $7, $8, $12;
            }""",
            constraints="=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
            args=[p0, p1, p2, p3, x2, c0, c1, c2, c3],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True,
            pack=1,
        )
    return c0, c1, c2, c3


@triton.jit
def _x_absmax(xm, PER_ROW: tl.constexpr = False):
    """max |x| of a [M_P, KR] tile: a scalar, or (PER_ROW) one per batch row [M_P]."""
    v = tl.max(tl.abs(xm), axis=1)
    if not PER_ROW:
        v = tl.max(v, axis=0)
    return v


@triton.jit
def _x_scale(xabsmax):
    """A power of two that brings ``xabsmax`` (max |x| of the K-range, or of all K-ranges of a program; a scalar, or
    [M_P] with one per batch row) into [8, 16) (1 when all x are 0), elementwise: x * q of one K-range then sums in
    fp16 without overflow (|x q| < 240, at most 128 terms per chain, the chains folded into fp32 per K-range) and
    with fp16's full precision for the largest x."""
    xmax = tl.maximum(xabsmax, 1e-30)
    e = tl.minimum(tl.maximum(tl.floor(tl.log2(16.0 / xmax)), -100.0), 100.0)
    e = tl.where(xabsmax > 0, e, 0.0)
    return ((e.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _x_pairs(xm, xscale):
    """h2 at M_P > 1: the [M_P, KR] x tile scaled per batch row (``xscale`` [M_P]) as fp16 pairs (x, x), returned
    as fp32 bit patterns for the scratch list (the compaction stores them in place of x): the row loop then loads
    one ready HFMA2 operand per (row, batch row) instead of thresholding, scaling and converting x per row."""
    xi = (xm * xscale[:, None]).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return (xi | (xi << 16)).to(tl.float32, bitcast=True)


@triton.jit
def _store_rows(xs, mm, k0, part, K, scr_x_ptr, M_P: tl.constexpr, KR: tl.constexpr):
    """The x values (h2 at M_P > 1: the pairs of ``_x_pairs``) of rows k0 .. k0 + KR in their own scratch slots, in
    order (no compaction: the in-place loop reads slot = row), then a barrier."""
    rk = tl.arange(0, KR)
    tl.store(scr_x_ptr + (part * K + k0 + rk)[None, :] * M_P + mm[:, None], xs)
    tl.debug_barrier()


@triton.jit
def _unpack(wd, w_hi, magic, J: tl.constexpr, BITS: tl.constexpr):
    """Value J of each int32 word as fp32, times a power of two that is undone per column at the end (exact):
    int4: nibble J masked in place (J <= 4) or in ``w_hi = wd >> 12`` (J >= 5) and OR-ed into the exponent of 2^23
    gives 2^23 + q * 16^(J or J - 3); int8: byte J in place (J <= 1) or in ``wd >> 16`` -> 2^23 + q * 256^(J % 2).
    One LOP3 + one FADD per value, no I2F."""
    if BITS == 4:
        if J < 5:
            v = wd & (15 << (4 * J))
        else:
            v = w_hi & (15 << (4 * (J - 3)))
    else:
        if J < 2:
            v = wd & (255 << (8 * J))
        else:
            v = w_hi & (255 << (8 * (J - 2)))
    return (v | magic).to(tl.float32, bitcast=True) - 8388608.0

@triton.jit
def _slot_load(scr_i_ptr, scr_x_ptr, ibase, k0, slot, c, mm, M_P: tl.constexpr, MASK: tl.constexpr = True):
    """Row index and x values [M_P, W] of compacted slots ``slot`` [W] (one per warp). Slots past the end give row
    k0 (a valid, cached row) and x = 0, so the loop needs no load predicates or zero fills: through the load mask,
    or (MASK False, slots < KR) from the scratch list itself, whose slots past c hold (k0, 0)."""
    if MASK:
        ok = slot < c
        row = tl.load(scr_i_ptr + ibase + slot, mask=ok, other=k0)
        xr = tl.load(scr_x_ptr + (ibase + slot)[None, :] * M_P + mm[:, None], mask=ok[None, :], other=0.0)
    else:
        row = tl.load(scr_i_ptr + ibase + slot)
        xr = tl.load(scr_x_ptr + (ibase + slot)[None, :] * M_P + mm[:, None])
    return row, xr


# -- the compacted list in registers (SHFL, batch 1): one slot per lane, broadcast by warp shuffles ------------------
# The [W] lane lists differ between the lanes of a warp although triton sees one element per row of the weight tile
# (a slice layout whose lanes all hold the same elements): only inline asm reads them, each thread its own register,
# and the loop's rows and x come out of a shuffle equal in every lane again. The masks come from [32] tensors whose
# element l is held by lane l (checked in the GPU IR, benchmarks/profile/sass_core.py --ttgir).
@triton.jit
def _lane_id(like):
    """The executing thread's lane, in the shape of ``like`` (values differ per lane)."""
    return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _ballot(act):
    """Bit l set where lane l's ``act`` is true (every lane of the warp gets the same word)."""
    return tl.inline_asm_elementwise("{ .reg .pred p;\n setp.ne.s32 p, $1, 0;\n vote.sync.ballot.b32 $0, p, -1; }",
                                     "=r,r", [act.to(tl.int32)], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _nth_active(m0, m1, m2, m3, slot):
    """Offset in the K-range of the slot-th active row (0-based) of the 128-bit mask m0..m3, -1 past the last: the
    word by prefix popcounts, then the bit by a branch-free binary search (popc of the low 16, 8, 4, 2, 1 bits;
    PTX ``fns`` compiles to ~50 instructions with branches)."""
    return tl.inline_asm_elementwise(
        "{ .reg .u32 c1, c2, c3, t, m, n, b, c;\n .reg .pred q;\n"
        " popc.b32 c1, $1;\n popc.b32 t, $2;\n add.u32 c2, c1, t;\n popc.b32 t, $3;\n add.u32 c3, c2, t;\n"
        " popc.b32 t, $4;\n add.u32 t, c3, t;\n mov.u32 m, $1;\n mov.u32 n, $5;\n mov.u32 b, 0;\n"
        " setp.ge.u32 q, $5, c1;\n @q mov.u32 m, $2;\n @q sub.u32 n, $5, c1;\n @q mov.u32 b, 32;\n"
        " setp.ge.u32 q, $5, c2;\n @q mov.u32 m, $3;\n @q sub.u32 n, $5, c2;\n @q mov.u32 b, 64;\n"
        " setp.ge.u32 q, $5, c3;\n @q mov.u32 m, $4;\n @q sub.u32 n, $5, c3;\n @q mov.u32 b, 96;\n"
        " and.b32 c, m, 0xFFFF;\n popc.b32 c, c;\n setp.ge.u32 q, n, c;\n"
        " @q sub.u32 n, n, c;\n @q shr.b32 m, m, 16;\n @q add.u32 b, b, 16;\n"
        " and.b32 c, m, 0xFF;\n popc.b32 c, c;\n setp.ge.u32 q, n, c;\n"
        " @q sub.u32 n, n, c;\n @q shr.b32 m, m, 8;\n @q add.u32 b, b, 8;\n"
        " and.b32 c, m, 0xF;\n popc.b32 c, c;\n setp.ge.u32 q, n, c;\n"
        " @q sub.u32 n, n, c;\n @q shr.b32 m, m, 4;\n @q add.u32 b, b, 4;\n"
        " and.b32 c, m, 0x3;\n popc.b32 c, c;\n setp.ge.u32 q, n, c;\n"
        " @q sub.u32 n, n, c;\n @q shr.b32 m, m, 2;\n @q add.u32 b, b, 2;\n"
        " and.b32 c, m, 0x1;\n setp.ge.u32 q, n, c;\n @q add.u32 b, b, 1;\n"
        " setp.ge.u32 q, $5, t;\n selp.b32 $0, -1, b, q; }",
        "=r,r,r,r,r,r", [m0, m1, m2, m3, slot], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _shfl(v, src):
    """Lane ``src``'s v (int32) in every lane of the warp."""
    return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, -1;", "=r,r,r", [v, src],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _x_above(x_ptr, u_ptr, t_ptr, t_value, t_stride_part, part, rows, ok, T_MODE: tl.constexpr, SILU: tl.constexpr,
             X_DTYPE: tl.constexpr):
    """x of 1-D ``rows`` (batch 1; 0 where not ok) and whether it survives the threshold (threshold_rows' rule)."""
    xv = load_x(x_ptr, u_ptr, rows, ok, SILU, X_DTYPE)
    if T_MODE == 0:
        act = tl.abs(xv) > t_value
    elif T_MODE == 1:
        act = tl.abs(xv) > tl.load(t_ptr + part * t_stride_part).to(tl.float32)
    else:
        act = tl.abs(xv) > tl.load(t_ptr + part * t_stride_part + rows, mask=ok, other=0.0).to(tl.float32)
    return xv, act & ok


@triton.jit
def _lane_masks(x_ptr, u_ptr, t_ptr, t_value, t_stride_part, part, k0, KR: tl.constexpr, T_MODE: tl.constexpr,
                SILU: tl.constexpr, X_DTYPE: tl.constexpr):
    """The active rows of k0 .. k0 + KR (batch 1) as four 32-bit masks (scalars; 0 past KR) and their count: every
    warp takes them itself, one ballot per 32 rows (x read again: L1 hits after threshold_rows), no barrier."""
    lanes = tl.arange(0, 32)
    ms = ()
    c = 0
    for i in tl.static_range(4):
        if i < KR // 32:
            _, act = _x_above(x_ptr, u_ptr, t_ptr, t_value, t_stride_part, part, k0 + 32 * i + lanes, lanes < 32,
                              T_MODE, SILU, X_DTYPE)
            m = tl.max(_ballot(act), axis=0)  # the same word in every lane: a scalar
            c += tl.sum(act.to(tl.int32), axis=0)
        else:
            m = 0
        ms = ms + (m,)
    return ms[0], ms[1], ms[2], ms[3], c


@triton.jit
def _lane_list(x_ptr, u_ptr, t_ptr, t_value, t_stride_part, part, k0, wv, m0, m1, m2, m3, W: tl.constexpr,
               T_MODE: tl.constexpr, SILU: tl.constexpr, X_DTYPE: tl.constexpr):
    """The compacted list of the K-range in registers -> (row offsets, x bits): lane l holds, for each slot-row
    element e of the [W] tensors, slot e + W * l (the slots the warps holding e walk, in order); slots past the last
    active row hold (0, 0), i.e. row k0 with x = 0 as the scratch list does. No scratch stores, no barrier, no L2
    round trip before the first row load (docs/kernels.md, round 14)."""
    lane = _lane_id(wv)
    zero = lane * 0
    off = _nth_active(m0 + zero, m1 + zero, m2 + zero, m3 + zero, wv + W * lane)
    live = off >= 0
    lrow = tl.where(live, off, 0)
    xv, _ = _x_above(x_ptr, u_ptr, t_ptr, t_value, t_stride_part, part, k0 + lrow, live, T_MODE, SILU, X_DTYPE)
    return lrow, xv.to(tl.int32, bitcast=True)


@triton.jit
def _row_load(qw_ptr, row, word, w_ok, stride_qk, M_P: tl.constexpr, ALIGNED: tl.constexpr, EVICT: tl.constexpr):
    """The [W, NB] words of one gathered row per warp ([1, W, NB] for M_P > 1: the accumulators' layout)."""
    if M_P == 1:
        ptrs = qw_ptr + row[:, None] * stride_qk + word[None, :]
        ok = w_ok[None, :]
    else:
        ptrs = qw_ptr + row[None, :, None] * stride_qk + word[None, None, :]
        ok = w_ok[None, None, :]
    if ALIGNED:
        if EVICT:
            wd = tl.load(ptrs, eviction_policy="evict_first")
        else:
            wd = tl.load(ptrs)
    else:
        if EVICT:
            wd = tl.load(ptrs, mask=ok, eviction_policy="evict_first")
        else:
            wd = tl.load(ptrs, mask=ok)
    return wd


@triton.jit
def _row_x(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, row, mm, m_ok, T_MODE: tl.constexpr,
           SILU: tl.constexpr, X_DTYPE: tl.constexpr):
    """x of rows ``row`` [W] (one per warp) for every batch row (SILU: silu(gate) * up, kernels/gemv_common.py
    ``load_x``), thresholded here (|x| > t, NaN dropped), in the [M_P, W] shape of the scratch-slot loads (no layout
    conversions): (act, x * act)."""
    xv = load_x(x_ptr, u_ptr, row[None, :] + mm[:, None] * stride_xm, m_ok[:, None], SILU, X_DTYPE)
    if T_MODE == 0:
        act = tl.abs(xv) > t_value
    elif T_MODE == 1:
        act = tl.abs(xv) > tl.load(t_ptr + part * t_stride_part).to(tl.float32)
    else:
        act = tl.abs(xv) > tl.load(t_ptr + part * t_stride_part + row[None, :] + 0 * mm[:, None]).to(tl.float32)
    act = act & m_ok[:, None]
    return act, tl.where(act, xv, 0.0)


@triton.jit
def _masked_words(ptrs, ok, EVICT: tl.constexpr):
    """Weight words where ``ok``, 0 elsewhere (no memory traffic for masked-off words)."""
    if EVICT:
        wd = tl.load(ptrs, mask=ok, other=0, eviction_policy="evict_first")
    else:
        wd = tl.load(ptrs, mask=ok, other=0)
    return wd


@triton.jit
def _live_row_load(qw_ptr, row, act, word, w_ok, stride_qk, EVICT: tl.constexpr):
    """Batch 1: the [W, NB] words of rows ``row`` [W] (one per warp) whose ``act`` [1, W] is set; an inactive row's
    load is predicated off and reads as 0 (the in-place loop and PRELOAD 2)."""
    live = tl.reshape(act, [row.shape[0]])
    return _masked_words(qw_ptr + row[:, None] * stride_qk + word[None, :], live[:, None] & w_ok[None, :], EVICT)


@triton.jit
def _preload_rows(qw_ptr, k0, wv, word, w_ok, stride_qk, M_P: tl.constexpr, KR: tl.constexpr, W: tl.constexpr,
                  ALIGNED: tl.constexpr, EVICT: tl.constexpr):
    """PRELOAD 1: the words of all KR rows of the tile (warp w takes rows k0 + w, k0 + w + W, ...), one tuple entry
    per step of W rows, unpredicated and before x is read: no row load waits for anything, all are in flight at
    once. Inactive rows are read too and multiplied by x = 0."""
    wts = ()
    for r in tl.static_range(KR // W):
        wts = wts + (_row_load(qw_ptr, k0 + r * W + wv, word, w_ok, stride_qk, M_P, ALIGNED, EVICT),)
    return wts


@triton.jit
def _preload_x(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0, wv, mm, m_ok, KR: tl.constexpr,
               W: tl.constexpr, T_MODE: tl.constexpr, SILU: tl.constexpr, X_DTYPE: tl.constexpr):
    """The thresholded x of every step of W rows ([M_P, W] each, ``_row_x``), all loads issued together:
    (act, x) tuples."""
    acts = ()
    xrs = ()
    for r in tl.static_range(KR // W):
        act, xr = _row_x(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0 + r * W + wv, mm, m_ok, T_MODE,
                         SILU, X_DTYPE)
        acts = acts + (act,)
        xrs = xrs + (xr,)
    return acts, xrs


@triton.jit
def _preload_live(qw_ptr, k0, wv, word, w_ok, stride_qk, acts, KR: tl.constexpr, W: tl.constexpr,
                  EVICT: tl.constexpr):
    """PRELOAD 2 (batch 1): the words of all KR rows, each load predicated on its row being active (x read first:
    an inactive row costs no memory traffic), all issued together."""
    wts = ()
    for r in tl.static_range(KR // W):
        wts = wts + (_live_row_load(qw_ptr, k0 + r * W + wv, acts[r], word, w_ok, stride_qk, EVICT),)
    return wts


@triton.jit
def _all_loaded(wts, K, KR: tl.constexpr, W: tl.constexpr):
    """An int32 zero tile (the accumulators' start) that depends on every preloaded word: (w_0 | w_1 | ...) & (K >> 31),
    K >= 0 unknown to the compiler. Every FMA chain then waits for all loads, so ptxas issues them all first; without
    it ptxas sinks most row loads of a 1-2 warp program below the FMAs of the earlier rows, one DRAM latency per row
    (SASS, triton 3.6), even across a barrier."""
    dep = wts[0]
    for r in tl.static_range(1, KR // W):
        dep = dep | wts[r]
    return dep & (K >> 31)


@triton.jit
def _dense_rows(qw_ptr, x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, krow, mm, m_ok, word, w_ok,
                stride_qk, scr_x_ptr, K, M_P: tl.constexpr, W: tl.constexpr, T_MODE: tl.constexpr, EVICT: tl.constexpr,
                SILU: tl.constexpr, X_DTYPE: tl.constexpr, H2: tl.constexpr = False):
    """No compaction (DENSE, a K-range with enough active rows): rows krow + w (one per warp) read in place, thresholded here (|x| > t, NaN dropped);
    an inactive row's load is predicated off (no memory traffic; its words read as 0 and its x is 0, so it adds
    exactly 0). x and t are loaded in the [M_P, W] shape of the scratch-slot loads (no layout conversions).
    H2 at M_P > 1: x was thresholded, scaled and paired before the loop (``_store_rows``): the pairs are read from
    the row's scratch slot, and every row's words are loaded, unpredicated (at batch >= 2 the union of the active
    rows is 75-100 % dense; a predicate would put this scratch load, an L2 round trip, before every weight load).
    SILU (otherwise): x = silu(gate) * up, thresholded, was written in order by the threshold pass (``_store_rows``):
    read from there (an entry is active iff nonzero; a zero adds exactly 0 either way) instead of being recomputed per
    row, which put two loads, an exp and a division on every step's chain before its predicated row loads."""
    row = krow + tl.arange(0, W)
    if H2 and M_P > 1:
        xr = tl.load(scr_x_ptr + (part * K + row)[None, :] * M_P + mm[:, None])
    elif SILU:
        xr = tl.load(scr_x_ptr + (part * K + row)[None, :] * M_P + mm[:, None])
        act = xr != 0.0
    else:
        act, xr = _row_x(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, row, mm, m_ok, T_MODE, SILU, X_DTYPE)
    if M_P == 1:
        wd = _live_row_load(qw_ptr, row, act, word, w_ok, stride_qk, EVICT)
    else:
        ptrs = qw_ptr + row[None, :, None] * stride_qk + word[None, None, :]
        if H2:  # every row
            ok = w_ok[None, None, :]
        else:
            live = tl.max(act.to(tl.int32), axis=0) > 0  # union over the batch rows
            ok = live[None, :, None] & w_ok[None, None, :]
        wd = _masked_words(ptrs, ok, EVICT)
    return wd, xr


@triton.jit
def _row_fma(wd, xr, magic, xscale, a0, a1, a2, a3, a4, a5, a6, a7, BITS: tl.constexpr, M_P: tl.constexpr,
             W: tl.constexpr, F16: tl.constexpr, EMULATE: tl.constexpr, H2: tl.constexpr = False):
    """Unpack one row's words and accumulate x * value into the per-value accumulators. The unpacked values are
    finite whatever the bits, so a slot past the end (x = 0) adds exactly 0. H2 (int4): a0..a3 are fp16-pair
    accumulators (int32 bit patterns), a4..a7 unused; M_P 1: x is scaled here by the program's power of two
    ``xscale``; M_P > 1: xr holds the ready (x, x) pairs (``_x_pairs``: scaled per batch row before the loop), and
    the unpack is shared by the batch rows (per word 1 SHF + 4 LOP3 + 4 HSUB2, then 4 HFMA2 per row)."""
    if M_P == 1:
        xb = tl.reshape(xr, [W])[:, None]
    else:
        xb = xr[:, :, None]
    if H2:
        if M_P == 1:
            xi = (xb * xscale).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            a0, a1, a2, a3 = _fma8_h2(wd, xi | (xi << 16), a0, a1, a2, a3, EMULATE)
        else:  # xr: the (x, x) pairs of _x_pairs (scaled per batch row), as fp32 bit patterns
            x2 = xr.to(tl.int32, bitcast=True)[:, :, None]
            p0, p1, p2, p3 = _unpack4_h2(wd, EMULATE)
            a0, a1, a2, a3 = _fma4_h2(p0, p1, p2, p3, x2, a0, a1, a2, a3, EMULATE)
    else:
        if BITS == 4:
            w_hi = wd >> 12
        else:
            w_hi = wd >> 16
        if F16:
            v0, v1, v2, v3, v4, v5, v6, v7 = _unpack8_f16(wd, EMULATE)
            a0 += xb * v0
            a1 += xb * v1
            a2 += xb * v2
            a3 += xb * v3
            a4 += xb * v4
            a5 += xb * v5
            a6 += xb * v6
            a7 += xb * v7
        else:
            a0 += xb * _unpack(wd, w_hi, magic, 0, BITS)
            a1 += xb * _unpack(wd, w_hi, magic, 1, BITS)
            a2 += xb * _unpack(wd, w_hi, magic, 2, BITS)
            a3 += xb * _unpack(wd, w_hi, magic, 3, BITS)
            if BITS == 4:
                a4 += xb * _unpack(wd, w_hi, magic, 4, BITS)
                a5 += xb * _unpack(wd, w_hi, magic, 5, BITS)
                a6 += xb * _unpack(wd, w_hi, magic, 6, BITS)
                a7 += xb * _unpack(wd, w_hi, magic, 7, BITS)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _col_factor(cols, BITS: tl.constexpr, F16: tl.constexpr):
    """Per column, the factor that undoes the power of two its unpacked values carry (exact): fp16 pairs 1/16 on
    odd nibbles; the fp32 exponent trick 16^-(place); int8 256^-(byte % 2)."""
    if BITS == 4:
        if F16:
            inv = tl.where(cols % 2 == 1, 0.0625, 1.0)
        else:
            place = cols % 8
            place = place - (place >= 5).to(tl.int32) * 3
            inv = ((127 - 4 * place) << 23).to(tl.float32, bitcast=True)
    else:
        inv = ((127 - 8 * (cols % 2)) << 23).to(tl.float32, bitcast=True)
    return inv


@triton.jit
def _offset_term(sc, zr, xsum, inv, F16: tl.constexpr, BITS: tl.constexpr):
    """[M_P, BLOCK_N] s * (z + offset) * sum x of one K-range: what y subtracts from inv * sum_k s x v, where v is
    the unpacked value (fp16 pairs: 1024 + f q, so offset = 1024 * inv; else v = q / inv, offset 0)."""
    if BITS == 4 and F16:
        zo = zr + 1024.0 * inv
    else:
        zo = zr
    return (sc * zo)[None, :] * xsum[:, None]


@triton.jit
def _fold(soff, start, end, a0, a1, a2, a3, a4, a5, a6, a7, t0, t1, t2, t3, t4, t5, t6, t7,
          PER: tl.constexpr, NB: tl.constexpr, M_P: tl.constexpr, ALIGNED: tl.constexpr):
    """t_J += s_J * a_J per warp, with the scales of the K-range the loop leaves (no reduction over warps). The
    scales are loaded as one contiguous tile (a 16-byte vector per thread: one word's PER scales) and split into the
    value positions in registers: one load round trip, then one layout conversion per position."""
    cols = start + tl.arange(0, NB * PER)
    if ALIGNED:
        s = tl.load(soff + cols).to(tl.float32)
    else:
        s = tl.load(soff + cols, mask=cols < end, other=0.0).to(tl.float32)
    if PER == 8:  # column word * 8 + J, J = i + 2 j + 4 k at [word, k, j, i]
        ev, od = tl.split(tl.reshape(s, [NB, 2, 2, 2]))
        e0, e1 = tl.split(ev)
        o0, o1 = tl.split(od)
        s0, s4 = tl.split(e0)
        s2, s6 = tl.split(e1)
        s1, s5 = tl.split(o0)
        s3, s7 = tl.split(o1)
    else:  # J = i + 2 j at [word, j, i]
        ev, od = tl.split(tl.reshape(s, [NB, 2, 2]))
        s0, s2 = tl.split(ev)
        s1, s3 = tl.split(od)
    if M_P == 1:
        t0 += s0[None, :] * a0
        t1 += s1[None, :] * a1
        t2 += s2[None, :] * a2
        t3 += s3[None, :] * a3
        if PER == 8:
            t4 += s4[None, :] * a4
            t5 += s5[None, :] * a5
            t6 += s6[None, :] * a6
            t7 += s7[None, :] * a7
    else:
        t0 += s0[None, None, :] * a0
        t1 += s1[None, None, :] * a1
        t2 += s2[None, None, :] * a2
        t3 += s3[None, None, :] * a3
        if PER == 8:
            t4 += s4[None, None, :] * a4
            t5 += s5[None, None, :] * a5
            t6 += s6[None, None, :] * a6
            t7 += s7[None, None, :] * a7
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _slots_rows(scr_i_ptr, scr_x_ptr, ibase, k0, j, wv, c, mm, M_P: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
                lrow=0, lx=0, SHFL: tl.constexpr = False):
    """Row indices and x of the R compacted slots j + r * W + wv (r < R) of a step, all loads issued together
    (SHFL: shuffled out of the lane list of ``_lane_list``, lane j / W + r): (rows, xs) tuples."""
    rows = ()
    xs = ()
    for r in tl.static_range(R):
        if SHFL:
            src = lrow * 0 + (j // W + r)
            p = k0 + _shfl(lrow, src)
            q = _shfl(lx, src).to(tl.float32, bitcast=True)[None, :]
        else:
            p, q = _slot_load(scr_i_ptr, scr_x_ptr, ibase, k0, j + r * W + wv, c, mm, M_P)
        rows = rows + (p,)
        xs = xs + (q,)
    return rows, xs


@triton.jit
def _rows_fma(wds, xs, magic, xscale, K, a0, a1, a2, a3, a4, a5, a6, a7, BITS: tl.constexpr, M_P: tl.constexpr,
              W: tl.constexpr, R: tl.constexpr, F16: tl.constexpr, EMULATE: tl.constexpr, H2: tl.constexpr,
              WAIT_ALL: tl.constexpr = False):
    """The FMAs of R loaded rows (tuples of words and x), in order. WAIT_ALL (LOADS_FIRST): the first row's words are
    OR-ed with ``(w_1 | ... | w_R-1) & (K >> 31)`` (zero, K >= 0 unknown to the compiler), so the first FMA waits for
    every load of the step and ptxas issues them all before it (as ``_all_loaded`` does for the preload); without it
    ptxas issues 8 of the 16 row loads of an R = 8 compacted step first and the rest between the FMAs (SASS)."""
    for r in tl.static_range(R):
        wd = wds[r]
        if WAIT_ALL and r == 0 and R > 1:
            dep = wds[1]
            for i in tl.static_range(2, R):
                dep = dep | wds[i]
            wd = wd | (dep & (K >> 31))
        a0, a1, a2, a3, a4, a5, a6, a7 = _row_fma(wd, xs[r], magic, xscale, a0, a1, a2, a3, a4, a5, a6, a7,
                                                  BITS, M_P, W, F16, EMULATE, H2)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _slots_fma(scr_i_ptr, scr_x_ptr, ibase, k0, j, wv, c, mm, qw_ptr, word, w_ok, stride_qk, magic, xscale, K,
               a0, a1, a2, a3, a4, a5, a6, a7, M_P: tl.constexpr, W: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr,
               ALIGNED: tl.constexpr, EVICT: tl.constexpr, F16: tl.constexpr, EMULATE: tl.constexpr,
               H2: tl.constexpr, WAIT_ALL: tl.constexpr, lrow=0, lx=0, SHFL: tl.constexpr = False):
    """One step of the compacted loop with every load written before the FMAs: the R slot loads, then the R row
    loads, then the FMAs (at R = 4 with the fp16-pair FMAs ptxas otherwise issues 3 of the 24 loads of a step before
    the first HFMA2, and at R = 8 it spreads the row loads over the step: triton 3.6 SASS)."""
    rows, xs = _slots_rows(scr_i_ptr, scr_x_ptr, ibase, k0, j, wv, c, mm, M_P, W, R, lrow, lx, SHFL)
    wds = ()
    for r in tl.static_range(R):
        wds = wds + (_row_load(qw_ptr, rows[r], word, w_ok, stride_qk, M_P, ALIGNED, EVICT),)
    return _rows_fma(wds, xs, magic, xscale, K, a0, a1, a2, a3, a4, a5, a6, a7, BITS, M_P, W, R, F16, EMULATE, H2,
                     WAIT_ALL)


@triton.jit
def _dense_loop(qw_ptr, x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0, mm, m_ok, word, w_ok, stride_qk,
                scr_x_ptr, K, magic, xscale, a0, a1, a2, a3, a4, a5, a6, a7, KR: tl.constexpr, M_P: tl.constexpr, W: tl.constexpr,
                R: tl.constexpr, BITS: tl.constexpr, T_MODE: tl.constexpr, EVICT: tl.constexpr, F16: tl.constexpr,
                EMULATE: tl.constexpr, H2: tl.constexpr, LOADS_FIRST: tl.constexpr, SILU: tl.constexpr,
                X_DTYPE: tl.constexpr):
    """Every row of the K-range in place, inactive ones predicated off (DENSE): no scratch round trip, no barrier,
    row addresses independent of any load; it issues the instructions of every row. R = 4 or LOADS_FIRST: the R
    rows' loads of a step are written before their FMAs."""
    for j in range(0, KR, W * R):
        if R == 4 or LOADS_FIRST:  # all loads of the step written before the FMAs: in this two-loop kernel ptxas
            # otherwise sinks 6 of the 8 row loads below the first FMAs at R = 4 (as round 4's multiple-of hint did)
            wds = ()
            xs = ()
            for r in tl.static_range(R):
                wd, xr = _dense_rows(qw_ptr, x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0 + j + r * W,
                                     mm, m_ok, word, w_ok, stride_qk, scr_x_ptr, K, M_P, W, T_MODE, EVICT, SILU, X_DTYPE,
                                     H2)
                wds = wds + (wd,)
                xs = xs + (xr,)
            a0, a1, a2, a3, a4, a5, a6, a7 = _rows_fma(wds, xs, magic, xscale, K, a0, a1, a2, a3, a4, a5, a6, a7,
                                                       BITS, M_P, W, R, F16, EMULATE, H2, LOADS_FIRST)
        else:
            for r in tl.static_range(R):
                wd, xr = _dense_rows(qw_ptr, x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0 + j + r * W,
                                     mm, m_ok, word, w_ok, stride_qk, scr_x_ptr, K, M_P, W, T_MODE, EVICT, SILU, X_DTYPE,
                                     H2)
                a0, a1, a2, a3, a4, a5, a6, a7 = _row_fma(wd, xr, magic, xscale, a0, a1, a2, a3, a4, a5, a6, a7, BITS, M_P, W, F16, EMULATE, H2)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _compacted_loop(scr_i_ptr, scr_x_ptr, ibase, k0, c, wv, mm, qw_ptr, word, w_ok, stride_qk, magic, xscale, K,
                    a0, a1, a2, a3, a4, a5, a6, a7, M_P: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
                    BITS: tl.constexpr, ALIGNED: tl.constexpr, EVICT: tl.constexpr, F16: tl.constexpr,
                    EMULATE: tl.constexpr, H2: tl.constexpr, LOADS_FIRST: tl.constexpr, lrow=0, lx=0,
                    SHFL: tl.constexpr = False):
    """The c compacted rows of the K-range: warp wv takes slots wv, wv + W, ...; R rows per warp per step (h2 at R = 4,
    or LOADS_FIRST: the step's loads written before its FMAs; SHFL: the list in registers, one of these two)."""
    for j in range(0, c, W * R):
        if (H2 and R == 4) or LOADS_FIRST:
            a0, a1, a2, a3, a4, a5, a6, a7 = _slots_fma(
                scr_i_ptr, scr_x_ptr, ibase, k0, j, wv, c, mm, qw_ptr, word, w_ok, stride_qk, magic, xscale, K,
                a0, a1, a2, a3, a4, a5, a6, a7, M_P, W, R, BITS, ALIGNED, EVICT, F16, EMULATE, H2, LOADS_FIRST,
                lrow, lx, SHFL)
        else:
            for r in tl.static_range(R):
                row, xr = _slot_load(scr_i_ptr, scr_x_ptr, ibase, k0, j + r * W + wv, c, mm, M_P)
                wd = _row_load(qw_ptr, row, word, w_ok, stride_qk, M_P, ALIGNED, EVICT)
                a0, a1, a2, a3, a4, a5, a6, a7 = _row_fma(wd, xr, magic, xscale, a0, a1, a2, a3, a4, a5, a6, a7,
                                                          BITS, M_P, W, F16, EMULATE, H2)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _warp_sums(a0, a1, a2, a3, a4, a5, a6, a7, BITS: tl.constexpr, M_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The per-value accumulators [M_P, W, NB] summed over the warps and interleaved back to columns word * PER + J:
    [M_P, BLOCK_N]. One reduction per value J (fewer barriers than one reduction of the joined tile, round 2)."""
    RA: tl.constexpr = 1
    if BITS == 4:
        a = tl.join(tl.join(tl.join(tl.sum(a0, axis=RA), tl.sum(a4, axis=RA)), tl.join(tl.sum(a2, axis=RA), tl.sum(a6, axis=RA))),
                    tl.join(tl.join(tl.sum(a1, axis=RA), tl.sum(a5, axis=RA)), tl.join(tl.sum(a3, axis=RA), tl.sum(a7, axis=RA))))
    else:
        a = tl.join(tl.join(tl.sum(a0, axis=RA), tl.sum(a2, axis=RA)), tl.join(tl.sum(a1, axis=RA), tl.sum(a3, axis=RA)))
    return tl.reshape(a, [M_P, BLOCK_N])


@triton.jit
def _sgemv_kernel(
    x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part,
    qw_ptr, s_ptr, z_ptr, scr_i_ptr, scr_x_ptr, ws_ptr, lock_ptr, y_ptr, clear_ptr,
    M, N, K, G, stride_qk, stride_sg, stride_ym, END0, END1, n_ksplit, magic,
    M_P: tl.constexpr, KR: tl.constexpr, T_MODE: tl.constexpr, SILU: tl.constexpr, SPLIT: tl.constexpr, DET: tl.constexpr,
    ACC: tl.constexpr, CLEAR: tl.constexpr,
    ALIGNED: tl.constexpr, OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
    BITS: tl.constexpr, W: tl.constexpr, R: tl.constexpr, VEC: tl.constexpr,
    F16: tl.constexpr, PIPE: tl.constexpr, EVICT: tl.constexpr, STAGES: tl.constexpr = 1, GROUPS: tl.constexpr = 1,
    DENSE: tl.constexpr = 0, H2: tl.constexpr = False, PRELOAD: tl.constexpr = 0, LOOKAHEAD: tl.constexpr = 0,
    LOADS_FIRST: tl.constexpr = False, PDL: tl.constexpr = 0, SHFL: tl.constexpr = False,
):
    """One launch: threshold + compaction + gathered-row GEMV + split-K reduction (see the module docstring)."""
    wait_previous_kernel(PDL == 1 or (PDL == 2 and GROUPS > 1))
    PER: tl.constexpr = 32 // BITS
    NB: tl.constexpr = 32 * VEC
    BLOCK_N: tl.constexpr = NB * PER
    # no multiple-of hint on the tile start: the weight rows are then loaded as 8-byte pieces (a [2, 2] warp layout),
    # and ptxas issues all R rows' loads before the first FMA; with the hint (16-byte loads, one warp per row) it
    # sinks half of them below the FMAs of the first rows (triton 3.6 SASS; measured 25 % slower, docs/kernels.md)
    pid_n, pid_k, part, start, end, k0 = program_tile(N, END0, END1, BLOCK_N, KR * GROUPS, ALIGNED, False)
    if GROUPS == 1:
        # 1. scales / zeros of this K-range's group: independent of x, issued first
        cols, n_ok, sc, zr = tile_qparams(s_ptr, z_ptr, start, end, k0, G, stride_sg, BLOCK_N)
        if PRELOAD > 0:  # in place (DENSE 100), every row's words loaded now (PRELOAD 1: before x is read)
            word = start // PER + tl.arange(0, NB)
            w_ok = word < end // PER
            wv = tl.arange(0, W)
            if PRELOAD == 1 or M_P > 1:
                wts = _preload_rows(qw_ptr, k0, wv, word, w_ok, stride_qk, M_P, KR, W, ALIGNED, EVICT)
        wait_previous_kernel(PDL == 2)  # (PDL 2: the parameters above were read before the wait)
        # 2. threshold and compact rows k0 .. k0 + KR (union over the M rows of x)
        mm, m_ok, act, xm = threshold_rows(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0, M, M_P, KR,
                                           T_MODE, SILU, OUT_DTYPE)
        if PRELOAD > 0 and not (H2 and M_P > 1):  # x of every row in the loop's [M_P, W] layout, loaded together
            acts, xrs = _preload_x(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0, wv, mm, m_ok, KR, W,
                                   T_MODE, SILU, OUT_DTYPE)
            if PRELOAD == 2 and M_P == 1:
                wts = _preload_live(qw_ptr, k0, wv, word, w_ok, stride_qk, acts, KR, W, EVICT)
        xsum = tl.sum(xm, axis=1)
        if H2:  # fp16-pair accumulation: x scaled by a power of two per program and batch row (undone in the
            # epilogue; a scalar at M_P 1)
            xscale = _x_scale(_x_absmax(xm, M_P > 1))
        else:
            xscale = 1.0
        if H2 and M_P > 1:  # the scratch lists carry the ready (x, x) fp16 pairs instead of x
            xs = _x_pairs(xm, xscale)
        else:
            xs = xm
        if not SHFL:  # (SHFL, batch 1: the compacted list in registers, one slot per lane; no scratch list)
            lrow = 0
            lx = 0
        if DENSE > 0:  # a K-range with at least DENSE % of its rows active is read in place, without compaction
            if DENSE < 100:  # (100: always in place, and this kernel holds no compaction)
                c = tl.sum(tl.max(act.to(tl.int32), axis=0), axis=0)
                in_place = c * 100 >= DENSE * KR
                ibase = part * K + k0
                if SHFL:  # the masks and the list only where the list is walked (in place, at s0, neither)
                    wv = tl.arange(0, W)
                    if in_place:
                        lrow = wv * 0
                        lx = wv * 0
                        if SILU:  # the in-place rows read x from there
                            _store_rows(xs, mm, k0, part, K, scr_x_ptr, M_P, KR)
                    else:
                        m0, m1, m2, m3, _ = _lane_masks(x_ptr, u_ptr, t_ptr, t_value, t_stride_part, part, k0, KR,
                                                        T_MODE, SILU, OUT_DTYPE)
                        lrow, lx = _lane_list(x_ptr, u_ptr, t_ptr, t_value, t_stride_part, part, k0, wv, m0, m1, m2, m3,
                                              W, T_MODE, SILU, OUT_DTYPE)
                elif not in_place:
                    c, ibase = compact_rows(act, xs, mm, k0, part, K, scr_i_ptr, scr_x_ptr, M_P, KR)
                elif (H2 and M_P > 1) or (SILU and PRELOAD == 0):  # the in-place rows read x from there
                    _store_rows(xs, mm, k0, part, K, scr_x_ptr, M_P, KR)
            elif (H2 and M_P > 1) or (SILU and PRELOAD == 0):
                _store_rows(xs, mm, k0, part, K, scr_x_ptr, M_P, KR)
        elif SHFL:
            ibase = part * K + k0
            m0, m1, m2, m3, c = _lane_masks(x_ptr, u_ptr, t_ptr, t_value, t_stride_part, part, k0, KR, T_MODE, SILU,
                                            OUT_DTYPE)
            lrow, lx = _lane_list(x_ptr, u_ptr, t_ptr, t_value, t_stride_part, part, k0, tl.arange(0, W), m0, m1, m2, m3,
                                  W, T_MODE, SILU, OUT_DTYPE)
        else:
            c, ibase = compact_rows(act, xs, mm, k0, part, K, scr_i_ptr, scr_x_ptr, M_P, KR)
    else:
        # several K-ranges per program: each is thresholded and compacted into its own KR slots as above; the
        # zero-point and offset term of each (sum of x times s * (z + offset)) is summed here in the column layout,
        # the scales of sum x q are applied per warp when the row loop leaves a K-range (_fold)
        mm, m_ok, act, xm = threshold_rows(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0, M, M_P, KR,
                                           T_MODE, SILU, OUT_DTYPE)
        XP: tl.constexpr = H2 and M_P > 1
        if XP:  # the pairs written at compaction need the span's per-row scale first: max |x| over its K-ranges
            xabs = _x_absmax(xm, True)
            for gi in tl.static_range(1, GROUPS):
                _, _, _, xmi = threshold_rows(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0 + gi * KR, M,
                                              M_P, KR, T_MODE, SILU, OUT_DTYPE)
                xabs = tl.maximum(xabs, _x_absmax(xmi, True))
            xscale = _x_scale(xabs)
            c, ibase = compact_rows(act, _x_pairs(xm, xscale), mm, k0, part, K, scr_i_ptr, scr_x_ptr, M_P, KR)
        else:
            c, ibase = compact_rows(act, xm, mm, k0, part, K, scr_i_ptr, scr_x_ptr, M_P, KR)
        xabs = _x_absmax(xm, M_P > 1)
        cols, n_ok, sc, zr = tile_qparams(s_ptr, z_ptr, start, end, k0, G, stride_sg, BLOCK_N)
        inv0 = _col_factor(cols, BITS, F16)
        F16_OFF: tl.constexpr = F16 and not H2  # h2 sums exact q: no 1024 offsets
        offs = _offset_term(sc, zr, tl.sum(xm, axis=1), inv0, F16_OFF, BITS)
        steps = tl.cdiv(c, W * R)
        for gi in tl.static_range(1, GROUPS):
            ki = k0 + gi * KR
            mm, m_ok, act, xm = threshold_rows(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, ki, M, M_P, KR,
                                               T_MODE, SILU, OUT_DTYPE)
            if XP:
                ci, _ = compact_rows(act, _x_pairs(xm, xscale), mm, ki, part, K, scr_i_ptr, scr_x_ptr, M_P, KR)
            else:
                ci, _ = compact_rows(act, xm, mm, ki, part, K, scr_i_ptr, scr_x_ptr, M_P, KR)
            xabs = tl.maximum(xabs, _x_absmax(xm, M_P > 1))
            steps = tl.maximum(steps, tl.cdiv(ci, W * R))
            cols, n_ok, sc, zr = tile_qparams(s_ptr, z_ptr, start, end, ki, G, stride_sg, BLOCK_N)
            offs += _offset_term(sc, zr, tl.sum(xm, axis=1), inv0, F16_OFF, BITS)
        if H2:  # one power of two (per batch row) for the program's span (max |x| over its K-ranges; the fp16 chains of each
            # K-range are folded into fp32 at its end, so the overflow bound is per K-range as with GROUPS 1)
            xscale = _x_scale(xabs)
        else:
            xscale = 1.0
    # 3. gathered rows
    word = start // PER + tl.arange(0, NB)
    w_ok = word < end // PER
    wv = tl.arange(0, W)
    if H2 and M_P == 1:  # fp16-pair accumulators (int32 bit patterns, 0 = +0.0): a0..a3 hold the pairs (J, J + 4)
        a0 = tl.zeros([W, NB], tl.int32)
    elif H2:
        a0 = tl.zeros([M_P, W, NB], tl.int32)
    elif M_P == 1:  # 2-D accumulators [W, NB]: the layout of the weight tile, no conversion in the loop
        a0 = tl.zeros([W, NB], tl.float32)
    else:
        a0 = tl.zeros([M_P, W, NB], tl.float32)
    a1 = tl.zeros_like(a0)
    a2 = tl.zeros_like(a0)
    a3 = tl.zeros_like(a0)
    a4 = tl.zeros_like(a0)
    a5 = tl.zeros_like(a0)
    a6 = tl.zeros_like(a0)
    a7 = tl.zeros_like(a0)
    if PRELOAD > 0 and LOOKAHEAD == 0:  # zeros, but only once every preloaded word has arrived (ptxas then issues
        # all loads first); LOOKAHEAD > 0: row r's FMAs wait for its own load and that of row r + LOOKAHEAD (below)
        dep = _all_loaded(wts, K, KR, W)
        if not H2:
            dep = dep.to(tl.float32, bitcast=True)
        a0 += dep
        a1 += dep
        a2 += dep
        a3 += dep
        a4 += dep
        a5 += dep
        a6 += dep
        a7 += dep
    if PRELOAD > 0:  # the preloaded rows (DENSE 100: no compaction); at M_P > 1 with H2 the ready x pairs
        # written by _store_rows
        for r in tl.static_range(KR // W):
            if H2 and M_P > 1:
                xr = tl.load(scr_x_ptr + (part * K + k0 + r * W + wv)[None, :] * M_P + mm[:, None])
            else:
                xr = xrs[r]
            wd = wts[r]
            if LOOKAHEAD > 0 and r + LOOKAHEAD < KR // W:  # row r's words, once row r + LOOKAHEAD's have arrived
                wd = wd | (wts[r + LOOKAHEAD] & (K >> 31))
            a0, a1, a2, a3, a4, a5, a6, a7 = _row_fma(wd, xr, magic, xscale, a0, a1, a2, a3, a4, a5, a6, a7,
                                                      BITS, M_P, W, F16, EMULATE, H2)
    elif DENSE == 100:
        a0, a1, a2, a3, a4, a5, a6, a7 = _dense_loop(qw_ptr, x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0, mm, m_ok, word,
                                                     w_ok, stride_qk, scr_x_ptr, K, magic, xscale, a0, a1, a2, a3, a4, a5, a6, a7, KR,
                                                     M_P, W, R, BITS, T_MODE, EVICT, F16, EMULATE, H2, LOADS_FIRST, SILU, OUT_DTYPE)
    elif DENSE > 0:
        # SHFL: the in-place loop's first FMA of a step waits for all its loads (LOADS_FIRST's dependency), else ptxas
        # issues 14 of its 16 row loads before it in this kernel (SASS; +4-6 % at s0); the compacted loop without it
        # (with it: 1-2 % slower at s50 / s70; round 15 in docs/kernels.md)
        if in_place:
            a0, a1, a2, a3, a4, a5, a6, a7 = _dense_loop(qw_ptr, x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0, mm, m_ok, word,
                                                         w_ok, stride_qk, scr_x_ptr, K, magic, xscale, a0, a1, a2, a3, a4, a5, a6, a7, KR,
                                                         M_P, W, R, BITS, T_MODE, EVICT, F16, EMULATE, H2, LOADS_FIRST or SHFL, SILU,
                                                         OUT_DTYPE)
        else:
            a0, a1, a2, a3, a4, a5, a6, a7 = _compacted_loop(scr_i_ptr, scr_x_ptr, ibase, k0, c, wv, mm, qw_ptr, word, w_ok,
                                                               stride_qk, magic, xscale, K, a0, a1, a2, a3, a4, a5, a6, a7, M_P, W, R,
                                                               BITS, ALIGNED, EVICT, F16, EMULATE, H2, LOADS_FIRST,
                                                               lrow, lx, SHFL)
    elif PIPE:  # the next step's row indices and x are loaded before this step's FMAs (prefetch); R = 4, or any R
        # with LOADS_FIRST (the same loop over tuples)
        rows, xs = _slots_rows(scr_i_ptr, scr_x_ptr, ibase, k0, 0, wv, c, mm, M_P, W, R, lrow, lx, SHFL)
        for j in range(0, c, W * R):
            wds = ()
            for r in tl.static_range(R):
                wds = wds + (_row_load(qw_ptr, rows[r], word, w_ok, stride_qk, M_P, ALIGNED, EVICT),)
            rows, nxs = _slots_rows(scr_i_ptr, scr_x_ptr, ibase, k0, j + R * W, wv, c, mm, M_P, W, R, lrow, lx, SHFL)
            a0, a1, a2, a3, a4, a5, a6, a7 = _rows_fma(wds, xs, magic, xscale, K, a0, a1, a2, a3, a4, a5, a6, a7,
                                                       BITS, M_P, W, R, F16, EMULATE, H2, LOADS_FIRST)
            xs = nxs
    elif GROUPS > 1:  # one loop over the steps of every K-range, each padded to the longest one's step count (the
        # padding reads row k0 of its K-range with x = 0, cached); at the last step of a K-range its sums are scaled
        # and added to t0..t7 (_fold). STAGES > 1: triton's pipeliner keeps its ring filled across the K-ranges
        t0 = tl.zeros(a0.shape, tl.float32)  # (h2: fp32 totals of the fp16-pair sums)
        t1 = tl.zeros_like(t0)
        t2 = tl.zeros_like(t0)
        t3 = tl.zeros_like(t0)
        t4 = tl.zeros_like(t0)
        t5 = tl.zeros_like(t0)
        t6 = tl.zeros_like(t0)
        t7 = tl.zeros_like(t0)
        for it in tl.range(0, steps * GROUPS, num_stages=STAGES):
            rg = it // steps
            si = it - rg * steps
            base = ibase + rg * KR + si * (W * R)
            for r in tl.static_range(R):
                row, xr = _slot_load(scr_i_ptr, scr_x_ptr, base, k0, r * W + wv, c, mm, M_P, False)
                wd = _row_load(qw_ptr, row, word, w_ok, stride_qk, M_P, ALIGNED, EVICT)
                a0, a1, a2, a3, a4, a5, a6, a7 = _row_fma(wd, xr, magic, xscale, a0, a1, a2, a3, a4, a5, a6, a7, BITS, M_P, W, F16, EMULATE, H2)
            if si == steps - 1:
                soff = s_ptr + ((k0 + rg * KR) // G) * stride_sg
                if H2:  # the K-range's fp16 pairs (J, J + 4) -> fp32, then scaled like the fp32 sums
                    b0, b4 = _h2_split(a0)
                    b1, b5 = _h2_split(a1)
                    b2, b6 = _h2_split(a2)
                    b3, b7 = _h2_split(a3)
                    t0, t1, t2, t3, t4, t5, t6, t7 = _fold(soff, start, end, b0, b1, b2, b3, b4, b5, b6, b7,
                                                           t0, t1, t2, t3, t4, t5, t6, t7, PER, NB, M_P, ALIGNED)
                else:
                    t0, t1, t2, t3, t4, t5, t6, t7 = _fold(soff, start, end, a0, a1, a2, a3, a4, a5, a6, a7,
                                                           t0, t1, t2, t3, t4, t5, t6, t7, PER, NB, M_P, ALIGNED)
                a0 = tl.zeros_like(a0)
                a1 = tl.zeros_like(a0)
                a2 = tl.zeros_like(a0)
                a3 = tl.zeros_like(a0)
                a4 = tl.zeros_like(a0)
                a5 = tl.zeros_like(a0)
                a6 = tl.zeros_like(a0)
                a7 = tl.zeros_like(a0)
        a0, a1, a2, a3, a4, a5, a6, a7 = t0, t1, t2, t3, t4, t5, t6, t7
    elif STAGES > 1:  # triton's software pipeliner: every load of a step becomes a cp.async into a shared-memory ring
        # STAGES - 1 steps ahead (a loop with its own num_stages pipelines loads that feed no tl.dot too), so the loads
        # in flight no longer hold registers
        # unmasked slot loads (fewer predicates and selects per copy) where whole steps stay inside the K-range
        MASK: tl.constexpr = KR % (W * R) != 0
        for j in tl.range(0, c, W * R, num_stages=STAGES):
            for r in tl.static_range(R):
                row, xr = _slot_load(scr_i_ptr, scr_x_ptr, ibase, k0, j + r * W + wv, c, mm, M_P, MASK)
                wd = _row_load(qw_ptr, row, word, w_ok, stride_qk, M_P, ALIGNED, EVICT)
                a0, a1, a2, a3, a4, a5, a6, a7 = _row_fma(wd, xr, magic, xscale, a0, a1, a2, a3, a4, a5, a6, a7, BITS, M_P, W, F16, EMULATE, H2)
    else:
        a0, a1, a2, a3, a4, a5, a6, a7 = _compacted_loop(scr_i_ptr, scr_x_ptr, ibase, k0, c, wv, mm, qw_ptr, word, w_ok,
                                                           stride_qk, magic, xscale, K, a0, a1, a2, a3, a4, a5, a6, a7, M_P, W, R,
                                                           BITS, ALIGNED, EVICT, F16, EMULATE, H2, LOADS_FIRST,
                                                           lrow, lx, SHFL)
    # 4. reduce over the warps (one pass per value J: fewer barriers than a joined reduction), interleave the
    #    per-value accumulators back to columns word * PER + J (in registers), remove the offsets, scale once
    if H2 and GROUPS == 1:  # the fp16 pairs (J, J + 4) -> eight fp32 accumulators (GROUPS > 1: done in _fold)
        a0, a4 = _h2_split(a0)
        a1, a5 = _h2_split(a1)
        a2, a6 = _h2_split(a2)
        a3, a7 = _h2_split(a3)
    if M_P == 1:  # [W, NB] -> [1, W, NB] (reducing the 2-D tiles directly gives slice layouts that cost barriers)
        a0 = a0[None, :, :]
        a1 = a1[None, :, :]
        a2 = a2[None, :, :]
        a3 = a3[None, :, :]
        a4 = a4[None, :, :]
        a5 = a5[None, :, :]
        a6 = a6[None, :, :]
        a7 = a7[None, :, :]
    a = _warp_sums(a0, a1, a2, a3, a4, a5, a6, a7, BITS, M_P, BLOCK_N)
    inv = _col_factor(cols, BITS, F16)
    if H2:  # x was scaled by xscale (per batch row at M_P > 1): undo it
        if M_P == 1:
            a = a * (1.0 / xscale)
        else:
            a = a * (1.0 / xscale)[:, None]
    if H2 and GROUPS == 1:  # exact q: no offsets, no per-column factor
        y = sc.to(tl.float32)[None, :] * (a - zr.to(tl.float32)[None, :] * xsum[:, None])
    elif GROUPS == 1:
        if BITS == 4 and F16:  # remove the 1024 offsets (1024 * sum of x)
            a = a - 1024.0 * xsum[:, None]
        y = sc.to(tl.float32)[None, :] * (a * inv[None, :] - zr.to(tl.float32)[None, :] * xsum[:, None])
    elif H2:  # the scales are already in a (_fold); q exact
        y = a - offs
    else:  # the scales are already in a (_fold)
        y = a * inv[None, :] - offs
    out_ok = m_ok[:, None] & n_ok[None, :]
    reduce_split_k(y, y_ptr + mm[:, None] * stride_ym + cols[None, :], ws_ptr + mm[:, None] * N + cols[None, :],
                   lock_ptr + pid_n, out_ok, pid_k, n_ksplit, M * N, SPLIT, DET, OUT_DTYPE,
                   clear_ptr + mm[:, None] * N + cols[None, :], ACC, CLEAR)


def launch(p: GemvProblem, shape: CoreShape) -> torch.Tensor | None:
    """Run ``_sgemv_kernel`` with launch shape ``shape``; None when the call does not fit it (int8 weights whose rows
    are not 4-byte aligned: the caller uses the tensor-core kernel)."""
    qw = p.qweight
    if p.bits == 8:  # 4 values per int32 word, like int4's 8
        if qw.stride(0) % 4 or qw.data_ptr() % 4:
            return None
        qw = qw.view(torch.int32)
    block_n = 32 * shape.vec * (32 // p.bits)
    steps_fit = shape.k_range % (shape.warps * shape.rows) == 0
    preload = shape.preload if not shape.pipe and shape.stages == 1 and shape.k_range % shape.warps == 0 else 0
    dense = 100 if preload else shape.dense if not shape.pipe and shape.stages == 1 and steps_fit else 0
    groups = 1 if shape.pipe or dense or not steps_fit else shape.groups
    while groups > 1 and p.k % (shape.k_range * groups):  # the span of a program must divide K
        groups //= 2
    call = prepare(p, block_n, shape.k_range, qweight=qw, ranges_per_program=groups)
    # fp32 x: the exact fp32-exponent unpack, not the fp16 pairs, whose 1024 offsets cancel ~7 bits of the fp32
    # accumulator (harmless under a bf16/fp16 output rounding, ~1e-5 relative error in an fp32 model)
    f16 = p.bits == 4 and shape.f16 and p.x.dtype != torch.float32
    pipe = shape.pipe and (shape.rows == 4 or shape.loads_first)
    # fp16-pair accumulation: int4, batch 1-4 (one power of two per batch row), 16-bit x, any loop (else the
    # fp16-pair unpack into fp32)
    h2 = shape.h2 and p.bits == 4 and p.m <= CORE_MAX_M and p.x.dtype != torch.float32
    extra = {"maxnreg": shape.maxnreg} if shape.maxnreg else {}
    # the register list (inline PTX: not under the interpreter, which takes the scratch list: same slots, same sums)
    shfl = (shape.shfl and p.m == 1 and groups == 1 and not preload and dense < 100 and not call.constants["EMULATE"]
            and (pipe or shape.loads_first or (h2 and shape.rows == 4)))
    _sgemv_kernel[call.grid](
        **call.args, magic=FP32_MAGIC, **call.constants,
        BITS=p.bits, W=shape.warps, R=shape.rows, VEC=shape.vec, F16=f16, PIPE=pipe, STAGES=1 if pipe else shape.stages,
        GROUPS=groups, DENSE=dense, H2=h2, PRELOAD=preload, LOOKAHEAD=shape.lookahead if preload else 0,
        LOADS_FIRST=shape.loads_first, SHFL=shfl,
        EVICT=shape.evict_first and not call.constants["EMULATE"], num_warps=shape.warps, num_stages=1, **extra,
        **call.options,
    )
    return call.y
