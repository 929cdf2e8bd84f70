"""Dense prefill path over int4/int8 group-quantized weights: y = x @ W^T for any M.

    x [..., K] fp16/bf16/fp32 -> y [..., N] in x.dtype

M <= 16 rows reuse the sparse GEMV (kernels/gemv_launch.py) with every row active (threshold -inf: the weight is read once, at
the GEMV's bandwidth). Larger M dequantizes W^T once into x.dtype with a Triton kernel and multiplies with cuBLAS
(torch.matmul): the dequantization writes K*N*2 bytes, small next to an M >= 16 GEMM's time for prefill-sized M.
A fused dequantize-in-the-GEMM Triton kernel (gemlite-style) would remove that pass; not done yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import gemv_common, gemv_launch
from .gemv_common import TL_DTYPE

SMALL_M = 16


@triton.jit
def _dequantize_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, K, N, G, stride_qk, stride_sg,
                       BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """W^T[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n] in fp32, stored in OUT_DTYPE ([K, N] row-major)."""
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rk < K)[:, None] & (rn < N)[None, :]
    if BITS == 4:
        w = tl.load(qw_ptr + rk[:, None] * stride_qk + (rn // 8)[None, :], mask=ok, other=0)
        q = (w >> ((rn % 8) * 4)[None, :]) & 15
    else:
        q = tl.load(qw_ptr + rk[:, None] * stride_qk + rn[None, :], mask=ok, other=0).to(tl.int32)
    g = rk // G
    s = tl.load(s_ptr + g[:, None] * stride_sg + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g[:, None] * stride_sg + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(w_ptr + rk[:, None] * N + rn[None, :], ((q.to(tl.float32) - z) * s).to(OUT_DTYPE), mask=ok)


def dequantize(qweight: Tensor, scales: Tensor, zeros: Tensor, *, bits: int, group_size: int, dtype: torch.dtype) -> Tensor:
    """W^T [K, N] in ``dtype`` (Triton twin of kernels.reference.dequantize)."""
    k = qweight.shape[0]
    n = qweight.shape[1] * (8 if bits == 4 else 1)
    w = gemv_common._empty(k, n, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(k, 32), triton.cdiv(n, 128))
    _dequantize_kernel[grid](qweight, scales, zeros, w, k, n, group_size, qweight.stride(0), scales.stride(0),
                             BITS=bits, BLOCK_K=32, BLOCK_N=128, OUT_DTYPE=TL_DTYPE[dtype], num_warps=4)
    return w


def dense_gemm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, *, bits: int, group_size: int) -> Tensor:
    """x [..., K] -> x @ W^T [..., N] in x.dtype. Note: rows of M <= 16 go through the GEMV, where NaN inputs are
    dropped like inactive activations; larger M propagates NaN as a dense matmul does."""
    k = qweight.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} but qweight has K={k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    n = qweight.shape[1] * (8 if bits == 4 else 1)
    if m == 0:
        return x.new_zeros(*lead, n)
    if m <= SMALL_M:
        y = gemv_launch.sparse_gemv(x2.contiguous(), qweight, scales, zeros, float("-inf"), bits=bits, group_size=group_size)
        return y.reshape(*lead, n)
    w = dequantize(qweight, scales, zeros, bits=bits, group_size=group_size, dtype=x.dtype)
    return (x2 @ w).reshape(*lead, n)
