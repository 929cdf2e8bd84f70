"""What the two sparse-GEMV kernel families share (kernels/gemv_triton.py: CUDA cores, made for batch 1;
kernels/gemv_mma_triton.py: tensor cores, batch 2-16): one call's arguments as a named object, the split-K workspace,
and the jit pieces every program of both runs.

A program owns a column tile (inside one part of a fused weight) and a K-range of KR rows of W^T inside one
quantization group. It thresholds its KR entries of x (the union over the batch rows), compacts the active rows into a
scratch list shared by the part's column tiles (every tile writes the same values to the same slots), walks the
compacted rows, and adds its partial into an fp32 workspace. The last program of a column tile (a counter) writes y
and leaves workspace and counter zero, so the next call needs no memset launch.

Deterministic mode (``torch.use_deterministic_algorithms(True)``): each program stores its partial in its own
workspace slot instead of adding it atomically, and the last program of the tile sums the slots in a fixed order, so
y is bit-reproducible from call to call (docs/kernels.md gives the measured cost).

SiLU form (``GemvProblem.up``, constexpr ``SILU``): x is the gate of a Llama MLP and every load of x reads gate and up
at the same offsets and computes ``silu(gate) * up`` (``load_x``, rounded as kernels.silu_mul rounds), so the down
projection of a decode step needs no separate SiLU-and-mul launch; the threshold applies to that product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import interpreting
from .elementwise_triton import silu_and_mul
from .pdl_triton import launch_options

INTERPRET = interpreting()
# every buffer of a call comes from here (tests swap in an allocator that fills memory with garbage)
_empty = torch.empty
MAX_M = 16
MAX_PARTS = 3
TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# -- the call -------------------------------------------------------------------------------------------------------
@dataclass
class GemvProblem:
    """One sparse-GEMV call, validated: x [M, K], the weight, its thresholds and the part ends along N. With ``up``
    (same shape and strides as x) the input is silu(x) * up instead of x (the SiLU form, module docstring)."""

    x: Tensor
    qweight: Tensor
    scales: Tensor
    zeros: Tensor
    t_mode: int  # 0: python float t_value; 1: one scalar tensor per part; 2: [K] per-input-channel per part
    t_tensor: Tensor | None
    t_value: float
    t_stride_part: int
    ends: tuple[int, ...]  # end column of each part (up to MAX_PARTS)
    bits: int
    group_size: int
    deterministic: bool = False
    up: Tensor | None = None
    out: Tensor | None = None  # fp32 [M, N], zero on entry: the call adds its product into it (no split-K tail)
    clear: Tensor | None = None  # fp32 [M, N]: zeroed by the call (an earlier call's `out`, already consumed)

    @property
    def m(self) -> int:
        return self.x.shape[0]

    @property
    def k(self) -> int:
        return self.x.shape[1]

    @property
    def n(self) -> int:
        return self.ends[-1]


@dataclass
class KernelCall:
    """Grid, runtime arguments (by name: both kernels take the same ones) and compile-time constants of one launch."""

    grid: tuple[int, int]
    args: dict
    constants: dict
    y: Tensor
    options: dict  # programmatic dependent launch (kernels/pdl_triton.py): {"PDL": mode, "launch_pdl": True} or {}


_BUFFERS: dict = {}
_RETIRED: list = []  # buffers replaced by larger ones stay alive: captured CUDA graphs may still point at them


def _device_buffer(key: tuple, device: torch.device, numel: int, dtype: torch.dtype, zero: bool) -> Tensor:
    """A buffer kept per device and purpose, grown when a call needs more. Zeroed ones are split-K workspaces and
    counters that every call leaves zero again (no memset launch). Shared by eager calls and the CUDA graphs captured
    after it exists: calls must not run concurrently on several streams of one device (decode runs them in order on
    one stream). A call captured before any eager call of that size gets its own buffer, allocated in the capture."""
    buf = _BUFFERS.get((key, device))
    if buf is None or buf.numel() < numel:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        new_numel = numel if capturing else max(numel, 1 << 16)
        new = torch.zeros(new_numel, dtype=dtype, device=device) if zero else _empty(new_numel, dtype=dtype, device=device)
        if capturing:
            _RETIRED.append(new)
            return new
        if buf is not None:
            _RETIRED.append(buf)
        _BUFFERS[(key, device)] = buf = new
    return buf


def prepare(p: GemvProblem, block_n: int, k_range: int, tiles_per_program: int = 1, qweight: Tensor | None = None,
            scratch: bool = True, ranges_per_program: int = 1) -> KernelCall:
    """Buffers, grid and arguments of one launch with column tiles of ``block_n`` and K-ranges of ``k_range`` rows
    (the last one may be shorter); a program walks ``tiles_per_program`` consecutive column tiles of one part and
    ``ranges_per_program`` consecutive K-ranges (the core kernel's groups: their span divides K).
    ``scratch``: the compaction's scratch lists (the split-K kernel has none)."""
    m, n, k = p.m, p.n, p.k
    m_p = triton.next_power_of_2(m)
    n_ksplit = triton.cdiv(k, k_range * ranges_per_program)
    end0 = p.ends[0]
    end1 = p.ends[1] if len(p.ends) > 1 else end0
    starts = (0,) + tuple(p.ends[:-1])
    span = block_n * tiles_per_program
    tiles = sum(triton.cdiv(e - b, span) for b, e in zip(starts, p.ends))
    dev = p.x.device
    acc = p.out is not None
    y = p.out if acc else _empty(m, n, dtype=p.x.dtype, device=dev)
    if scratch:  # scratch lists: every slot a program reads was written by it in this call
        scr_i = _device_buffer(("scratch_rows",), dev, len(p.ends) * k, torch.int32, zero=False)
        scr_x = _device_buffer(("scratch_x",), dev, len(p.ends) * k * m_p, torch.float32, zero=False)
    else:
        scr_i = scr_x = None
    split = n_ksplit > 1
    det = p.deterministic
    if acc:  # the caller's accumulator is the workspace; no counter, no tail
        ws, locks = p.out, p.out
    elif split:  # the deterministic slots are not left zero: a workspace of their own
        ws = _device_buffer(("workspace", det), dev, m * n * (n_ksplit if det else 1), torch.float32, zero=not det)
        locks = _device_buffer(("counters", det), dev, tiles * tiles_per_program, torch.int32, zero=True)
    else:  # not read (SPLIT is a compile-time False)
        ws = locks = y
    qw = p.qweight if qweight is None else qweight
    args = dict(
        x_ptr=p.x, u_ptr=p.up if p.up is not None else p.x, stride_xm=p.x.stride(0), t_ptr=p.t_tensor if p.t_tensor is not None else y, t_value=p.t_value,
        t_stride_part=p.t_stride_part, qw_ptr=qw, s_ptr=p.scales, z_ptr=p.zeros,
        ws_ptr=ws, lock_ptr=locks, y_ptr=y, clear_ptr=p.clear if p.clear is not None else ws, M=m, N=n, K=k, G=p.group_size, stride_qk=qw.stride(0),
        stride_sg=p.scales.stride(0), stride_ym=y.stride(0), END0=end0, END1=end1, n_ksplit=n_ksplit,
    )
    if scratch:
        args.update(scr_i_ptr=scr_i, scr_x_ptr=scr_x)
    constants = dict(M_P=m_p, KR=k_range, T_MODE=p.t_mode, SILU=p.up is not None, SPLIT=split, DET=p.deterministic,
                     ACC=acc, CLEAR=p.clear is not None,
                     ALIGNED=all(e % span == 0 for e in p.ends), OUT_DTYPE=TL_DTYPE[p.x.dtype], EMULATE=INTERPRET)
    return KernelCall(grid=(tiles, n_ksplit), args=args, constants=constants, y=y,
                      options=launch_options(dev, "gemv"))


# -- jit pieces -----------------------------------------------------------------------------------------------------
@triton.jit
def program_tile(N, END0, END1, SPAN: tl.constexpr, KR: tl.constexpr, ALIGNED: tl.constexpr, HINT: tl.constexpr = True):
    """This program's column span and K-range: (pid_n, pid_k, part, first column, end column of its part, first row).
    Parts end at END0, END1, N; each part's columns are cut into spans of SPAN."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    t0 = tl.cdiv(END0, SPAN)
    t1 = tl.cdiv(END1 - END0, SPAN)
    in1 = pid_n >= t0
    in2 = pid_n >= t0 + t1
    part = in1.to(tl.int32) + in2.to(tl.int32)
    start = tl.where(in2, END1 + (pid_n - t0 - t1) * SPAN, tl.where(in1, END0 + (pid_n - t0) * SPAN, pid_n * SPAN))
    end = tl.where(in2, N, tl.where(in1, END1, END0))
    if ALIGNED and HINT:
        start = tl.multiple_of(start, SPAN)
    return pid_n, pid_k, part, start, end, pid_k * KR


@triton.jit
def tile_qparams(s_ptr, z_ptr, start, end, k0, G, stride_sg, BLOCK_N: tl.constexpr):
    """The tile's columns and the scales / zeros of the group holding rows k0.. (in their own dtype: converted where
    used, so they hold half the registers while the row loop runs); independent of x, issued first."""
    cols = start + tl.arange(0, BLOCK_N)
    n_ok = cols < end
    soff = (k0 // G) * stride_sg + cols
    sc = tl.load(s_ptr + soff, mask=n_ok, other=0.0).to(tl.float32)
    zr = tl.load(z_ptr + soff, mask=n_ok, other=0.0).to(tl.float32)
    return cols, n_ok, sc, zr


@triton.jit
def load_x(x_ptr, u_ptr, offs, mask, SILU: tl.constexpr, X_DTYPE: tl.constexpr):
    """The input at ``offs`` as fp32 (0 where masked off). SILU: silu(gate) * up of the gate at x_ptr and the up at
    u_ptr (same offsets: equal strides), computed and rounded as kernels.silu_mul (``silu_and_mul``), so the value
    and the threshold decision are the ones of the separate SiLU-and-mul launch to the last bit."""
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        uv = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xv = silu_and_mul(xv, uv, X_DTYPE).to(tl.float32)
    return xv


@triton.jit
def above_threshold(xv, t_ptr, t_value, t_stride_part, part, ks, T_MODE: tl.constexpr, K_AXIS: tl.constexpr):
    """|x| > t for a 2-D fp32 tile xv whose input channels ks run along K_AXIS (NaN compares False: dropped).
    T_MODE 0: a python float t_value; 1: a 0-dim (or per-part scalar) tensor; 2: [K] per-input-channel thresholds."""
    if T_MODE == 0:
        act = tl.abs(xv) > t_value
    elif T_MODE == 1:
        t = tl.load(t_ptr + part * t_stride_part).to(tl.float32)
        act = tl.abs(xv) > t
    else:
        t = tl.load(t_ptr + part * t_stride_part + ks).to(tl.float32)
        if K_AXIS == 0:
            act = tl.abs(xv) > t[:, None]
        else:
            act = tl.abs(xv) > t[None, :]
    return act


@triton.jit
def threshold_rows(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0, M,
                   M_P: tl.constexpr, KR: tl.constexpr, T_MODE: tl.constexpr, SILU: tl.constexpr,
                   X_DTYPE: tl.constexpr):
    """x[:, k0 .. k0 + KR] of every batch row (SILU: silu(gate) * up, ``load_x``) and which entries survive |x| > t:
    (mm, m_ok, act, x * act). T_MODE 0: a python float t_value; 1: a 0-dim (or per-part scalar) tensor; 2: [K]
    per-input-channel thresholds. NaN compares False: dropped."""
    mm = tl.arange(0, M_P)
    m_ok = mm < M
    rk = tl.arange(0, KR)
    xv = load_x(x_ptr, u_ptr, mm[:, None] * stride_xm + (k0 + rk)[None, :], m_ok[:, None], SILU, X_DTYPE)
    act = above_threshold(xv, t_ptr, t_value, t_stride_part, part, k0 + rk, T_MODE, 1)
    act = act & m_ok[:, None]
    return mm, m_ok, act, tl.where(act, xv, 0.0)


@triton.jit
def compact_rows(act, xm, mm, k0, part, K, scr_i_ptr, scr_x_ptr, M_P: tl.constexpr, KR: tl.constexpr):
    """The union over the batch of the active rows k0 .. k0 + KR, compacted into the scratch lists (row index and
    the M_P x values per slot) -> (active count, scratch base of this K-range). All KR slots are written: the c
    active rows first, then row k0 with x = 0 (a valid, cached row that adds exactly 0), so a loop may read whole
    steps of slots up to KR without load masks."""
    rk = tl.arange(0, KR)
    any_row = tl.max(act.to(tl.int32), axis=0)
    incl = tl.cumsum(any_row, axis=0)
    c = tl.sum(any_row, axis=0)
    keep = any_row > 0
    slot = tl.where(keep, incl - 1, c + rk - incl)  # active rows in order, then the inactive ones
    ibase = part * K + k0
    tl.store(scr_i_ptr + ibase + slot, tl.where(keep, k0 + rk, k0))
    tl.store(scr_x_ptr + (ibase + slot)[None, :] * M_P + mm[:, None], xm)  # xm is 0 where no batch row is active
    tl.debug_barrier()
    return c, ibase


@triton.jit
def _slot(ws_ptrs, ws_stride_k, i, n_ksplit, out_ok):
    """Workspace slot i (read at the L2: written by other programs), 0 past the last slot."""
    v = tl.load(ws_ptrs + tl.minimum(i, n_ksplit - 1) * ws_stride_k, mask=out_ok, other=0.0, cache_modifier=".cg")
    return tl.where(i < n_ksplit, v, 0.0)


@triton.jit
def reduce_split_k(y, y_ptrs, ws_ptrs, lock_ptr, out_ok, pid_k, n_ksplit, ws_stride_k,
                   SPLIT: tl.constexpr, DET: tl.constexpr, OUT_DTYPE: tl.constexpr,
                   clear_ptrs=None, ACC: tl.constexpr = False, CLEAR: tl.constexpr = False):
    """Not SPLIT: store y. SPLIT: fp32 atomics into a workspace that is zero before the call; the last program of
    the column tile (a counter) reads the sum at the L2, writes y and leaves workspace and counter zero again.
    DET: the partial goes to its own slot (pid_k) and the last program sums the slots in order (bit-reproducible).
    ACC: the workspace is the caller's fp32 output: partials are only added (no counter, no last-program tail, whose
    L2 round trips end every split-K call); its consumer rounds it. CLEAR: the first K-split zeroes `clear_ptrs`."""
    if ACC:
        if CLEAR:
            if pid_k == 0:
                tl.store(clear_ptrs, tl.zeros_like(y), mask=out_ok)
        if SPLIT:
            tl.atomic_add(ws_ptrs, y, mask=out_ok, sem="relaxed")
        else:
            tl.store(ws_ptrs, y, mask=out_ok)
    elif SPLIT:
        if DET:
            tl.store(ws_ptrs + pid_k * ws_stride_k, y, mask=out_ok)
            tl.debug_barrier()
            arrived = tl.atomic_add(lock_ptr, 1, sem="acq_rel")
            if arrived == n_ksplit - 1:
                total = tl.zeros_like(y)
                for i in range(0, n_ksplit, 8):  # 8 slot loads in flight, added in slot order
                    p0 = _slot(ws_ptrs, ws_stride_k, i, n_ksplit, out_ok)
                    p1 = _slot(ws_ptrs, ws_stride_k, i + 1, n_ksplit, out_ok)
                    p2 = _slot(ws_ptrs, ws_stride_k, i + 2, n_ksplit, out_ok)
                    p3 = _slot(ws_ptrs, ws_stride_k, i + 3, n_ksplit, out_ok)
                    p4 = _slot(ws_ptrs, ws_stride_k, i + 4, n_ksplit, out_ok)
                    p5 = _slot(ws_ptrs, ws_stride_k, i + 5, n_ksplit, out_ok)
                    p6 = _slot(ws_ptrs, ws_stride_k, i + 6, n_ksplit, out_ok)
                    p7 = _slot(ws_ptrs, ws_stride_k, i + 7, n_ksplit, out_ok)
                    total = ((((((((total + p0) + p1) + p2) + p3) + p4) + p5) + p6) + p7)
                tl.store(y_ptrs, total.to(OUT_DTYPE), mask=out_ok)
                tl.store(lock_ptr, 0)
        else:
            tl.atomic_add(ws_ptrs, y, mask=out_ok, sem="relaxed")
            tl.debug_barrier()
            arrived = tl.atomic_add(lock_ptr, 1, sem="acq_rel")
            if arrived == n_ksplit - 1:
                total = tl.atomic_add(ws_ptrs, tl.zeros_like(y), mask=out_ok, sem="acquire")  # read at the L2
                tl.store(y_ptrs, total.to(OUT_DTYPE), mask=out_ok)
                tl.store(ws_ptrs, tl.zeros_like(y), mask=out_ok)
                tl.store(lock_ptr, 0)
    else:
        tl.store(y_ptrs, y.to(OUT_DTYPE), mask=out_ok)
