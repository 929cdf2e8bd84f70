"""Pure-torch reference for the teal-quant kernels (imports only torch).

Layouts (the artifact contract, docs/artifact-format.md / DESIGN.md "Artifact"):

* bits 4: ``qweight`` int32 [K, N // 8]; word j of row k holds q[k, 8j + i] in bits 4i..4i+3 (i = 0..7).
* bits 8: ``qweight`` uint8 [K, N] (q itself).
* ``scales``, ``zeros``: [K // G, N] in the model dtype, float zeros; G = group_size (G == K: per channel).
* W^T[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n], computed in fp32.

TEAL sparse decode: y = (x * (|x| > threshold)) @ W^T. The threshold is compared in fp32 against |x| cast to fp32.
NaN handling: ``|NaN| > t`` is False, so a NaN input is treated as inactive and contributes exactly 0 (it is
selected away with ``torch.where``, never multiplied by 0, which would give NaN). The Triton kernels do the same.
+-inf inputs are active and propagate as they would in a dense matmul.

On the CPU ``sparse_gemv_ref`` is the decode path of the product, so it only gathers and dequantizes the rows k of
W^T that are active for some row of x (the union over the M rows).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "pack_int4",
    "unpack_int4",
    "pack",
    "unpack",
    "dequantize",
    "threshold_mask",
    "sparse_gemv_ref",
    "sparse_gemv_fused_ref",
    "sparse_gemv_silu_ref",
    "dense_gemm_ref",
    "rms_norm_ref",
    "silu_mul_ref",
    "rotary_ref",
]

_SHIFTS4 = tuple(range(0, 32, 4))


def pack_int4(q: Tensor) -> Tensor:
    """q [K, N] with values 0..15 (N % 8 == 0) -> int32 [K, N // 8], 8 nibbles per word along N."""
    if q.dim() != 2 or q.shape[1] % 8 != 0:
        raise ValueError(f"pack_int4 expects q of shape [K, N] with N % 8 == 0, got {tuple(q.shape)}")
    if q.is_floating_point():
        raise TypeError(f"pack_int4 expects an integer tensor, got {q.dtype}")
    k, n = q.shape
    q32 = q.to(torch.int32).reshape(k, n // 8, 8)
    if q32.numel() and (int(q32.min()) < 0 or int(q32.max()) > 15):
        raise ValueError("pack_int4 expects values in 0..15")
    packed = torch.zeros(k, n // 8, dtype=torch.int32, device=q.device)
    for i, shift in enumerate(_SHIFTS4):
        packed |= q32[:, :, i] << shift
    return packed


def unpack_int4(qweight: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: int32 [K, N // 8] -> uint8 [K, N]."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"unpack_int4 expects int32 [K, N // 8], got {qweight.dtype} {tuple(qweight.shape)}")
    shifts = torch.tensor(_SHIFTS4, dtype=torch.int32, device=qweight.device)
    nib = (qweight.unsqueeze(-1) >> shifts) & 0xF
    return nib.reshape(qweight.shape[0], -1).to(torch.uint8)


def pack(q: Tensor, bits: int) -> Tensor:
    """bits 4 -> :func:`pack_int4`; bits 8 -> uint8 [K, N] unchanged (values 0..255)."""
    if bits == 4:
        return pack_int4(q)
    if bits == 8:
        return q.to(torch.uint8)
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def unpack(qweight: Tensor, bits: int) -> Tensor:
    """bits 4 -> :func:`unpack_int4`; bits 8 -> uint8 [K, N] unchanged."""
    if bits == 4:
        return unpack_int4(qweight)
    if bits == 8:
        if qweight.dtype != torch.uint8:
            raise ValueError(f"bits 8 expects a uint8 qweight, got {qweight.dtype}")
        return qweight
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def _shape_kn(qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> tuple[int, int]:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    k = qweight.shape[0]
    n = qweight.shape[1] * (8 if bits == 4 else 1)
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"K={k} must be a positive multiple of group_size={group_size}")
    want = (k // group_size, n)
    if tuple(scales.shape) != want or tuple(zeros.shape) != want:
        raise ValueError(
            f"scales/zeros must be {want} for K={k}, N={n}, group_size={group_size}; "
            f"got {tuple(scales.shape)} and {tuple(zeros.shape)}"
        )
    return k, n


def _dequantize_rows(q: Tensor, scales: Tensor, zeros: Tensor, groups: Tensor | None) -> Tensor:
    """q uint8 [R, N] (R selected rows), groups [R] group index of each row (None: consecutive rows) -> fp32."""
    s = scales.float()
    z = zeros.float()
    if groups is not None:
        s, z = s[groups], z[groups]
    else:
        rep = q.shape[0] // s.shape[0]
        s, z = s.repeat_interleave(rep, 0), z.repeat_interleave(rep, 0)
    return (q.float() - z) * s


def dequantize(qweight: Tensor, scales: Tensor, zeros: Tensor, *, bits: int, group_size: int) -> Tensor:
    """W^T [K, N] in scales.dtype (computed in fp32)."""
    _shape_kn(qweight, scales, zeros, bits, group_size)
    return _dequantize_rows(unpack(qweight, bits), scales, zeros, None).to(scales.dtype)


def threshold_mask(x: Tensor, threshold) -> Tensor:
    """|x| > threshold compared in fp32; threshold float, 0-dim tensor or [K] tensor. NaN -> False."""
    k = x.shape[-1]
    if isinstance(threshold, Tensor):
        t = threshold.to(device=x.device, dtype=torch.float32)
        if t.dim() not in (0, 1) or (t.dim() == 1 and t.shape[0] != k):
            raise ValueError(f"threshold tensor must be 0-dim or [K={k}], got {tuple(t.shape)}")
    else:
        t = float(threshold)
    return x.float().abs() > t


def sparse_gemv_ref(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    threshold,
    *,
    bits: int,
    group_size: int,
) -> Tensor:
    """y [M, N] in x.dtype = (x * (|x| > threshold)) @ W^T, fp32 accumulation.

    Only rows of W^T active for some row of x are unpacked and dequantized (union over M).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    k, n = _shape_kn(qweight, scales, zeros, bits, group_size)
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} but qweight has K={k}")
    mask = threshold_mask(x, threshold)
    xs = torch.where(mask, x.float(), 0.0)
    active = mask.any(0).nonzero().squeeze(1)
    if active.numel() == 0:
        return torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device)
    q = unpack(qweight.index_select(0, active), bits)
    w = _dequantize_rows(q, scales, zeros, torch.div(active, group_size, rounding_mode="floor"))
    return (xs.index_select(1, active) @ w).to(x.dtype)


def sparse_gemv_silu_ref(gate: Tensor, up: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, threshold, *,
                         bits: int, group_size: int) -> Tensor:
    """The Llama MLP's down projection of a decode step: ``sparse_gemv_ref(silu_mul_ref(gate, up), ...)``, the
    threshold applied to the product (gate, up [M, K])."""
    return sparse_gemv_ref(silu_mul_ref(gate, up), qweight, scales, zeros, threshold, bits=bits, group_size=group_size)


def dense_gemm_ref(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, *, bits: int, group_size: int) -> Tensor:
    """x [..., K] -> x @ W^T [..., N] in x.dtype (prefill path). On CUDA the weight is dequantized to x.dtype;
    on the CPU the product is computed in fp32."""
    k, n = _shape_kn(qweight, scales, zeros, bits, group_size)
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} but qweight has K={k}")
    w = _dequantize_rows(unpack(qweight, bits), scales, zeros, None)
    if x.is_cuda:
        return (x @ w.to(x.dtype)).to(x.dtype)
    return (x.float() @ w).to(x.dtype)


def sparse_gemv_fused_ref(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    thresholds: Tensor,
    split_sizes,
    *,
    bits: int,
    group_size: int,
) -> Tensor:
    """Several projections of one input, concatenated along N, each with its own threshold.

    thresholds: [n_parts] (or [n_parts, K]); split_sizes: N of each part (multiples of 8). y [M, sum(split_sizes)].
    """
    split_sizes = [int(s) for s in split_sizes]
    n = qweight.shape[1] * (8 if bits == 4 else 1)
    if sum(split_sizes) != n or any(s % 8 for s in split_sizes):
        raise ValueError(f"split_sizes {split_sizes} must be multiples of 8 summing to N={n}")
    if thresholds.shape[0] != len(split_sizes):
        raise ValueError(f"thresholds has {thresholds.shape[0]} entries for {len(split_sizes)} parts")
    per_word = 8 if bits == 4 else 1
    outs, start = [], 0
    for p, size in enumerate(split_sizes):
        cols = slice(start // per_word, (start + size) // per_word)
        outs.append(
            sparse_gemv_ref(
                x, qweight[:, cols], scales[:, start : start + size], zeros[:, start : start + size],
                thresholds[p], bits=bits, group_size=group_size,
            )
        )
        start += size
    return torch.cat(outs, dim=-1)


def count_inactive_ref(x: Tensor, thresholds: Tensor, zero_count: Tensor, input_count: Tensor,
                       last_sparsity: Tensor) -> None:
    """Realized-sparsity counters of P parts, updated in place: zero_count += inputs dropped (|x| > t false, in fp32),
    input_count += M*K, last_sparsity = this call's dropped fraction. thresholds 0-dim, [P], [K] (P == 1) or [P, K]."""
    n_parts, k = zero_count.numel(), x.shape[-1]
    per_channel = thresholds.dim() == 2 or (thresholds.dim() == 1 and n_parts == 1 and thresholds.shape[0] == k and k != 1)
    t = thresholds.float().reshape(n_parts, 1, k if per_channel else 1)
    dropped = x.numel() - (x.float().abs().unsqueeze(0) > t).sum(dim=(1, 2), dtype=torch.float64)
    zero_count.view(-1).add_(dropped.to(zero_count.dtype))
    input_count.view(-1).add_(x.numel())
    last_sparsity.view(-1).copy_(dropped / max(x.numel(), 1))


# -- elementwise ops of a Llama-family decoder layer (kernels.elementwise_triton is their one-launch twin) ----------
def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm: fp32 statistics, normalized value rounded to x.dtype, then times weight."""
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def silu_mul_ref(gate: Tensor, up: Tensor) -> Tensor:
    """The Llama MLP's act_fn(gate) * up with act_fn = SiLU."""
    return torch.nn.functional.silu(gate) * up


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_ref(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb with unsqueeze_dim=1: q, k [B, H, S, D], cos, sin [B, S, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
