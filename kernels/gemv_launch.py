"""The sparse GEMV entry: validate a call, pick its kernel family and launch shape (kernels/dispatch.py, from the
per-GPU table), run it. y = (x * (|x| > t)) @ W^T for x [M <= 16, K]; docs/kernels.md has the design and numbers.

    x        [M, K] fp16/bf16/fp32
    qweight  bits 4: int32 [K, N // 8], nibble i of word j of row k is q[k, 8j + i]; bits 8: uint8 [K, N]
    scales   [K // G, N], zeros [K // G, N] (float zeros), W^T[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n]
    y        [M, N] in x.dtype, fp32 accumulation

Families: kernels/gemv_triton.py (CUDA cores, made for M = 1), kernels/gemv_mma_triton.py (tensor cores, any M,
int8 and fp32 too, on the compacted union of active rows) and kernels/gemv_splitk_triton.py (tensor cores, dense
weight tiles with split-K, made for M >= 4). Group sizes below 16 (no K-range of >= 16 rows fits in a group) take the pure-torch reference.
Split-K partial sums are added with fp32 atomics, so the last bits of y can differ from call to call, unless
``torch.use_deterministic_algorithms(True)`` is on: then the reduction is in a fixed order.

``sparse_gemv_silu(gate, up, ...)``: the same product of x = silu(gate) * up, which the families of ``SILU_FAMILIES``
compute where they load x (kernels/gemv_common.py ``load_x``; the others get silu_mul's output), bit for bit what
``silu_mul`` and then ``sparse_gemv`` give.

``out=`` (the decode step): the partials are added into the caller's fp32 [M, N] buffer and the call ends there, without
the split-K tail (a counter and the last program's read and store: L2 round trips at the end of every call); the next
kernel rounds the sum to the activation dtype as it reads it, and a later call zeroes the buffer (``clear=``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from . import gemv_mma_triton, gemv_splitk_triton, gemv_triton, reference
from .dispatch import CoreShape, GemvShape, MmaShape, SplitKShape, fit_k_range, fits, pick_gemv
from .gemv_common import MAX_M, MAX_PARTS, TL_DTYPE, GemvProblem

FALLBACK = MmaShape(block_n=128, block_k=16, warps=4, k_range=128)  # when no rule of the table fits the call
# kernel families that compute silu(gate) * up where they load x (the SiLU form); a call of the SiLU form that picks
# another family gets silu_mul's output instead (two launches, the same bits). Not splitk: each of its column-tile
# programs recomputes the SiLU of every x tile it streams (8B down at batch 16: 35.2 against 29.2 µs for silu_mul +
# GEMV on the H200; benchmarks/results/decode_silu_down_h200.md); its SILU path stays, tested, for a table to opt in
SILU_FAMILIES = frozenset({"core", "mma"})


def check(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> tuple[int, int, int]:
    """-> (M, N, K) of a valid call; ValueError with one clear line otherwise."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if x.dim() != 2 or x.dtype not in TL_DTYPE:
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


def threshold_args(threshold, k: int, device) -> tuple[int, Tensor | None, float]:
    """-> (T_MODE, tensor or None, float value) of a float / 0-dim / [K] threshold."""
    if isinstance(threshold, Tensor):
        if threshold.device != device:
            raise ValueError(f"threshold tensor must be on {device}, got {threshold.device}")
        if threshold.dim() == 0:
            return 1, threshold, 0.0
        if threshold.dim() == 1 and threshold.shape[0] == k:
            return 2, threshold.contiguous(), 0.0
        raise ValueError(f"threshold tensor must be 0-dim or [K={k}], got {tuple(threshold.shape)}")
    return 0, None, float(threshold)


def run(p: GemvProblem, shape: GemvShape | None = None) -> Tensor:
    """Launch ``p`` with ``shape``, or with the shape the device's table picks. With ``p.out`` the kernels add
    into it (atomics, no tail); under deterministic algorithms, or where the reference runs, the ordinary call's y is
    added instead (the same values once the consumer rounds them)."""
    if p.out is not None and p.deterministic:
        return _accumulate(p, run(replace(p, out=None, clear=None), shape))
    y = _launch(p, shape)
    return y if y is p.out else _accumulate(p, y)


def _accumulate(p: GemvProblem, y: Tensor) -> Tensor:
    """The ``out`` / ``clear`` contract of a call whose kernel did not write ``out``."""
    if p.out is None:
        return y
    p.out.add_(y)
    if p.clear is not None:
        p.clear.zero_()
    return p.out


def _launch(p: GemvProblem, shape: GemvShape | None) -> Tensor:
    if shape is None:
        shape = pick_gemv(p.m, p.n, p.k, p.bits, p.group_size, p.x.device,
                          threshold=p.t_value if p.t_mode == 0 else p.t_tensor)
    if p.up is not None and shape is not None and shape.kernel not in SILU_FAMILIES:
        p = _silu_mul_first(p)
    if isinstance(shape, SplitKShape):
        shape = fit_k_range(shape, p.group_size)
        if not fits(shape, p.m, p.k, p.bits, p.group_size):  # no K-step of >= 16 rows divides the group
            return _reference(p)
        return gemv_splitk_triton.launch(p, shape)
    if isinstance(shape, CoreShape):
        y = gemv_triton.launch(p, shape)
        if y is not None:
            return y
        shape = None
    if shape is None:
        shape = fit_k_range(FALLBACK, p.group_size)
        if not fits(shape, p.m, p.k, p.bits, p.group_size):  # no K-range of >= 16 rows divides the group
            return _reference(p)
    return gemv_mma_triton.launch(p, shape)


