"""The sparse GEMV as torch.library custom ops (``teal_quant::sparse_gemv``, ``teal_quant::sparse_gemv_fused``,
``teal_quant::sparse_gemv_silu``), each with its fake beside it, so that torch.compile and CUDA-graph capture see one opaque op per call.

On CUDA (or the CPU under ``TRITON_INTERPRET=1``) a call runs :mod:`.gemv_launch`, which picks the kernel family
(:mod:`.gemv_triton`: CUDA cores, batch 1; :mod:`.gemv_mma_triton`: tensor cores, any batch) and its launch shape from
the GPU's table (:mod:`.dispatch`, configs/*.json); on the CPU the pure-torch reference runs. This module imports
only torch: triton is imported on first use.

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
        from . import gemv_launch

        return gemv_launch.sparse_gemv(x, qweight, scales, zeros, threshold, bits=bits, group_size=group_size)
    return reference.sparse_gemv_ref(x, qweight, scales, zeros, threshold, bits=bits, group_size=group_size)


@sparse_gemv_op.register_fake
def _(x, qweight, scales, zeros, threshold_tensor, threshold_value, bits, group_size):
    return x.new_empty(x.shape[0], _n_of(qweight, bits))


@torch.library.custom_op("teal_quant::sparse_gemv_silu", mutates_args=())
def sparse_gemv_silu_op(
    gate: Tensor,
    up: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    threshold_tensor: Tensor | None,
    threshold_value: float,
    bits: int,
    group_size: int,
) -> Tensor:
    threshold = threshold_tensor if threshold_tensor is not None else threshold_value
    if use_triton(gate):
        from . import gemv_launch

        return gemv_launch.sparse_gemv_silu(gate, up, qweight, scales, zeros, threshold, bits=bits,
                                            group_size=group_size)
    return reference.sparse_gemv_silu_ref(gate, up, qweight, scales, zeros, threshold, bits=bits, group_size=group_size)


@sparse_gemv_silu_op.register_fake
def _(gate, up, qweight, scales, zeros, threshold_tensor, threshold_value, bits, group_size):
    return gate.new_empty(gate.shape[0], _n_of(qweight, bits))


@torch.library.custom_op("teal_quant::sparse_gemv_fused", mutates_args=())
def sparse_gemv_fused_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, thresholds: Tensor,
                         split_sizes: list[int], bits: int, group_size: int) -> Tensor:
    if use_triton(x):
        from . import gemv_launch

        return gemv_launch.sparse_gemv_fused(
            x, qweight, scales, zeros, thresholds, split_sizes, bits=bits, group_size=group_size
        )
    return reference.sparse_gemv_fused_ref(
        x, qweight, scales, zeros, thresholds, split_sizes, bits=bits, group_size=group_size
    )


@sparse_gemv_fused_op.register_fake
def _(x, qweight, scales, zeros, thresholds, split_sizes, bits, group_size):
    return x.new_empty(x.shape[0], _n_of(qweight, bits))


# the decode step's form (kernels/gemv_launch.py ``out=``): the product added into a zero fp32 buffer, another zeroed
def _accumulate_ref(y: Tensor, out: Tensor, clear: Tensor | None) -> None:
    out.add_(y)
    if clear is not None:
        clear.zero_()


@torch.library.custom_op("teal_quant::sparse_gemv_into", mutates_args=("out", "clear"))
def sparse_gemv_into_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, threshold_tensor: Tensor | None,
                        threshold_value: float, bits: int, group_size: int, out: Tensor, clear: Tensor | None) -> None:
    threshold = threshold_tensor if threshold_tensor is not None else threshold_value
    if use_triton(x):
        from . import gemv_launch

        gemv_launch.sparse_gemv(x, qweight, scales, zeros, threshold, bits=bits, group_size=group_size, out=out,
                                clear=clear)
        return
    y = reference.sparse_gemv_ref(x, qweight, scales, zeros, threshold, bits=bits, group_size=group_size)
    _accumulate_ref(y, out, clear)


@sparse_gemv_into_op.register_fake
def _(x, qweight, scales, zeros, threshold_tensor, threshold_value, bits, group_size, out, clear):
    return None


@torch.library.custom_op("teal_quant::sparse_gemv_fused_into", mutates_args=("out", "clear"))
def sparse_gemv_fused_into_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, thresholds: Tensor,
                              split_sizes: list[int], bits: int, group_size: int, out: Tensor,
                              clear: Tensor | None) -> None:
    if use_triton(x):
        from . import gemv_launch

        gemv_launch.sparse_gemv_fused(x, qweight, scales, zeros, thresholds, split_sizes, bits=bits,
                                      group_size=group_size, out=out, clear=clear)
        return
    y = reference.sparse_gemv_fused_ref(x, qweight, scales, zeros, thresholds, split_sizes, bits=bits,
                                        group_size=group_size)
    _accumulate_ref(y, out, clear)


@sparse_gemv_fused_into_op.register_fake
def _(x, qweight, scales, zeros, thresholds, split_sizes, bits, group_size, out, clear):
    return None


@torch.library.custom_op("teal_quant::sparse_gemv_silu_into", mutates_args=("out", "clear"))
def sparse_gemv_silu_into_op(gate: Tensor, up: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor,
                             threshold_tensor: Tensor | None, threshold_value: float, bits: int, group_size: int,
                             out: Tensor, clear: Tensor | None) -> None:
    threshold = threshold_tensor if threshold_tensor is not None else threshold_value
    if use_triton(gate):
        from . import gemv_launch

        gemv_launch.sparse_gemv_silu(gate, up, qweight, scales, zeros, threshold, bits=bits, group_size=group_size,
                                     out=out, clear=clear)
        return
    y = reference.sparse_gemv_silu_ref(gate, up, qweight, scales, zeros, threshold, bits=bits, group_size=group_size)
    _accumulate_ref(y, out, clear)


@sparse_gemv_silu_into_op.register_fake
def _(gate, up, qweight, scales, zeros, threshold_tensor, threshold_value, bits, group_size, out, clear):
    return None
