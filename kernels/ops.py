"""torch.library custom ops (namespace ``teal_quant``) with fake implementations, so that torch.compile and
CUDA-graph capture see one opaque op per call. The real implementation picks the backend through
``dispatch.use_triton`` (CUDA -> Triton; CPU -> Triton interpreter under TRITON_INTERPRET=1, else reference); the
sparse GEMV then picks its kernel family and launch shape from the GPU's table (kernels/gemv.py, kernels/dispatch.py).
This module imports no triton, so the ops exist (running the reference) where triton is not installed.

Thresholds cross the op boundary as ``(threshold_tensor or None, threshold_value)`` because a custom-op schema
has no float-or-tensor union: a python float threshold travels as ``threshold_value``; a 0-dim or [K] tensor as
``threshold_tensor`` (its value is read on the device, so changing it needs neither a recompile nor a recapture).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .dispatch import use_triton


def _n_of(qweight: Tensor, bits: int) -> int:
    return qweight.shape[1] * (8 if bits == 4 else 1)


@torch.library.custom_op("teal_quant::sparse_gemv", mutates_args=())
def sparse_gemv_op(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    threshold_tensor: Tensor | None,
    threshold_value: float,
    bits: int,
    group_size: int,
) -> Tensor:
    threshold = threshold_tensor if threshold_tensor is not None else threshold_value
    if use_triton(x):
        from . import gemv

        return gemv.sparse_gemv(x, qweight, scales, zeros, threshold, bits=bits, group_size=group_size)
    return reference.sparse_gemv_ref(x, qweight, scales, zeros, threshold, bits=bits, group_size=group_size)


@sparse_gemv_op.register_fake
def _(x, qweight, scales, zeros, threshold_tensor, threshold_value, bits, group_size):
    return x.new_empty(x.shape[0], _n_of(qweight, bits))


@torch.library.custom_op("teal_quant::sparse_gemv_fused", mutates_args=())
def sparse_gemv_fused_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, thresholds: Tensor,
                         split_sizes: list[int], bits: int, group_size: int) -> Tensor:
    if use_triton(x):
        from . import gemv

        return gemv.sparse_gemv_fused(
            x, qweight, scales, zeros, thresholds, split_sizes, bits=bits, group_size=group_size
        )
    return reference.sparse_gemv_fused_ref(
        x, qweight, scales, zeros, thresholds, split_sizes, bits=bits, group_size=group_size
    )


@sparse_gemv_fused_op.register_fake
def _(x, qweight, scales, zeros, thresholds, split_sizes, bits, group_size):
    return x.new_empty(x.shape[0], _n_of(qweight, bits))


@torch.library.custom_op("teal_quant::dense_gemm", mutates_args=())
def dense_gemm_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> Tensor:
    if use_triton(x):
        from . import gemm_triton

        return gemm_triton.dense_gemm(x, qweight, scales, zeros, bits=bits, group_size=group_size)
    return reference.dense_gemm_ref(x, qweight, scales, zeros, bits=bits, group_size=group_size)


@dense_gemm_op.register_fake
def _(x, qweight, scales, zeros, bits, group_size):
    return x.new_empty(*x.shape[:-1], _n_of(qweight, bits))


# -- elementwise ops of a Llama-family decoder layer (kernels.elementwise_triton) ------------------------------------
@torch.library.custom_op("teal_quant::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if use_triton(x):
        from . import elementwise_triton

        return elementwise_triton.rms_norm(x, weight, eps)
    return reference.rms_norm_ref(x, weight, eps)


@rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("teal_quant::silu_mul", mutates_args=())
def silu_mul_op(gate: Tensor, up: Tensor) -> Tensor:
    if use_triton(gate):
        from . import elementwise_triton

        return elementwise_triton.silu_mul(gate, up)
    return reference.silu_mul_ref(gate, up)


@silu_mul_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("teal_quant::rotary", mutates_args=())
def rotary_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton(q):
        from . import elementwise_triton

        return elementwise_triton.rotary(q, k, cos, sin)
    return reference.rotary_ref(q, k, cos, sin)


@rotary_op.register_fake
def _(q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)
