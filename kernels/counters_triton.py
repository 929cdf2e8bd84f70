"""The realized-sparsity counters of a decode step (``count_inactive``) in one launch.

One program per part counts the inputs that part's threshold drops (|x| > t false, compared in fp32 like the GEMV)
and updates the part's counters in place, so a decode step's bookkeeping is one launch per call instead of a handful
of elementwise kernels, and nothing is read back to the host.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .pdl_triton import launch_options, wait_previous_kernel


@triton.jit
def _count_inactive_kernel(
    x_ptr, stride_xm, t_ptr, t_stride_part, zero_ptr, input_ptr, last_ptr, M, K,
    T_MODE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = 0,
):
    wait_previous_kernel(PDL > 0)
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
        T_MODE=t_mode, BLOCK=1024, num_warps=4, **launch_options(x.device, "counters"),
    )
