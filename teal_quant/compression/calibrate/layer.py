"""One decoder layer during calibration: activation capture, TEAL thresholds, block error, propagation.

The layer is the transformers module itself; its seven projections are swapped for `SimulatedLinear`,
which can observe its input, threshold it, and use float or dequantized weights. So the block error of
an allocation is measured by running the real layer, whatever attention or norm variant it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from teal_quant.architecture import ACTIVATION_POINTS, CRITERIA, PROJECTIONS
from teal_quant.compression.calibrate.allocation import effective_sparsity, greedy_allocation, uniform_allocation
from teal_quant.compression.calibrate.histogram import AbsHistogram


def channel_scale(weight: torch.Tensor) -> torch.Tensor:
    """WINA's per-input-channel weight: ||W[:, k]||_2 of nn.Linear.weight [N, K] -> float32 [K].

    Under the weight-aware criterion input k is kept when |x_k| * channel_scale[k] > t: an activation feeding
    large weights matters more than an equally large one feeding small weights (arXiv 2505.19427).
    """
    return weight.detach().float().norm(dim=0)


class SimulatedLinear(nn.Module):
    """A projection under calibration: y = sparsify(x) @ W^T + b, optionally observing x.

    The score of input k is |x_k| (magnitude criterion) or |x_k| * channel_scale[k] (weight_aware, when
    `channel_scale` is set); inputs whose score is not above `threshold` are zeroed.
    """

    def __init__(self, linear: nn.Linear, channel_scale: torch.Tensor | None = None):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.threshold = 0.0
        self.channel_scale = channel_scale
        self.observer: Callable[[torch.Tensor], None] | None = None
        # With `reuse` on, a call on the very same input tensor at the same threshold returns the previous
        # output: the greedy search re-evaluates the MLP with only one projection changed.
        self.reuse = False
        self._last: tuple[torch.Tensor, float, torch.Tensor] | None = None

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """What the threshold is compared with: |x|, or |x| * channel_scale (a zero-norm channel scores 0)."""
        if self.channel_scale is None:
            return x.abs()
        return x.abs() * self.channel_scale.to(device=x.device, dtype=x.dtype)

    def sparsify(self, x: torch.Tensor) -> torch.Tensor:
        """x with every input whose score is not above the threshold zeroed (x itself at threshold 0)."""
        threshold = self.threshold
        return x * (self.score(x) > threshold) if threshold > 0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x)
        if self.reuse and self._last is not None and self._last[0] is x and self._last[1] == self.threshold:
            return self._last[2]
        out = F.linear(self.sparsify(x), self.weight, self.bias)
        self._last = (x, self.threshold, out) if self.reuse else None
        return out


def attach_simulated(layer: nn.Module, criterion: str = "magnitude") -> dict[str, SimulatedLinear]:
    """Swap the layer's seven projections for SimulatedLinear (sharing their parameters).

    Under `weight_aware` each gets the channel_scale of its float weight (the weights the artifact's
    channel_scale is computed from, before quantization replaces them).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown sparsity criterion {criterion!r} (expected one of {', '.join(CRITERIA)})")
    sims = {}
    for proj, path in PROJECTIONS.items():
        parent_path, _, child = path.rpartition(".")
        parent = layer.get_submodule(parent_path)
        linear = getattr(parent, child)
        scale = channel_scale(linear.weight) if criterion == "weight_aware" else None
        sims[proj] = SimulatedLinear(linear, scale)
        setattr(parent, child, sims[proj])
    return sims


@dataclass
class LayerRunner:
    """Runs a decoder layer over batches of hidden states with fixed rotary embeddings (causal, no cache)."""

    layer: nn.Module
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    batch_size: int = 8

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
        """hidden: [S, T, D] anywhere -> [S, T, D] on hidden's device."""
        outs = []
        for start in range(0, hidden.shape[0], self.batch_size):
            h = hidden[start : start + self.batch_size].to(device, non_blocking=True)
            out = self.layer(h, attention_mask=None, position_embeddings=self.position_embeddings)
            if isinstance(out, tuple):
                out = out[0]
            outs.append(out.to(hidden.device))
        return torch.cat(outs)


