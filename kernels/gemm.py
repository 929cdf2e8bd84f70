"""The dense prefill GEMM as a torch.library custom op (``teal_quant::dense_gemm``) with its fake beside it.
On CUDA (or the CPU under ``TRITON_INTERPRET=1``) a call runs :mod:`.gemm_triton`; on the CPU the pure-torch
reference runs. This module imports only torch."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .dispatch import use_triton
from .gemv import _n_of


@torch.library.custom_op("teal_quant::dense_gemm", mutates_args=())
def dense_gemm_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> Tensor:
    if use_triton(x):
        from . import gemm_triton

        return gemm_triton.dense_gemm(x, qweight, scales, zeros, bits=bits, group_size=group_size)
    return reference.dense_gemm_ref(x, qweight, scales, zeros, bits=bits, group_size=group_size)


@dense_gemm_op.register_fake
def _(x, qweight, scales, zeros, bits, group_size):
    return x.new_empty(*x.shape[:-1], _n_of(qweight, bits))
