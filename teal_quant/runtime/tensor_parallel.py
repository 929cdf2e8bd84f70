"""Tensor-parallel decoding over torch.distributed: Megatron's split of a decoder layer, applied to a loaded model in
place the way gpt-fast's `apply_tp` does it (docs/decoding.md, "Tensor parallel").

Per decoder layer, over the W ranks of a process group:
- q/k/v and gate/up are split along N (column parallel): rank r keeps the output columns of its heads (q: H/W heads,
  k/v: KV/W heads, so grouped-query attention stays local) and its slice of the intermediate size. The int4 words
  pack 8 consecutive output columns of one row, so a column slice is a slice of whole words: nothing is repacked.
- o and down are split along K (row parallel): rank r keeps the rows of W^T that its own slice of x feeds, and the
  groups of scales/zeros that cover them (the slice must start and end on a group boundary). Each rank thresholds
  its own slice of x with the same per-projection threshold, so the union of the ranks' surviving rows is exactly
  the one-process set, and each reads only its rows.
- the partial outputs of o and down are summed by one all-reduce each: the shard sits inside an `AllReduceOutput`
  module at o_proj / down_proj, so transformers' attention and MLP code, the fused decode step
  (runtime/decode_step.py, which calls o_proj and down_proj itself) and the bench's baselines (which swap the
  TealLinear inside for nn.Linear or tinygemm) all sum the same way; a bias of a row-parallel projection is kept by
  rank 0 only.
Embeddings, norms and lm_head are replicated; every rank computes the same logits and the same greedy tokens.
The KV cache holds only the local heads (transformers' static cache sizes its layers from the first keys it sees).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from teal_quant.architecture import PROJECTIONS
from teal_quant.errors import TealQuantError
from teal_quant.runtime.modules import TealLinear

COLUMN_PARALLEL = ("q", "k", "v", "gate", "up")
ROW_PARALLEL = ("o", "down")


@dataclass(frozen=True)
class TensorParallel:
    """How a model is sharded (model.tensor_parallel)."""

    rank: int
    size: int
    group: Any = None  # the process group (None: the default group)


def shard_for_tensor_parallel(model: nn.Module, group: Any = None) -> nn.Module:
    """Shard a teal_quant model (from `teal_quant.load`) in place over the ranks of `group` (default: the default
    process group) and return it; o_proj and down_proj become `AllReduceOutput` modules around their shards. Every rank calls it on the same model; a world of one leaves the model unchanged.

    Raises TealQuantError when the shapes do not split: heads and KV heads must divide by the world size, column
    slices must hold whole int4 words, and row slices whole quantization groups. Fused q/k/v and gate/up groups are
    split back first and fused again afterwards (on CUDA).
    """
    import torch.distributed as dist

    if getattr(model, "tensor_parallel", None) is not None:
        raise TealQuantError("this model is already sharded for tensor parallelism")
    if not (dist.is_available() and dist.is_initialized()):
        return model
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if size == 1:
        return model
    check_tensor_parallel(model.config, size, _group_size(model))
    from teal_quant.runtime.fusion import fuse_projections, fused_groups, unfuse_projections

    was_fused = bool(fused_groups(model))
    unfuse_projections(model)
    for layer in model.model.layers:
        for proj, path in PROJECTIONS.items():
            module = layer.get_submodule(path)
            parent_path, _, child = path.rpartition(".")
            style = "column" if proj in COLUMN_PARALLEL else "row"
            shard = shard_module(module, style, rank, size, name=path)
            setattr(layer.get_submodule(parent_path), child, AllReduceOutput(shard, group) if style == "row" else shard)
    if was_fused:
        fuse_projections(model)
    model.tensor_parallel = TensorParallel(rank=rank, size=size, group=group)
    return model


def check_tensor_parallel(config, size: int, group_size: int | None) -> None:
    """The config splits over `size` ranks: heads and KV heads divide, N/size holds whole int4 words, K/size whole
    groups (group_size None: not quantized, only the heads count). One clear TealQuantError otherwise."""
    from teal_quant.architecture import projection_shapes

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % size or kv_heads % size:
        raise TealQuantError(f"tensor parallel over {size} ranks: {heads} attention heads and {kv_heads} key/value "
                             f"heads must both divide by {size}")
    for proj, (k, n) in projection_shapes(config).items():
        if proj in COLUMN_PARALLEL and (n // size) % 8:
            raise TealQuantError(f"tensor parallel over {size} ranks: {PROJECTIONS[proj]} has {n} outputs, "
                                 f"{n // size} per rank is not a multiple of 8 (whole int4 words)")
        if proj in ROW_PARALLEL and k % size:
            raise TealQuantError(f"tensor parallel over {size} ranks: {PROJECTIONS[proj]} has {k} inputs, "
                                 f"which do not divide by {size}")
        if proj in ROW_PARALLEL and group_size and group_size > 0 and (k // size) % group_size:
            raise TealQuantError(f"tensor parallel over {size} ranks: {PROJECTIONS[proj]} has {k} inputs, "
                                 f"{k // size} per rank is not a whole number of groups of {group_size}")


def _group_size(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, TealLinear):
            return module.group_size if module.group_size != module.in_features else None
    return None


def shard_module(module: nn.Module, style: str, rank: int, size: int, *, name: str = "projection") -> nn.Module:
    """Rank `rank`'s share of one projection: "column" keeps out_features slice r, "row" in_features slice r.

    A TealLinear gives a new TealLinear holding views-turned-copies of its packed buffers (qweight words, scale and
    zero groups, thresholds, channel scales); an nn.Linear gives an nn.Linear of the weight slice."""
    if style not in ("column", "row"):
        raise ValueError(f"style must be 'column' or 'row', got {style!r}")
    if isinstance(module, TealLinear):
        return _shard_teal_linear(module, style, rank, size, name)
    if isinstance(module, nn.Linear):
        return _shard_dense_linear(module, style, rank, size)
    raise TealQuantError(f"tensor parallel: {name} is a {type(module).__name__}, not a linear layer")


def _shard_teal_linear(m: TealLinear, style: str, rank: int, size: int, name: str) -> TealLinear:
    k, n = m.in_features, m.out_features
    per_word = 8 if m.bits == 4 else 1
    bias = m.bias
    if style == "column":
        n0, n1 = n * rank // size, n * (rank + 1) // size
        if n0 % 8 or n1 % 8:
            raise TealQuantError(f"tensor parallel: {name} columns {n0}:{n1} do not start and end on int4 words")
        qweight = m.qweight[:, n0 // per_word : n1 // per_word]
        scales, zeros = m.scales[:, n0:n1], m.zeros[:, n0:n1]
        bias = None if bias is None else bias[n0:n1]
        channel_scale, perm = m.channel_scale, m.perm
        k_local, n_local = k, n1 - n0
    else:
        k0, k1 = k * rank // size, k * (rank + 1) // size
        per_channel = m.group_size == k  # one scale/zero row for all of K: every rank keeps it
        g = k1 - k0 if per_channel else m.group_size
        if not per_channel and (k0 % g or k1 % g):
            raise TealQuantError(f"tensor parallel: {name} rows {k0}:{k1} do not start and end on groups of {g}")
        if m.perm is not None:
            raise TealQuantError(f"tensor parallel: {name} stores its rows in act-order (a GPTQ import with perm); "
                                 "such a projection cannot be split along its inputs")
        qweight = m.qweight[k0:k1]
        groups = slice(0, 1) if per_channel else slice(k0 // g, k1 // g)
        scales, zeros = m.scales[groups], m.zeros[groups]
        bias = bias if rank == 0 else None  # added once, by rank 0, before the sum over the ranks
        channel_scale = None if m.channel_scale is None else m.channel_scale[k0:k1]
        perm = None
        k_local, n_local = k1 - k0, n
    local = TealLinear(
        k_local, n_local, bits=m.bits, group_size=k_local if m.group_size == k else m.group_size, n_levels=m.thresholds.numel(), bias=bias is not None,
        dtype=m.scales.dtype, device="meta", prefill=m.prefill, channel_scale=channel_scale is not None,
        perm=perm is not None,
    )
    with torch.no_grad():
        local.qweight = qweight.contiguous()
        local.scales, local.zeros = scales.contiguous(), zeros.contiguous()
        local.thresholds = m.thresholds.clone()
        local.bias = None if bias is None else bias.contiguous()
        local.channel_scale = None if channel_scale is None else channel_scale.contiguous()
        local.perm = perm
    local.level_index, local.track = m.level_index, m.track
    local.materialize_runtime_state(m.qweight.device)
    return local


def _shard_dense_linear(m: nn.Linear, style: str, rank: int, size: int) -> nn.Linear:
    n, k = m.weight.shape
    if style == "column":
        n0, n1 = n * rank // size, n * (rank + 1) // size
        weight, bias = m.weight[n0:n1], None if m.bias is None else m.bias[n0:n1]
    else:
        k0, k1 = k * rank // size, k * (rank + 1) // size
        weight, bias = m.weight[:, k0:k1], m.bias if rank == 0 else None
    with torch.device("meta"):
        local = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=m.weight.dtype)
    local.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        local.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return local


class AllReduceOutput(nn.Module):
    """A row-parallel projection: `inner` (this rank's rows) applied to this rank's slice of x, then the partial
    outputs summed over the group in place (one all-reduce; CUDA-graph capturable with NCCL)."""

    def __init__(self, inner: nn.Module, group: Any = None):
        super().__init__()
        self.inner = inner
        self.group = group

    @property
    def in_features(self) -> int:
        return self.inner.in_features

    @property
    def out_features(self) -> int:
        return self.inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = self.inner(x)
        dist.all_reduce(y, group=self.group)
        return y
