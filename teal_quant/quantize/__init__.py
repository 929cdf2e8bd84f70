"""Weight quantizers, selected by the recipe's `quantization.method` through one explicit table."""

from __future__ import annotations

from typing import Callable

import torch

from .rtn import QuantSpec, rtn_quantize

# method -> f(weight [N, K], spec) -> (q uint8 [K, N], scales fp32 [K/G, N], zeros fp32 [K/G, N])
QUANTIZERS: dict[str, Callable[[torch.Tensor, QuantSpec], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
    "rtn": rtn_quantize,
}

__all__ = ["QUANTIZERS", "QuantSpec", "rtn_quantize"]
