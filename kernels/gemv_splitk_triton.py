"""Batched sparse GEMV as a dense-tile split-K GEMM on tensor cores (``_sgemv_splitk_kernel``): y = (x * (|x| > t)) @ W^T
for M = 1..16 rows, made for M >= 4, where the union of the rows' active sets is nearly dense (independent rows at
s50: ~6 % of the rows of W^T inactive for all 4 rows, none at 16), so the compaction of the other two families costs
more than the rows it saves.

A program owns BLOCK_N columns (inside one part of a fused weight) and a K-range of whole BLOCK_K steps; the K split
is chosen per call so that the grid comes near ``SplitKShape.programs`` programs (docs/kernels.md round 6). Per step
it loads the contiguous packed tile [BLOCK_K, BLOCK_N / 8] of W^T (no index gather, so triton's software pipeliner
streams it through a cp.async ring ``stages`` deep), the x tile of every batch row (thresholded in-kernel: |x| > t
with the per-part scalar, 0-dim tensor or per-input-channel thresholds, NaN dropped), unpacks the words by
``_unpack8_dot`` (LOP3 with the 0x4300 / 0x6400 magic: 16-bit ``OFF + q``, exact) and multiplies with tl.dot. The
step's group scale and zero are applied to the step's fp32 dot result: y += s * (acc - (z + OFF) * sum(x)), so the
products are exact and the offset cancels per group. The scales / zeros are too narrow per thread (one 16-bit value
in the accumulator's layout) for the pipeliner's cp.async copies, so a plain load would wait a DRAM latency every
step; ``prefetch`` loads the next step's during this one. ``skip``: a step whose x values are all inactive for every batch
row masks its weight load (cp.async with zero fill reads nothing; the zero words unpack to finite values times x = 0).
The partials are added by the split-K reduction the other families use (fp32 atomics with a self-zeroing workspace,
or ordered slots under ``torch.use_deterministic_algorithms(True)``). int8 weights and fp32 x take a plain integer
unpack (exact; fp32 dots with ``input_precision="ieee"``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import SplitKShape
from .gemv_common import (
    INTERPRET,
    TL_DTYPE,
    GemvProblem,
    above_threshold,
    load_x,
    prepare,
    program_tile,
    reduce_split_k,
)
from .gemv_mma_triton import _unpack_tile_dot
from .pdl_triton import wait_previous_kernel


@triton.jit
def _x_tile(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, kb, M,
            M_D: tl.constexpr, BLOCK_K: tl.constexpr, T_MODE: tl.constexpr, SWAP: tl.constexpr, SILU: tl.constexpr,
            X_DTYPE: tl.constexpr):
    """x[:, kb .. kb + BLOCK_K] of every batch row (SILU: silu(gate) * up, kernels/gemv_common.py ``load_x``),
    thresholded (fp32, 0 where inactive or NaN), laid out as the dot's x operand ([BLOCK_K, M_D] when SWAP, else
    [M_D, BLOCK_K]); and 1 if any entry is active, else 0."""
    md = tl.arange(0, M_D)
    kk = tl.arange(0, BLOCK_K)
    if SWAP:
        xv = load_x(x_ptr, u_ptr, md[None, :] * stride_xm + (kb + kk)[:, None], (md < M)[None, :], SILU, X_DTYPE)
    else:
        xv = load_x(x_ptr, u_ptr, md[:, None] * stride_xm + (kb + kk)[None, :], (md < M)[:, None], SILU, X_DTYPE)
    act = above_threshold(xv, t_ptr, t_value, t_stride_part, part, kb + kk, T_MODE, 0 if SWAP else 1)
    return tl.where(act, xv, 0.0), tl.max(act.to(tl.int32))


@triton.jit
def _sgemv_splitk_kernel(
    x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part,
    qw_ptr, s_ptr, z_ptr, ws_ptr, lock_ptr, y_ptr, clear_ptr,
    M, N, K, G, stride_qk, stride_sg, stride_ym, END0, END1, n_ksplit, KR,
    M_P: tl.constexpr, T_MODE: tl.constexpr, SILU: tl.constexpr, SPLIT: tl.constexpr, DET: tl.constexpr,
    ACC: tl.constexpr, CLEAR: tl.constexpr,
    ALIGNED: tl.constexpr, OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
    BITS: tl.constexpr, M_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    SWAP: tl.constexpr, SKIP: tl.constexpr, PREFETCH: tl.constexpr, FAST: tl.constexpr, BF16: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PDL: tl.constexpr = 0, SUM_DOT: tl.constexpr = False,
):
    """Program (pid_n, pid_k) owns BLOCK_N columns and rows k0 = pid_k * KR .. min(k0 + KR, K) of W^T, KR (a runtime
    value: one compile serves every layer) a multiple of BLOCK_K and BLOCK_K dividing the group size (every step lies
    inside one group); see the module docstring."""
    wait_previous_kernel(PDL == 1 or (PDL == 2 and not PREFETCH))
    NW: tl.constexpr = BLOCK_N // 8
    if FAST:
        OFF: tl.constexpr = 128.0 if BF16 else 1024.0
    else:
        OFF: tl.constexpr = 0.0
    pid_n, pid_k, part, start, end, _ = program_tile(N, END0, END1, BLOCK_N, 1, ALIGNED)
    k0 = pid_k * KR
    cols = start + tl.arange(0, BLOCK_N)
    n_ok = cols < end
    kk = tl.arange(0, BLOCK_K)
    md = tl.arange(0, M_D)
    md_ok = md < M
    if BITS == 4:
        word = start // 8 + tl.arange(0, NW)
        w_ok = word < end // 8
    if SWAP:
        out = tl.zeros([BLOCK_N, M_D], tl.float32)
    else:
        out = tl.zeros([M_D, BLOCK_N], tl.float32)
    n_steps = (tl.minimum(K - k0, KR)) // BLOCK_K
    if PREFETCH:  # the first step's scales / zeros; each step then loads the next step's
        sc_next = tl.load(s_ptr + (k0 // G) * stride_sg + cols, mask=n_ok, other=0.0)
        zr_next = tl.load(z_ptr + (k0 // G) * stride_sg + cols, mask=n_ok, other=0.0)
        wait_previous_kernel(PDL == 2)  # (PDL 2: the first scales / zeros were read before the wait)
    for i in tl.range(0, n_steps, num_stages=STAGES):
        kb = k0 + i * BLOCK_K
        xm, n_act = _x_tile(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, kb, M, M_D, BLOCK_K, T_MODE, SWAP,
                            SILU, OUT_DTYPE)
        if PREFETCH:
            sc = sc_next.to(tl.float32)
            zr = zr_next.to(tl.float32) + OFF
            soff = (tl.minimum(kb + BLOCK_K, K - BLOCK_K) // G) * stride_sg + cols  # the last one is not used
            sc_next = tl.load(s_ptr + soff, mask=n_ok, other=0.0)
            zr_next = tl.load(z_ptr + soff, mask=n_ok, other=0.0)
        else:
            soff = (kb // G) * stride_sg + cols
            sc = tl.load(s_ptr + soff, mask=n_ok, other=0.0).to(tl.float32)
            zr = tl.load(z_ptr + soff, mask=n_ok, other=0.0).to(tl.float32) + OFF
        if SKIP:  # rows of this step to load: all of them, or none (constant along the tile's contiguous axis)
            live = (kk < BLOCK_K * tl.minimum(n_act, 1))[:, None]
        if BITS == 4:
            ptrs = qw_ptr + (kb + kk)[:, None] * stride_qk + word[None, :]
            if SKIP:
                if ALIGNED:
                    wd = tl.load(ptrs, mask=live, other=0, eviction_policy="evict_first")
                else:
                    wd = tl.load(ptrs, mask=live & w_ok[None, :], other=0, eviction_policy="evict_first")
            elif ALIGNED:
                wd = tl.load(ptrs, eviction_policy="evict_first")
            else:
                wd = tl.load(ptrs, mask=w_ok[None, :], other=0, eviction_policy="evict_first")
            if FAST:
                v = _unpack_tile_dot(wd, BF16, EMULATE, BLOCK_K, BLOCK_N, DOT_DTYPE)
            else:
                shift = 4 * tl.arange(0, 8)
                v = tl.reshape((wd[:, :, None] >> shift[None, None, :]) & 15, [BLOCK_K, BLOCK_N]).to(tl.float32)
        else:
            ptrs = qw_ptr + (kb + kk)[:, None] * stride_qk + cols[None, :]
            if SKIP:
                v = tl.load(ptrs, mask=live & n_ok[None, :], other=0, eviction_policy="evict_first")
            else:
                v = tl.load(ptrs, mask=n_ok[None, :], other=0, eviction_policy="evict_first")
            v = v.to(tl.float32)  # 0..255: exact in fp16 / bf16 too
        if SWAP:
            xd = xm.to(DOT_DTYPE)
            acc = tl.dot(tl.trans(v.to(DOT_DTYPE)), xd, input_precision="ieee")  # fp32 x: no TF32
            if SUM_DOT:  # every row of the product is the step's sum of x, already in acc's layout
                xsum = tl.dot(tl.full([BLOCK_N, BLOCK_K], 1.0, DOT_DTYPE), xd, input_precision="ieee")
            else:
                xsum = tl.sum(xm, axis=0)[None, :]
            out += sc[:, None] * (acc - zr[:, None] * xsum)
        else:
            xd = xm.to(DOT_DTYPE)
            acc = tl.dot(xd, v.to(DOT_DTYPE), input_precision="ieee")
            if SUM_DOT:
                xsum = tl.dot(xd, tl.full([BLOCK_K, BLOCK_N], 1.0, DOT_DTYPE), input_precision="ieee")
            else:
                xsum = tl.sum(xm, axis=1)[:, None]
            out += sc[None, :] * (acc - zr[None, :] * xsum)
    lock = lock_ptr + pid_n
    if SWAP:
        reduce_split_k(out, y_ptr + md[None, :] * stride_ym + cols[:, None], ws_ptr + md[None, :] * N + cols[:, None],
                       lock, n_ok[:, None] & md_ok[None, :], pid_k, n_ksplit, M * N, SPLIT, DET, OUT_DTYPE,
                       clear_ptr + md[None, :] * N + cols[:, None], ACC, CLEAR)
    else:
        reduce_split_k(out, y_ptr + md[:, None] * stride_ym + cols[None, :], ws_ptr + md[:, None] * N + cols[None, :],
                       lock, md_ok[:, None] & n_ok[None, :], pid_k, n_ksplit, M * N, SPLIT, DET, OUT_DTYPE,
                       clear_ptr + md[:, None] * N + cols[None, :], ACC, CLEAR)


def k_range_for(shape: SplitKShape, n_tiles: int, k: int) -> int:
    """Rows of W^T per program: the K split that brings the grid nearest ``shape.programs`` (whole K-steps)."""
    steps = k // shape.block_k
    split = max(1, min(steps, round(shape.programs / max(n_tiles, 1))))
    return triton.cdiv(steps, split) * shape.block_k


def launch(p: GemvProblem, shape: SplitKShape) -> torch.Tensor:
    """Run ``_sgemv_splitk_kernel`` with launch shape ``shape`` (fitted to the group size by the dispatch)."""
    fast = p.bits == 4 and p.x.dtype in (torch.float16, torch.bfloat16)
    starts = (0,) + tuple(p.ends[:-1])
    n_tiles = sum(triton.cdiv(e - b, shape.block_n) for b, e in zip(starts, p.ends))
    call = prepare(p, shape.block_n, k_range_for(shape, n_tiles, p.k), scratch=False)
    kr = call.constants.pop("KR")
    m_d = max(8 if shape.swap else 16, call.constants["M_P"])
    # tl.dot operands: x's own 16-bit dtype on the GPU; fp32 for fp32 x, and under the interpreter (its bf16 tl.dot
    # returns garbage in triton 3.9; the operands are exact in fp32 either way)
    dot_dtype = tl.float32 if INTERPRET or p.x.dtype == torch.float32 else TL_DTYPE[p.x.dtype]
    extra = {"maxnreg": shape.maxnreg} if shape.maxnreg else {}
    _sgemv_splitk_kernel[call.grid](
        **call.args, KR=kr, **call.constants,
        BITS=p.bits, M_D=m_d, BLOCK_N=shape.block_n, BLOCK_K=shape.block_k, STAGES=shape.stages, SWAP=shape.swap,
        SKIP=shape.skip, PREFETCH=shape.prefetch, FAST=fast, BF16=p.x.dtype == torch.bfloat16, DOT_DTYPE=dot_dtype,
        SUM_DOT=shape.sum_dot and fast, num_warps=shape.warps, num_stages=shape.stages, **extra, **call.options,
    )
    return call.y
