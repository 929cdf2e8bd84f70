"""Round-to-nearest group-wise weight quantization as matched pure functions (qparams -> quantize -> dequantize_codes).

Layout: we quantize W^T, shape [K, N] (K = in_features, N = out_features; nn.Linear.weight is [N, K]), because the
TEAL kernel reads only the rows k of W^T whose input activation x[k] survives the threshold. A group is
``group_size`` consecutive rows along K of one column n; group_size -1 means one group per column (per-channel).
scales and zeros are [K/G, N] fp32, and W^T[k, n] ~= (q[k, n] - zeros[k // G, n]) * scales[k // G, n].

zeros are unrounded floats. For asymmetric groups this makes the grid {min + i * scale} exact, so a weight that came
from llama.cpp Q4_1 (w = d * q + m per block of 32) is reproduced exactly at 4 bits, group 32. GPTQ reuses
``compute_qparams`` / ``quantize`` / ``dequantize_codes`` column by column; packing happens once, elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class QuantSpec:
    """Integer format: ``bits`` (4 or 8), ``group_size`` (>0, or -1 for per-channel), symmetric or not."""

    bits: int
    group_size: int
    sym: bool

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer or -1 (per-channel), got {self.group_size}")

    @property
    def qmax(self) -> int:
        """Largest code, 2^bits - 1."""
        return (1 << self.bits) - 1

    def resolved_group_size(self, K: int) -> int:
        """The group size for in_features K (-1 -> K); K must be a multiple of it."""
        group = K if self.group_size == -1 else self.group_size
        if K % group != 0:
            raise ValueError(f"in_features K={K} is not divisible by group_size={group}")
        return group


def _grouped(w_t: Tensor, spec: QuantSpec) -> tuple[Tensor, int]:
    """W^T [K, N] as fp32 [K/G, G, N]."""
    if w_t.dim() != 2:
        raise ValueError(f"expected W^T of shape [K, N], got shape {tuple(w_t.shape)}")
    K, N = w_t.shape
    group = spec.resolved_group_size(K)
    return w_t.to(torch.float32).reshape(K // group, group, N), group


def compute_qparams(w_t: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-group (scales, zeros), fp32 [K/G, N], from the group's range.

    asym: scale = (max - min) / (2^b - 1), zero = -min / scale (not rounded).
    sym:  scale = absmax / (2^(b-1) - 1), zero = 2^(b-1), so w = 0 maps to a code and dequantizes to exactly 0.
    A group with zero range (constant, or all zeros) gets scale 1, which reproduces its value exactly instead of
    dividing by zero.
    """
    w, _ = _grouped(w_t, spec)
    if spec.sym:
        half = 1 << (spec.bits - 1)
        scale = w.abs().amax(dim=1) / (half - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float(half))
    else:
        lo, hi = w.amin(dim=1), w.amax(dim=1)
        scale = (hi - lo) / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = -lo / scale
    return scale.contiguous(), zero.contiguous()


def quantize(w_t: Tensor, scales: Tensor, zeros: Tensor, spec: QuantSpec) -> Tensor:
    """Codes q = clamp(round(w / scale + zero), 0, 2^b - 1) as uint8 [K, N] (round half to even)."""
    w, _ = _grouped(w_t, spec)
    q = torch.round(w / scales.float().unsqueeze(1) + zeros.float().unsqueeze(1)).clamp_(0, spec.qmax)
    return q.reshape(w_t.shape).to(torch.uint8).contiguous()


def dequantize_codes(q: Tensor, scales: Tensor, zeros: Tensor, spec: QuantSpec) -> Tensor:
    """W^T ~= (q - zero) * scale, fp32 [K, N], from unpacked codes q uint8 [K, N] (kernels.dequantize takes the
    packed qweight of an artifact instead)."""
    w, _ = _grouped(q, spec)
    return ((w - zeros.float().unsqueeze(1)) * scales.float().unsqueeze(1)).reshape(q.shape).contiguous()


def rtn_quantize(weight: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize an nn.Linear weight [N, K]: returns (q uint8 [K, N], scales fp32 [K/G, N], zeros fp32 [K/G, N])."""
    if weight.dim() != 2:
        raise ValueError(f"expected a linear weight of shape [N, K], got shape {tuple(weight.shape)}")
    w_t = weight.detach().t()
    scales, zeros = compute_qparams(w_t, spec)
    return quantize(w_t, scales, zeros, spec), scales, zeros
