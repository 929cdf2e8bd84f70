"""teal_quant.kernels: TEAL sparse decode GEMV and dense prefill GEMM over int4/int8 group-quantized weights.

Imports only torch at import time (triton is imported lazily, on first use of a Triton path), does no device work
at import, and never imports teal_quant.*.

Files, one per kernel family: gemv_triton.py (sparse GEMV on CUDA cores, batch 1), gemv_mma_triton.py (sparse GEMV on
tensor cores, batch 2-16), gemm_triton.py (prefill), elementwise_triton.py (RMSNorm, SiLU-and-mul, rotary),
counters_triton.py (realized-sparsity counters); gemv.py is the sparse GEMV's entry and gemv_common.py what its two
families share. dispatch.py holds the backend switch (:func:`.dispatch.use_triton`: CUDA tensors -> Triton kernels;
CPU tensors -> the Triton kernels under the interpreter when ``TRITON_INTERPRET=1`` is set and triton imports, else
the pure-torch reference :mod:`.reference`, which on the CPU is the product's decode path) and the per-GPU
launch-shape tables (configs/*.json). ops.py registers the custom ops.

Layouts and semantics: see :mod:`.reference` and docs/kernels.md.
"""

from __future__ import annotations

from torch import Tensor

from .dispatch import triton_available, use_triton
from .reference import (
    count_inactive_ref,
    dense_gemm_ref,
    dequantize,
    pack,
    pack_int4,
    sparse_gemv_ref,
    unpack,
    unpack_int4,
)

__all__ = [
    "sparse_gemv",
    "sparse_gemv_fused",
    "dense_gemm",
    "count_inactive",
    "rms_norm",
    "silu_mul",
    "rotary",
    "sparse_gemv_ref",
    "dense_gemm_ref",
    "dequantize",
    "pack",
    "unpack",
    "pack_int4",
    "unpack_int4",
    "triton_available",
]


def _split_threshold(threshold) -> tuple[Tensor | None, float]:
    if isinstance(threshold, Tensor):
        return threshold, 0.0
    return None, float(threshold)


def sparse_gemv(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, threshold, *, bits: int, group_size: int) -> Tensor:
    """y [M, N] in x.dtype = (x * (|x| > threshold)) @ W^T (DESIGN.md "Kernel API").

    threshold: python float, 0-dim tensor on x's device (changing its value needs no recompile / graph recapture),
    or a [K] tensor of per-input-channel thresholds. Registered as the custom op ``teal_quant::sparse_gemv``.
    """
    from . import ops

    t_tensor, t_value = _split_threshold(threshold)
    return ops.sparse_gemv_op(x, qweight, scales, zeros, t_tensor, t_value, bits, group_size)


def sparse_gemv_fused(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    thresholds: Tensor,
    split_sizes: list[int],
    *,
    bits: int,
    group_size: int,
) -> Tensor:
    """One launch for several projections of one input (q/k/v, gate/up) concatenated along N.

    thresholds: [n_parts] tensor (or [n_parts, K] per-channel); split_sizes: N of each part (each a multiple of 8).
    Returns y [M, sum(split_sizes)]; part p is (x * (|x| > thresholds[p])) @ W_p^T. Split it with
    ``y.split(split_sizes, dim=-1)``.
    """
    from . import ops

    return ops.sparse_gemv_fused_op(x, qweight, scales, zeros, thresholds, list(split_sizes), bits, group_size)


def dense_gemm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, *, bits: int, group_size: int) -> Tensor:
    """x [..., K] -> x @ W^T [..., N] in x.dtype: the dense prefill path (any M). Custom op ``teal_quant::dense_gemm``."""
    from . import ops

    return ops.dense_gemm_op(x, qweight, scales, zeros, bits, group_size)


def count_inactive(x: Tensor, thresholds: Tensor, zero_count: Tensor, input_count: Tensor, last_sparsity: Tensor) -> None:
    """Update the realized-sparsity counters of P parts in place for one call on x [M, K]: zero_count += inputs the
    threshold drops (|x| > t false, compared in fp32 like the GEMV), input_count += M*K, last_sparsity = this call's
    fraction. thresholds: 0-dim, [P], [K] (one part, per-channel) or [P, K]; counters: P contiguous values each
    (float64, float64, float32), e.g. 0-dim buffers for one part. One Triton launch on CUDA, no host sync."""
    x2 = x.reshape(-1, x.shape[-1])
    if use_triton(x2):
        from . import counters_triton

        counters_triton.count_inactive(x2, thresholds, zero_count, input_count, last_sparsity)
    else:
        count_inactive_ref(x2, thresholds, zero_count, input_count, last_sparsity)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm in one launch: weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype), x [..., N].
    Custom op ``teal_quant::rms_norm``."""
    from . import ops

    return ops.rms_norm_op(x, weight, float(eps))


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up in one launch (the Llama MLP's activation); gate, up [..., N] may be column slices of one
    fused gate/up output. Custom op ``teal_quant::silu_mul``."""
    from . import ops

    return ops.silu_mul_op(gate, up)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb (unsqueeze_dim=1) for q [B, Hq, S, D] and k [B, Hk, S, D] with cos, sin
    [B, S, D], one launch for both. Custom op ``teal_quant::rotary``."""
    from . import ops

    return ops.rotary_op(q, k, cos, sin)
