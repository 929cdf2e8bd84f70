"""The layer-streaming loop: the per-layer work of every compression, in one place.

The recipe pipeline (pipeline.py), the synthetic-artifact builder (synthetic.py, also behind bench's in-memory
synthetic model) and a distributed run all call `compress_layers`. Per decoder layer it

  1. loads that layer's float weights (a `LayerWeights`: the base model's shards, or synthetic random codes);
  2. captures the histograms of the activation scores over the calibration hidden states (dense float layer);
  3. allocates sparsity between the seven projections for every level (greedy or uniform);
  4. quantizes each projection through a `LayerQuantizer` (rtn / gptq / a GPTQ checkpoint's codes / synthetic
     codes: the loop names no method; a Hessian-based method runs its own extra pass in `prepare`);
  5. propagates: runs the compressed layer (dequantized weights, default-level thresholds) over the hidden states,
     writing each batch's output over its input in the one `HiddenStates` buffer;
  6. yields the layer's artifact tensors and its report row, so the caller writes them (and checkpoints the run)
     before the next layer starts.

Only this layer's float weights exist on the compute device (a meta skeleton gives the structure); the hidden
states are one buffer (host memory, the device, or a file on disk: hidden.py).

Distributed runs: statistics a layer accumulates over calibration tokens go through `Reducer.all_reduce` (a sum
over processes, in place); `SingleProcess` does nothing, so one process gets bit-for-bit the numbers it always had.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Protocol

import torch
from torch import nn

from teal_quant.architecture import PROJECTIONS, build_skeleton, materialize_non_persistent_buffers
from teal_quant.artifact.format import layer_key_prefix, linear_key
from teal_quant.compression.calibrate.histogram import AbsHistogram
from teal_quant.compression.calibrate.layer import (
    LayerAllocation,
    SimulatedLinear,
    allocate,
    attach_simulated,
    capture_histograms,
    predicted_sparsity,
)
from teal_quant.compression.hidden import HiddenStates


class Reducer(Protocol):
    """Sums statistics over the processes of a distributed run (torch.distributed); one process: nothing to do."""

    rank: int
    world_size: int

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Replace `tensor` (in place) by its sum over every process."""


class SingleProcess:
    """The reducer of a run in one process: sums over one process are the tensors themselves."""

    rank = 0
    world_size = 1

    def all_reduce(self, tensor: torch.Tensor) -> None:
        return None


SINGLE_PROCESS = SingleProcess()


class LayerWeights(Protocol):
    """Where the float weights of each decoder layer come from."""

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        """The layer's state dict (keys relative to the layer, e.g. 'self_attn.q_proj.weight'), float tensors."""

    def release(self, index: int) -> None:
        """Layer `index` is done: what only it needed may go (a downloaded shard, drawn codes)."""


@dataclass
class LayerWork:
    """One decoder layer as the quantizer sees it: the float layer with its SimulatedLinear projections, the
    allocation found, a way to run the float layer over the calibration hidden states, and the reducer."""

    index: int
    layer: nn.Module
    sims: dict[str, SimulatedLinear]
    allocation: LayerAllocation
    levels: list[float]
    passes: "LayerPasses"
    reducer: Reducer

    def module_name(self, proj: str) -> str:
        """The projection's fully qualified module name (model.layers.3.self_attn.q_proj)."""
        return layer_key_prefix(self.index) + PROJECTIONS[proj]


