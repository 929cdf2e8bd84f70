"""Decode attention over a static KV cache as the custom op ``teal_quant::decode_attention`` (its fake beside it),
with the pure-torch reference that defines it.

One call per layer and step: rotary of the new token's q and k, the cache write of k and v at `pos`, and
grouped-query attention of the rotated q over positions 0..pos, reading the cache in place (no `repeat_kv` copy).
On CUDA (or the CPU under ``TRITON_INTERPRET=1``) one Triton launch (:mod:`.attention_triton`); else the reference.
This module imports only torch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .dispatch import use_triton


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decode_attention_ref(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, k_cache: Tensor,
                         v_cache: Tensor, scale: float) -> Tensor:
    """q [B, Hq*D], k, v [B, Hkv*D] (before rotary; in the cache dtype, or float32 sums that are rounded to it
    first), cos, sin [L, D], pos int64 [1], caches [B, Hkv, L, D].

    Writes rotary(k) and v at `pos` into the caches; returns softmax(rotary(q) K^T * scale) V over positions
    0..pos as [B, Hq*D] in the cache dtype. The rotary products and sums round to the model dtype as transformers'
    `q * cos + rotate_half(q) * sin` does; scores, softmax and sums in fp32; probabilities rounded to the value
    dtype before the product with V (as eager attention does)."""
    b, hkv, length, d = k_cache.shape
    hq = q.shape[1] // d
    q, k, v = (t.to(k_cache.dtype) for t in (q, k, v))  # fp32 inputs (a GEMV's out= buffer) round to the model dtype
    c, s = cos.index_select(0, pos), sin.index_select(0, pos)  # [1, D]
    qh, kh, vh = q.reshape(b, hq, d), k.reshape(b, hkv, d), v.reshape(b, hkv, d)
    q_rot = qh * c + _rotate_half(qh) * s
    k_rot = kh * c + _rotate_half(kh) * s
    k_cache.index_copy_(2, pos, k_rot.unsqueeze(2).to(k_cache.dtype))
    v_cache.index_copy_(2, pos, vh.unsqueeze(2).to(v_cache.dtype))
    scores = q_rot.reshape(b, hkv, hq // hkv, d).float() @ k_cache.float().transpose(-1, -2) * scale
    valid = torch.arange(length, device=pos.device) <= pos
    probs = torch.softmax(scores.masked_fill(~valid, -math.inf), dim=-1).to(v_cache.dtype)
    out = probs.float() @ v_cache.float()  # [B, Hkv, G, D]
    return out.reshape(b, hq * d).to(k_cache.dtype)


@torch.library.custom_op("teal_quant::decode_attention", mutates_args=("k_cache", "v_cache", "workspace", "counter"))
def decode_attention_op(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, k_cache: Tensor,
                        v_cache: Tensor, workspace: Tensor, counter: Tensor, scale: float, fused_reduce: bool) -> Tensor:
    if use_triton(q):
        from . import attention_triton

        return attention_triton.decode_attention(q, k, v, cos, sin, pos, k_cache, v_cache, workspace, counter, scale,
                                                 fused_reduce)
    return decode_attention_ref(q, k, v, cos, sin, pos, k_cache, v_cache, scale)


@decode_attention_op.register_fake
def _(q, k, v, cos, sin, pos, k_cache, v_cache, workspace, counter, scale, fused_reduce):
    return k_cache.new_empty(q.shape[0], q.shape[1])


def workspace_sizes(batch: int, q_heads: int, kv_heads: int, max_length: int, head_dim: int,
                    device: torch.device) -> tuple[int, int]:
    """(float32 workspace elements, int32 counters) one decode_attention call needs; 0 elements on the reference
    path. Allocate them once (zeros: the counters must start at 0; the kernel resets them) and pass them to every
    layer's call."""
    probe = torch.empty(0, device=device)
    if not use_triton(probe):
        return 1, 1
    from . import attention_triton

    return attention_triton.workspace_size(batch, q_heads, kv_heads, max_length, head_dim, device), batch * kv_heads
