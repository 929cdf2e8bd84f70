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
products run on the tensor cores (`tl.dot`; fp32 models use IEEE fp32 products). The grid is sized for the longest
context (it is fixed once a CUDA graph captures it); at the current position about `split_factor` * sqrt(key blocks)
splits work (the others exit at once): a split's time grows with its blocks, the combination's with the splits. One
working split writes the output itself. With several, partial results (row max, sum, weighted values in fp32) go to
`workspace`, and the last working program of a KV head to finish (an atomic counter per head, reset by that program)
combines them and writes the output, so a layer's attention is one launch. `fused_reduce=False` runs the combination
as a second launch instead (kept for the comparison in benchmarks/decode_glue.py).

The launch choices are data (kernels/dispatch.py `AttentionShape`, the GPU table's `attention` entry). A call is a
chain of dependent round trips more than bytes at short context (docs/kernels.md "Decode attention at short
context"); `registers` shortens it: every load that does not need the previous kernel (the rotary row, the first
block of cached keys and values: positions < pos, written by earlier steps) is issued first, all together, before
the PDL wait in mode 2, and the new token's score and value come from registers (its key and value are written to
the cache for later steps, never read back). Without it (the kernel before), the program whose key range holds `pos`
writes the new key and value, a barrier, and reads them back with their block. `wide` loads every split's partial
results at once in the combination instead of loops of dependent loads.

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

