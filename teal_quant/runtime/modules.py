"""TealLinear: a packed int4/int8 linear layer that thresholds its input (TEAL) before the product; QuantLinear: the
same storage without a threshold (a quantized lm_head).

Decode (one token per sequence) goes through `teal_quant.kernels.sparse_gemv`, which reads only the
rows of W^T whose input activation survives the threshold. Prefill goes through the dense int4/int8
product (`dense_gemm`), optionally on thresholded inputs. The threshold of the active level lives in a
buffer that `set_level` overwrites in place, so switching levels never reallocates (a captured CUDA graph
keeps working) and never recompiles: 0-dim under the magnitude criterion; [K] under the weight-aware one
(WINA), where input k is kept when |x_k| * channel_scale[k] > t, i.e. |x_k| > t / channel_scale[k].

On the CPU (when the kernels would run their pure-torch reference) both modules keep W^T dequantized once, in
float32, beside the packed tensors (`cpu_weight`; 4 bytes per weight, dropped when the module moves to another
device): decode multiplies the thresholded input with it, prefill is one float32 matmul. Per-call dequantization
cost 1.7 s per SmolLM2 token on 2 cores; docs/decoding.md ("The CPU path") has the measured alternatives.

On CUDA, `teal_quant.runtime.fusion.fuse_projections` (called by `teal_quant.load` and the Decoder) lets q/k/v and
gate/up share one fused launch; a fused member hands its call to its `FusedGroup` (see teal_quant/runtime/fusion.py).
Moving or casting a fused model (`model.to(...)`, `.float()`) undoes the fusion first.
The realized-sparsity counters cost a few small kernels per call: they are on in a plain forward and off in the
decode fast path (`teal_quant.generate` / the Decoder) unless `track_sparsity(model, True)` asks for them
(docs/decoding.md has the measured cost).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
from torch import nn

from teal_quant import kernels

# "sparse_last_half" is an evaluation mode (the TEAL paper's perplexity protocol): in a multi-token forward only the
# last half of each sequence is thresholded, the first half stays dense like a prompt.
PREFILL_MODES = ("dense", "sparse", "sparse_last_half")
DECODE_ROWS = 16  # a forward with one token per sequence and at most this many rows takes the GEMV (decode) path


def channel_thresholds(threshold: torch.Tensor, channel_scale: torch.Tensor) -> torch.Tensor:
    """Per-input-channel thresholds t / channel_scale (float32 [K]) of the weight-aware criterion.

    A zero-norm channel (scale 0) feeds nothing: at t > 0 it is never kept (inf), at t = 0 (dense level) kept
    like every other channel (0), so no NaN arises from 0 / 0.
    """
    t = threshold.to(torch.float32)
    positive = channel_scale > 0
    per_channel = t / torch.where(positive, channel_scale, torch.ones_like(channel_scale))
    never = torch.where(t > 0, math.inf, 0.0).to(per_channel)
    return torch.where(positive, per_channel, never)


class PackedLinear(nn.Module):
    """W^T [K, N] stored packed (docs/artifact-format.md): the buffers TealLinear and QuantLinear share, and the
    float32 copy of W^T that their CPU path multiplies with."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None):
        super().__init__()
        if group_size == -1:
            group_size = in_features
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        if out_features % 8:
            raise ValueError(f"out_features {out_features} is not a multiple of 8")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        packed = (in_features, out_features // 8) if bits == 4 else (in_features, out_features)
        packed_dtype = torch.int32 if bits == 4 else torch.uint8
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(packed, dtype=packed_dtype, device=device))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(groups, out_features, dtype=dtype, device=device))
        self._cpu_weight: torch.Tensor | None = None  # float32 W^T on the CPU, built on first use
        self._cpu_key: tuple | None = None

    @property
    def weight_size(self) -> int:
        return self.in_features * self.out_features

    def stored_weight_t(self) -> torch.Tensor:
        """W^T [K, N] as stored (rows in stored order), in scales.dtype."""
        return kernels.dequantize(self.qweight, self.scales, self.zeros, bits=self.bits, group_size=self.group_size)

    def cpu_weight(self) -> torch.Tensor:
        """W^T [K, N] in float32 (the values the reference kernels compute), dequantized once and kept while the
        packed tensors are unchanged (in-place writes bump their version: the copy is rebuilt)."""
        buffers = self._buffers  # direct: this runs on every CPU call
        q, s, z = buffers["qweight"], buffers["scales"], buffers["zeros"]
        key = (q.data_ptr(), q._version, s.data_ptr(), s._version, z.data_ptr(), z._version)
        if self._cpu_key != key:
            with torch.no_grad():
                self._cpu_weight = dequantize_float32(q, s, z, self.bits, self.group_size)
            self._cpu_key = key
        return self._cpu_weight

    def _apply(self, fn, recurse: bool = True):
        self._cpu_weight = self._cpu_key = None  # a move or cast: the copy would be stale (and would hold memory)
        return super()._apply(fn, recurse)