class LayerQuantizer(Protocol):
    """A quantization method, as the loop sees it."""

    def prepare(self, work: LayerWork) -> None:
        """Before any projection is quantized: e.g. accumulate input Hessians with one more float pass."""

    def quantize(self, work: LayerWork, proj: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """({artifact suffix: tensor} of the projection: qweight, scales, zeros (perm)), and the dequantized weight
        [N, K] the next layer must be calibrated through (None: the float weight already is it)."""

    def finish(self, work: LayerWork) -> dict:
        """After the layer: what the calibration report keeps about it (e.g. GPTQ stats per projection), or {}."""


@dataclass(frozen=True)
class StreamSettings:
    """How each layer is calibrated and propagated (the recipe's sparsity section, resolved)."""

    levels: list[float]  # the artifact's level table: 0 first
    default_level: float
    allocation: str  # greedy | uniform
    step: float
    greedy_tokens: int
    last_fraction: float
    compute_dtype: torch.dtype
    storage_dtype: torch.dtype  # dtype of the layer's non-projection tensors (norms) in the artifact
    device: torch.device
    criterion: str = "magnitude"
    compare_uniform: bool = True  # also measure the uniform allocation's block error (report)
    batch_size: int = 8
    search: str = "lazy"  # greedy candidates: lazy (re-measure the promising) | exact (all); calibrate.allocation

    @property
    def default_index(self) -> int:
        return min(range(len(self.levels)), key=lambda j: abs(self.levels[j] - self.default_level))


@dataclass
class LayerResult:
    """What one layer produced: its artifact tensors (keys as the artifact names them) and its report row."""

    index: int
    tensors: dict[str, torch.Tensor]
    report: dict
    dense_params: int
    seconds: float


class LayerPasses:
    """Runs the layer over every batch of the hidden states: for calibration (outputs dropped, observers see the
    inputs) or to propagate (each batch's output written over its input). Called as `passes(hidden, device)` it is
    the runner calibrate.layer.capture_histograms expects."""

    def __init__(self, layer: nn.Module, position_embeddings, hidden: HiddenStates, device: torch.device,
                 compute_dtype: torch.dtype, batch_size: int):
        self.layer, self.position_embeddings, self.hidden = layer, position_embeddings, hidden
        self.device, self.compute_dtype, self.batch_size = device, compute_dtype, batch_size

    def _forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.layer(h, attention_mask=None, position_embeddings=self.position_embeddings)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run(self, samples: int | None = None) -> None:
        """The layer over the first `samples` sequences (all when None), outputs dropped."""
        n = self.hidden.samples if samples is None else min(samples, self.hidden.samples)
        for start in range(0, n, self.batch_size):
            self._forward(self.hidden.read(start, min(start + self.batch_size, n), self.device, self.compute_dtype))

    def __call__(self, hidden, device) -> None:  # the runner protocol of capture_histograms
        self.run()

    @torch.no_grad()
    def propagate(self) -> None:
        """hidden <- layer(hidden), batch by batch, in the one buffer."""
        n = self.hidden.samples
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            self.hidden.write(start, self._forward(self.hidden.read(start, stop, self.device, self.compute_dtype)))
        self.hidden.finish_layer()


def distinct_histograms(hists: Mapping[str, AbsHistogram]) -> list[AbsHistogram]:
    """Each histogram object once (q/k/v share one under the magnitude criterion)."""
    out: list[AbsHistogram] = []
    for h in hists.values():
        if not any(h is seen for seen in out):
            out.append(h)
    return out


def compact_histograms(hists: Mapping[str, AbsHistogram]) -> list[dict]:
    """Each distinct activation-score histogram of a layer, compacted (256 log bins), with the projections it feeds."""
    groups: list[tuple[AbsHistogram, list[str]]] = []
    for proj in PROJECTIONS:
        for h, projs in groups:
            if h is hists[proj]:
                projs.append(proj)
                break
        else:
            groups.append((hists[proj], [proj]))
    return [{"projections": projs, **h.compact()} for h, projs in groups]


class Peaks:
    """Peak host RSS (the process's high-water mark) and peak GPU memory (allocated and reserved by torch)."""

    def __init__(self, device: torch.device):
        self.device = device

    def host_bytes(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    def gpu_bytes(self) -> dict[str, int]:
        if self.device.type != "cuda":
            return {}
        return {"allocated": int(torch.cuda.max_memory_allocated(self.device)),
                "reserved": int(torch.cuda.max_memory_reserved(self.device))}

    @staticmethod
    def host_now_bytes() -> int:
        """The resident set right now (Linux /proc/self/statm; 0 elsewhere)."""
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize()
        except (OSError, ValueError, IndexError):
            return 0

    def snapshot(self) -> dict:
        gpu = self.gpu_bytes()
        return {"host_rss_bytes": self.host_bytes(), "host_rss_now_bytes": self.host_now_bytes(),
                **({"gpu_allocated_bytes": gpu["allocated"], "gpu_reserved_bytes": gpu["reserved"]} if gpu else {})}


def release_freed_host_memory() -> None:
    """glibc keeps freed medium-sized blocks (under its 32 MB mmap threshold) in its heaps: a layer's many temporary
    tensors then leave the resident set higher after each layer. malloc_trim(0) hands them back; elsewhere a no-op."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def rotary_embeddings(config, skeleton: nn.Module, seq_len: int, device: torch.device, dtype: torch.dtype):
    """(cos, sin) of positions 0..seq_len-1, shared by every layer (no cache: each window starts at 0)."""
    probe = torch.zeros(1, seq_len, config.hidden_size, device=device, dtype=dtype)
    return skeleton.model.rotary_emb(probe, torch.arange(seq_len, device=device)[None])


def _summed(reducer: Reducer) -> Callable[[torch.Tensor], torch.Tensor]:
    """calibrate.layer.allocate's `reduce`: the tensor summed over the processes (in place), returned."""
    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        reducer.all_reduce(tensor)
        return tensor

    return reduce


def compress_layers(config, weights: LayerWeights, quantizer: LayerQuantizer, hidden: HiddenStates,
                    settings: StreamSettings, *, first_layer: int = 0, reducer: Reducer = SINGLE_PROCESS,
                    on_stage: Callable[[int, str], None] | None = None,
                    greedy_progress: Callable[[int, float], None] | None = None) -> Iterator[LayerResult]:
    """Compress decoder layers first_layer .. num_layers-1 in order; `hidden` holds the input of `first_layer` and,
    after each yield, the input of the next layer. The caller writes each LayerResult (and may checkpoint the run)
    before asking for the next one. `on_stage(i, name)` is told as each stage of layer i starts (progress);
    `greedy_progress(i, effective_sparsity)` follows the greedy search."""
    config._attn_implementation = "sdpa"
    device, dtype = settings.device, settings.compute_dtype
    skeleton = build_skeleton(config, dtype)
    materialize_non_persistent_buffers(skeleton, device)
    position_embeddings = rotary_embeddings(config, skeleton, hidden.seq_len, device, dtype)
    n_subset = max(1, math.ceil(settings.greedy_tokens / hidden.seq_len))
    # distributed: `hidden` holds this process's strided share of the sequences (teal_quant.distributed.World.split);
    # of the first n_subset global ones it holds its first local_count(n_subset)
    n_subset = len(range(reducer.rank, n_subset, reducer.world_size))
    levels, default_index = settings.levels, settings.default_index
    peaks = Peaks(device)

    def stage(i: int, name: str, seconds: dict, last: list) -> None:
        now = time.perf_counter()
        if last[0] is not None:
            seconds[last[0]] = round(seconds.get(last[0], 0.0) + now - last[1], 4)
        last[:] = [name, now]
        if on_stage is not None and name is not None:
            on_stage(i, name)

    for i in range(first_layer, int(config.num_hidden_layers)):
        t0 = time.perf_counter()
        stage_seconds: dict[str, float] = {}
        last: list = [None, t0]
        stage(i, "load", stage_seconds, last)
        layer = skeleton.model.layers[i]
        layer.to_empty(device=device)
        state = weights.layer_state(i)
        dense_params = sum(t.numel() for t in state.values())
        layer.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()})
        layer.eval()
        sims = attach_simulated(layer, settings.criterion)
        passes = LayerPasses(layer, position_embeddings, hidden, device, dtype, settings.batch_size)

        stage(i, "capture", stage_seconds, last)
        hists = capture_histograms(passes, sims, hidden, device)
        if reducer.world_size > 1:
            for h in distinct_histograms(hists):
                reducer.all_reduce(h.counts)

        stage(i, "allocate", stage_seconds, last)
        subset = hidden.read(0, min(n_subset, hidden.samples), device, dtype)
        allocation = allocate(
            layer, sims, hists, subset, position_embeddings, levels, method=settings.allocation, step=settings.step,
            last_fraction=settings.last_fraction, search=settings.search, compare_uniform=settings.compare_uniform,
            progress=None if greedy_progress is None else (lambda eff, _i=i: greedy_progress(_i, eff)),
            reduce=_summed(reducer) if reducer.world_size > 1 else None,  # distributed: squared errors summed
        )
        del subset

        stage(i, "quantize", stage_seconds, last)
        work = LayerWork(i, layer, sims, allocation, levels, passes, reducer)
        quantizer.prepare(work)
        tensors: dict[str, torch.Tensor] = {}
        for proj in PROJECTIONS:
            sim, name = sims[proj], work.module_name(proj)
            packed, weight = quantizer.quantize(work, proj)
            tensors.update({linear_key(name, suffix): t for suffix, t in packed.items()})
            if weight is not None:  # the next layer must see this one as it will run: dequantized weights
                sim.weight = nn.Parameter(weight.to(device=device, dtype=dtype).contiguous(), requires_grad=False)
            thresholds = allocation.projection_thresholds(proj)
            tensors[linear_key(name, "thresholds")] = torch.tensor(thresholds, dtype=torch.float32)
            if sim.channel_scale is not None:  # weight_aware: norms of the float weight's input columns
                tensors[linear_key(name, "channel_scale")] = sim.channel_scale.to(torch.float32)
            if sim.bias is not None:
                tensors[linear_key(name, "bias")] = sim.bias.detach().to(settings.storage_dtype)
            sim.threshold = thresholds[default_index]
        quant_stats = quantizer.finish(work)
        projection_params = {f"{p}.{s}" for p in PROJECTIONS.values() for s in ("weight", "bias")}
        prefix = layer_key_prefix(i)
        for key, t in state.items():
            if key not in projection_params:  # norms and any other parameter of the layer, in the artifact's dtype
                tensors[prefix + key] = t.to(settings.storage_dtype)
        del state

        stage(i, "propagate", stage_seconds, last)
        passes.propagate()
        stage(i, None, stage_seconds, last)

        sizes = {p: s.weight.numel() for p, s in sims.items()}
        report = {
            "layer": i,
            "levels": levels,
            "sparsity": [{p: round(s, 6) for p, s in a.items()} for a in allocation.sparsities],
            "thresholds": {p: allocation.projection_thresholds(p) for p in PROJECTIONS},
            "calibration_sparsity": predicted_sparsity(allocation, hists, sizes),
            "block_error": allocation.errors,
            "greedy_evaluations": allocation.evaluations,
            "histograms": compact_histograms(hists),
            **({"quantizer": quant_stats} if quant_stats else {}),
            "seconds": round(time.perf_counter() - t0, 3),
            "stage_seconds": stage_seconds,
            "peaks": peaks.snapshot(),
        }
        layer.to("meta")
        del sims, passes, hists, work, allocation
        release_freed_host_memory()
        yield LayerResult(index=i, tensors=tensors, report=report, dense_params=dense_params,
                          seconds=time.perf_counter() - t0)
        weights.release(i)


@dataclass
class StreamSummary:
    """Numbers of a finished stream the pipeline's summary shows."""

    layers: list[dict] = field(default_factory=list)

    def mean_over_layers(self, key: str, n_levels: int) -> list[float]:
        return [sum(r[key][j] for r in self.layers) / len(self.layers) for j in range(n_levels)]
