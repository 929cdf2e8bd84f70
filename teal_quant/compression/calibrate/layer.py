"""One decoder layer during calibration: activation capture, TEAL thresholds, block error, propagation.

The layer is the transformers module itself; its seven projections are swapped for `SimulatedLinear`,
which can observe its input, threshold it, and use float or dequantized weights. So the block error of
an allocation is measured by running the real layer, whatever attention or norm variant it has.
"""

from __future__ import annotations

from collections import OrderedDict
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
        # reuse > 0: a call on the very same input tensor at a threshold seen among the last `reuse` calls returns
        # that call's output (the greedy search re-evaluates the block with one projection changed at a time).
        self.reuse = 0
        self._recent: list[tuple[torch.Tensor, float, torch.Tensor]] = []

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
        if self.reuse:
            for seen, threshold, out in self._recent:
                if seen is x and threshold == self.threshold:
                    return out
        out = F.linear(self.sparsify(x), self.weight, self.bias)
        if self.reuse:
            self._recent = [(x, self.threshold, out)] + self._recent[: self.reuse - 1]
        return out

    def forget(self) -> None:
        """Drop the reused outputs (and stop reusing)."""
        self.reuse, self._recent = 0, []


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


class _TailRows(nn.Module):
    """Stands in for q_proj while the block is evaluated: the projection of the tail rows only, zeros elsewhere.

    A tail query attends to every earlier key and value, but nothing reads the queries of the other rows."""

    def __init__(self, sim: SimulatedLinear, start: int):
        super().__init__()
        self.sim, self.start = sim, start
        self._tail: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._tail is None or self._tail[0] is not x:  # the same slice object each time: the sim reuses its output
            self._tail = (x, x[:, self.start :])
        tail = self.sim(self._tail[1])
        out = tail.new_zeros(*x.shape[:-1], tail.shape[-1])
        out[:, self.start :] = tail
        return out


class _CaptureTail(nn.Module):
    """Stands in for o_proj while attention runs: keeps o's input on the tail rows, returns its input unchanged."""

    def __init__(self, start: int):
        super().__init__()
        self.start = start
        self.tail: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tail = x[:, self.start :]
        return x


