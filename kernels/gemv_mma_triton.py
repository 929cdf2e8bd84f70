"""Batched sparse GEMV on tensor cores (``_sgemv_mma_kernel``): y = (x * (|x| > t)) @ W^T for M = 1..16 rows.

The one-launch structure of the batch-1 kernel (kernels/gemv_common.py: scales first, threshold + compaction of
the union of the rows' active sets into the shared scratch list, split-K reduction without memset) with a
tensor-core inner loop: BLOCK_K compacted rows at a time, the gathered words [BLOCK_K, BLOCK_N / 8] are unpacked by
``_unpack8_dot`` (inline PTX, per word 3 SHF + 4 LOP3: ``((w >> 4i) & 0x000F000F) | MAGIC`` is the 16-bit pair
(OFF + q_i, OFF + q_{i+4}), MAGIC 0x43004300 -> bf16 128 + q, 0x64006400 -> fp16 1024 + q, exact, no CVT),
interleaved back to columns with tl.join (registers) and multiplied with tl.dot against x (M padded to M_D).
The offset is folded into the zero point: y = s * (acc - (z + OFF) * sum x). Each row keeps its own mask for its
values; the rows of W^T read are the union.

Launch shape (kernels/dispatch.py ``MmaShape``): ``swap`` computes y^T = W x^T (the weight tile is the dot's M side,
the batch padded to 8 its N side: half the accumulators at M <= 8); ``tiles`` > 1 lets a program walk several
column tiles with one compaction of its K-range. int8 weights and fp32 x take a plain integer unpack (exact), so
this kernel serves every call the batch-1 kernel does not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import MmaShape
from .gemv_common import (
    INTERPRET,
    TL_DTYPE,
    GemvProblem,
    compact_rows,
    prepare,
    program_tile,
    reduce_split_k,
    threshold_rows,
    tile_qparams,
)
from .pdl_triton import wait_previous_kernel


def _unpack8_dot_asm(magic: int) -> tl.constexpr:
    """PTX for ``_unpack8_dot``: ``lop3 (w >> 4i) & 0x000F000F | magic`` for i = 0..3, halves to the 8 outputs."""
    lops = "\n".join(f"            lop3.b32 t{i}, {src}, 0x000F000F, 0x{magic:08X}, 0xEA;"
                     for i, src in enumerate(("$8", "w4", "w8", "w12")))
    movs = "\n".join(f"            mov.b32 {{${i}, ${i + 4}}}, t{i};" for i in range(4))
    return tl.constexpr("{\n            .reg .b32 t0, t1, t2, t3, w4, w8, w12;\n"
                        "            shr.u32 w4, $8, 4;\n            shr.u32 w8, $8, 8;\n            shr.u32 w12, $8, 12;\n"
                        f"{lops}\n{movs}\n            }}")


_UNPACK8_DOT_ASM_BF16 = _unpack8_dot_asm(0x43004300)  # bf16 128 + q
_UNPACK8_DOT_ASM_F16 = _unpack8_dot_asm(0x64006400)  # fp16 1024 + q


@triton.jit
def _unpack8_dot(wd, BF16: tl.constexpr, EMULATE: tl.constexpr):
    """The eight nibbles of each int32 word as 16-bit dot operands ``OFF + q`` (bit patterns, int16), exact:
    ``((w >> 4i) & 0x000F000F) | MAGIC`` is the pair (OFF + q_i, OFF + q_{i+4}) for i = 0..3; MAGIC 0x43004300 gives
    bf16 128 + q, 0x64006400 fp16 1024 + q. Per word: 3 SHF + 4 LOP3 (the halves are register halves, no CVT).
    The offset is removed once per program through sum(x). EMULATE: fp32 values computed with integer ops."""
    if EMULATE:
        off = 128 if BF16 else 1024
        v0 = (off + (wd & 15)).to(tl.float32)
        v1 = (off + ((wd >> 4) & 15)).to(tl.float32)
        v2 = (off + ((wd >> 8) & 15)).to(tl.float32)
        v3 = (off + ((wd >> 12) & 15)).to(tl.float32)
        v4 = (off + ((wd >> 16) & 15)).to(tl.float32)
        v5 = (off + ((wd >> 20) & 15)).to(tl.float32)
        v6 = (off + ((wd >> 24) & 15)).to(tl.float32)
        v7 = (off + ((wd >> 28) & 15)).to(tl.float32)
    else:
        if BF16:
            asm: tl.constexpr = _UNPACK8_DOT_ASM_BF16
        else:
            asm: tl.constexpr = _UNPACK8_DOT_ASM_F16
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
            asm=asm,
            constraints="=h,=h,=h,=h,=h,=h,=h,=h,r",
            args=[wd],
            dtype=(tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16),
            is_pure=True,
            pack=1,
        )
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def _unpack_tile_dot(wd, BF16: tl.constexpr, EMULATE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_DTYPE: tl.constexpr):
    """A [BLOCK_K, BLOCK_N / 8] tile of int4 words as the dot's [BLOCK_K, BLOCK_N] operand (16-bit OFF + q): the
    8 values of each word unpacked (`_unpack8_dot`) and interleaved back to column order in registers."""
    v0, v1, v2, v3, v4, v5, v6, v7 = _unpack8_dot(wd, BF16, EMULATE)
    v = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    v = tl.reshape(v, [BLOCK_K, BLOCK_N])
    if not EMULATE:
        v = v.to(DOT_DTYPE, bitcast=True)
    return v


@triton.jit
def _unpack_plain(qw_ptr, row, start, end, stride_qk, BITS: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    """The gathered rows' values q [BLOCK_K, BLOCK_N] as fp32 (exact), by integer ops: int8 weights, fp32 x."""
    if BITS == 4:
        NW: tl.constexpr = BLOCK_N // 8
        word = start // 8 + tl.arange(0, NW)
        if ALIGNED:
            wd = tl.load(qw_ptr + row[:, None] * stride_qk + word[None, :])
        else:
            wd = tl.load(qw_ptr + row[:, None] * stride_qk + word[None, :], mask=(word < end // 8)[None, :], other=0)
        shift = 4 * tl.arange(0, 8)
        q = tl.reshape((wd[:, :, None] >> shift[None, None, :]) & 15, [row.shape[0], BLOCK_N])
    else:
        cols = start + tl.arange(0, BLOCK_N)
        q = tl.load(qw_ptr + row[:, None] * stride_qk + cols[None, :], mask=(cols < end)[None, :], other=0).to(tl.int32)
    return q.to(tl.float32)


@triton.jit
def _sgemv_mma_kernel(
    x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part,
    qw_ptr, s_ptr, z_ptr, scr_i_ptr, scr_x_ptr, ws_ptr, lock_ptr, y_ptr, clear_ptr,
    M, N, K, G, stride_qk, stride_sg, stride_ym, END0, END1, n_ksplit,
    M_P: tl.constexpr, KR: tl.constexpr, T_MODE: tl.constexpr, SILU: tl.constexpr, SPLIT: tl.constexpr, DET: tl.constexpr,
    ACC: tl.constexpr, CLEAR: tl.constexpr,
    ALIGNED: tl.constexpr, OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
    BITS: tl.constexpr, M_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
    SWAP: tl.constexpr, FAST: tl.constexpr, BF16: tl.constexpr, DOT_DTYPE: tl.constexpr, PDL: tl.constexpr = 0,
):
    """Program (pid_n, pid_k) owns TILES column tiles of BLOCK_N columns and the KR rows k0 = pid_k * KR (inside one
    quantization group); see the module docstring. Slots past the end read row k0 with x = 0 (adds exactly 0). SILU: x
    is silu(gate) * up, computed where x is thresholded (kernels/gemv_common.py)."""
    wait_previous_kernel(PDL > 0)
    NW: tl.constexpr = BLOCK_N // 8
    if FAST:
        OFF: tl.constexpr = 128.0 if BF16 else 1024.0
    else:
        OFF: tl.constexpr = 0.0
    pid_n, pid_k, part, start0, end, k0 = program_tile(N, END0, END1, BLOCK_N * TILES, KR, ALIGNED)
    mm, m_ok, act, xm = threshold_rows(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0, M, M_P, KR, T_MODE,
                                       SILU, OUT_DTYPE)
    c, ibase = compact_rows(act, xm, mm, k0, part, K, scr_i_ptr, scr_x_ptr, M_P, KR)
    md = tl.arange(0, M_D)
    md_ok = md < M
    kk = tl.arange(0, BLOCK_K)
    for t in range(TILES):
        start = start0 + t * BLOCK_N
        if start < end:
            cols, n_ok, sc, zr = tile_qparams(s_ptr, z_ptr, start, end, k0, G, stride_sg, BLOCK_N)
            word = start // 8 + tl.arange(0, NW)
            w_ok = word < end // 8
            if SWAP:
                acc = tl.zeros([BLOCK_N, M_D], tl.float32)
                xsum = tl.zeros([M_D], tl.float32)
            else:
                acc = tl.zeros([M_D, BLOCK_N], tl.float32)
                xsum = tl.zeros([M_D], tl.float32)
            for j in range(0, c, BLOCK_K):
                slot = j + kk
                ok = slot < c
                row = tl.load(scr_i_ptr + ibase + slot, mask=ok, other=k0)
                if FAST:
                    if ALIGNED:
                        wd = tl.load(qw_ptr + row[:, None] * stride_qk + word[None, :])
                    else:
                        wd = tl.load(qw_ptr + row[:, None] * stride_qk + word[None, :], mask=w_ok[None, :], other=0)
                    v = _unpack_tile_dot(wd, BF16, EMULATE, BLOCK_K, BLOCK_N, DOT_DTYPE)
                else:
                    v = _unpack_plain(qw_ptr, row, start, end, stride_qk, BITS, BLOCK_N, ALIGNED)
                if SWAP:
                    xk = tl.load(scr_x_ptr + (ibase + slot)[:, None] * M_P + md[None, :], mask=ok[:, None] & md_ok[None, :], other=0.0)
                    acc = tl.dot(tl.trans(v.to(DOT_DTYPE)), xk.to(DOT_DTYPE), acc, input_precision="ieee")
                    xsum += tl.sum(xk, axis=0)
                else:
                    xk = tl.load(scr_x_ptr + (ibase + slot)[None, :] * M_P + md[:, None], mask=md_ok[:, None] & ok[None, :], other=0.0)
                    acc = tl.dot(xk.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, input_precision="ieee")  # fp32: no TF32 rounding
                    xsum += tl.sum(xk, axis=1)
            lock = lock_ptr + pid_n * TILES + t
            if SWAP:
                y = sc.to(tl.float32)[:, None] * (acc - (zr.to(tl.float32)[:, None] + OFF) * xsum[None, :])
                out_ok = n_ok[:, None] & md_ok[None, :]
                reduce_split_k(y, y_ptr + md[None, :] * stride_ym + cols[:, None], ws_ptr + md[None, :] * N + cols[:, None],
                               lock, out_ok, pid_k, n_ksplit, M * N, SPLIT, DET, OUT_DTYPE,
                               clear_ptr + md[None, :] * N + cols[:, None], ACC, CLEAR)
            else:
                y = sc.to(tl.float32)[None, :] * (acc - (zr.to(tl.float32)[None, :] + OFF) * xsum[:, None])
                out_ok = md_ok[:, None] & n_ok[None, :]
                reduce_split_k(y, y_ptr + md[:, None] * stride_ym + cols[None, :], ws_ptr + md[:, None] * N + cols[None, :],
                               lock, out_ok, pid_k, n_ksplit, M * N, SPLIT, DET, OUT_DTYPE,
                               clear_ptr + md[:, None] * N + cols[None, :], ACC, CLEAR)


def launch(p: GemvProblem, shape: MmaShape) -> torch.Tensor:
    """Run ``_sgemv_mma_kernel`` with launch shape ``shape``."""
    fast = p.bits == 4 and p.x.dtype in (torch.float16, torch.bfloat16)
    if p.bits == 4 and p.qweight.dtype != torch.int32:
        raise ValueError("int4 weights must be int32 words")
    call = prepare(p, shape.block_n, shape.k_range, tiles_per_program=shape.tiles)
    m_d = max(8 if shape.swap else 16, call.constants["M_P"])
    # tl.dot operands: x's own 16-bit dtype on the GPU; fp32 for fp32 x, and under the interpreter (its bf16 tl.dot
    # returns garbage in triton 3.9; the operands are exact in fp32 either way)
    dot_dtype = tl.float32 if INTERPRET or p.x.dtype == torch.float32 else TL_DTYPE[p.x.dtype]
    extra = {"maxnreg": shape.maxnreg} if shape.maxnreg else {}
    _sgemv_mma_kernel[call.grid](
        **call.args, **call.constants,
        BITS=p.bits, M_D=m_d, BLOCK_N=shape.block_n, BLOCK_K=shape.block_k, TILES=shape.tiles, SWAP=shape.swap,
        FAST=fast, BF16=p.x.dtype == torch.bfloat16, DOT_DTYPE=dot_dtype,
        num_warps=shape.warps, num_stages=shape.stages, **extra, **call.options,
    )
    return call.y
