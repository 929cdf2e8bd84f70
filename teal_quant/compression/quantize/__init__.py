"""Weight quantizers, selected by the recipe's `quantization.method` through one explicit table.

Every entry is called as ``quantizer(weight [N, K], spec, hessian=None, **options)`` and returns
``(q uint8 [K, N], scales fp32 [K/G, N], zeros fp32 [K/G, N])``. ``needs_hessian`` tells the pipeline to
accumulate the input Hessian of each projection (one extra pass of the float layer) before calling it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from teal_quant.compression.quantize.gptq import GPTQStats, HessianAccumulator, gptq_quantize
from teal_quant.compression.quantize.rtn import QuantSpec, rtn_quantize


@dataclass(frozen=True)
class Quantizer:
    """One method of the table: the function and whether it needs the input Hessian."""

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    needs_hessian: bool

    def __call__(self, weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None,
                 stats: dict | None = None, **options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize; a Hessian-based method also fills `stats` (GPTQStats fields) when given."""
        if self.needs_hessian:
            return self.fn(weight, spec, hessian, stats=stats, **options)
        return self.fn(weight, spec, **options)


QUANTIZERS: dict[str, Quantizer] = {
    "rtn": Quantizer(rtn_quantize, needs_hessian=False),
    "gptq": Quantizer(gptq_quantize, needs_hessian=True),
}

__all__ = ["GPTQStats", "HessianAccumulator", "QUANTIZERS", "QuantSpec", "Quantizer", "gptq_quantize", "rtn_quantize"]
