"""The decode step of a Llama-family model with nothing but the weight reads and a few fused launches around them.

transformers' decode step of a Llama layer runs ~25 GPU kernels besides its linear layers even with the one-launch
RMSNorm / SiLU-and-mul / rotary of teal_quant.runtime.elementwise: `repeat_kv` copies of the whole static cache and
the attention output's `.contiguous()`, two cache `index_copy_`, residual adds, fills for the mask, the rotary
tables. `FusedDecodeStep` runs the same computation, per layer, as

    add_rms_norm -> q/k/v (one launch when fused) -> decode_attention -> o_proj -> add_rms_norm -> gate/up
    -> silu_mul + down_proj (one launch: kernels.sparse_gemv_silu)

where `add_rms_norm` is the previous residual add and this norm in one launch (the residual stream is carried
between layers, as vLLM does) and `decode_attention` (kernels/attention.py) is rotary + the cache write + GQA
attention over the StaticCache's own tensors in one launch. The model-level glue is the embedding lookup, the final
add + norm and lm_head. The rotary tables are the model's own rotary module evaluated once for every position.

Only for models whose modules run transformers' Llama code (checked by bytecode, like teal_quant.runtime.elementwise:
Llama, and copies such as Mistral without sliding window), with a static rotary (no dynamic / longrope scaling) and
a power-of-two head size >= 16; `fused_step_support(model)` says why a model does not qualify, and the Decoder then
runs the transformers forward. Projections are called as modules (TealLinear, its fused groups, nn.Linear, the
bench's tinygemm baseline...), so every linear implementation works unchanged; a q/k/v or gate/up group fused by
`teal_quant.runtime.fusion` is one launch. A TealLinear down_proj reads gate and up itself and computes silu(gate) * up
as it loads its input (`kernels.sparse_gemv_silu`, bit-equal to silu_mul then the GEMV; `silu_down=False` keeps the
separate launch); with the realized-sparsity counters on, or another module, silu_mul runs first.

`glue="torch"` / `attention="sdpa"` run the same step with plain torch ops for the glue (to be compiled by
torch.compile) or SDPA with enable_gqa for the attention: the comparison benchmarks/decode_glue.py measures
(docs/decoding.md has the outcome).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from teal_quant import kernels
from teal_quant.runtime.elementwise import _is_silu, _same_code

GLUES = ("triton", "torch")
# the GEMV sums without the split-K tail measured faster up to this batch (H200, 8B: batch 4 1.047x, batch 1 1.000x)
# and slower at 16 (0.965x: benchmarks/results/decode_sums_h200.md); larger batches keep the tail
ACCUMULATE_MAX_BATCH = 4
ATTENTIONS = ("triton", "sdpa")


def _same(fn_a, fn_b) -> bool:
    """Same bytecode under every decorator (transformers wraps forwards in generic decorators whose own code is
    shared by every model, so the wrappers alone prove nothing)."""
    return _same_code(inspect.unwrap(fn_a), inspect.unwrap(fn_b))


def fused_step_support(model: nn.Module) -> str | None:
    """None when `FusedDecodeStep` can run this model's decode step, else the reason it cannot."""
    try:
        from transformers.models.llama import modeling_llama as ml
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "transformers' Llama code is not importable"
    inner = getattr(model, "model", None)
    if not _same(type(model).forward, ml.LlamaForCausalLM.forward) or inner is None:
        return f"{type(model).__name__}.forward is not transformers' LlamaForCausalLM.forward"
    if not _same(type(inner).forward, ml.LlamaModel.forward):
        return f"{type(inner).__name__}.forward is not transformers' LlamaModel.forward"
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or not _same(type(rotary).forward, ml.LlamaRotaryEmbedding.forward):
        return "the rotary embedding is not transformers' LlamaRotaryEmbedding"
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if "dynamic" in rope_type or rope_type == "longrope":
        return f"rope_type {rope_type!r} changes with the sequence length"
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 16"
    if config.num_attention_heads % config.num_key_value_heads:
        return "num_attention_heads is not a multiple of num_key_value_heads"
    norms = [inner.norm]
    for i, layer in enumerate(inner.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not _same(type(layer).forward, ml.LlamaDecoderLayer.forward) or attn is None or mlp is None:
            return f"layer {i} is not transformers' LlamaDecoderLayer"
        if not _same(type(attn).forward, ml.LlamaAttention.forward):
            return f"layer {i}'s attention is not transformers' LlamaAttention"
        if not _same(type(mlp).forward, ml.LlamaMLP.forward) or not _is_silu(getattr(mlp, "act_fn", None)):
            return f"layer {i}'s MLP is not a SiLU LlamaMLP"
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    for norm in norms:
        if not _same(type(norm).forward, ml.LlamaRMSNorm.forward):
            return f"{type(norm).__name__} is not transformers' LlamaRMSNorm"
    return None


# (out, clear): float32 [B, N] buffers of a GEMV's ``out=`` / ``clear=`` (kernels.sparse_gemv)
Sink = tuple[Tensor, Tensor]


def _accumulating(fn: Callable, n: int) -> Callable:
    """Mark a projection call that takes ``sink=``: its GEMV adds into ``out`` (float32, no split-K tail) and zeroes
    ``clear``; a call that falls back to the module's path returns its ordinary output and zeroes ``clear`` itself."""
    fn.sums_width = n
    return fn


def _clear(sink: Sink | None) -> None:
    if sink is not None:
        sink[1].zero_()


def _projections(modules: list[nn.Module]) -> Callable[..., tuple[Tensor, ...]]:
    """One call giving every projection of a shared input: a fusion.SharedProjection's single product split, else
    the modules called in order (a fused TealLinear group computes all parts on the first call; it takes ``sink=``)."""
    from teal_quant.runtime.fusion import ProjectionPart
    from teal_quant.runtime.modules import DECODE_ROWS, TealLinear

    shared = getattr(modules[0], "shared", None)
    if (all(isinstance(m, ProjectionPart) and m.shared is shared for m in modules)
            and [m.index for m in modules] == list(range(len(shared.split_sizes)))):
        return lambda x: shared.inner(x).split(shared.split_sizes, dim=-1)
    group = getattr(modules[0], "_fused_group", None)
    if (group is not None and all(isinstance(m, TealLinear) for m in modules) and list(group.members) == list(modules)
            and all(m.bias is None for m in modules)):
        def fused(x: Tensor, sink: Sink | None = None) -> tuple[Tensor, ...]:
            # counters, a batch past the decode kernel, hooks or the CPU path: the modules' path
            if (modules[0].track or x.shape[0] > DECODE_ROWS or not kernels.use_triton(x)
                    or any(m._forward_hooks or m._forward_pre_hooks for m in modules)):
                _clear(sink)
                return tuple(m(x) for m in modules)
            out, clear = sink if sink is not None else (None, None)
            y = kernels.sparse_gemv_fused(x, group.qweight, group.scales, group.zeros, group.thresholds,
                                          group.split_sizes, bits=group.bits, group_size=group.group_size, out=out,
                                          clear=clear)
            return y.split(group.split_sizes, dim=-1)

        return _accumulating(fused, sum(group.split_sizes))
    return lambda x: tuple(m(x) for m in modules)


def _gemv(module: nn.Module) -> Callable[..., Tensor]:
    """x -> module(x); a TealLinear (no act-order permutation, no fused group, no bias) takes ``sink=``."""
    from teal_quant.runtime.modules import DECODE_ROWS, TealLinear

    if (not isinstance(module, TealLinear) or module.perm is not None or module._fused_group is not None
            or module.bias is not None):
        return module

    def one_launch(x: Tensor, sink: Sink | None = None) -> Tensor:
        if (sink is None or module.track or x.shape[0] > DECODE_ROWS or not kernels.use_triton(x)
                or module._forward_hooks or module._forward_pre_hooks):
            _clear(sink)
            return module(x)
        return kernels.sparse_gemv(x, module.qweight, module.scales, module.zeros, module.threshold, bits=module.bits,
                                   group_size=module.group_size, out=sink[0], clear=sink[1])

    return _accumulating(one_launch, module.out_features)


def _silu_down(module: nn.Module, silu_mul: Callable[[Tensor, Tensor], Tensor],
               fused: bool) -> Callable[[Tensor, Tensor], Tensor]:
    """(gate, up) -> module(silu(gate) * up). A TealLinear (no act-order permutation) on the Triton kernels: one
    launch, the GEMV computing silu(gate) * up where it loads its input (kernels.sparse_gemv_silu: the same bits as
    silu_mul then the module's GEMV). With its counters on (they count the product's inactive entries: the module
    path does), past the decode kernel's batch, or another module: silu_mul, then the module."""
    from teal_quant.runtime.modules import DECODE_ROWS, TealLinear

    def separate(gate: Tensor, up: Tensor, sink: Sink | None = None) -> Tensor:
        _clear(sink)
        return module(silu_mul(gate, up))

    if not fused or not isinstance(module, TealLinear) or module.perm is not None or module._fused_group is not None:
        return separate

    def one_launch(gate: Tensor, up: Tensor, sink: Sink | None = None) -> Tensor:
        if (module.track or gate.shape[0] > DECODE_ROWS or not kernels.use_triton(gate) or module._forward_hooks
                or module._forward_pre_hooks):  # (hooks would see the module's input: it must exist)
            return separate(gate, up, sink)
        out, clear = sink if sink is not None else (None, None)  # (a sink only reaches a module without bias)
        y = kernels.sparse_gemv_silu(gate, up, module.qweight, module.scales, module.zeros, module.threshold,
                                     bits=module.bits, group_size=module.group_size, out=out, clear=clear)
        return y if module.bias is None else y + module.bias

    return _accumulating(one_launch, module.out_features) if module.bias is None else one_launch


@dataclass
class _LayerPlan:
    norm1: Tensor
    eps1: float
    norm2: Tensor
    eps2: float
    qkv: Callable[..., tuple[Tensor, ...]]
    o_proj: Callable[..., Tensor]
    gate_up: Callable[[Tensor], tuple[Tensor, ...]]
    down: Callable[..., Tensor]  # (gate, up) -> down_proj(silu(gate) * up)
    scale: float


class FusedDecodeStep:
    """`step(tokens [B, 1], pos [1]) -> logits [B, V]` over a transformers StaticCache that a prefill filled; writes
    the new token's k and v at `pos` (pos itself is not advanced). Static buffers only: CUDA-graph capturable."""

    def __init__(self, model: nn.Module, cache, *, batch_size: int, max_length: int, glue: str = "triton",
                 attention: str = "triton", fused_reduce: bool = True, silu_down: bool = True,
                 accumulate: bool = True):
        reason = fused_step_support(model)
        if reason is not None:
            raise ValueError(f"the fused decode step does not support this model: {reason}")
        if glue not in GLUES or attention not in ATTENTIONS:
            raise ValueError(f"glue must be one of {GLUES} and attention one of {ATTENTIONS}")
        self.model, self.cache = model, cache
        self.glue, self.attention, self.fused_reduce = glue, attention, bool(fused_reduce)
        self.silu_down = bool(silu_down) and glue == "triton"  # the torch glue keeps its own silu * up
        inner, config = model.model, model.config
        self.embed, self.lm_head = inner.embed_tokens, model.lm_head
        self.final_norm, self.final_eps = inner.norm.weight, float(inner.norm.variance_epsilon)
        self.q_heads, self.kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
        tp = getattr(model, "tensor_parallel", None)  # runtime/tensor_parallel.py: this rank holds 1/size of the heads
        if tp is not None:
            self.q_heads, self.kv_heads = self.q_heads // tp.size, self.kv_heads // tp.size
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        weight = self.embed.weight
        device, dtype = weight.device, weight.dtype
        self.layers = []
        for layer in inner.layers[: config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_LayerPlan(
                norm1=layer.input_layernorm.weight, eps1=float(layer.input_layernorm.variance_epsilon),
                norm2=layer.post_attention_layernorm.weight, eps2=float(layer.post_attention_layernorm.variance_epsilon),
                qkv=_projections([attn.q_proj, attn.k_proj, attn.v_proj]), o_proj=_gemv(attn.o_proj),
                gate_up=_projections([mlp.gate_proj, mlp.up_proj]),
                down=_silu_down(mlp.down_proj, self._silu_mul, self.silu_down), scale=float(attn.scaling),
            ))
        with torch.no_grad():  # the model's own rotary module at every position: the eager values exactly
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=dtype, device=device),
                                        torch.arange(max_length, device=device)[None])
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        ws, counters = kernels.attention_workspace_sizes(batch_size, self.q_heads, self.kv_heads, max_length,
                                                         self.head_dim, device)
        self.workspace = torch.zeros(ws, dtype=torch.float32, device=device)
        self.counter = torch.zeros(counters, dtype=torch.int32, device=device)  # reset by the kernel after each use
        self.positions = torch.arange(max_length, device=device)
        self.batch_size = int(batch_size)
        self.sums = self._sum_buffers(accumulate, device) if self.layers else {}

    def _sum_buffers(self, accumulate: bool, device: torch.device) -> dict[str, Tensor]:
        """float32 [S, B, N] output buffers of the q/k/v, o_proj and down GEMVs (``out=``): layer i's call adds into
        slot i % S and zeroes slot (i - 1) % S, which its reader has read by then (stream order; for layer 0 the
        previous step's last layer), so no call pays the split-K tail and no memset runs. S = 2 when the layer count
        is even (the two slots stay in the L2), else one slot per layer (S must divide L: each slot is zeroed after
        its last write of a step). Only for projections whose every layer can (TealLinear GEMVs), readers that round
        float32 sums (the triton glue and attention), two layers or more, and batches up to ACCUMULATE_MAX_BATCH."""
        if not (accumulate and self.glue == "triton" and self.attention == "triton" and len(self.layers) >= 2
                and self.batch_size <= ACCUMULATE_MAX_BATCH):
            return {}
        sums = {}
        for kind in ("qkv", "o_proj", "down"):
            calls = [getattr(plan, kind) for plan in self.layers]
            n = {getattr(c, "sums_width", None) for c in calls}
            if len(n) == 1 and None not in n:
                slots = 2 if len(self.layers) % 2 == 0 else len(self.layers)
                sums[kind] = torch.zeros(slots, self.batch_size, n.pop(), dtype=torch.float32, device=device)
        return sums

    def _sink(self, kind: str, i: int, rows: int) -> Sink | None:
        buf = self.sums.get(kind)
        if buf is None or rows != self.batch_size:
            return None
        return buf[i % len(buf)], buf[(i - 1) % len(buf)]

    # -- glue: one launch each (triton) or plain torch ops (for torch.compile) ----------------------------------------
    def _norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        if self.glue == "triton":
            return kernels.rms_norm(x, weight, eps)
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def _add_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        if self.glue == "triton":
            return kernels.add_rms_norm(x, residual, weight, eps), residual  # residual updated in place
        residual = residual + x
        return self._norm(residual, weight, eps), residual

    def _silu_mul(self, gate: Tensor, up: Tensor) -> Tensor:
        return kernels.silu_mul(gate, up) if self.glue == "triton" else F.silu(gate) * up

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
        if self.attention == "triton":
            return kernels.decode_attention(q, k, v, self.cos, self.sin, pos, keys, values, self.workspace, self.counter,
                                            scale, fused_reduce=self.fused_reduce)
        # SDPA with enable_gqa over the whole static cache, masked past pos (rotary and cache write in torch ops)
        b, d = q.shape[0], self.head_dim
        c, s = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        qh = q.reshape(b, self.q_heads, 1, d)
        kh = k.reshape(b, self.kv_heads, 1, d)
        half = d // 2
        q_rot = qh * c + torch.cat((-qh[..., half:], qh[..., :half]), -1) * s
        k_rot = kh * c + torch.cat((-kh[..., half:], kh[..., :half]), -1) * s
        keys.index_copy_(2, pos, k_rot)
        values.index_copy_(2, pos, v.reshape(b, self.kv_heads, 1, d))
        mask = (self.positions <= pos).view(1, 1, 1, -1)
        out = F.scaled_dot_product_attention(q_rot, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.reshape(b, self.q_heads * d)

    # -- the step ------------------------------------------------------------------------------------------------------
    def __call__(self, tokens: Tensor, pos: Tensor) -> Tensor:
        residual = self.embed(tokens.reshape(-1))  # [B, H], the residual stream (updated in place by the triton glue)
        h = None
        for i, plan in enumerate(self.layers):
            if h is None:
                x = self._norm(residual, plan.norm1, plan.eps1)
            else:
                x, residual = self._add_norm(h, residual, plan.norm1, plan.eps1)
            rows = x.shape[0]
            sink = self._sink("qkv", i, rows)
            q, k, v = plan.qkv(x) if sink is None else plan.qkv(x, sink=sink)
            layer = self.cache.layers[i]
            a = self._attention(q, k, v, pos, layer.keys, layer.values, plan.scale)
            sink = self._sink("o_proj", i, rows)
            x, residual = self._add_norm(plan.o_proj(a) if sink is None else plan.o_proj(a, sink=sink), residual,
                                         plan.norm2, plan.eps2)
            gate, up = plan.gate_up(x)
            sink = self._sink("down", i, rows)
            h = plan.down(gate, up) if sink is None else plan.down(gate, up, sink=sink)
        x, _ = self._add_norm(h, residual, self.final_norm, self.final_eps)
        return self.lm_head(x)
