"""The recipe's quantization method as the layer-streaming loop sees it (compression.stream.LayerQuantizer).

`MethodQuantizer` wraps an entry of the QUANTIZERS table: a method that `needs_hessian` (GPTQ) first runs the float
layer once more over the calibration hidden states with observers accumulating each projection's input Hessian
(summed over the processes of a distributed run), then each projection is quantized, packed for the artifact, and
its dequantized weight (through the scales and zeros rounded to the artifact's dtype) handed back for propagation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from teal_quant.architecture import ACTIVATION_POINTS, PROJECTIONS
from teal_quant.compression.quantize import HessianAccumulator, Quantizer, QuantSpec
from teal_quant.compression.quantize.rtn import dequantize_codes
from teal_quant.kernels import pack

if TYPE_CHECKING:
    from teal_quant.compression.stream import LayerWork


class MethodQuantizer:
    """rtn or gptq (any `Quantizer` of the table) on the float weights of each layer."""

    def __init__(self, quantizer: Quantizer, spec: QuantSpec, storage_dtype: torch.dtype, *, options: dict | None = None,
                 hessian_samples: int | None = None, sparsity_aware_level: float | None = None):
        self.quantizer, self.spec, self.storage_dtype = quantizer, spec, storage_dtype
        self.options = options or {}
        self.hessian_samples = hessian_samples
        self.sparsity_aware_level = sparsity_aware_level
        self._hessians: dict[str, torch.Tensor] | None = None
        self._stats: dict[str, dict] = {}

    def prepare(self, work: "LayerWork") -> None:
        self._stats = {}
        self._hessians = None
        if not self.quantizer.needs_hessian:
            return
        thresholds = None
        if self.sparsity_aware_level is not None:
            j = min(range(len(work.levels)), key=lambda k: abs(work.levels[k] - self.sparsity_aware_level))
            thresholds = {p: work.allocation.projection_thresholds(p)[j] for p in PROJECTIONS}
        self._hessians = input_hessians(work, thresholds, self.hessian_samples)

    def quantize(self, work: "LayerWork", proj: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        sim = work.sims[proj]
        stats: dict = {}
        hessian = self._hessians[proj] if self._hessians is not None else None
        q, scales, zeros = self.quantizer(sim.weight.detach().float(), self.spec, hessian, stats=stats, **self.options)
        if stats:
            self._stats[proj] = stats
        scales, zeros = scales.to(self.storage_dtype), zeros.to(self.storage_dtype)
        w_t = dequantize_codes(q, scales, zeros, self.spec)  # through the rounded (artifact-dtype) scales and zeros
        return {"qweight": pack(q, self.spec.bits), "scales": scales, "zeros": zeros}, w_t.t()

    def finish(self, work: "LayerWork") -> dict:
        self._hessians = None
        return self._stats


def input_hessians(work: "LayerWork", thresholds: dict[str, float] | None,
                   samples: int | None) -> dict[str, torch.Tensor]:
    """Each projection's input Hessian 2/n Σ x xᵀ from one pass of the float layer over the first `samples`
    calibration sequences (all when None).

    thresholds None: dense inputs, one Hessian per activation point (q/k/v read the same input, and gate/up).
    Otherwise (sparsity-aware GPTQ) the layer runs with every projection at its threshold, as it will decode at
    that level, and each projection gets the Hessian of its own thresholded input (sim.sparsify).
    In a distributed run each process's running mean is turned back into a sum, summed over processes, and divided
    by the total token count.
    """
    sims, device = work.sims, work.passes.device
    accumulators: dict[str, HessianAccumulator] = {}
    try:
        if thresholds is None:
            for projs in ACTIVATION_POINTS.values():
                first = sims[projs[0]]
                acc = HessianAccumulator(first.weight.shape[1], device)
                first.observer = acc.update
                accumulators.update({p: acc for p in projs})
        else:
            for proj, sim in sims.items():
                sim.threshold = thresholds[proj]
                acc = accumulators[proj] = HessianAccumulator(sim.weight.shape[1], device)
                sim.observer = lambda x, _sim=sim, _acc=acc: _acc.update(_sim.sparsify(x))
        if samples is not None:  # distributed: this process's share of the first `samples` global sequences
            samples = len(range(work.reducer.rank, samples, work.reducer.world_size))
        work.passes.run(samples)
    finally:
        for sim in sims.values():
            sim.observer, sim.threshold = None, 0.0
    if work.reducer.world_size > 1:
        done: list[HessianAccumulator] = []
        for acc in accumulators.values():
            if any(acc is d for d in done):
                continue
            done.append(acc)
            count = torch.tensor([float(acc.count)], dtype=torch.float64, device=acc.hessian.device)
            total = acc.hessian * acc.count
            work.reducer.all_reduce(count)
            work.reducer.all_reduce(total)
            acc.hessian, acc.count = total / float(count.item()), int(count.item())
    return {p: acc.hessian for p, acc in accumulators.items()}
