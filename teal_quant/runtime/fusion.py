"""Projection fusion: q/k/v (and gate/up) share one input, so one kernel launch can serve all of them.

`fuse_projections(model)` concatenates the packed buffers of each group along N once, into a `FusedGroup`,
and turns the members' `qweight` / `scales` / `zeros` into column views of it (no second copy of any weight:
the per-part tensors are freed). The members stay ordinary TealLinear modules in the transformers model, so
attention / MLP code is not touched: HF Llama-family layers call q, k, v (then gate, up) on the very same
tensor, so the first member called computes every part with one `kernels.sparse_gemv_fused` launch (decode)
or one `kernels.dense_gemm` (dense prefill) and the others return their slice of that result.

Why this instead of replacing the attention / MLP forward: it works for any model whose projections carry those
names, under any transformers version, and the unfused path stays available per call (a member called on a
different tensor, or in sparse prefill, where each part thresholds differently, just runs its own kernel).

Thresholds: the group owns one [n_parts] float32 tensor; each member's `threshold` buffer is a 0-dim view of its
entry, so `set_level` (an in-place copy) updates the fused launch too, and captured CUDA graphs keep working.
The realized-sparsity counters are views of [n_parts] group tensors as well, so one set of ops counts all parts.

Not fused (left as separate calls): members with a `perm` buffer (act-order GPTQ import), per-channel
thresholds (`channel_scale`), differing bits / group size / dtype / device / K. A move or cast of the
model (`model.to`, `.float()`) unfuses first (TealLinear._apply: the views would be copied apart from the group's
buffers); `unfuse_projections` undoes it explicitly (contiguous per-part buffers again).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from teal_quant import kernels
from teal_quant.runtime.modules import TealLinear

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedGroup:
    """The concatenated packed weight of projections that share one input, and the cache of its last result."""

    def __init__(self, members: list[TealLinear]):
        first = members[0]
        self.members = members
        self.bits, self.group_size = first.bits, first.group_size
        self.split_sizes = [m.out_features for m in members]
        per_word = 8 if self.bits == 4 else 1
        with torch.no_grad():
            self.qweight = torch.cat([m.qweight for m in members], dim=1)
            self.scales = torch.cat([m.scales for m in members], dim=1)
            self.zeros = torch.cat([m.zeros for m in members], dim=1)
            dev = first.qweight.device
            self.thresholds = torch.stack([m.threshold.detach().float() for m in members]).to(dev)
            self.zero_count = torch.stack([m.zero_count for m in members])
            self.input_count = torch.stack([m.input_count for m in members])
            self.last_sparsity = torch.stack([m.last_sparsity for m in members])
        start = 0
        for p, m in enumerate(members):
            end = start + m.out_features
            m.qweight = self.qweight[:, start // per_word : end // per_word]
            m.scales = self.scales[:, start:end]
            m.zeros = self.zeros[:, start:end]
            m.threshold = self.thresholds[p]
            m.zero_count = self.zero_count[p]
            m.input_count = self.input_count[p]
            m.last_sparsity = self.last_sparsity[p]
            m._fused_group, m._fused_part = self, p
            start = end
        self._clear()

    def _clear(self) -> None:
        self._x: Tensor | None = None
        self._version = -1
        self._decode = False
        self._parts: tuple[Tensor, ...] = ()
        self._served: set[int] = set()

    def output(self, member: TealLinear, x: Tensor, x2: Tensor, decode: bool) -> Tensor:
        """Member `member`'s product with x2 (x reshaped to [M, K]): from the cache when a sibling was just called on
        the very same tensor, else one fused launch for every part."""
        p = member._fused_part
        hit = self._x is x and self._version == x._version and self._decode == decode and p not in self._served
        if not hit:
            self._compute(x, x2, decode)
        y = self._parts[p]
        self._served.add(p)
        if len(self._served) == len(self.members):
            self._clear()  # drop the reference to x and the results as soon as every part was handed out
        return y

    def _compute(self, x: Tensor, x2: Tensor, decode: bool) -> None:
        if decode:
            if self.members[0].track:
                self._record(x2)
            y = kernels.sparse_gemv_fused(
                x2, self.qweight, self.scales, self.zeros, self.thresholds, self.split_sizes,
                bits=self.bits, group_size=self.group_size,
            )
        else:
            y = kernels.dense_gemm(x2, self.qweight, self.scales, self.zeros, bits=self.bits, group_size=self.group_size)
        self._x, self._version, self._decode = x, x._version, decode
        self._parts = tuple(y.split(self.split_sizes, dim=-1))
        self._served = set()

    def _record(self, x2: Tensor) -> None:
        # One launch for all parts on CUDA, no host sync: the [P] counters every member holds views of.
        kernels.count_inactive(x2, self.thresholds, self.zero_count, self.input_count, self.last_sparsity)

    def unfuse(self) -> None:
        """Give every member contiguous buffers of its own again (and its own runtime scalars)."""
        with torch.no_grad():
            for m in self.members:
                m.qweight = m.qweight.contiguous()
                m.scales = m.scales.contiguous()
                m.zeros = m.zeros.contiguous()
                m.threshold = m.threshold.clone()
                m.zero_count = m.zero_count.clone()
                m.input_count = m.input_count.clone()
                m.last_sparsity = m.last_sparsity.clone()
                m._fused_group, m._fused_part = None, 0
        self.qweight = self.scales = self.zeros = None  # type: ignore[assignment]
        self._clear()


def _fusable(members: list[TealLinear]) -> bool:
    first = members[0]
    for m in members:
        if m._fused_group is not None:
            return False
        if getattr(m, "perm", None) is not None or getattr(m, "channel_scale", None) is not None:
            return False  # act-order permutation / per-channel thresholds: separate calls
        if (m.in_features, m.bits, m.group_size) != (first.in_features, first.bits, first.group_size):
            return False
        if m.scales.dtype != first.scales.dtype or m.qweight.device != first.qweight.device:
            return False
        if m.qweight.device.type == "meta" or not m.qweight.is_contiguous():
            return False
    return True


def fuse_projections(model: nn.Module) -> int:
    """Fuse every q/k/v and gate/up group of TealLinear modules that allows it; returns the number of groups.

    Idempotent (already fused members are skipped). Groups that do not qualify keep separate calls."""
    count = 0
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, TealLinear) for m in members) and _fusable(members):
                FusedGroup(members)
                count += 1
    return count


class SharedProjection(nn.Module):
    """Projections of one input as one module (`inner`, whose output is the parts concatenated along the last dim):
    the dense twin of FusedGroup, for nn.Linear (the bench's bf16 baseline) or any other linear implementation
    (the bench's tinygemm baseline). Its members are `ProjectionPart` modules in place of the original projections;
    the first one called on a tensor computes every part, its siblings return their slice."""

    def __init__(self, inner: nn.Module, split_sizes: list[int]):
        super().__init__()
        self.inner = inner
        self.split_sizes = [int(n) for n in split_sizes]
        self._clear()

    def _clear(self) -> None:
        self._x: Tensor | None = None
        self._version = -1
        self._parts: tuple[Tensor, ...] = ()
        self._served: set[int] = set()

    def output(self, index: int, x: Tensor) -> Tensor:
        hit = self._x is x and self._version == x._version and index not in self._served
        if not hit:
            self._parts = tuple(self.inner(x).split(self.split_sizes, dim=-1))
            self._x, self._version, self._served = x, x._version, set()
        y = self._parts[index]
        self._served.add(index)
        if len(self._served) == len(self.split_sizes):
            self._clear()
        return y


class ProjectionPart(nn.Module):
    """Part `index` of a SharedProjection (what q_proj / k_proj / ... become when their group is shared)."""

    def __init__(self, shared: SharedProjection, index: int):
        super().__init__()
        self.shared = shared
        self.index = int(index)
        self.in_features = getattr(shared.inner, "in_features", None)
        self.out_features = shared.split_sizes[self.index]

    def forward(self, x: Tensor) -> Tensor:
        return self.shared.output(self.index, x)


def share_projections(model: nn.Module, make_inner) -> int:
    """Replace every q/k/v and gate/up group for which `make_inner(members)` returns a module (the group as one
    product, or None to leave the group alone) by ProjectionParts of one SharedProjection; returns the number of
    groups. The members are dropped, so their weights are freed once nothing else holds them."""
    count = 0
    for parent in list(model.modules()):
        for names in GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if any(m is None or isinstance(m, ProjectionPart) for m in members):
                continue
            inner = make_inner(members)
            if inner is None:
                continue
            shared = SharedProjection(inner, [m.out_features for m in members])
            for i, name in enumerate(names):
                setattr(parent, name, ProjectionPart(shared, i))
            count += 1
    return count


def _concat_linear(members: list[nn.Module]) -> nn.Linear | None:
    if not all(type(m) is nn.Linear for m in members):
        return None
    first = members[0]
    has_bias = [m.bias is not None for m in members]
    if (any(m.in_features != first.in_features or m.weight.dtype != first.weight.dtype
            or m.weight.device != first.weight.device for m in members) or len(set(has_bias)) != 1):
        return None
    with torch.device("meta"):
        linear = nn.Linear(first.in_features, sum(m.out_features for m in members), bias=has_bias[0],
                           dtype=first.weight.dtype)
    with torch.no_grad():
        linear.weight = nn.Parameter(torch.cat([m.weight for m in members]), requires_grad=False)
        if has_bias[0]:
            linear.bias = nn.Parameter(torch.cat([m.bias for m in members]), requires_grad=False)
    return linear


def fuse_linear_projections(model: nn.Module) -> int:
    """One nn.Linear for each q/k/v and gate/up group of plain nn.Linear modules (same input size, dtype, device,
    all or none with a bias): what gpt-fast's fused wqkv does for a dense model. Returns the number of groups."""
    return share_projections(model, _concat_linear)


def fuse_for_decode(model: nn.Module, *, projections: bool = True, elementwise: bool = True) -> None:
    """What `teal_quant.load` and the Decoder do on CUDA: fuse q/k/v and gate/up, and route the Llama-style RMSNorm,
    SiLU-and-mul and rotary to one-launch kernels (teal_quant/runtime/elementwise.py)."""
    if projections:
        fuse_projections(model)
    if elementwise:
        from teal_quant.runtime.elementwise import fuse_elementwise

        fuse_elementwise(model)


def unfuse_projections(model: nn.Module) -> int:
    """Undo `fuse_projections` (e.g. before `model.to(other_device)`); returns the number of groups undone."""
    groups = {id(m._fused_group): m._fused_group for m in model.modules()
              if isinstance(m, TealLinear) and m._fused_group is not None}
    for g in groups.values():
        g.unfuse()
    return len(groups)


def fused_groups(model: nn.Module) -> list[FusedGroup]:
    """The distinct fused groups of a model (for checks and benchmarks)."""
    seen: dict[int, FusedGroup] = {}
    for m in model.modules():
        if isinstance(m, TealLinear) and m._fused_group is not None:
            seen.setdefault(id(m._fused_group), m._fused_group)
    return list(seen.values())
