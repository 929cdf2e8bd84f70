"""Triton TEAL sparse GEMV over int4/int8 group-quantized weights: y = (x * (|x| > t)) @ W^T.

Shapes and layout (DESIGN.md "Artifact"; the pure-torch twin is :func:`kernels.reference.sparse_gemv_ref`):

    x        [M, K] fp16/bf16, M <= 16 (decode: M = 1)
    qweight  bits 4: int32 [K, N // 8], nibble i of word j of row k is q[k, 8j + i]; bits 8: uint8 [K, N]
    scales   [K // G, N], zeros [K // G, N] (float zeros), W^T[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n]
    y        [M, N] in x.dtype, fp32 accumulation

M <= 4: ONE launch, ``_sgemv_kernel`` (grid: column tiles x K-ranges; docs/kernels.md has the measurements).
A program owns 32 * VEC * (32 // BITS) columns (each thread VEC int32 words of a row) and KR rows of W^T inside one
quantization group. It
1. issues the loads of its scales / zeros (independent of x),
2. thresholds its KR entries of x (fp32 compare; NaN compares False, so it is dropped; union over the M rows),
   compacts the active rows with a cumsum and writes (row, x) to a scratch list (every column tile of a part writes
   the same values to the same slots, so the list is shared), barrier,
3. walks the compacted rows: its W warps take slots w, w + W, ... and R rows per warp per step are unrolled so their
   16-byte loads are in flight together; slots past the end read a valid row with x = 0, so the loop has no load
   predicates. int4 values are unpacked two per LOP3 into fp16 pairs ``1024 + q * {1, 16}`` and converted to fp32
   (``_unpack8_f16``; the fp32 exponent trick ``_unpack`` is the alternative), accumulated per value position J in
   fp32 registers (FMA chains, no shuffles),
4. reduces over its warps (shared memory), interleaves the eight per-value accumulators back to columns, removes
   the offsets (1024 * sum x) and applies zero point and scale once: ``y = s * (sum_k x_k q_k - z * sum_k x_k)``,
5. adds its partial into an fp32 workspace with (vectorised) atomics; the last program of a column tile (a counter)
   writes y and resets its workspace slice and counter to zero, so the next call needs no memset launch.
Split-K sums are added with fp32 atomics, so the last bits of y can differ from call to call.

M = 2..4 on layers with few programs (k/v, 8B q/o; ``pick_mma``): ``_sgemv_mma_kernel``, the same one-launch
structure on tensor cores (gathered rows unpacked to 16-bit ``OFF + q`` by LOP3, tl.dot with M padded to 16).

M = 5..16 (and shapes the one-launch kernels cannot take): the two-launch path of the first version,
``_compact_kernel`` (threshold + compaction + zeroing of the workspace) then ``_gemv_dot_kernel`` (the union of
active rows unpacked to x.dtype and multiplied with tl.dot, M padded to 16).

Fused projections (q/k/v, gate/up): one weight concatenated along N with up to three parts, each with its own
threshold; every column tile belongs to one part and reads that part's compacted rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# every buffer of a call comes from here (tests swap in an allocator that fills memory with garbage)
_empty = torch.empty
MAX_M = 16
MAX_PARTS = 3


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of the two-launch path (M > 4; chosen by :func:`pick_config`)."""

    block_n: int  # columns per program
    block_k: int  # gathered rows per unrolled step
    num_warps: int
    segment: int  # rows of W^T per compaction segment (divides group_size); scales are applied per segment
    split_k: int  # programs along K (each takes a contiguous range of segments)
    num_stages: int = 1


@dataclass(frozen=True)
class FusedConfig:
    """Launch parameters of the one-launch kernel ``_sgemv_kernel`` (M <= 4; chosen by :func:`pick_fused`)."""

    vec: int  # int32 words per thread per row (1, 2, 4): the row piece of a thread is 4 * vec bytes
    warps: int  # warps of a program; they split the active rows of the program's K-range
    rows: int  # rows per warp per step (unrolled: their loads are in flight together)
    k_range: int  # rows of W^T per program (divides group_size): one quantization group or a part of one
    f16: bool = True  # int4: unpack through fp16 pairs (see _unpack8_f16); False: fp32 exponent trick
    pipe: bool = False  # rows == 4 only: prefetch the next step's row indices and x (software pipelining)
    probe: int = 0  # measurement only (see _sgemv_kernel)


FUSED_MAX_M = 4


@dataclass(frozen=True)
class MmaConfig:
    """Launch parameters of the tensor-core kernel ``_sgemv_mma_kernel`` (int4, 2 <= M <= 16; :func:`pick_mma`)."""

    block_n: int = 256  # columns per program (multiple of 128: 16 words per 8 lanes)
    block_k: int = 32  # compacted rows per tl.dot step (>= 16)
    warps: int = 4
    k_range: int = 128  # rows of W^T per program (divides group_size)
    stages: int = 1  # num_stages of the row loop (software pipelining by triton)
    maxnreg: int = 0  # register cap per thread (0: ptxas decides)


MMA_MIN_M, MMA_MAX_M = 2, 4  # int4 batches in this range may use the tensor-core kernel (see pick_mma)
MMA_SMALL = MmaConfig(block_n=256, block_k=64, warps=4, k_range=128, stages=1, maxnreg=128)