def dequantize_float32(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                       group_size: int) -> torch.Tensor:
    """W^T [K, N] float32 = (q - zeros) * scales per group: the reference kernels' arithmetic (bit for bit), built in
    place (one [K, N] float32 tensor, no repeated scale / zero tensors)."""
    q = kernels.unpack(qweight, bits)
    k, n = q.shape
    w = q.to(torch.float32)
    grouped = w.view(k // group_size, group_size, n)
    grouped.sub_(zeros.float().unsqueeze(1)).mul_(scales.float().unsqueeze(1))
    return w


def cpu_path(x: torch.Tensor) -> bool:
    """True where the kernels would run their pure-torch reference (a CPU tensor, no Triton interpreter)."""
    return not kernels.use_triton(x)


class TealLinear(PackedLinear):
    """y = (x * (|x| > t)) @ W^T + b with W^T stored packed (see docs/artifact-format.md).

    With `channel_scale=True` (weight-aware criterion) the module holds a float32 [K] `channel_scale` buffer
    and t is the [K] vector thresholds[level] / channel_scale.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        n_levels: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        prefill: str = "dense",
        channel_scale: bool = False,
        perm: bool = False,
    ):
        super().__init__(in_features, out_features, bits=bits, group_size=group_size, dtype=dtype, device=device)
        self.prefill = prefill
        self.register_buffer("thresholds", torch.zeros(n_levels, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer(
            "channel_scale", torch.ones(in_features, dtype=torch.float32, device=device) if channel_scale else None
        )
        # act-order GPTQ import: W^T rows stored in perm order, so the layer computes x[..., perm] @ W^T_stored
        self.register_buffer("perm", torch.empty(in_features, dtype=torch.int32, device=device) if perm else None)
        self.level_index = 0
        self._track = True  # count realized sparsity (track_sparsity switches it; see `track`)
        self._fused_group = None  # teal_quant.runtime.fusion.FusedGroup when fused with its siblings
        self._fused_part = 0
        self._init_runtime_state(device)
        self._register_state_dict_hook(_contiguous_state)

    @property
    def track(self) -> bool:
        """Whether a forward updates the realized-sparsity counters: the module's own setting, unless a `counting`
        block (the Decoder's forwards) decides for every module at once."""
        override = _COUNTING.get()
        return self._track if override is None else override

    @track.setter
    def track(self, enabled: bool) -> None:
        self._track = bool(enabled)

    def _init_runtime_state(self, device: torch.device | str | None) -> None:
        """Buffers that are not saved: the active threshold ([K] when weight-aware) and the realized-sparsity counters."""
        shape = (self.in_features,) if self.channel_scale is not None else ()
        self.register_buffer("threshold", torch.zeros(shape, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("zero_count", torch.zeros((), dtype=torch.float64, device=device), persistent=False)
        self.register_buffer("input_count", torch.zeros((), dtype=torch.float64, device=device), persistent=False)
        self.register_buffer("last_sparsity", torch.zeros((), dtype=torch.float32, device=device), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # A move or cast of a fused member would copy its views apart from the group's buffers, which the fused
        # launch reads: give the whole group its own buffers back first (the Decoder and `load` fuse again on CUDA).
        if self._fused_group is not None:
            self._fused_group.unfuse()
        return super()._apply(fn, recurse)

    def materialize_runtime_state(self, device: torch.device | str) -> None:
        """After a meta-device build + load_state_dict(assign=True): real runtime buffers on `device`."""
        self._init_runtime_state(device)
        self.set_level(self.level_index)

    def set_level(self, index: int) -> None:
        """Make level `index` active by overwriting the threshold buffer in place (same storage)."""
        self.level_index = index
        with torch.no_grad():
            if self.channel_scale is None:
                self.threshold.copy_(self.thresholds[index])
            else:
                per_channel = channel_thresholds(self.thresholds[index], self.channel_scale)
                if self.perm is not None:  # channel_scale is in input order; x is gathered to stored order first
                    per_channel = per_channel.index_select(0, self.perm)
                self.threshold.copy_(per_channel)

    def reset_stats(self) -> None:
        self.zero_count.zero_()
        self.input_count.zero_()
        self.last_sparsity.zero_()

    def _record(self, active: torch.Tensor) -> None:
        # Tensor ops only: no host sync on the decode path.
        zeros = active.numel() - active.sum(dtype=torch.float64)
        self.zero_count += zeros
        self.input_count += active.numel()
        self.last_sparsity.copy_(zeros / max(active.numel(), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused_group is None and cpu_path(x):
            return self._cpu_forward(x)
        lead = x.shape[:-1]
        tokens_per_sequence = x.shape[-2] if x.dim() >= 3 else 1
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:  # thresholding is elementwise, so gathering first changes nothing else
            x2 = x2.index_select(1, self.perm)
        decode = tokens_per_sequence == 1 and x2.shape[0] <= DECODE_ROWS
        if self._fused_group is not None and (decode or (self.prefill == "dense" and tokens_per_sequence > 1)):
            y = self._fused_group.output(self, x, x2, decode)
        elif decode:
            if self.track:  # one launch on CUDA (kernels.count_inactive), no host sync
                kernels.count_inactive(x2, self.threshold, self.zero_count, self.input_count, self.last_sparsity)
            y = kernels.sparse_gemv(
                x2, self.qweight, self.scales, self.zeros, self.threshold, bits=self.bits, group_size=self.group_size
            )
        else:
            if self.prefill == "sparse" or tokens_per_sequence == 1:
                active = x2.abs() > self.threshold
                if self.track:
                    self._record(active)
                x2 = x2 * active
            elif self.prefill == "sparse_last_half":
                active = (x2.abs() > self.threshold).reshape(*lead, self.in_features)
                active[..., : tokens_per_sequence // 2, :] = True
                active = active.reshape(-1, self.in_features)
                if self.track:
                    self._record(active)
                x2 = x2 * active
            y = kernels.dense_gemm(x2, self.qweight, self.scales, self.zeros, bits=self.bits, group_size=self.group_size)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The CPU path, in float32 like the reference kernels: the thresholded input times cpu_weight (W^T float32).
        |x| > t is compared in float32; an input under it contributes exactly 0 (a NaN input gives a NaN output, as in
        a dense product and in y = (x * (|x| > t)) @ W^T; the CUDA kernels drop it instead). One decode row reads only
        the active rows of W^T (`sparse_row_product`); several decode rows or a prompt multiply the masked input with
        the whole matrix (one matmul reads W^T once: the union of several rows' active sets is nearly all of it)."""
        k = self.in_features
        w_t = self.cpu_weight()
        buffers = self._buffers
        perm, bias = buffers["perm"], buffers["bias"]
        threshold = buffers["threshold"]
        if x.numel() == k and x.dtype == torch.float32 and perm is None and threshold.dim() == 0:
            # one decode row, magnitude criterion: the common case, kept to four tensor ops
            y = sparse_row_product(x.reshape(k).hardshrink(threshold.item()), w_t, self if self.track else None)
            if bias is not None:
                y = y + bias
            return y.view(*x.shape[:-1], self.out_features)
        lead = x.shape[:-1]
        tokens_per_sequence = x.shape[-2] if x.dim() >= 3 else 1
        xf = x.reshape(-1, k)
        if xf.dtype != torch.float32:
            xf = xf.to(torch.float32)
        if perm is not None:  # thresholding is elementwise, so gathering first changes nothing else
            xf = xf.index_select(1, perm)
        if xf.shape[0] == 1 and tokens_per_sequence == 1:
            x1 = xf.view(k)
            x1 = x1 * (x1.abs() > threshold)  # per-channel thresholds ([K]) too; NaN stays NaN, as in hardshrink
            y = sparse_row_product(x1, w_t, self if self.track else None).view(1, -1)
        else:
            decode = tokens_per_sequence == 1 and xf.shape[0] <= DECODE_ROWS
            if decode or self.prefill == "sparse":
                active = xf.abs() > self.threshold
            elif self.prefill == "sparse_last_half":
                active = (xf.abs() > self.threshold).reshape(*lead, k)
                active[..., : tokens_per_sequence // 2, :] = True
                active = active.reshape(-1, k)
            else:  # dense prefill
                active = None
            if active is None:
                y = xf @ w_t
            else:
                if self.track:
                    self._record(active)
                y = (xf * active) @ w_t
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.view(*lead, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The dense [out, in] weight this module represents (for checks and export, not for inference)."""
        w_t = self.stored_weight_t()
        if self.perm is not None:  # stored row j is input channel perm[j]
            w_t = torch.empty_like(w_t).index_copy_(0, self.perm.long(), w_t)
        return w_t.t()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, levels={self.thresholds.numel()}, prefill={self.prefill}, "
            f"criterion={'magnitude' if self.channel_scale is None else 'weight_aware'}"
            + (", perm=True" if self.perm is not None else "")
        )


_BAG_OFFSETS = torch.zeros(1, dtype=torch.long)  # one bag starting at 0 (embedding_bag's 1-D form)
GATHER_BELOW = 0.85  # active fraction under which one decode row gathers its rows (above it, one dense matvec)


def sparse_row_product(x: torch.Tensor, w_t: torch.Tensor, counters: TealLinear | None = None) -> torch.Tensor:
    """x @ W^T for one thresholded row on the CPU: x float32 [K] (zero where inactive), W^T [K, N] float32 -> [N].

    Reads only the rows of W^T where x is nonzero: torch's embedding_bag computes sum_k x_k W^T[k] over them without
    copying them (docs/decoding.md has the measured alternatives); a nearly dense row (level 0) takes one matvec.
    `counters`: a TealLinear whose realized-sparsity counters this call updates (the count is free here)."""
    rows = x.nonzero(as_tuple=True)[0]
    n, k = rows.numel(), x.shape[0]
    if counters is not None:
        counters.zero_count.add_(k - n)
        counters.input_count.add_(k)
        counters.last_sparsity.fill_((k - n) / max(k, 1))
    if n >= GATHER_BELOW * k:
        return x @ w_t
    # torch.embedding_bag(weight, indices, offsets, scale_grad_by_freq, mode=0 (sum), sparse, per_sample_weights,
    # include_last_offset, padding_idx): the builtin, without F.embedding_bag's argument checks
    return torch.embedding_bag(w_t, rows, _BAG_OFFSETS, False, 0, False, x.index_select(0, rows), False, None)[0]


class QuantLinear(PackedLinear):
    """y = x @ W^T + b with W^T packed int4/int8 and no threshold: a quantized lm_head (recipe
    `quantization.lm_head: int8 | int4`). Decode rows take the int GEMV at threshold 0 (every nonzero input is
    read: a dense product), prompts the dense int GEMM, the CPU the float32 W^T."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bits=bits, group_size=group_size, dtype=dtype, device=device)
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        tokens_per_sequence = x.shape[-2] if x.dim() >= 3 else 1
        x2 = x.reshape(-1, self.in_features)
        if cpu_path(x2):
            y = (x2.to(torch.float32) @ self.cpu_weight()).to(x2.dtype)
        elif tokens_per_sequence == 1 and x2.shape[0] <= DECODE_ROWS:
            y = kernels.sparse_gemv(x2, self.qweight, self.scales, self.zeros, 0.0, bits=self.bits,
                                    group_size=self.group_size)
        else:
            y = kernels.dense_gemm(x2, self.qweight, self.scales, self.zeros, bits=self.bits, group_size=self.group_size)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The dense [out, in] weight (for checks and the dense baseline)."""
        return self.stored_weight_t().t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}, threshold=none"


def _contiguous_state(module: TealLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    """A fused member's buffers are column views of its group: save them as tensors of their own."""
    if module._fused_group is not None:
        for name in ("qweight", "scales", "zeros"):
            key = prefix + name
            if key in state_dict:
                state_dict[key] = state_dict[key].contiguous()


def track_sparsity(model: nn.Module, enabled: bool) -> None:
    """Switch the realized-sparsity counters of every TealLinear and make that the model's explicit choice.

    Without a call, a plain forward counts (`realized_sparsity` reports it) and the decode fast path
    (`teal_quant.generate`, the Decoder) does not; after `track_sparsity(model, True)` the fast path counts too,
    after `track_sparsity(model, False)` nothing does (docs/decoding.md has the cost)."""
    for _, m in teal_linears(model):
        m.track = bool(enabled)
    model.teal_track_sparsity = bool(enabled)


def decode_tracking(model: nn.Module, requested: bool | None = None) -> bool:
    """Whether the decode fast path counts: `requested` when given, else the model's `track_sparsity` choice, else
    off (the counters are a few small kernels per projection and token)."""
    if requested is not None:
        return bool(requested)
    return bool(getattr(model, "teal_track_sparsity", False))


# Set by `counting`: None (each module's own `track`), or True / False for every TealLinear at once. A context
# variable, so one decoder's setting never leaks into another thread's forwards.
_COUNTING: ContextVar[bool | None] = ContextVar("teal_quant_counting", default=None)


@contextmanager
def counting(enabled: bool) -> Iterator[None]:
    """Every TealLinear counts (or not) in the forwards inside the block, whatever its own setting (two context
    variable writes per forward, not one attribute write per module)."""
    token = _COUNTING.set(bool(enabled))
    try:
        yield
    finally:
        _COUNTING.reset(token)


def teal_linears(model: nn.Module) -> list[tuple[str, TealLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TealLinear)]


def realized_sparsity(model: nn.Module, *, cumulative: bool = False) -> float:
    """Size-weighted fraction of weight rows skipped: of the last forward that counted, or since reset_stats.

    A forward with the counters off (the decode fast path by default, see `track_sparsity`) changes nothing: the
    value is that of the last counted forward, 0.0 when none has counted since the model was built or reset."""
    num = den = 0.0
    for _, m in teal_linears(model):
        frac = (m.zero_count / m.input_count.clamp(min=1)) if cumulative else m.last_sparsity
        num += float(frac) * m.weight_size
        den += m.weight_size
    return num / den if den else 0.0


def set_sparsity(model: nn.Module, level: float) -> None:
    """Switch every TealLinear to the thresholds of `level` (one of the artifact's levels; 0 = dense activations)."""
    quant = getattr(model, "teal_quant_config", None)  # the artifact's TealQuantConfig, set when the model is assembled
    if quant is None:
        raise ValueError("this model was not loaded by teal_quant.load (no teal_quant_config)")
    index = quant.level_index(float(level))
    for _, module in teal_linears(model):
        module.set_level(index)
    model.teal_sparsity = float(level)


def reset_stats(model: nn.Module) -> None:
    for _, m in teal_linears(model):
        m.reset_stats()


def set_prefill_mode(model: nn.Module, mode: str) -> None:
    """'sparse' thresholds every prompt token too (how quality is measured: every token as in decode);
    'sparse_last_half' only the last half of each sequence (the TEAL paper's perplexity protocol)."""
    if mode not in PREFILL_MODES:
        raise ValueError(f"prefill mode must be one of {PREFILL_MODES}, got {mode!r}")
    for _, m in teal_linears(model):
        m.prefill = mode
