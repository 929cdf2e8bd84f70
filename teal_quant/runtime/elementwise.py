"""One-launch RMSNorm, SiLU-and-mul and rotary for transformers' Llama-family layers (decode speed on CUDA).

At batch 1 the linear products of a decode step are a minority of its kernels: the eager RMSNorm is ~7 small
kernels, rotary ~10, SiLU-and-mul 2, and each costs ~2 us even inside a CUDA graph (docs/bench.md).
`fuse_elementwise(model)` routes them to `teal_quant.kernels.rms_norm / silu_mul / rotary` (one Triton launch
each on CUDA, the same roundings as the eager code):

* every RMSNorm module whose forward is transformers' Llama RMSNorm (same bytecode: Llama, Mistral, Qwen2, ...)
  gets an instance-level forward (the class is not touched);
* every MLP whose forward is the Llama MLP and whose activation is SiLU likewise;
* rotary: the attention code calls the module-level function `apply_rotary_pos_emb` of its modeling file, so that
  name is rebound once in that file to a function that takes the one-launch path only inside the forward of an
  attention module fused here (an instance-level forward sets a context variable) and only for the layout the
  Llama attention uses (q/k [B, H, S, D], cos/sin [B, S, D], one dtype, unsqueeze_dim=1); every other caller,
  other models of that family included, gets the original function.

Anything else (other norms such as Gemma's 1 + weight, GELU MLPs, partial rotary) keeps its eager code: the
bytecode checks make the fast path opt-in per module, never a guess. Works on dense models too (the bf16 baseline
of `teal-quant bench` gets the same fused ops, so ratios compare like with like).
"""

from __future__ import annotations

import contextvars
import inspect
import sys
import types
from dataclasses import dataclass

from torch import Tensor, nn

from teal_quant import kernels

_MARK = "_teal_quant_elementwise"
_ORIGINAL = "_teal_quant_original"
_FAST_ROTARY = contextvars.ContextVar("teal_quant_fast_rotary", default=False)


@dataclass
class ElementwiseFusion:
    """What `fuse_elementwise` routed to the one-launch kernels."""

    norms: int = 0
    mlps: int = 0
    attentions: int = 0  # attention modules whose rotary takes the one-launch kernel

    @property
    def total(self) -> int:
        return self.norms + self.mlps + self.attentions


def _same_code(fn_a, fn_b) -> bool:
    a, b = getattr(fn_a, "__code__", None), getattr(fn_b, "__code__", None)
    return (a is not None and b is not None and a.co_code == b.co_code and a.co_names == b.co_names
            and a.co_consts == b.co_consts)


def _llama_reference():
    from transformers.models.llama import modeling_llama as ml

    return ml


def _rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: Tensor) -> Tensor:
    # gate before up: a fused gate/up group computes both parts on the first call (teal_quant/runtime/fusion.py)
    return self.down_proj(kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))


def _attention_forward(self, *args, **kwargs):
    token = _FAST_ROTARY.set(True)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _FAST_ROTARY.reset(token)


def _is_silu(act) -> bool:
    from torch.nn.functional import silu

    return isinstance(act, nn.SiLU) or act is silu or type(act).__name__ == "SiLUActivation"


def _llama_layout(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> bool:
    """The layout kernels.rotary takes: q/k [B, H, S, D], cos/sin [B or 1, S, D], one dtype and device, unit stride
    along D, D even, unsqueeze_dim 1 (what the Llama attention passes)."""
    return (unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and sin.shape == cos.shape
            and q.shape[-1] == k.shape[-1] == cos.shape[-1] and q.shape[-1] % 2 == 0
            and q.dtype == k.dtype == cos.dtype == sin.dtype and q.device == cos.device
            and q.stride(-1) == k.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1
            and cos.shape[1] == q.shape[2] and cos.shape[0] in (1, q.shape[0]))


def _make_fast_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if _FAST_ROTARY.get() and _llama_layout(q, k, cos, sin, unsqueeze_dim):
            if cos.shape[0] != q.shape[0]:
                cos, sin = cos.expand(q.shape[0], -1, -1), sin.expand(q.shape[0], -1, -1)
            return kernels.rotary(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    setattr(apply_rotary_pos_emb, _ORIGINAL, original)
    return apply_rotary_pos_emb


def _rotary_file_ready(module: nn.Module, ml) -> bool:
    """Rebind apply_rotary_pos_emb in the module's modeling file (once) when it is Llama's; False if it is not."""
    mod = sys.modules.get(type(module).__module__)
    current = getattr(mod, "apply_rotary_pos_emb", None)
    if current is None:
        return False
    if hasattr(current, _ORIGINAL):
        return True
    if not _same_code(inspect.unwrap(current), inspect.unwrap(ml.apply_rotary_pos_emb)):
        return False
    mod.apply_rotary_pos_emb = _make_fast_rotary(current)
    return True


def _patch(module: nn.Module, forward) -> None:
    module.forward = types.MethodType(forward, module)
    setattr(module, _MARK, True)


def fuse_elementwise(model: nn.Module) -> ElementwiseFusion:
    """Route the model's Llama-style RMSNorm, SiLU MLP and rotary to one-launch kernels; idempotent (a second call
    counts nothing new)."""
    ml = _llama_reference()
    done = ElementwiseFusion()
    for module in model.modules():
        if getattr(module, _MARK, False):
            continue
        cls = type(module)
        if _same_code(cls.forward, ml.LlamaRMSNorm.forward) and isinstance(getattr(module, "weight", None), Tensor):
            _patch(module, _rms_norm_forward)
            done.norms += 1
        elif _same_code(cls.forward, ml.LlamaMLP.forward) and _is_silu(getattr(module, "act_fn", None)):
            _patch(module, _mlp_forward)
            done.mlps += 1
        elif all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and _rotary_file_ready(module, ml):
            _patch(module, _attention_forward)
            done.attentions += 1
    return done


def unfuse_elementwise(model: nn.Module) -> int:
    """Give every module `fuse_elementwise` patched its eager forward back; returns how many. (A rebound
    apply_rotary_pos_emb stays: outside a fused attention module it is the original function.)"""
    restored = 0
    for module in model.modules():
        if getattr(module, _MARK, False):
            del module.forward
            delattr(module, _MARK)
            restored += 1
    return restored