def pick_mma(m: int, n: int, k: int, bits: int, group_size: int, device: torch.device, n_parts: int = 1) -> MmaConfig | None:
    """Launch shape of the tensor-core kernel, None where the CUDA-core kernel (pick_fused) or the two-launch path is
    used. Measured on an H200 (launch-shape sweeps at batch 4, docs/kernels.md "Round 3"): faster than the
    CUDA-core kernel only on layers with few programs (k/v, 8B q/o: -25 to -30 %), slower on large layers
    (70B q/o 57 vs 52 µs, gate/up 186 vs 166 µs); at batch 8/16 (70B q/o) 6-9 % faster than the two-launch path, not
    adopted there yet (one shape measured, that launch shape not checked on the GPU at M > 4)."""
    if bits != 4 or not MMA_MIN_M <= m <= MMA_MAX_M or group_size % 128 != 0:
        return None
    if INTERPRET or device.type != "cuda":
        return MmaConfig(block_n=32, block_k=16, warps=4, k_range=32)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if (triton.cdiv(n, 256) + n_parts - 1) * (k // 128) >= 4 * sms:  # large layers: CUDA-core kernel
        return None
    return MMA_SMALL


def pick_fused(m: int, n: int, k: int, bits: int, group_size: int, device: torch.device, n_parts: int = 1) -> FusedConfig | None:
    """Shape-based choice for the one-launch kernel (measured on an H200: docs/kernels.md "Launch shapes");
    None when the shape needs the two-launch path (M > 4, or no K-range of >= 16 rows divides the group)."""
    if m > FUSED_MAX_M:
        return None
    cands = [c for c in (128, 64, 32, 16) if c <= group_size and group_size % c == 0]
    if not cands:
        return None
    if INTERPRET or device.type != "cuda":
        return FusedConfig(vec=1, warps=2, rows=2, k_range=32 if 32 in cands else cands[-1])
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per = 32 // bits

    def programs(vec, kr):
        return (triton.cdiv(n, 32 * vec * per) + n_parts - 1) * (k // kr)

    def kr_at_most(kr):
        return next(c for c in cands if c <= kr) if cands[-1] <= kr else cands[-1]

    if m > 1:  # M_P accumulators per value: fewer words per thread; long K-ranges amortise the compaction
        kr = kr_at_most(128)
        if programs(2, kr) >= 2 * sms:
            return FusedConfig(vec=2, warps=4, rows=4, k_range=kr)
        return FusedConfig(vec=1, warps=4, rows=4, k_range=kr, pipe=True)  # small N: prefetch measured 13-17 % faster
    if programs(4, kr_at_most(128)) >= 3 * sms:  # large layers: 16-byte rows, 128-row programs
        return FusedConfig(vec=4, warps=4, rows=4, k_range=kr_at_most(128))
    # small layers (measured: the fp16-pair unpack was 1.5-3x slower in these launch shapes, cause not found)
    if n >= 4096:  # 8B q/o-sized: wider programs (8 warps) over 128 rows
        return FusedConfig(vec=4, warps=8, rows=4, k_range=kr_at_most(128), f16=False, pipe=True)
    return FusedConfig(vec=1, warps=4, rows=8, k_range=kr_at_most(64), f16=False)  # small N (k/v)


def _segments(group_size: int, smallest: int = 32) -> list[int]:
    """Candidate segment sizes: divisors of group_size that are <= 256, largest first, down to ``smallest``."""
    out = [s for s in (256, 128, 64, 32, 16) if s <= group_size and group_size % s == 0 and s >= min(smallest, group_size)]
    return out or [group_size]


def pick_config(m: int, n: int, k: int, bits: int, group_size: int, device: torch.device,
                ctas_per_sm: int = 8) -> GemvConfig:
    """Launch shape of the two-launch (tl.dot) path, used for M > 4 (callers pass M >= 2)."""
    if INTERPRET or device.type != "cuda":
        seg = _segments(group_size)[0]
        return GemvConfig(block_n=32, block_k=16, num_warps=4, segment=seg, split_k=2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    num_warps, block_n, block_k = 4, 128 if bits == 4 else 64, 32
    tiles = triton.cdiv(n, block_n)
    want = ctas_per_sm * sms
    cands = _segments(group_size)
    seg = cands[-1]
    for cand in cands:  # largest segment that still gives enough programs
        if tiles * (k // cand) >= want:
            seg = cand
            break
    nseg = k // seg
    split_k = max(1, min(nseg, triton.cdiv(want, tiles)))
    return GemvConfig(block_n=block_n, block_k=block_k, num_warps=num_warps, segment=seg, split_k=split_k)


@triton.jit
def _compact_kernel(
    x_ptr, stride_xm, t_ptr, t_value, t_stride_part,
    idx_ptr, xc_ptr, xsum_ptr, cnt_ptr, ws_ptr, ws_numel, lock_ptr, n_locks,
    M, K, nseg,
    M_P: tl.constexpr, S: tl.constexpr, S_P: tl.constexpr, T_MODE: tl.constexpr, ZERO_BLOCK: tl.constexpr,
):
    seg = tl.program_id(0)
    part = tl.program_id(1)
    r = tl.arange(0, S_P)
    rows = seg * S + r
    rvalid = r < S
    m = tl.arange(0, M_P)
    mvalid = m < M
    valid = mvalid[:, None] & rvalid[None, :]
    x = tl.load(x_ptr + m[:, None] * stride_xm + rows[None, :], mask=valid, other=0.0).to(tl.float32)
    if T_MODE == 0:  # python float
        act = tl.abs(x) > t_value
    elif T_MODE == 1:  # 0-dim (or per-part scalar) tensor
        t = tl.load(t_ptr + part * t_stride_part).to(tl.float32)
        act = tl.abs(x) > t
    else:  # [K] per-input-channel thresholds
        t = tl.load(t_ptr + part * t_stride_part + rows, mask=rvalid, other=0.0).to(tl.float32)
        act = tl.abs(x) > t[None, :]
    act = act & valid
    xm = tl.where(act, x, 0.0)
    any_row = tl.max(act.to(tl.int32), axis=0)
    pos = tl.cumsum(any_row, axis=0) - 1
    base = part * K + seg * S
    keep = any_row > 0
    tl.store(idx_ptr + base + pos, rows, mask=keep)
    tl.store(xc_ptr + part * M * K + m[:, None] * K + (seg * S + pos)[None, :], xm, mask=mvalid[:, None] & keep[None, :])
    tl.store(xsum_ptr + (part * nseg + seg) * M + m, tl.sum(xm, axis=1), mask=mvalid)
    tl.store(cnt_ptr + part * nseg + seg, tl.sum(any_row, axis=0))
    # zero the split-K workspace and the tile counters of the GEMV launch that follows
    pid = part * nseg + seg
    nprog = tl.num_programs(0) * tl.num_programs(1)
    chunk = tl.cdiv(tl.cdiv(ws_numel, nprog), ZERO_BLOCK) * ZERO_BLOCK
    zoff = tl.arange(0, ZERO_BLOCK)
    for off in range(pid * chunk, pid * chunk + chunk, ZERO_BLOCK):
        tl.store(ws_ptr + off + zoff, tl.zeros([ZERO_BLOCK], tl.float32), mask=off + zoff < ws_numel)
    if pid == 0:
        for off in range(0, n_locks, ZERO_BLOCK):
            tl.store(lock_ptr + off + zoff, tl.zeros([ZERO_BLOCK], tl.int32), mask=off + zoff < n_locks)


@triton.jit
def _tile_columns(pid_n, N, END0, END1, BLOCK_N: tl.constexpr):
    """Column tile pid_n -> (part, first column, end column of its part); parts end at END0, END1, N."""
    t0 = tl.cdiv(END0, BLOCK_N)
    t1 = tl.cdiv(END1 - END0, BLOCK_N)
    in1 = pid_n >= t0
    in2 = pid_n >= t0 + t1
    part = in1.to(tl.int32) + in2.to(tl.int32)
    start = tl.where(in2, END1 + (pid_n - t0 - t1) * BLOCK_N, tl.where(in1, END0 + (pid_n - t0) * BLOCK_N, pid_n * BLOCK_N))
    end = tl.where(in2, N, tl.where(in1, END1, END0))
    return part, start, end


@triton.jit
def _program_tile(N, END0, END1, KR: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's column tile and K-range: (pid_n, pid_k, part, first column, end column, first row k0)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    part, start, end = _tile_columns(pid_n, N, END0, END1, BLOCK_N)
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK_N)
    return pid_n, pid_k, part, start, end, pid_k * KR


@triton.jit
def _store_or_reduce(y, y_ptr, ws_ptr, lock_ptr, out_off, ws_off, out_ok, pid_n,
                     SPLIT_K: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """SPLIT_K == 1: store. Else: fp32 atomics into the workspace, and the last program of the tile stores."""
    if SPLIT_K == 1:
        tl.store(y_ptr + out_off, y.to(OUT_DTYPE), mask=out_ok)
    else:
        tl.atomic_add(ws_ptr + ws_off, y, mask=out_ok, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.atomic_add(ws_ptr + ws_off, tl.zeros_like(y), mask=out_ok, sem="acquire")  # atomic read at L2
            tl.store(y_ptr + out_off, total.to(OUT_DTYPE), mask=out_ok)


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
def _tile_qparams(s_ptr, z_ptr, start, end, k0, G, stride_sg, BLOCK_N: tl.constexpr):
    """The tile's columns and the scales / zeros of the group holding rows k0..: independent of x, issued first."""
    cols = start + tl.arange(0, BLOCK_N)
    n_ok = cols < end
    soff = (k0 // G) * stride_sg + cols
    sc = tl.load(s_ptr + soff, mask=n_ok, other=0.0).to(tl.float32)
    zr = tl.load(z_ptr + soff, mask=n_ok, other=0.0).to(tl.float32)
    return cols, n_ok, sc, zr


@triton.jit
def _threshold_rows(x_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0, M,
                    M_P: tl.constexpr, KR: tl.constexpr, T_MODE: tl.constexpr):
    """x[:, k0 .. k0 + KR] of every batch row and which entries survive |x| > t: (mm, m_ok, act, x * act).
    T_MODE 0: a python float t_value; 1: a 0-dim (or per-part scalar) tensor; 2: [K] per-input-channel thresholds.
    NaN compares False: dropped."""
    mm = tl.arange(0, M_P)
    m_ok = mm < M
    rk = tl.arange(0, KR)
    xv = tl.load(x_ptr + mm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
    if T_MODE == 0:
        act = tl.abs(xv) > t_value
    elif T_MODE == 1:
        t = tl.load(t_ptr + part * t_stride_part).to(tl.float32)
        act = tl.abs(xv) > t
    else:
        t = tl.load(t_ptr + part * t_stride_part + k0 + rk).to(tl.float32)
        act = tl.abs(xv) > t[None, :]
    act = act & m_ok[:, None]
    return mm, m_ok, act, tl.where(act, xv, 0.0)


@triton.jit
def _compact_rows(act, xm, mm, k0, part, K, scr_i_ptr, scr_x_ptr, M_P: tl.constexpr, KR: tl.constexpr,
                  STORE: tl.constexpr):
    """The union over the batch of the active rows k0 .. k0 + KR, compacted into the scratch lists (row index and
    x column per slot; every column tile of a part writes the same values to the same slots, so sharing the scratch
    between programs is benign) -> (active count, scratch base). STORE False: measurement probe only."""
    rk = tl.arange(0, KR)
    any_row = tl.max(act.to(tl.int32), axis=0)
    pos = tl.cumsum(any_row, axis=0) - 1
    c = tl.sum(any_row, axis=0)
    keep = any_row > 0
    ibase = part * K + k0
    if STORE:
        tl.store(scr_i_ptr + ibase + pos, k0 + rk, mask=keep)
        tl.store(scr_x_ptr + (ibase + pos)[None, :] * M_P + mm[:, None], xm, mask=keep[None, :])
        tl.debug_barrier()
    return c, ibase


@triton.jit
def _reduce_split_k(y, y_ptrs, ws_ptrs, lock_ptr, out_ok, n_ksplit, SPLIT: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Not SPLIT: store y. SPLIT: fp32 atomics into a workspace that is zero before the call; the last program of
    the column tile reads the sum, writes y and leaves workspace and counter zero again (no memset launch)."""
    if SPLIT:
        tl.atomic_add(ws_ptrs, y, mask=out_ok, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr, 1, sem="acq_rel")
        if arrived == n_ksplit - 1:
            total = tl.atomic_add(ws_ptrs, tl.zeros_like(y), mask=out_ok, sem="acquire")  # read at L2
            tl.store(y_ptrs, total.to(OUT_DTYPE), mask=out_ok)
            tl.store(ws_ptrs, tl.zeros_like(y), mask=out_ok)
            tl.store(lock_ptr, 0)
    else:
        tl.store(y_ptrs, y.to(OUT_DTYPE), mask=out_ok)


@triton.jit
def _slot_load(x_ptr, stride_xm, scr_i_ptr, scr_x_ptr, ibase, k0, slot, c, mm, m_ok, M_P: tl.constexpr, PROBE: tl.constexpr):
    """Row index and x values [M_P, W] of compacted slots ``slot`` [W] (one per warp). Slots past the end give row
    k0 (a valid, cached row) and x = 0, so the loop needs no load predicates or zero fills."""
    ok = slot < c
    if PROBE == 2:
        row = k0 + slot
        xr = tl.load(x_ptr + mm[:, None] * stride_xm + row[None, :], mask=ok[None, :] & m_ok[:, None], other=0.0).to(tl.float32)
    else:
        row = tl.load(scr_i_ptr + ibase + slot, mask=ok, other=k0)
        xr = tl.load(scr_x_ptr + (ibase + slot)[None, :] * M_P + mm[:, None], mask=ok[None, :], other=0.0)
    return row, xr


@triton.jit
def _row_load(qw_ptr, row, word, w_ok, stride_qk, M_P: tl.constexpr, ALIGNED: tl.constexpr):
    """The [W, NB] words of one gathered row per warp ([1, W, NB] for M_P > 1: the accumulators' layout)."""
    if M_P == 1:
        if ALIGNED:
            wd = tl.load(qw_ptr + row[:, None] * stride_qk + word[None, :])
        else:
            wd = tl.load(qw_ptr + row[:, None] * stride_qk + word[None, :], mask=w_ok[None, :])
    else:
        if ALIGNED:
            wd = tl.load(qw_ptr + row[None, :, None] * stride_qk + word[None, None, :])
        else:
            wd = tl.load(qw_ptr + row[None, :, None] * stride_qk + word[None, None, :], mask=w_ok[None, None, :])
    return wd


@triton.jit
def _row_fma(wd, xr, magic, a0, a1, a2, a3, a4, a5, a6, a7, BITS: tl.constexpr, M_P: tl.constexpr, W: tl.constexpr,
             F16: tl.constexpr, EMULATE: tl.constexpr, PROBE: tl.constexpr):
    """Unpack one row's words and accumulate x * value into the per-value accumulators. The unpacked values are
    finite whatever the bits, so a slot past the end (x = 0) adds exactly 0."""
    if M_P == 1:
        xb = tl.reshape(xr, [W])[:, None]
    else:
        xb = xr[:, :, None]
    if BITS == 4:
        w_hi = wd >> 12
    else:
        w_hi = wd >> 16
    if PROBE == 3:
        a0 += xb * (wd ^ w_hi).to(tl.float32, bitcast=True)
    elif F16:
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
def _sgemv_kernel(
    x_ptr, stride_xm, t_ptr, t_value, t_stride_part,
    qw_ptr, s_ptr, z_ptr, scr_i_ptr, scr_x_ptr, ws_ptr, lock_ptr, y_ptr,
    M, N, K, G, stride_qk, stride_sg, stride_ym, END0, END1, n_ksplit, magic,
    BITS: tl.constexpr, M_P: tl.constexpr, KR: tl.constexpr, W: tl.constexpr, R: tl.constexpr, VEC: tl.constexpr,
    T_MODE: tl.constexpr, SPLIT: tl.constexpr, ALIGNED: tl.constexpr, OUT_DTYPE: tl.constexpr,
    F16: tl.constexpr = False, EMULATE: tl.constexpr = False, PIPE: tl.constexpr = False, PROBE: tl.constexpr = 0,
):
    """One launch: threshold + compaction + gathered-row GEMV + split-K reduction (see the module docstring).

    Program (pid_n, pid_k) owns BLOCK_N = 32 * VEC * (32 // BITS) columns (each thread VEC int32 words = 4 * VEC bytes
    of a row) and the KR rows k0 = pid_k * KR ... (inside one quantization group). W warps split the active rows
    (warp w takes compacted slots w, w + W, ...), R rows per warp per step are unrolled so their loads are in flight
    together. PROBE (measurement only; the probe script is in git history, benchmarks/gemv_probe.py at d0ecadf):
    1 partials stored instead of the split-K reduction (wrong y), 2 contiguous rows instead of the compacted list
    (wrong y), 3 no unpack/FMA (wrong y)."""
    PER: tl.constexpr = 32 // BITS
    NB: tl.constexpr = 32 * VEC
    BLOCK_N: tl.constexpr = NB * PER
    pid_n, pid_k, part, start, end, k0 = _program_tile(N, END0, END1, KR, BLOCK_N, ALIGNED)
    # 1. scales / zeros of this K-range's group: independent of x, issued first
    cols, n_ok, sc, zr = _tile_qparams(s_ptr, z_ptr, start, end, k0, G, stride_sg, BLOCK_N)
    # 2. threshold and compact rows k0 .. k0 + KR (union over the M rows of x)
    mm, m_ok, act, xm = _threshold_rows(x_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0, M, M_P, KR, T_MODE)
    xsum = tl.sum(xm, axis=1)
    c, ibase = _compact_rows(act, xm, mm, k0, part, K, scr_i_ptr, scr_x_ptr, M_P, KR, PROBE != 2)
    # 3. gathered rows
    word = start // PER + tl.arange(0, NB)
    w_ok = word < end // PER
    wv = tl.arange(0, W)
    if M_P == 1:  # 2-D accumulators [W, NB]: the layout of the weight tile, no conversion in the loop
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
    if PIPE:  # R == 4; the next step's row indices and x are loaded before this step's weights (prefetch)
        p0, q0 = _slot_load(x_ptr, stride_xm, scr_i_ptr, scr_x_ptr, ibase, k0, 0 * W + wv, c, mm, m_ok, M_P, PROBE)
        p1, q1 = _slot_load(x_ptr, stride_xm, scr_i_ptr, scr_x_ptr, ibase, k0, 1 * W + wv, c, mm, m_ok, M_P, PROBE)
        p2, q2 = _slot_load(x_ptr, stride_xm, scr_i_ptr, scr_x_ptr, ibase, k0, 2 * W + wv, c, mm, m_ok, M_P, PROBE)
        p3, q3 = _slot_load(x_ptr, stride_xm, scr_i_ptr, scr_x_ptr, ibase, k0, 3 * W + wv, c, mm, m_ok, M_P, PROBE)
        for j in range(0, c, W * 4):
            # this step's weights first, then the next step's indices, then the FMAs
            w0 = _row_load(qw_ptr, p0, word, w_ok, stride_qk, M_P, ALIGNED)
            w1 = _row_load(qw_ptr, p1, word, w_ok, stride_qk, M_P, ALIGNED)
            w2 = _row_load(qw_ptr, p2, word, w_ok, stride_qk, M_P, ALIGNED)
            w3 = _row_load(qw_ptr, p3, word, w_ok, stride_qk, M_P, ALIGNED)
            jn = j + 4 * W
            p0, n0 = _slot_load(x_ptr, stride_xm, scr_i_ptr, scr_x_ptr, ibase, k0, jn + 0 * W + wv, c, mm, m_ok, M_P, PROBE)
            p1, n1 = _slot_load(x_ptr, stride_xm, scr_i_ptr, scr_x_ptr, ibase, k0, jn + 1 * W + wv, c, mm, m_ok, M_P, PROBE)
            p2, n2 = _slot_load(x_ptr, stride_xm, scr_i_ptr, scr_x_ptr, ibase, k0, jn + 2 * W + wv, c, mm, m_ok, M_P, PROBE)
            p3, n3 = _slot_load(x_ptr, stride_xm, scr_i_ptr, scr_x_ptr, ibase, k0, jn + 3 * W + wv, c, mm, m_ok, M_P, PROBE)
            a0, a1, a2, a3, a4, a5, a6, a7 = _row_fma(w0, q0, magic, a0, a1, a2, a3, a4, a5, a6, a7, BITS, M_P, W, F16, EMULATE, PROBE)
            a0, a1, a2, a3, a4, a5, a6, a7 = _row_fma(w1, q1, magic, a0, a1, a2, a3, a4, a5, a6, a7, BITS, M_P, W, F16, EMULATE, PROBE)
            a0, a1, a2, a3, a4, a5, a6, a7 = _row_fma(w2, q2, magic, a0, a1, a2, a3, a4, a5, a6, a7, BITS, M_P, W, F16, EMULATE, PROBE)
            a0, a1, a2, a3, a4, a5, a6, a7 = _row_fma(w3, q3, magic, a0, a1, a2, a3, a4, a5, a6, a7, BITS, M_P, W, F16, EMULATE, PROBE)
            q0, q1, q2, q3 = n0, n1, n2, n3
    else:
        for j in range(0, c, W * R):
            for r in tl.static_range(R):
                row, xr = _slot_load(x_ptr, stride_xm, scr_i_ptr, scr_x_ptr, ibase, k0, j + r * W + wv, c, mm, m_ok, M_P, PROBE)
                wd = _row_load(qw_ptr, row, word, w_ok, stride_qk, M_P, ALIGNED)
                a0, a1, a2, a3, a4, a5, a6, a7 = _row_fma(wd, xr, magic, a0, a1, a2, a3, a4, a5, a6, a7, BITS, M_P, W, F16, EMULATE, PROBE)
    # 4. reduce over the warps (one pass per value J: fewer barriers than a joined reduction), interleave the
    #    per-value accumulators back to columns word * PER + J (in registers), remove the offsets, scale once
    if M_P == 1:  # [W, NB] -> [1, W, NB] (reducing the 2-D tiles directly gives slice layouts that cost barriers)
        a0 = a0[None, :, :]
        a1 = a1[None, :, :]
        a2 = a2[None, :, :]
        a3 = a3[None, :, :]
        a4 = a4[None, :, :]
        a5 = a5[None, :, :]
        a6 = a6[None, :, :]
        a7 = a7[None, :, :]
    RA: tl.constexpr = 1
    if BITS == 4:
        a = tl.join(tl.join(tl.join(tl.sum(a0, axis=RA), tl.sum(a4, axis=RA)), tl.join(tl.sum(a2, axis=RA), tl.sum(a6, axis=RA))),
                    tl.join(tl.join(tl.sum(a1, axis=RA), tl.sum(a5, axis=RA)), tl.join(tl.sum(a3, axis=RA), tl.sum(a7, axis=RA))))
    else:
        a = tl.join(tl.join(tl.sum(a0, axis=RA), tl.sum(a2, axis=RA)), tl.join(tl.sum(a1, axis=RA), tl.sum(a3, axis=RA)))
    a = tl.reshape(a, [M_P, BLOCK_N])
    if BITS == 4:
        if F16:  # remove the 1024 offsets (1024 * sum of x) and the factor 16 of the odd nibbles
            a = a - 1024.0 * xsum[:, None]
            inv = tl.where(cols % 2 == 1, 0.0625, 1.0)
        else:
            place = cols % 8
            place = place - (place >= 5).to(tl.int32) * 3
            inv = ((127 - 4 * place) << 23).to(tl.float32, bitcast=True)
    else:
        inv = ((127 - 8 * (cols % 2)) << 23).to(tl.float32, bitcast=True)
    y = sc[None, :] * (a * inv[None, :] - zr[None, :] * xsum[:, None])
    out_ok = m_ok[:, None] & n_ok[None, :]
    ws_off = mm[:, None] * N + cols[None, :]
    if PROBE == 1:
        tl.store(ws_ptr + pid_k * M * N + ws_off, y, mask=out_ok)
    else:
        _reduce_split_k(y, y_ptr + mm[:, None] * stride_ym + cols[None, :], ws_ptr + ws_off, lock_ptr + pid_n, out_ok,
                        n_ksplit, SPLIT, OUT_DTYPE)


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
def _sgemv_mma_kernel(
    x_ptr, stride_xm, t_ptr, t_value, t_stride_part,
    qw_ptr, s_ptr, z_ptr, scr_i_ptr, scr_x_ptr, ws_ptr, lock_ptr, y_ptr,
    M, N, K, G, stride_qk, stride_sg, stride_ym, END0, END1, n_ksplit,
    M_P: tl.constexpr, M_D: tl.constexpr, KR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    T_MODE: tl.constexpr, SPLIT: tl.constexpr, ALIGNED: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BF16: tl.constexpr, DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr = False,
):
    """int4, 2 <= M <= 16, one launch on tensor cores: the program (pid_n, pid_k) owns BLOCK_N columns and the KR rows
    k0 = pid_k * KR (inside one quantization group). Threshold + compaction as in ``_sgemv_kernel`` (shared scratch
    list, barrier), then BLOCK_K compacted rows at a time: the gathered words [BLOCK_K, BLOCK_N / 8] are unpacked
    to 16-bit ``OFF + q`` (``_unpack8_dot``), interleaved back to columns (tl.join, in registers) and multiplied with
    tl.dot against x [M_D = 16 (M padded), BLOCK_K]. Slots past the end read row k0 with x = 0 (adds exactly 0).
    y = s * (acc - (z + OFF) * sum x), then the split-K reduction of ``_sgemv_kernel``."""
    NW: tl.constexpr = BLOCK_N // 8
    OFF: tl.constexpr = 128.0 if BF16 else 1024.0
    pid_n, pid_k, part, start, end, k0 = _program_tile(N, END0, END1, KR, BLOCK_N, ALIGNED)
    cols, n_ok, sc, zr = _tile_qparams(s_ptr, z_ptr, start, end, k0, G, stride_sg, BLOCK_N)
    mm, m_ok, act, xm = _threshold_rows(x_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0, M, M_P, KR, T_MODE)
    c, ibase = _compact_rows(act, xm, mm, k0, part, K, scr_i_ptr, scr_x_ptr, M_P, KR, True)
    md = tl.arange(0, M_D)
    md_ok = md < M
    word = start // 8 + tl.arange(0, NW)
    w_ok = word < end // 8
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([M_D, BLOCK_N], tl.float32)
    xsum = tl.zeros([M_D], tl.float32)
    for j in range(0, c, BLOCK_K):
        slot = j + kk
        ok = slot < c
        row = tl.load(scr_i_ptr + ibase + slot, mask=ok, other=k0)
        xk = tl.load(scr_x_ptr + (ibase + slot)[None, :] * M_P + md[:, None], mask=md_ok[:, None] & ok[None, :], other=0.0)
        if ALIGNED:
            wd = tl.load(qw_ptr + row[:, None] * stride_qk + word[None, :])
        else:
            wd = tl.load(qw_ptr + row[:, None] * stride_qk + word[None, :], mask=w_ok[None, :], other=0)
        v0, v1, v2, v3, v4, v5, v6, v7 = _unpack8_dot(wd, BF16, EMULATE)
        v = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
        v = tl.reshape(v, [BLOCK_K, BLOCK_N])
        if not EMULATE:
            v = v.to(DOT_DTYPE, bitcast=True)
        acc = tl.dot(xk.to(DOT_DTYPE), v, acc, input_precision="ieee")  # fp32 operands: no TF32 rounding
        xsum += tl.sum(xk, axis=1)
    y = sc[None, :] * (acc - (zr[None, :] + OFF) * xsum[:, None])
    out_ok = md_ok[:, None] & n_ok[None, :]
    ws_off = md[:, None] * N + cols[None, :]
    _reduce_split_k(y, y_ptr + md[:, None] * stride_ym + cols[None, :], ws_ptr + ws_off, lock_ptr + pid_n, out_ok,
                    n_ksplit, SPLIT, OUT_DTYPE)


@triton.jit
def _gemv_dot_kernel(
    qw_ptr, s_ptr, z_ptr, idx_ptr, xc_ptr, xsum_ptr, cnt_ptr, ws_ptr, lock_ptr, y_ptr,
    M, N, K, G, nseg, segs_per_split, stride_qk, stride_sg, stride_ym, END0, END1,
    BITS: tl.constexpr, S: tl.constexpr, M_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, OUT_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """1 < M <= 16: the union of active rows, unpacked to DOT_DTYPE (exact) and multiplied with tl.dot
    (M padded to M_P >= 16); x rows keep their own masks (inactive entries are 0 in the compacted x)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    part, start, end = _tile_columns(pid_n, N, END0, END1, BLOCK_N)
    cols = start + tl.arange(0, BLOCK_N)
    n_ok = cols < end
    nib = tl.arange(0, 8)
    word = start // 8 + tl.arange(0, BLOCK_N // 8)
    shift = 4 * nib
    idx_base = idx_ptr + part * K
    xc_base = xc_ptr + part * M * K
    xsum_base = xsum_ptr + part * nseg * M
    cnt_base = cnt_ptr + part * nseg
    seg0 = pid_k * segs_per_split
    seg1 = tl.minimum(seg0 + segs_per_split, nseg)
    kk = tl.arange(0, BLOCK_K)
    mm = tl.arange(0, M_P)
    y = tl.zeros([M_P, BLOCK_N], tl.float32)
    for seg in range(seg0, seg1):
        c = tl.load(cnt_base + seg)
        if c > 0:
            acc = tl.zeros([M_P, BLOCK_N], tl.float32)
            for j in range(0, c, BLOCK_K):
                rk = j + kk
                r_ok = rk < c
                rows = tl.load(idx_base + seg * S + rk, mask=r_ok, other=0)
                if BITS == 4:
                    w = tl.load(qw_ptr + rows[:, None] * stride_qk + word[None, :], mask=r_ok[:, None] & (word < end // 8)[None, :], other=0)
                    v = (w[:, :, None] >> shift[None, None, :]) & 15
                    q = tl.reshape(v, [BLOCK_K, BLOCK_N])
                else:
                    q = tl.load(qw_ptr + rows[:, None] * stride_qk + cols[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0).to(tl.int32)
                q = ((q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0).to(DOT_DTYPE)  # q <= 255: exact
                xk = tl.load(xc_base + mm[:, None] * K + (seg * S + rk)[None, :], mask=(mm < M)[:, None] & r_ok[None, :], other=0.0)
                # x values are exact in their own dtype; fp32 operands must not be rounded to TF32 (Triton's default
                # for fp32 tl.dot on NVIDIA: ~1e-3 relative error, which flips threshold decisions downstream)
                acc = tl.dot(xk.to(DOT_DTYPE), q, acc, input_precision="ieee")
            off = ((seg * S) // G) * stride_sg + cols
            sc = tl.load(s_ptr + off, mask=n_ok, other=0.0).to(tl.float32)
            zr = tl.load(z_ptr + off, mask=n_ok, other=0.0).to(tl.float32)
            xsum = tl.load(xsum_base + seg * M + mm, mask=mm < M, other=0.0)
            y += sc[None, :] * (acc - zr[None, :] * xsum[:, None])
    out_ok = (mm < M)[:, None] & n_ok[None, :]
    _store_or_reduce(y, y_ptr, ws_ptr, lock_ptr, mm[:, None] * stride_ym + cols[None, :], mm[:, None] * N + cols[None, :],
                     out_ok, pid_n, SPLIT_K, OUT_DTYPE)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _dot_dtype(dtype: torch.dtype):
    """tl.dot operand dtype: x's own (bf16/fp16 tensor cores). fp32 for fp32 x, and for bf16 under the triton 3.9
    interpreter, whose bf16 tl.dot returns garbage (operands are exact in fp32 either way)."""
    if dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16):
        return tl.float32
    return _TL_DTYPE[dtype]


def _check(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> tuple[int, int, int]:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if x.dim() != 2 or x.dtype not in _TL_DTYPE:
        raise ValueError(f"x must be [M, K] fp16/bf16/fp32, got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    if not 1 <= m <= MAX_M:
        raise ValueError(f"sparse_gemv handles 1 <= M <= {MAX_M} rows, got M={m}; use dense_gemm for prefill")
    want_dtype = torch.int32 if bits == 4 else torch.uint8
    if qweight.dtype != want_dtype or qweight.dim() != 2 or qweight.shape[0] != k:
        raise ValueError(f"qweight must be {want_dtype} [K={k}, ...] for bits={bits}, got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[1] * (8 if bits == 4 else 1)
    if n % 8 != 0:
        raise ValueError(f"N={n} must be a multiple of 8")
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"K={k} must be a multiple of group_size={group_size}")
    shape = (k // group_size, n)
    if tuple(scales.shape) != shape or tuple(zeros.shape) != shape or scales.stride() != zeros.stride():
        raise ValueError(f"scales and zeros must be {shape} with equal strides, got {tuple(scales.shape)}, {tuple(zeros.shape)}")
    devices = {t.device for t in (x, qweight, scales, zeros)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    if qweight.stride(1) != 1 or scales.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("qweight, scales, zeros and x must be contiguous along their last dimension")
    return m, n, k


def _launch(x, qweight, scales, zeros, t_mode, t_tensor, t_value, t_stride_part, ends, bits, group_size, config=None):
    m, n, k = _check(x, qweight, scales, zeros, bits, group_size)
    n_parts = len(ends)
    if isinstance(config, MmaConfig) or (config is None and bits == 4 and x.dtype != torch.float32):
        mcfg = config or pick_mma(m, n, k, bits, group_size, x.device, n_parts)
        if mcfg is not None:
            return _launch_mma(x, qweight, scales, zeros, t_mode, t_tensor, t_value, t_stride_part, ends, group_size,
                               mcfg, m, n, k)
    if config is None or isinstance(config, FusedConfig):
        fcfg = config or pick_fused(m, n, k, bits, group_size, x.device, n_parts)
        if fcfg is not None and (bits == 4 or (qweight.stride(0) % 4 == 0 and qweight.data_ptr() % 4 == 0)):
            return _launch_fused(x, qweight, scales, zeros, t_mode, t_tensor, t_value, t_stride_part, ends, bits,
                                 group_size, fcfg, m, n, k)
        config = None
    cfg = config or pick_config(max(m, 2), n, k, bits, group_size, x.device)  # two-launch path: tl.dot kernel
    s = cfg.segment
    if s <= 0 or group_size % s != 0:
        raise ValueError(f"segment {s} must divide group_size {group_size}")
    nseg = k // s
    split_k = max(1, min(cfg.split_k, nseg))
    per = triton.cdiv(nseg, split_k)
    split_k = triton.cdiv(nseg, per)
    m_p = max(16, triton.next_power_of_2(m))
    block_n = cfg.block_n
    end0 = ends[0]
    end1 = ends[1] if n_parts > 1 else end0
    tiles = sum(triton.cdiv(e - b, block_n) for b, e in zip((0,) + tuple(ends[:-1]), ends))

    dev = x.device
    idx = _empty(n_parts * k, dtype=torch.int32, device=dev)
    xc = _empty(n_parts * m * k, dtype=torch.float32, device=dev)
    xsum = _empty(n_parts * nseg * m, dtype=torch.float32, device=dev)
    cnt = _empty(n_parts * nseg, dtype=torch.int32, device=dev)
    ws = _empty(m * n if split_k > 1 else 1, dtype=torch.float32, device=dev)
    locks = _empty(tiles if split_k > 1 else 1, dtype=torch.int32, device=dev)
    y = _empty(m, n, dtype=x.dtype, device=dev)
    t_ptr = t_tensor if t_tensor is not None else xsum  # unused pointer when T_MODE == 0

    _compact_kernel[(nseg, n_parts)](
        x, x.stride(0), t_ptr, t_value, t_stride_part,
        idx, xc, xsum, cnt, ws, ws.numel() if split_k > 1 else 0, locks, locks.numel() if split_k > 1 else 0,
        m, k, nseg,
        M_P=triton.next_power_of_2(m), S=s, S_P=triton.next_power_of_2(s), T_MODE=t_mode, ZERO_BLOCK=256,
        num_warps=4,
    )
    _gemv_dot_kernel[(tiles, split_k)](
        qweight, scales, zeros, idx, xc, xsum, cnt, ws, locks, y,
        m, n, k, group_size, nseg, per, qweight.stride(0), scales.stride(0), y.stride(0), end0, end1,
        BITS=bits, S=s, M_P=m_p, BLOCK_N=block_n, BLOCK_K=cfg.block_k, SPLIT_K=split_k,
        OUT_DTYPE=_TL_DTYPE[x.dtype], DOT_DTYPE=_dot_dtype(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


_SPLIT_BUFFERS: dict = {}
LAST_COMPILED = None  # the last launched compiled kernel (benchmarks read its register / spill counts)
_RETIRED: list = []  # buffers replaced by larger ones stay alive: captured CUDA graphs may still point at them


def _split_buffers(device: torch.device, ws_numel: int, n_locks: int) -> tuple[Tensor, Tensor]:
    """fp32 workspace and int32 tile counters for the split-K reduction, zero between calls: every call leaves them
    zero again (the last program of a tile reads its slice, writes y and zeroes the slice and its counter), so no
    memset launch is needed. One pair per device, shared by eager calls and CUDA graphs captured after it exists:
    calls must not run concurrently on several streams of one device (decode runs them in order on one stream).
    A call captured before any eager call of that size gets its own pair, whose zero fill is captured with it."""
    capturing = torch.cuda.is_current_stream_capturing()
    ws, locks = _SPLIT_BUFFERS.get(device.index, (None, None))
    if ws is None or ws.numel() < ws_numel or locks.numel() < n_locks:
        if capturing:
            ws = torch.zeros(ws_numel, dtype=torch.float32, device=device)
            locks = torch.zeros(n_locks, dtype=torch.int32, device=device)
            _RETIRED.append((ws, locks))
            return ws, locks
        if ws is not None:
            _RETIRED.append((ws, locks))
        ws = torch.zeros(max(ws_numel, 1 << 16), dtype=torch.float32, device=device)
        locks = torch.zeros(max(n_locks, 1024), dtype=torch.int32, device=device)
        _SPLIT_BUFFERS[device.index] = (ws, locks)
    return ws, locks


@dataclass
class _Buffers:
    """What a compacting launch (``_sgemv_kernel``, ``_sgemv_mma_kernel``) needs besides the weights: the part ends,
    the column-tile count, the scratch lists, the split-K workspace and counters, the output."""

    m_p: int
    n_ksplit: int
    end0: int
    end1: int
    tiles: int
    split: bool
    scr_i: torch.Tensor
    scr_x: torch.Tensor
    ws: torch.Tensor
    locks: torch.Tensor
    y: torch.Tensor
    t_ptr: torch.Tensor

    @staticmethod
    def make(x, t_tensor, ends, block_n, kr, m, n, k, probe_ws=None) -> "_Buffers":
        m_p = triton.next_power_of_2(m)
        n_ksplit = k // kr
        end0 = ends[0]
        end1 = ends[1] if len(ends) > 1 else end0
        tiles = sum(triton.cdiv(e - b, block_n) for b, e in zip((0,) + tuple(ends[:-1]), ends))
        dev = x.device
        scr_i = _empty(len(ends) * k, dtype=torch.int32, device=dev)
        scr_x = _empty(len(ends) * k * m_p, dtype=torch.float32, device=dev)
        y = _empty(m, n, dtype=x.dtype, device=dev)
        split = n_ksplit > 1
        if probe_ws is not None:
            ws, locks = probe_ws
        elif split and dev.type == "cuda":
            ws, locks = _split_buffers(dev, m * n, tiles)
        elif split:  # interpreter: a fresh zeroed pair each call
            ws = torch.zeros(m * n, dtype=torch.float32, device=dev)
            locks = torch.zeros(tiles, dtype=torch.int32, device=dev)
        else:
            ws = locks = scr_i
        t_ptr = t_tensor if t_tensor is not None else scr_x  # unused pointer when T_MODE == 0
        return _Buffers(m_p, n_ksplit, end0, end1, tiles, split, scr_i, scr_x, ws, locks, y, t_ptr)


def _launch_fused(x, qweight, scales, zeros, t_mode, t_tensor, t_value, t_stride_part, ends, bits, group_size,
                  cfg: FusedConfig, m, n, k, probe_ws=None):
    if bits == 8:
        qw = qweight.view(torch.int32)  # 4 values per word, like int4's 8 (raises if misaligned: caller falls back)
    else:
        qw = qweight
    per = 32 // bits
    block_n = 32 * cfg.vec * per
    kr = cfg.k_range
    if group_size % kr != 0 or k % kr != 0:
        raise ValueError(f"k_range {kr} must divide group_size {group_size}")
    # fp32 x: the exact fp32-exponent unpack, not the fp16 pairs, whose 1024 offsets cancel ~7 bits of the fp32
    # accumulator (harmless under a bf16/fp16 output rounding, ~1e-5 relative error in an fp32 model)
    b = _Buffers.make(x, t_tensor, ends, block_n, kr, m, n, k, probe_ws)
    m_p, n_ksplit, end0, end1, tiles, split = b.m_p, b.n_ksplit, b.end0, b.end1, b.tiles, b.split
    scr_i, scr_x, ws, locks, y, t_ptr = b.scr_i, b.scr_x, b.ws, b.locks, b.y, b.t_ptr
    global LAST_COMPILED
    LAST_COMPILED = _sgemv_kernel[(tiles, n_ksplit)](
        x, x.stride(0), t_ptr, t_value, t_stride_part,
        qw, scales, zeros, scr_i, scr_x, ws, locks, y,
        m, n, k, group_size, qw.stride(0), scales.stride(0), y.stride(0), end0, end1, n_ksplit, 0x4B000000,
        BITS=bits, M_P=m_p, KR=kr, W=cfg.warps, R=cfg.rows, VEC=cfg.vec, T_MODE=t_mode, SPLIT=split,
        ALIGNED=all(e % block_n == 0 for e in ends), OUT_DTYPE=_TL_DTYPE[x.dtype],
        F16=bits == 4 and cfg.f16 and x.dtype != torch.float32, EMULATE=INTERPRET, PIPE=cfg.pipe and cfg.rows == 4, PROBE=cfg.probe,
        num_warps=cfg.warps, num_stages=1, **({"maxnreg": 128} if cfg.pipe and cfg.rows == 4 else {}),
    )
    return y


def _launch_mma(x, qweight, scales, zeros, t_mode, t_tensor, t_value, t_stride_part, ends, group_size,
                cfg: MmaConfig, m, n, k):
    kr, block_n = cfg.k_range, cfg.block_n
    if x.dtype not in (torch.float16, torch.bfloat16) or qweight.dtype != torch.int32:
        raise ValueError("the tensor-core kernel takes int4 weights and fp16/bf16 x")
    if group_size % kr != 0 or k % kr != 0 or cfg.block_k > kr or block_n % 8 != 0:
        raise ValueError(f"MmaConfig {cfg} does not fit group_size {group_size}, K={k}")
    b = _Buffers.make(x, t_tensor, ends, block_n, kr, m, n, k)
    m_p, n_ksplit, end0, end1, tiles, split = b.m_p, b.n_ksplit, b.end0, b.end1, b.tiles, b.split
    scr_i, scr_x, ws, locks, y, t_ptr = b.scr_i, b.scr_x, b.ws, b.locks, b.y, b.t_ptr
    bf16 = x.dtype == torch.bfloat16
    dot_dtype = tl.float32 if INTERPRET or x.dtype == torch.float32 else _TL_DTYPE[x.dtype]
    global LAST_COMPILED
    LAST_COMPILED = _sgemv_mma_kernel[(tiles, n_ksplit)](
        x, x.stride(0), t_ptr, t_value, t_stride_part,
        qweight, scales, zeros, scr_i, scr_x, ws, locks, y,
        m, n, k, group_size, qweight.stride(0), scales.stride(0), y.stride(0), end0, end1, n_ksplit,
        M_P=m_p, M_D=16, KR=kr, BLOCK_N=block_n, BLOCK_K=cfg.block_k, T_MODE=t_mode, SPLIT=split,
        ALIGNED=all(e % block_n == 0 for e in ends), OUT_DTYPE=_TL_DTYPE[x.dtype],
        BF16=bf16, DOT_DTYPE=dot_dtype, EMULATE=INTERPRET,
        num_warps=cfg.warps, num_stages=cfg.stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
    )
    return y


def _threshold_args(threshold, k: int, device):
    """-> (T_MODE, tensor or None, float value)."""
    if isinstance(threshold, Tensor):
        if threshold.device != device:
            raise ValueError(f"threshold tensor must be on {device}, got {threshold.device}")
        if threshold.dim() == 0:
            return 1, threshold, 0.0
        if threshold.dim() == 1 and threshold.shape[0] == k:
            return 2, threshold.contiguous(), 0.0
        raise ValueError(f"threshold tensor must be 0-dim or [K={k}], got {tuple(threshold.shape)}")
    return 0, None, float(threshold)


def sparse_gemv(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, threshold, *, bits: int, group_size: int,
                config: FusedConfig | GemvConfig | None = None) -> Tensor:
    """See the module docstring and DESIGN.md "Kernel API"."""
    t_mode, t_tensor, t_value = _threshold_args(threshold, x.shape[-1], x.device)
    n = qweight.shape[1] * (8 if bits == 4 else 1)
    return _launch(x, qweight, scales, zeros, t_mode, t_tensor, t_value, 0, (n,), bits, group_size, config)


def sparse_gemv_fused(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, thresholds: Tensor, split_sizes,
                      *, bits: int, group_size: int, config: FusedConfig | GemvConfig | None = None) -> Tensor:
    """Up to three projections concatenated along N (q/k/v, gate/up), thresholds [n_parts] or [n_parts, K]."""
    split_sizes = [int(v) for v in split_sizes]
    n = qweight.shape[1] * (8 if bits == 4 else 1)
    k = x.shape[-1]
    if not 1 <= len(split_sizes) <= MAX_PARTS or sum(split_sizes) != n or any(v <= 0 or v % 8 for v in split_sizes):
        raise ValueError(f"split_sizes {split_sizes}: 1..{MAX_PARTS} positive multiples of 8 summing to N={n}")
    if not isinstance(thresholds, Tensor) or thresholds.device != x.device or thresholds.shape[0] != len(split_sizes):
        raise ValueError(f"thresholds must be a tensor on {x.device} with {len(split_sizes)} rows")
    if thresholds.dim() == 1:
        t_mode, stride = 1, thresholds.stride(0)
    elif thresholds.dim() == 2 and thresholds.shape[1] == k:
        thresholds = thresholds.contiguous()
        t_mode, stride = 2, thresholds.stride(0)
    else:
        raise ValueError(f"thresholds must be [n_parts] or [n_parts, K={k}], got {tuple(thresholds.shape)}")
    ends = tuple(int(v) for v in torch.tensor(split_sizes).cumsum(0).tolist())
    return _launch(x, qweight, scales, zeros, t_mode, thresholds, 0.0, stride, ends, bits, group_size, config)


@triton.jit
def _count_inactive_kernel(
    x_ptr, stride_xm, t_ptr, t_stride_part, zero_ptr, input_ptr, last_ptr, M, K,
    T_MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per part: counts the inputs that part's threshold drops (|x| > t is false, compared in fp32 like
    # the GEMV) and updates the part's counters in place, so a decode step's bookkeeping is one launch per call
    # instead of a handful of elementwise kernels, and nothing is read back to the host.
    part = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    kept = tl.zeros([BLOCK], tl.int32)
    if T_MODE == 1:
        t0 = tl.load(t_ptr + part * t_stride_part).to(tl.float32)
    for m in range(0, M):
        for k0 in range(0, K, BLOCK):
            k = k0 + offs
            ok = k < K
            x = tl.load(x_ptr + m * stride_xm + k, mask=ok, other=0.0).to(tl.float32)
            if T_MODE == 1:
                t = t0
            else:
                t = tl.load(t_ptr + part * t_stride_part + k, mask=ok, other=0.0).to(tl.float32)
            kept += ((tl.abs(x) > t) & ok).to(tl.int32)
    numel = M * K
    dropped = numel - tl.sum(kept, axis=0)
    tl.store(zero_ptr + part, tl.load(zero_ptr + part) + dropped.to(tl.float64))
    tl.store(input_ptr + part, tl.load(input_ptr + part) + numel.to(tl.float64))
    tl.store(last_ptr + part, dropped.to(tl.float32) / numel.to(tl.float32))


def count_inactive(x: Tensor, thresholds: Tensor, zero_count: Tensor, input_count: Tensor, last_sparsity: Tensor) -> None:
    """See kernels.count_inactive: x [M, K]; thresholds 0-dim, [P], [K] (P == 1) or [P, K]; counters of P parts."""
    n_parts = zero_count.numel()
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if thresholds.dim() == 2 or (thresholds.dim() == 1 and n_parts == 1 and thresholds.shape[0] == k and k != 1):
        t = thresholds.reshape(n_parts, k).contiguous()
        t_mode, stride = 2, t.stride(0)
    else:
        t = thresholds.reshape(n_parts)
        t_mode, stride = 1, t.stride(0) if n_parts > 1 else 0
    for c in (zero_count, input_count, last_sparsity):
        if c.numel() != n_parts or not c.is_contiguous() or c.device != x.device:
            raise ValueError(f"counters must be {n_parts} contiguous values on {x.device}")
    _count_inactive_kernel[(n_parts,)](
        x, x.stride(0), t, stride, zero_count, input_count, last_sparsity, m, k,
        T_MODE=t_mode, BLOCK=1024, num_warps=4,
    )