def _silu_mul_first(p: GemvProblem) -> GemvProblem:
    """The call of the SiLU form as the two launches it replaces: kernels.silu_mul, then a plain call on its output."""
    from .elementwise_triton import silu_mul

    return GemvProblem(silu_mul(p.x, p.up), p.qweight, p.scales, p.zeros, p.t_mode, p.t_tensor, p.t_value,
                       p.t_stride_part, p.ends, p.bits, p.group_size, p.deterministic)


def _reference(p: GemvProblem) -> Tensor:
    """The pure-torch result of ``p`` in x.dtype (``out`` / ``clear`` are the caller's: `run`)."""
    if p.up is not None:
        p = _silu_mul_first(p)
    if len(p.ends) == 1:
        t = p.t_tensor if p.t_tensor is not None else p.t_value
        return reference.sparse_gemv_ref(p.x, p.qweight, p.scales, p.zeros, t, bits=p.bits, group_size=p.group_size)
    sizes = [e - b for b, e in zip((0,) + p.ends[:-1], p.ends)]
    return reference.sparse_gemv_fused_ref(p.x, p.qweight, p.scales, p.zeros, p.t_tensor, sizes, bits=p.bits,
                                           group_size=p.group_size)


def check_out(out: Tensor | None, clear: Tensor | None, m: int, n: int, device) -> None:
    """``out`` / ``clear``: fp32 [M, N] contiguous buffers on x's device, distinct; ValueError otherwise."""
    for name, t in (("out", out), ("clear", clear)):
        if t is None:
            continue
        if t.dtype != torch.float32 or tuple(t.shape) != (m, n) or not t.is_contiguous() or t.device != device:
            raise ValueError(f"{name} must be a contiguous float32 [{m}, {n}] tensor on {device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    if clear is not None and (out is None or clear.data_ptr() == out.data_ptr()):
        raise ValueError("clear needs an out of its own (a buffer the call zeroes, not the one it adds into)")


def sparse_gemv(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, threshold, *, bits: int, group_size: int,
                shape: GemvShape | None = None, out: Tensor | None = None, clear: Tensor | None = None) -> Tensor:
    """See the module docstring; ``shape`` overrides the table (tests and sweeps). ``out`` (fp32 [M, N], zero):
    the product is added into it and it is returned; ``clear`` (fp32 [M, N]) is zeroed by the same launch."""
    m, n, _ = check(x, qweight, scales, zeros, bits, group_size)
    check_out(out, clear, m, n, x.device)
    t_mode, t_tensor, t_value = threshold_args(threshold, x.shape[-1], x.device)
    p = GemvProblem(x, qweight, scales, zeros, t_mode, t_tensor, t_value, 0, (n,), bits, group_size,
                    torch.are_deterministic_algorithms_enabled(), out=out, clear=clear)
    return run(p, shape)


def sparse_gemv_silu(gate: Tensor, up: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, threshold, *, bits: int,
                     group_size: int, shape: GemvShape | None = None, out: Tensor | None = None,
                     clear: Tensor | None = None) -> Tensor:
    """``sparse_gemv(silu_mul(gate, up), ...)`` in one launch: gate, up [M, K] of one dtype and device (e.g. the two
    halves of a fused gate/up output). Up with another row stride than gate (at M > 1) takes the two launches.
    ``out`` / ``clear`` as in `sparse_gemv`."""
    m, n, _ = check(gate, qweight, scales, zeros, bits, group_size)
    check_out(out, clear, m, n, gate.device)
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device or up.stride(1) != 1:
        raise ValueError(f"up must be like gate {gate.dtype} {tuple(gate.shape)} on {gate.device} with a unit column "
                         f"stride, got {up.dtype} {tuple(up.shape)} on {up.device}")
    if gate.shape[0] > 1 and up.stride(0) != gate.stride(0):  # load_x reads both at the same offsets
        from .elementwise_triton import silu_mul

        return sparse_gemv(silu_mul(gate, up), qweight, scales, zeros, threshold, bits=bits, group_size=group_size,
                           shape=shape, out=out, clear=clear)
    t_mode, t_tensor, t_value = threshold_args(threshold, gate.shape[-1], gate.device)
    p = GemvProblem(gate, qweight, scales, zeros, t_mode, t_tensor, t_value, 0, (n,), bits, group_size,
                    torch.are_deterministic_algorithms_enabled(), up, out=out, clear=clear)
    return run(p, shape)


def sparse_gemv_fused(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, thresholds: Tensor, split_sizes,
                      *, bits: int, group_size: int, shape: GemvShape | None = None, out: Tensor | None = None,
                      clear: Tensor | None = None) -> Tensor:
    """Up to three projections concatenated along N (q/k/v, gate/up), thresholds [n_parts] or [n_parts, K];
    ``out`` / ``clear`` as in `sparse_gemv`."""
    m, n, _ = check(x, qweight, scales, zeros, bits, group_size)
    check_out(out, clear, m, n, x.device)
    split_sizes = [int(v) for v in split_sizes]
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
    p = GemvProblem(x, qweight, scales, zeros, t_mode, thresholds, 0.0, stride, ends, bits, group_size,
                    torch.are_deterministic_algorithms_enabled(), out=out, clear=clear)
    return run(p, shape)