def capture_histograms(runner: LayerRunner, sims: Mapping[str, SimulatedLinear], hidden: torch.Tensor, device) -> dict[str, AbsHistogram]:
    """Histogram of each projection's score over all calibration tokens (dense layer), keyed by projection.

    Magnitude criterion: the projections of one activation point read the same |x|, so they share one
    histogram object (one pass per point). Weight-aware: each projection scores its input with its own
    channel_scale, so each has its own histogram.
    """
    hists: dict[str, AbsHistogram] = {}
    for projs in ACTIVATION_POINTS.values():
        shared = None
        for proj in projs:
            sim = sims[proj]
            if sim.channel_scale is None and shared is not None:
                hists[proj] = shared
                continue
            hist = hists[proj] = AbsHistogram(device=device)
            if sim.channel_scale is None:
                shared = hist
            sim.observer = lambda x, _h=hist, _s=sim: _h.update(_s.score(x))
    try:
        runner(hidden, device)
    finally:
        for sim in sims.values():
            sim.observer = None
    return hists


class TailBlock:
    """The layer's output on the last fraction of each sequence, for the greedy search's many evaluations.

    A pre-norm decoder layer is h2 = h + attn(norm1(h)); y = h2 + mlp(norm2(h2)). Attention needs every
    position, but the MLP is per token, and the error only counts the last fraction (where decode happens):
    so the MLP runs on that tail only, and h2 is cached per attention-threshold setting, which makes the
    gate/up/down candidates of a greedy step cost a tail MLP each. Exact: equal to layer(h)[:, start:].
    """

    def __init__(self, layer: nn.Module, sims: Mapping[str, SimulatedLinear], hidden: torch.Tensor,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor], last_fraction: float, cache_size: int = 16):
        self.layer, self.sims, self.hidden = layer, sims, hidden
        self.position_embeddings = position_embeddings
        self.start = int(hidden.shape[1] * (1 - last_fraction))
        self.cache: dict[tuple[float, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache_size = cache_size

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        key = tuple(self.sims[p].threshold for p in ("q", "k", "v", "o"))
        cached = self.cache.get(key)
        if cached is None:
            layer, h = self.layer, self.hidden
            attn = layer.self_attn(layer.input_layernorm(h), position_embeddings=self.position_embeddings, attention_mask=None)[0]
            h2 = (h + attn)[:, self.start :]
            if len(self.cache) >= self.cache_size:
                self.cache.pop(next(iter(self.cache)))
            cached = self.cache[key] = (h2, self.layer.post_attention_layernorm(h2))
        h2, normed = cached
        return h2 + self.layer.mlp(normed)


def set_thresholds(sims: Mapping[str, SimulatedLinear], thresholds: Mapping[str, float]) -> None:
    for proj, t in thresholds.items():
        sims[proj].threshold = t


def thresholds_for(allocation: Mapping[str, float], hists: Mapping[str, AbsHistogram],
                   memo: dict[tuple[int, float], float] | None = None) -> dict[str, float]:
    """Each projection's threshold: the inverse CDF of its score histogram at its sparsity.

    The memo is keyed by histogram (identity) and sparsity, so projections sharing a histogram share entries.
    """
    out = {}
    for proj, s in allocation.items():
        hist = hists[proj]
        if memo is None:
            out[proj] = hist.threshold(s)
            continue
        key = (id(hist), s)
        if key not in memo:
            memo[key] = hist.threshold(s)
        out[proj] = memo[key]
    return out


@dataclass
class LayerAllocation:
    """Per level: the per-projection sparsity and threshold, plus measured block errors."""

    levels: list[float]
    sparsities: list[dict[str, float]]
    thresholds: list[dict[str, float]]
    errors: dict[str, list[float]] = field(default_factory=dict)  # allocation kind -> relative error per level

    def projection_thresholds(self, proj: str) -> list[float]:
        """Non-decreasing thresholds of one projection across levels (the artifact's P.thresholds)."""
        out, last = [], 0.0
        for per_level in self.thresholds:
            last = max(last, per_level[proj])
            out.append(last)
        return out


# Sums over this process's calibration tokens -> sums over every process's (torch.distributed all-reduce).
Reduce = Callable[[torch.Tensor], torch.Tensor]


def allocate(
    layer: nn.Module,
    sims: Mapping[str, SimulatedLinear],
    hists: Mapping[str, AbsHistogram],
    subset: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    levels: Sequence[float],
    *,
    method: str,
    step: float,
    last_fraction: float,
    compare_uniform: bool = True,
    progress: Callable[[float], None] | None = None,
    reduce: Reduce | None = None,
) -> LayerAllocation:
    """Sparsity allocation of one layer for every level ('greedy': TEAL block-wise search; 'uniform').

    The block error of an allocation is ||Y - Y_hat||^2 / ||Y||^2 over the last fraction of each sequence of
    `subset` (on the compute device), Y being the dense output of the float layer. Both are plain sums over tokens:
    `reduce`, when given, turns a float64 tensor of this process's sums into the sums over all processes, so every
    process of a distributed run takes the same decisions (a process whose share of `subset` is empty adds zeros).
    """
    sizes = {p: s.weight.numel() for p, s in sims.items()}
    zero = {p: 0.0 for p in sizes}
    set_thresholds(sims, zero)
    empty = subset.shape[0] == 0
    block = None if empty else TailBlock(layer, sims, subset, position_embeddings, last_fraction)
    reference = None if empty else block().float()

    def summed(local: torch.Tensor) -> float:
        local = local.reshape(1).to(torch.float64)
        return float((reduce(local) if reduce is not None else local)[0])

    ref_norm = summed(torch.zeros(()) if empty else reference.pow(2).sum(dtype=torch.float64)) or 1.0
    memo: dict[tuple[int, float], float] = {}

    def error_of(allocation: Mapping[str, float]) -> float:
        set_thresholds(sims, thresholds_for(allocation, hists, memo))
        if empty:
            return summed(torch.zeros(())) / ref_norm
        return summed((block().float() - reference).pow(2).sum(dtype=torch.float64)) / ref_norm

    for sim in sims.values():
        sim.reuse = True

    positive = [lv for lv in levels if lv > 0]
    uniform = uniform_allocation(sizes, positive)
    if method == "greedy":
        chosen = greedy_allocation(error_of, sizes, positive, step, progress=progress)
    elif method == "uniform":
        chosen = uniform
    else:
        raise ValueError(f"unknown allocation {method!r}")
    by_level = [zero if lv == 0 else chosen[positive.index(lv)] for lv in levels]
    result = LayerAllocation(
        levels=list(levels), sparsities=by_level, thresholds=[thresholds_for(a, hists) for a in by_level]
    )
    result.errors[method] = [error_of(a) for a in by_level]
    if compare_uniform and method != "uniform":
        result.errors["uniform"] = [error_of(zero if lv == 0 else uniform[positive.index(lv)]) for lv in levels]
    set_thresholds(sims, zero)
    for sim in sims.values():
        sim.reuse, sim._last = False, None
    return result


def predicted_sparsity(allocation: LayerAllocation, hists: Mapping[str, AbsHistogram], sizes: Mapping[str, int]) -> list[float]:
    """Size-weighted sparsity each level's thresholds give on the calibration activations."""
    out = []
    for per_level in allocation.thresholds:
        realized = {p: hists[p].sparsity_at(t) if t > 0 else 0.0 for p, t in per_level.items()}
        out.append(effective_sparsity(realized, sizes))
    return out
