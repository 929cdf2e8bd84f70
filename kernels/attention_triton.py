"""Triton decode attention for grouped-query attention over a static KV cache, read in place.

One launch per layer does what transformers' decode step spreads over ~10 kernels (rotary of q and k, two cache
`index_copy_`, `repeat_kv` copies of the whole cache, the attention, the output `.contiguous()`):

    decode_attention(q, k, v, cos, sin, pos, k_cache, v_cache, workspace, counter, scale) -> out [B, Hq * D]

* q [B, Hq * D], k, v [B, Hkv * D]: the projections of the new token, before rotary (row strides free: they may
  be column slices of one fused q/k/v output);
* cos, sin [L, D]: the rotary tables of every position (the model's own rotary module evaluated once), pos: a
  1-element int64 device tensor, the position of the new token (the same for every row of the batch);
* k_cache, v_cache [B, Hkv, L, D] (a transformers StaticCache layer's tensors): the rotated k and v of the new token
  are written at `pos`, then attention of the rotated q over positions 0..pos.

Grid (B * Hkv, splits): each program takes one KV head and all G = Hq / Hkv query heads that share it (GQA without
copying K/V), and a range of key blocks (split-KV, "flash-decoding"); the G query rows are padded to 16 so both
products run on the tensor cores (`tl.dot`; fp32 models use IEEE fp32 products). The program whose key range holds
`pos` writes the new key and value first. The grid is sized for the longest context (it is fixed once a CUDA graph
captures it); at the current position about SPLIT_FACTOR * sqrt(key blocks) splits work (the others exit at once):
a split's time grows with its blocks, the combination's with the splits. One working split writes the output
itself. With several, partial results (row max, sum, weighted values in fp32) go to `workspace`, and the last
working program of a KV head to finish (an atomic counter per head, reset by that program) combines them and writes
the output, so a layer's attention is one launch. `fused_reduce=False` runs the combination as a second launch
instead (kept for the comparison in benchmarks/decode_glue.py).

Roundings follow transformers' eager code where it rounds: the rotary products and sums are rounded to the model
dtype (as `q * cos + rotate_half(q) * sin` is), the probabilities are rounded to the value dtype before the product
with V; scores, softmax and accumulation are fp32 (eager rounds the scores to bf16 first: this is more exact).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .pdl_triton import launch_options, wait_previous_kernel

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
LOG2E = 1.4426950408889634
TARGET_PROGRAMS = 2  # programs per multiprocessor the split count aims at
SPLIT_FACTOR = 2.0  # working splits per sqrt(key blocks) at the current position (benchmarks/decode_attention.py)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_shape(batch: int, kv_heads: int, max_length: int, head_dim: int, device: torch.device) -> tuple[int, int]:
    """(block_n, splits) for a cache of `max_length` positions: enough programs to fill the GPU at the longest
    context (the grid is fixed when a CUDA graph captures it; at a shorter one the kernel works with fewer splits,
    `_working_splits`)."""
    block_n = 64 if head_dim <= 128 else 32
    blocks = triton.cdiv(max_length, block_n)
    sms = _multiprocessors(device.index or 0) if device.type == "cuda" else 8
    return block_n, max(1, min(blocks, triton.cdiv(TARGET_PROGRAMS * sms, batch * kv_heads)))


def workspace_size(batch: int, q_heads: int, kv_heads: int, max_length: int, head_dim: int, device: torch.device) -> int:
    """fp32 elements of the partial-result workspace one layer's call needs (reused by every layer)."""
    splits = launch_shape(batch, kv_heads, max_length, head_dim, device)[1]
    return batch * q_heads * splits * (head_dim + 2)


@triton.jit
def _rotate(x, xp, c, s, sign, DTYPE: tl.constexpr):
    # x * cos + rotate_half(x) * sin, rotate_half(x)[d] = sign[d] * x[(d + D/2) % D]; each product and the sum
    # rounded to DTYPE like the eager code
    return ((x * c).to(DTYPE).to(tl.float32) + (sign * xp * s).to(DTYPE).to(tl.float32)).to(DTYPE)


@triton.jit
def _working_splits(pos, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, SPLIT_FACTOR: tl.constexpr):
    # (splits that work, key blocks per split) at position pos: about SPLIT_FACTOR * sqrt(blocks) of them, at most
    # SPLITS, each non-empty. A split's time grows with its blocks and the combination's with the splits, so their
    # sum is least near sqrt(blocks) splits (benchmarks/decode_attention.py measured the factor)
    blocks = pos // BLOCK_N + 1
    want = tl.minimum(tl.ceil(SPLIT_FACTOR * tl.sqrt(blocks.to(tl.float32))).to(tl.int32), SPLITS)
    per = tl.cdiv(blocks, tl.maximum(want, 1))
    return tl.cdiv(blocks, per), per