class _Recent(OrderedDict):
    """A small LRU: the last `size` sub-block results by threshold key."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, compute: Callable[[], object]):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = compute()
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class BlockEvaluator:
    """The layer's update on the last fraction of each sequence, for the greedy search's many evaluations,
    recomputing only the sub-blocks whose thresholds changed.

    A pre-norm decoder layer is h2 = h + o(attn(q, k, v of norm1(h))); y = h2 + mlp(norm2(h2)). The error only
    counts the last fraction of each sequence (where decode happens); attention needs every position for its
    keys and values, but everything after it is per token. So: norm1(h) is computed once; q runs on the tail rows
    only; attention's output on the tail is kept per (q, k, v) thresholds and the MLP's input per (q, k, v, o)
    thresholds; and each projection returns its kept output when its input and threshold are ones it has just
    seen (raising only down recomputes down alone; raising gate recomputes gate and down; raising o recomputes o
    and the MLP). Exact: h + update equals layer(h)[:, start:] with every projection at its threshold. It runs the
    transformers module itself (its attention kernel, rotary, q/k norms and biases), so every supported family is
    covered.
    """

    def __init__(self, layer: nn.Module, sims: Mapping[str, SimulatedLinear], hidden: torch.Tensor,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor], last_fraction: float, cache_size: int = 4):
        self.layer, self.sims = layer, sims
        self.position_embeddings = position_embeddings
        self.start = int(hidden.shape[1] * (1 - last_fraction))
        with torch.no_grad():
            self.normed = layer.input_layernorm(hidden)
        self.residual = hidden[:, self.start :]
        self._q_rows = _TailRows(sims["q"], self.start)
        self._attention = _Recent(cache_size)  # (tq, tk, tv) -> o's input on the tail
        self._mlp_input = _Recent(cache_size)  # (tq, tk, tv, to) -> (o's output in fp32, norm2(h2)) on the tail

    def _attend(self) -> torch.Tensor:
        attn = self.layer.self_attn
        q_proj, o_proj, capture = attn.q_proj, attn.o_proj, _CaptureTail(self.start)
        attn.q_proj, attn.o_proj = self._q_rows, capture
        try:
            attn(self.normed, position_embeddings=self.position_embeddings, attention_mask=None)
        finally:
            attn.q_proj, attn.o_proj = q_proj, o_proj
        return capture.tail

    def _after_attention(self, attended: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.sims["o"](attended)
        h2 = self.residual + attn
        return attn.float(), self.layer.post_attention_layernorm(h2)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        """[S, tail, D] float32: the layer's update on the tail rows, layer(h) - h, under the current thresholds.

        The update, not the output: the output's difference from the reference is the updates' difference, and in a
        16-bit layer the rounding of h + update (the residual stream is far larger than one layer's update) would
        otherwise add noise comparable to the small errors the search compares."""
        key = tuple(self.sims[p].threshold for p in ("q", "k", "v"))
        attended = self._attention.get_or(key, self._attend)
        attn, normed = self._mlp_input.get_or(key + (self.sims["o"].threshold,),
                                              lambda: self._after_attention(attended))
        return attn + self.layer.mlp(normed).float()


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
    evaluations: int = 0  # block evaluations the search made (the reported errors not counted)

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
    search: str = "lazy",
    compare_uniform: bool = True,
    progress: Callable[[float], None] | None = None,
    reduce: Reduce | None = None,
) -> LayerAllocation:
    """Sparsity allocation of one layer for every level ('greedy': TEAL block-wise search; 'uniform').

    The block error of an allocation is ||Y - Y_hat||^2 / ||Y||^2 over the last fraction of each sequence of
    `subset` (on the compute device), Y being the dense output of the layer in its dtype (the sums in float64).
    Both are plain sums over tokens: `reduce`, when given, turns a float64 tensor of this process's sums into the
    sums over all processes (one call per greedy step in the exact search, per evaluation in the lazy one), so
    every process takes the same decisions (a process whose share of `subset` is empty adds zeros). `search`: see
    greedy_allocation.
    """
    sizes = {p: s.weight.numel() for p, s in sims.items()}
    zero = {p: 0.0 for p in sizes}
    set_thresholds(sims, zero)
    for sim in sims.values():
        sim.reuse = 3  # the current threshold, a candidate's, and one spare
    try:
        empty = subset.shape[0] == 0  # distributed: this process holds none of the greedy sequences
        block = None if empty else BlockEvaluator(layer, sims, subset, position_embeddings, last_fraction)
        reference = None if empty else block()  # the dense update; ||Y||^2 of the dense output below
        ref_sum = torch.zeros(1, dtype=torch.float64, device=subset.device) if empty else \
            (block.residual.float() + reference).pow(2).sum(dtype=torch.float64).reshape(1)
        ref_norm = float((reduce(ref_sum) if reduce else ref_sum)[0]) or 1.0
        memo: dict[tuple[int, float], float] = {}
        evaluations = 0

        def block_errors(allocations: list[Mapping[str, float]]) -> list[float]:
            sums = []
            for allocation in allocations:
                set_thresholds(sims, thresholds_for(allocation, hists, memo))
                sums.append(ref_sum[0] * 0 if empty else (block() - reference).pow(2).sum(dtype=torch.float64))
            total = torch.stack(sums)
            return (((reduce(total) if reduce else total)) / ref_norm).tolist()

        def counted(allocations: list[Mapping[str, float]]) -> list[float]:
            nonlocal evaluations
            evaluations += len(allocations)
            return block_errors(allocations)

        positive = [lv for lv in levels if lv > 0]
        uniform = uniform_allocation(sizes, positive)
        if method == "greedy":
            chosen = greedy_allocation(counted, sizes, positive, step, progress=progress, search=search)
        elif method == "uniform":
            chosen = uniform
        else:
            raise ValueError(f"unknown allocation {method!r}")
        by_level = [zero if lv == 0 else chosen[positive.index(lv)] for lv in levels]
        result = LayerAllocation(levels=list(levels), sparsities=by_level,
                                 thresholds=[thresholds_for(a, hists) for a in by_level], evaluations=evaluations)
        result.errors[method] = block_errors(by_level)
        if compare_uniform and method != "uniform":
            result.errors["uniform"] = block_errors([zero if lv == 0 else uniform[positive.index(lv)] for lv in levels])
    finally:
        set_thresholds(sims, zero)
        for sim in sims.values():
            sim.forget()
    return result


def predicted_sparsity(allocation: LayerAllocation, hists: Mapping[str, AbsHistogram], sizes: Mapping[str, int]) -> list[float]:
    """Size-weighted sparsity each level's thresholds give on the calibration activations."""
    out = []
    for per_level in allocation.thresholds:
        realized = {p: hists[p].sparsity_at(t) if t > 0 else 0.0 for p, t in per_level.items()}
        out.append(effective_sparsity(realized, sizes))
    return out