from .dispatch import AttentionShape, pick_attention
from .pdl_triton import launch_options, wait_previous_kernel

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
LOG2E = 1.4426950408889634
TARGET_PROGRAMS = 2  # programs per multiprocessor the split count aims at
COMBINE_CHUNK = 8  # splits whose partial results the wide combination loads at once


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_n(head_dim: int, shape: AttentionShape) -> int:
    return max(16, shape.block_n * 128 // max(head_dim, 128))


def launch_shape(batch: int, kv_heads: int, max_length: int, head_dim: int, device: torch.device,
                 shape: AttentionShape | None = None) -> tuple[int, int]:
    """(block_n, splits) for a cache of `max_length` positions: enough programs to fill the GPU at the longest
    context (the grid is fixed when a CUDA graph captures it; at a shorter one the kernel works with fewer splits,
    `_working_splits`). ``shape``: the launch choices (default: the device's, kernels/dispatch.py)."""
    block_n = _block_n(head_dim, shape or pick_attention(device))
    blocks = triton.cdiv(max_length, block_n)
    sms = _multiprocessors(device.index or 0) if device.type == "cuda" else 8
    return block_n, max(1, min(blocks, triton.cdiv(TARGET_PROGRAMS * sms, batch * kv_heads)))


def workspace_size(batch: int, q_heads: int, kv_heads: int, max_length: int, head_dim: int, device: torch.device,
                   shape: AttentionShape | None = None) -> int:
    """fp32 elements of the partial-result workspace one layer's call needs (reused by every layer)."""
    splits = launch_shape(batch, kv_heads, max_length, head_dim, device, shape)[1]
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
def _attend(q, kt, v, ok, m_i, l_i, acc, qk_scale, DTYPE: tl.constexpr, PRECISION: tl.constexpr,
            DOT_F32: tl.constexpr):
    # one block of keys kt [D, BLOCK_N] (transposed; ok: which hold a key) and values v [BLOCK_N, D] into the online
    # softmax (log2 units)
    if DOT_F32:  # the Triton interpreter's tl.dot mishandles bf16 operands (CPU tests only)
        scores = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
    else:
        scores = tl.dot(q, kt, input_precision=PRECISION)
    scores = tl.where(ok[None, :], scores * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    if DOT_F32:
        pv = tl.dot(p.to(DTYPE).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(DTYPE), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + pv


@triton.jit
def _reduce_head(ws_ptr, out_ptr, row0, g, gok, d, rows, working,
                 SPLITS: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr, CACHE: tl.constexpr):
    # combine the partial results of the first `working` splits for the query rows row0 + g (g < G); out_ptr: their
    # output rows [GP, 1]. Loops of dependent loads (one split after another; `_reduce_head_wide` loads them at once)
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
def _reduce_head_wide(ws_ptr, out_ptr, row0, d, rows, working, G: tl.constexpr, GC: tl.constexpr,
                      SC: tl.constexpr, SPLITS: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr,
                      CACHE: tl.constexpr):
    # the same combination with the partial results of SC splits loaded at once ([GC, SC] maxima and sums,
    # [GC, SC, D] weighted values: one round trip per SC splits), rescaled online across chunks; out_ptr: the output
    # row of this KV head's first query head (its G rows are consecutive)
    gc = tl.arange(0, GC)
    gok = gc < G
    sc = tl.arange(0, SC)
    m_base = ws_ptr + rows * SPLITS * D
    l_base = m_base + rows * SPLITS
    m_run = tl.full((GC,), float("-inf"), tl.float32)
    total = tl.zeros((GC,), tl.float32)
    acc = tl.zeros((GC, D), tl.float32)
    for c0 in range(0, working, SC):
        sp = c0 + sc
        ok = gok[:, None] & (sp < working)[None, :]
        idx = (row0 + gc)[:, None] * SPLITS + sp[None, :]
        m_s = tl.load(m_base + idx, mask=ok, other=float("-inf"), cache_modifier=CACHE)
        l_s = tl.load(l_base + idx, mask=ok, other=0.0, cache_modifier=CACHE)
        a = tl.load(ws_ptr + idx[:, :, None] * D + d[None, None, :], mask=ok[:, :, None], other=0.0,
                    cache_modifier=CACHE)
        m_new = tl.maximum(m_run, tl.max(m_s, axis=1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows without a split (padding): every weight 0
        alpha = tl.exp2(m_run - base)
        w = tl.exp2(m_s - base[:, None])
        total = total * alpha + tl.sum(w * l_s, axis=1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * a, axis=1)
        m_run = m_new
    out = acc / tl.where(gok, total, 1.0)[:, None]
    tl.store(out_ptr + gc[:, None] * D + d[None, :], out.to(DTYPE), mask=gok[:, None])


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, out_ptr, ws_ptr, cnt_ptr,
    stride_qb, stride_kb, stride_vb, stride_cos, stride_sin,
    stride_cb, stride_ch, stride_cl, stride_vcb, stride_vch, stride_vcl, stride_ob,
    rows, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, SPLIT_FACTOR: tl.constexpr,
    DTYPE: tl.constexpr, PRECISION: tl.constexpr, FUSED_REDUCE: tl.constexpr, DOT_F32: tl.constexpr,
    REGISTERS: tl.constexpr, WIDE: tl.constexpr, GC: tl.constexpr, SC: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    # PDL 1: wait first. PDL 2 (REGISTERS only): the position, the rotary row and the cached keys and values
    # (positions < pos: written by earlier steps, not by the kernel this one may overlap) are loaded before the wait;
    # q, k, v (the previous kernel's output) after it
    wait_previous_kernel(PDL == 1)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    pos = tl.load(pos_ptr)
    working, per = _working_splits(pos, BLOCK_N, SPLITS, SPLIT_FACTOR)
    if split < working:
        d = tl.arange(0, D)
        partner = (d + D // 2) % D
        sign = tl.where(d < D // 2, -1.0, 1.0)
        g = tl.arange(0, GP)
        gok = g < G
        c = tl.load(cos_ptr + pos * stride_cos + d).to(tl.float32)
        s = tl.load(sin_ptr + pos * stride_sin + d).to(tl.float32)
        lo = split * per * BLOCK_N
        last = split == working - 1  # its key range holds pos
        k_base = kc_ptr + b * stride_cb + hk * stride_ch
        v_base = vc_ptr + b * stride_vcb + hk * stride_vch
        kb = k_ptr + b * stride_kb + hk * D
        kc_new = kc_ptr + b * stride_cb + hk * stride_ch + pos * stride_cl + d
        vc_new = vc_ptr + b * stride_vcb + hk * stride_vch + pos * stride_vcl + d
        qb = q_ptr + b * stride_qb + (hk * G + g)[:, None] * D
        if REGISTERS:
            # every load that does not need the previous kernel first, all in flight together: the keys transposed
            # ([D, BLOCK_N], the product's operand as it is: triton moves a transposition next to its load, with a
            # shared-memory round trip and barriers that would hold back every later load), the rotary row as
            # [GP, D] rows in q's layout (no layout conversion either)
            hi = tl.minimum(lo + per * BLOCK_N, pos)  # the cached keys of this split
            offs = lo + tl.arange(0, BLOCK_N)
            ok = offs < hi
            kt0 = tl.load(k_base + offs[None, :] * stride_cl + d[:, None], mask=ok[None, :], other=0.0)
            v0 = tl.load(v_base + offs[:, None] * stride_vcl + d[None, :], mask=ok[:, None], other=0.0)
            row = 0 * g[:, None] + d[None, :]
            c2 = tl.load(cos_ptr + pos * stride_cos + row).to(tl.float32)
            s2 = tl.load(sin_ptr + pos * stride_sin + row).to(tl.float32)
            prow = (row + D // 2) % D
            sign2 = tl.where(row < D // 2, -1.0, 1.0)
            wait_previous_kernel(PDL == 2)
            q = tl.load(qb + d[None, :], mask=gok[:, None], other=0.0).to(DTYPE).to(tl.float32)
            qp = tl.load(qb + partner[None, :], mask=gok[:, None], other=0.0).to(DTYPE).to(tl.float32)
            q = _rotate(q, qp, c2, s2, sign2, DTYPE)
            mine = split + 0 * row == working - 1  # the new token's key and value (the last split loads them)
            k_new = _rotate(tl.load(kb + row, mask=mine, other=0.0).to(DTYPE).to(tl.float32),
                            tl.load(kb + prow, mask=mine, other=0.0).to(DTYPE).to(tl.float32), c2, s2, sign2, DTYPE)
            v_new = tl.load(v_ptr + b * stride_vb + hk * D + row, mask=mine, other=0.0).to(DTYPE)
            once = mine & (g[:, None] == 0)
            tl.store(kc_new + 0 * g[:, None], k_new, mask=once)
            tl.store(vc_new + 0 * g[:, None], v_new, mask=once)
            # the new token first: score q . k_new (exact products, fp32 sum, as the tensor cores), probability 1
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * qk_scale
            m_i = tl.where(last, s_new, float("-inf"))
            l_i = tl.where(last, 1.0, 0.0) + tl.zeros((GP,), tl.float32)
            acc = tl.where(mine, v_new.to(tl.float32), 0.0)
            m_i, l_i, acc = _attend(q, kt0, v0, ok, m_i, l_i, acc, qk_scale, DTYPE, PRECISION, DOT_F32)
            for start in range(lo + BLOCK_N, hi, BLOCK_N):
                offs = start + tl.arange(0, BLOCK_N)
                ok = offs < hi
                kt = tl.load(k_base + offs[None, :] * stride_cl + d[:, None], mask=ok[None, :], other=0.0)
                v = tl.load(v_base + offs[:, None] * stride_vcl + d[None, :], mask=ok[:, None], other=0.0)
                m_i, l_i, acc = _attend(q, kt, v, ok, m_i, l_i, acc, qk_scale, DTYPE, PRECISION, DOT_F32)
        else:  # the kernel before issue 13's short-context round
            n = pos + 1
            hi = tl.minimum(lo + per * BLOCK_N, n)
            if last:
                # the new token's key (rotated) and value go into the cache before this program reads its keys
                k_new = _rotate(tl.load(kb + d).to(DTYPE).to(tl.float32),
                                tl.load(kb + partner).to(DTYPE).to(tl.float32), c, s, sign, DTYPE)
                tl.store(kc_new, k_new)
                tl.store(vc_new, tl.load(v_ptr + b * stride_vb + hk * D + d).to(DTYPE))
            tl.debug_barrier()
            q = tl.load(qb + d[None, :], mask=gok[:, None], other=0.0).to(DTYPE).to(tl.float32)
            qp = tl.load(qb + partner[None, :], mask=gok[:, None], other=0.0).to(DTYPE).to(tl.float32)
            q = _rotate(q, qp, c[None, :], s[None, :], sign[None, :], DTYPE)
            m_i = tl.full((GP,), float("-inf"), tl.float32)
            l_i = tl.zeros((GP,), tl.float32)
            acc = tl.zeros((GP, D), tl.float32)
            for start in range(lo, hi, BLOCK_N):
                offs = start + tl.arange(0, BLOCK_N)
                ok = offs < hi
                k = tl.load(k_base + offs[:, None] * stride_cl + d[None, :], mask=ok[:, None], other=0.0)
                if DOT_F32:
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
        out_head = out_ptr + b * stride_ob + hk * G * D  # output row of this KV head's first query head
        out_rows = out_head + g[:, None] * D
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
                    if WIDE:
                        _reduce_head_wide(ws_ptr, out_head, row0, d, rows, working, G, GC, SC, SPLITS, D, DTYPE,
                                          ".cg")
                    else:
                        _reduce_head(ws_ptr, out_rows, row0, g, gok, d, rows, working, SPLITS, D, DTYPE, ".cg")


@triton.jit
def _attention_combine_kernel(ws_ptr, out_ptr, pos_ptr, stride_ob, rows,
                              HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                              SPLITS: tl.constexpr, DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
                              SPLIT_FACTOR: tl.constexpr, WIDE: tl.constexpr, GC: tl.constexpr, SC: tl.constexpr,
                              PDL: tl.constexpr = 0):
    wait_previous_kernel(PDL > 0)
    working, _ = _working_splits(tl.load(pos_ptr), BLOCK_N, SPLITS, SPLIT_FACTOR)
    if working > 1:  # (one working split wrote the output itself)
        bh = tl.program_id(0)
        b = bh // HKV
        hk = bh % HKV
        d = tl.arange(0, D)
        out_head = out_ptr + b * stride_ob + hk * G * D
        if WIDE:
            _reduce_head_wide(ws_ptr, out_head, b * (HKV * G) + hk * G, d, rows, working, G, GC, SC, SPLITS, D,
                              DTYPE, "")
        else:
            g = tl.arange(0, GP)
            _reduce_head(ws_ptr, out_head + g[:, None] * D, b * (HKV * G) + hk * G, g, g < G, d, rows, working,
                         SPLITS, D, DTYPE, "")


def decode_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, k_cache: Tensor,
                     v_cache: Tensor, workspace: Tensor, counter: Tensor, scale: float, fused_reduce: bool = True,
                     shape: AttentionShape | None = None) -> Tensor:
    """See the module docstring; returns out [B, Hq * D] in the cache dtype (contiguous). ``shape``: the launch
    choices (default: the device's, kernels/dispatch.py ``pick_attention``); the workspace must be sized for it."""
    b, hkv, length, d = k_cache.shape
    hq = q.shape[1] // d
    g = hq // hkv
    shape = shape or pick_attention(k_cache.device)
    block_n, splits = launch_shape(b, hkv, length, d, k_cache.device, shape)
    rows = b * hq
    if workspace.numel() < rows * splits * (d + 2) or counter.numel() < b * hkv:
        raise ValueError("decode_attention: workspace or counter too small for this call (see workspace_size)")
    out = torch.empty(b, hq * d, dtype=k_cache.dtype, device=k_cache.device)
    dtype = _TL_DTYPES[k_cache.dtype]
    gp = max(16, triton.next_power_of_2(g))
    gc = max(2, triton.next_power_of_2(g))
    sc = max(2, min(COMBINE_CHUNK, triton.next_power_of_2(splits)))
    pdl = launch_options(k_cache.device, "attention")
    if pdl and not shape.registers:  # no prologue before the wait: mode 2 is mode 1
        pdl["PDL"] = 1
    _decode_attention_kernel[(b * hkv, splits)](
        q, k, v, cos, sin, pos, k_cache, v_cache, out, workspace, counter,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), rows, float(scale) * LOG2E,
        HKV=hkv, G=g, GP=gp, D=d, BLOCK_N=block_n, SPLITS=splits, SPLIT_FACTOR=float(shape.split_factor),
        DTYPE=dtype, PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32", FUSED_REDUCE=fused_reduce,
        DOT_F32=os.environ.get("TRITON_INTERPRET") == "1" and not k_cache.is_cuda, REGISTERS=shape.registers,
        WIDE=shape.wide, GC=gc, SC=sc, num_warps=shape.warps, num_stages=shape.stages, **pdl,
    )
    if not fused_reduce:
        _attention_combine_kernel[(b * hkv,)](workspace, out, pos, out.stride(0), rows, HKV=hkv, G=g, GP=gp, D=d,
                                              SPLITS=splits, DTYPE=dtype, BLOCK_N=block_n,
                                              SPLIT_FACTOR=float(shape.split_factor), WIDE=shape.wide, GC=gc, SC=sc,
                                              num_warps=4, **launch_options(k_cache.device, "attention"))
    return out