@triton.jit
def _reduce_head(ws_ptr, out_ptr, row0, g, gok, d, rows, working,
                 SPLITS: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr, CACHE: tl.constexpr):
    # combine the partial results of the first `working` splits for the query rows row0 + g (g < G); out_ptr: their
    # output rows [GP, 1]
    m_base = ws_ptr + rows * SPLITS * D
    l_base = m_base + rows * SPLITS
    r = row0 + g
    m_max = tl.full(g.shape, float("-inf"), tl.float32)
    for sp in range(working):
        m_s = tl.load(m_base + r * SPLITS + sp, mask=gok, other=float("-inf"), cache_modifier=CACHE)
        m_max = tl.maximum(m_max, m_s)
    total = tl.zeros(g.shape, tl.float32)
    acc = tl.zeros((g.shape[0], D), tl.float32)
    for sp in range(working):
        m_s = tl.load(m_base + r * SPLITS + sp, mask=gok, other=float("-inf"), cache_modifier=CACHE)
        l_s = tl.load(l_base + r * SPLITS + sp, mask=gok, other=0.0, cache_modifier=CACHE)
        w = tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - m_max))
        a = tl.load(ws_ptr + (r * SPLITS + sp)[:, None] * D + d[None, :], mask=gok[:, None], other=0.0,
                    cache_modifier=CACHE)
        total += w * l_s
        acc += w[:, None] * a
    out = acc / tl.where(gok, total, 1.0)[:, None]
    tl.store(out_ptr + d[None, :], out.to(DTYPE), mask=gok[:, None])


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, out_ptr, ws_ptr, cnt_ptr,
    stride_qb, stride_kb, stride_vb, stride_cos, stride_sin,
    stride_cb, stride_ch, stride_cl, stride_vcb, stride_vch, stride_vcl, stride_ob,
    rows, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, SPLIT_FACTOR: tl.constexpr,
    DTYPE: tl.constexpr, PRECISION: tl.constexpr, FUSED_REDUCE: tl.constexpr, DOT_F32: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    wait_previous_kernel(PDL > 0)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    pos = tl.load(pos_ptr)
    working, per = _working_splits(pos, BLOCK_N, SPLITS, SPLIT_FACTOR)
    if split < working:
        n = pos + 1
        d = tl.arange(0, D)
        partner = (d + D // 2) % D
        sign = tl.where(d < D // 2, -1.0, 1.0)
        c = tl.load(cos_ptr + pos * stride_cos + d).to(tl.float32)
        s = tl.load(sin_ptr + pos * stride_sin + d).to(tl.float32)

        lo = split * per * BLOCK_N
        hi = tl.minimum(lo + per * BLOCK_N, n)
        if split == working - 1:
            # the new token's key (rotated) and value go into the cache before this program reads its keys
            kb = k_ptr + b * stride_kb + hk * D
            k_new = _rotate(tl.load(kb + d).to(tl.float32), tl.load(kb + partner).to(tl.float32), c, s, sign, DTYPE)
            tl.store(kc_ptr + b * stride_cb + hk * stride_ch + pos * stride_cl + d, k_new)
            v_new = tl.load(v_ptr + b * stride_vb + hk * D + d)
            tl.store(vc_ptr + b * stride_vcb + hk * stride_vch + pos * stride_vcl + d, v_new)
        tl.debug_barrier()

        g = tl.arange(0, GP)
        gok = g < G
        qb = q_ptr + b * stride_qb + (hk * G + g)[:, None] * D
        q = tl.load(qb + d[None, :], mask=gok[:, None], other=0.0).to(tl.float32)
        qp = tl.load(qb + partner[None, :], mask=gok[:, None], other=0.0).to(tl.float32)
        q = _rotate(q, qp, c[None, :], s[None, :], sign[None, :], DTYPE)

        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        k_base = kc_ptr + b * stride_cb + hk * stride_ch
        v_base = vc_ptr + b * stride_vcb + hk * stride_vch
        for start in range(lo, hi, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            ok = offs < hi
            k = tl.load(k_base + offs[:, None] * stride_cl + d[None, :], mask=ok[:, None], other=0.0)
            if DOT_F32:  # the Triton interpreter's tl.dot mishandles bf16 operands (CPU tests only)
                scores = tl.dot(q.to(tl.float32), tl.trans(k).to(tl.float32), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            scores = scores * qk_scale  # log2 units
            scores = tl.where(ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs[:, None] * stride_vcl + d[None, :], mask=ok[:, None], other=0.0)
            if DOT_F32:
                pv = tl.dot(p.to(DTYPE).to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(DTYPE), v, input_precision=PRECISION)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        row0 = b * (HKV * G) + hk * G
        out_rows = out_ptr + b * stride_ob + (hk * G + g)[:, None] * D
        if working == 1:  # one split holds every key: no partial results
            tl.store(out_rows + d[None, :], (acc / tl.where(gok, l_i, 1.0)[:, None]).to(DTYPE), mask=gok[:, None])
        else:
            r = row0 + g
            m_base = ws_ptr + rows * SPLITS * D
            l_base = m_base + rows * SPLITS
            tl.store(ws_ptr + (r * SPLITS + split)[:, None] * D + d[None, :], acc, mask=gok[:, None])
            tl.store(m_base + r * SPLITS + split, m_i, mask=gok)
            tl.store(l_base + r * SPLITS + split, l_i, mask=gok)
            if FUSED_REDUCE:
                tl.debug_barrier()
                arrived = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
                if arrived == working - 1:  # the last working program of this KV head combines the partial results
                    tl.store(cnt_ptr + bh, 0)
                    _reduce_head(ws_ptr, out_rows, row0, g, gok, d, rows, working, SPLITS, D, DTYPE, ".cg")


@triton.jit
def _attention_combine_kernel(ws_ptr, out_ptr, pos_ptr, stride_ob, rows,
                    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                    DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_FACTOR: tl.constexpr, PDL: tl.constexpr = 0):
    wait_previous_kernel(PDL > 0)
    working, _ = _working_splits(tl.load(pos_ptr), BLOCK_N, SPLITS, SPLIT_FACTOR)
    if working > 1:  # (one working split wrote the output itself)
        bh = tl.program_id(0)
        b = bh // HKV
        hk = bh % HKV
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        _reduce_head(ws_ptr, out_ptr + b * stride_ob + (hk * G + g)[:, None] * D, b * (HKV * G) + hk * G,
                     g, g < G, d, rows, working, SPLITS, D, DTYPE, "")


def decode_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, k_cache: Tensor,
                     v_cache: Tensor, workspace: Tensor, counter: Tensor, scale: float, fused_reduce: bool = True,
                     split_factor: float | None = None) -> Tensor:
    """See the module docstring; returns out [B, Hq * D] in the cache dtype (contiguous). ``split_factor``: working
    splits per sqrt(key blocks) (default SPLIT_FACTOR, read at the call)."""
    b, hkv, length, d = k_cache.shape
    hq = q.shape[1] // d
    g = hq // hkv
    block_n, splits = launch_shape(b, hkv, length, d, k_cache.device)
    split_factor = float(SPLIT_FACTOR if split_factor is None else split_factor)
    if not split_factor > 0:
        raise ValueError(f"decode_attention: split_factor must be > 0, got {split_factor}")
    rows = b * hq
    if workspace.numel() < rows * splits * (d + 2) or counter.numel() < b * hkv:
        raise ValueError("decode_attention: workspace or counter too small for this call (see workspace_size)")
    out = torch.empty(b, hq * d, dtype=k_cache.dtype, device=k_cache.device)
    dtype = _TL_DTYPES[k_cache.dtype]
    gp = max(16, triton.next_power_of_2(g))
    pdl = launch_options(k_cache.device, "attention")
    _decode_attention_kernel[(b * hkv, splits)](
        q, k, v, cos, sin, pos, k_cache, v_cache, out, workspace, counter,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), rows, float(scale) * LOG2E,
        HKV=hkv, G=g, GP=gp, D=d, BLOCK_N=block_n, SPLITS=splits, SPLIT_FACTOR=split_factor, DTYPE=dtype,
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32", FUSED_REDUCE=fused_reduce,
        DOT_F32=os.environ.get("TRITON_INTERPRET") == "1" and not k_cache.is_cuda, num_warps=4, num_stages=2, **pdl,
    )
    if not fused_reduce:
        _attention_combine_kernel[(b * hkv,)](workspace, out, pos, out.stride(0), rows, HKV=hkv, G=g, GP=gp, D=d,
                                              SPLITS=splits, DTYPE=dtype, BLOCK_N=block_n, SPLIT_FACTOR=split_factor,
                                              num_warps=4, **pdl)
    return out
