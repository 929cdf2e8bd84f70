"""Triton kernels for the elementwise parts of a Llama-family decoder layer: RMSNorm, SiLU-and-multiply, rotary.

Why: at batch 1 a decode step of the transformers Llama layer runs ~40 kernels, of which the linear products are
five; RMSNorm alone is ~7 small kernels (cast, pow, mean, add, rsqrt, mul, cast, mul), rotary ~10 (slices, neg,
cat, mul, add for q and k) and SiLU-and-mul 2. Each costs ~2 us of launch and tail even inside a CUDA graph,
which on the H200 is as much as the int4 weights of the whole layer take to stream (docs/bench.md). Each op
here is one launch.

Every kernel reproduces the transformers computation including its intermediate roundings (fp32 math, rounded to
the activation dtype wherever the eager code rounds), so results match the eager modules to the last bit or one
rounding step (rsqrt / exp approximations; the tests state the tolerance). The pure-torch twins are in
:mod:`kernels.reference` (``rms_norm_ref``, ``silu_mul_ref``, ``rotary_ref``).

    rms_norm   x [M, N] (row stride free, unit column stride), weight [N] -> y [M, N] in promote(x, weight)
               y = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)
    silu_mul   gate, up [M, N] (row strides free) -> silu(gate).to(dtype) * up, in gate's dtype
    rotary     q [B, Hq, S, D], k [B, Hk, S, D] (any strides, unit stride along D), cos, sin [B, S, D]
               -> q * cos + rotate_half(q) * sin (and k), each product rounded like the eager code
    add_rms_norm  x [M, N], residual [M, N] (updated in place), weight [N] -> y [M, N]
               residual <- (residual + x).to(dtype); y = rms_norm(residual): the decoder layer's residual add and
               the next norm in one launch (one read of each, one write of each)
    greedy_advance  logits [B, V] -> the decode loop's tail: argmax (lowest index on ties, like torch), EOS
               handling, token / output / position updates, in two launches (a split argmax, then one program)

The custom ops that call these launchers, with their fakes, are in :mod:`kernels.elementwise`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .pdl_triton import launch_options, wait_previous_kernel

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _rows(t: Tensor, n: int) -> Tensor:
    """t [..., n] as [M, n] with a unit column stride (a view when it can be: row strides are passed to the kernels)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, stride_x, stride_y, N, eps,
                     X_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    wait_previous_kernel(PDL == 1)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)  # a parameter: before the wait (PDL 2)
    wait_previous_kernel(PDL == 2)
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / N
    normed = (x * (1.0 / tl.sqrt(mean_sq + eps))).to(X_DTYPE).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * normed).to(Y_DTYPE), mask=ok)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., N] -> RMSNorm(x) * weight, one launch (one program per row)."""
    n = x.shape[-1]
    x2 = _rows(x, n)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, weight.contiguous(), y, x2.stride(0), y.stride(0), n, float(eps),
            X_DTYPE=_TL_DTYPES[x.dtype], Y_DTYPE=_TL_DTYPES[out_dtype], BLOCK=block,
            num_warps=min(16, max(1, block // 256)), **launch_options(x.device, "elementwise"),
        )
    return y.reshape(*x.shape[:-1], n)


@triton.jit
def silu_and_mul(g, u, DTYPE: tl.constexpr):
    """silu(g) * u of fp32 values g, u (loaded from DTYPE), rounded like the eager `F.silu(gate) * up` in DTYPE: the
    SiLU rounded to DTYPE, then the product. The one definition of these roundings: the sparse GEMV's `SILU` form
    (kernels/gemv_common.py ``load_x``) computes its input with it too, so fusing changes no bit."""
    act = (g / (1.0 + tl.exp(-g))).to(DTYPE).to(tl.float32)
    return (act * u).to(DTYPE)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, stride_g, stride_u, stride_y, N,
                     DTYPE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    wait_previous_kernel(PDL > 0)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, silu_and_mul(g, u, DTYPE), mask=ok)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for gate, up [..., N] of one dtype (e.g. column slices of a fused gate/up output)."""
    n = gate.shape[-1]
    g2, u2 = _rows(gate, n), _rows(up, n)
    y = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    if g2.shape[0]:
        block = min(4096, triton.next_power_of_2(n))
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(n, block))](
            g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), n,
            DTYPE=_TL_DTYPES[gate.dtype], BLOCK=block, num_warps=min(8, max(1, block // 256)),
            **launch_options(gate.device, "elementwise"),
        )
    return y.reshape(gate.shape)


@triton.jit
def _rotate_head(xb, ob, cb, sb, HALF: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    # the head vector is split in halves x1 | x2: out1 = x1 * cos1 - x2 * sin1, out2 = x2 * cos2 + x1 * sin2,
    # every product and the sum rounded to DTYPE like the eager `q * cos + rotate_half(q) * sin`
    d = tl.arange(0, BLOCK)
    ok = d < HALF
    x1 = tl.load(xb + d, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(xb + HALF + d, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cb + d, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cb + HALF + d, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sb + d, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sb + HALF + d, mask=ok, other=0.0).to(tl.float32)
    o1 = (x1 * c1).to(DTYPE).to(tl.float32) + (-x2 * s1).to(DTYPE).to(tl.float32)
    o2 = (x2 * c2).to(DTYPE).to(tl.float32) + (x1 * s2).to(DTYPE).to(tl.float32)
    tl.store(ob + d, o1.to(DTYPE), mask=ok)
    tl.store(ob + HALF + d, o2.to(DTYPE), mask=ok)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, S, HQ,
                   sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s,
                   sc_b, sc_s, ss_b, ss_s,
                   HALF: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    wait_previous_kernel(PDL > 0)
    # one program per (b, s) and head of q followed by the heads of k: q and k in one launch
    bs = tl.program_id(0)
    h = tl.program_id(1)
    b = bs // S
    s = bs % S
    cb = cos_ptr + b * sc_b + s * sc_s
    sb = sin_ptr + b * ss_b + s * ss_s
    if h < HQ:
        _rotate_head(q_ptr + b * sq_b + h * sq_h + s * sq_s, qo_ptr + b * sqo_b + h * sqo_h + s * sqo_s,
                     cb, sb, HALF, DTYPE, BLOCK)
    else:
        hk = h - HQ
        _rotate_head(k_ptr + b * sk_b + hk * sk_h + s * sk_s, ko_ptr + b * sko_b + hk * sko_h + s * sko_s,
                     cb, sb, HALF, DTYPE, BLOCK)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of q [B, Hq, S, D] and k [B, Hk, S, D] (one dtype, unit stride along D) with
    cos, sin [B, S, D] (they may broadcast over B with stride 0), one launch for both. The outputs keep the memory
    layout of q and k (e.g. transposed [B, S, H, D] views), as the eager ops do."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if b * s:
        half = d // 2
        _rotary_kernel[(b * s, hq + hk)](
            q, k, q_out, k_out, cos, sin, s, hq,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
            cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            HALF=half, DTYPE=_TL_DTYPES[q.dtype], BLOCK=triton.next_power_of_2(half), num_warps=1,
            **launch_options(q.device, "elementwise"),
        )
    return q_out, k_out


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, stride_x, stride_r, stride_y, N, eps,
                         X_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    wait_previous_kernel(PDL == 1)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)  # a parameter: before the wait (PDL 2)
    wait_previous_kernel(PDL == 2)
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(X_DTYPE).to(tl.float32)  # float32 sums round
    r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    h = (r + x).to(X_DTYPE)  # `residual + hidden_states` in the activation dtype
    tl.store(r_ptr + row * stride_r + cols, h, mask=ok)
    h = h.to(tl.float32)
    mean_sq = tl.sum(h * h, axis=0) / N
    normed = (h * (1.0 / tl.sqrt(mean_sq + eps))).to(X_DTYPE).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * normed).to(Y_DTYPE), mask=ok)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
    """residual <- residual + x (in place, rounded to its dtype); returns RMSNorm(residual) * weight. x, residual
    [..., N] of one dtype (or x float32 sums, rounded to residual's dtype first); residual must have a unit column
    stride (its rows are written in place)."""
    n = x.shape[-1]
    x2 = _rows(x, n)
    r2 = residual.view(-1, n)
    out_dtype = torch.promote_types(residual.dtype, weight.dtype)
    y = torch.empty(r2.shape, dtype=out_dtype, device=x.device)
    if r2.shape[0]:
        block = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(r2.shape[0],)](
            x2, r2, weight.contiguous(), y, x2.stride(0), r2.stride(0), y.stride(0), n, float(eps),
            X_DTYPE=_TL_DTYPES[residual.dtype], Y_DTYPE=_TL_DTYPES[out_dtype], BLOCK=block,
            num_warps=min(16, max(1, block // 256)), **launch_options(x.device, "elementwise"),
        )
    return y.reshape(residual.shape)


ARGMAX_CHUNK = 4096


@triton.jit
def _argmax_chunk_kernel(logits_ptr, val_ptr, idx_ptr, stride_l, V, CHUNKS, CHUNK: tl.constexpr, PDL: tl.constexpr = 0):
    wait_previous_kernel(PDL > 0)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + row * stride_l + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    best = tl.max(x, axis=0)
    first = tl.min(tl.where(x == best, offs, V), axis=0)  # the lowest index holding the maximum
    tl.store(val_ptr + row * CHUNKS + chunk, best)
    tl.store(idx_ptr + row * CHUNKS + chunk, first)


@triton.jit
def _advance_kernel(val_ptr, idx_ptr, tokens_ptr, finished_ptr, eos_ptr, out_ptr, pos_ptr, stride_t, stride_o,
                    B, V, CHUNKS, CP: tl.constexpr, PDL: tl.constexpr = 0):
    wait_previous_kernel(PDL > 0)
    # one program for the whole batch, so the position is advanced after every row has read it
    pos = tl.load(pos_ptr)
    eos = tl.load(eos_ptr)
    c = tl.arange(0, CP)
    for b in range(B):
        vals = tl.load(val_ptr + b * CHUNKS + c, mask=c < CHUNKS, other=float("-inf"))
        idxs = tl.load(idx_ptr + b * CHUNKS + c, mask=c < CHUNKS, other=V)
        best = tl.max(vals, axis=0)
        nxt = tl.min(tl.where(vals == best, idxs, V), axis=0).to(tl.int64)
        done = tl.load(finished_ptr + b) != 0
        nxt = tl.where(done, eos, nxt)
        tl.store(finished_ptr + b, (done | (nxt == eos)).to(tl.int8))
        tl.store(tokens_ptr + b * stride_t, nxt)
        tl.store(out_ptr + b * stride_o + pos + 1, nxt)
    tl.store(pos_ptr, pos + 1)


def greedy_advance(logits: Tensor, tokens: Tensor, finished: Tensor, eos: Tensor, out: Tensor, pos: Tensor,
                   workspace: Tensor) -> None:
    """The decode loop's tail in two launches (see kernels.elementwise.greedy_advance for the semantics).
    workspace: float32, at least 2 * B * ceil(V / ARGMAX_CHUNK) elements."""
    b, v = logits.shape
    chunks = triton.cdiv(v, ARGMAX_CHUNK)
    if workspace.numel() < 2 * b * chunks:
        raise ValueError("greedy_advance: workspace too small (need 2 * B * ceil(V / 4096) float32)")
    vals = workspace[: b * chunks]
    idxs = workspace[b * chunks : 2 * b * chunks].view(torch.int32)
    pdl = launch_options(logits.device, "elementwise")
    _argmax_chunk_kernel[(b, chunks)](logits, vals, idxs, logits.stride(0), v, chunks, CHUNK=ARGMAX_CHUNK, num_warps=4,
                                      **pdl)
    _advance_kernel[(1,)](vals, idxs, tokens, finished.view(torch.int8), eos, out, pos, tokens.stride(0), out.stride(0),
                          b, v, chunks, CP=triton.next_power_of_2(chunks), num_warps=1, **pdl)
