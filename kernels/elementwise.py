"""The glue of a decode step as torch.library custom ops (namespace ``teal_quant``), each with its fake beside it:
RMSNorm, residual add + RMSNorm, SiLU-and-mul, rotary, and the greedy tail of the decode loop.

On CUDA (or the CPU under ``TRITON_INTERPRET=1``) each is one Triton launch (:mod:`.elementwise_triton`, two for
the greedy tail); on the CPU the pure-torch twins below or in :mod:`.reference` run. This module imports only torch:
triton is imported on first use, through ``dispatch.use_triton``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .dispatch import use_triton


# -- RMSNorm ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("teal_quant::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if use_triton(x):
        from . import elementwise_triton

        return elementwise_triton.rms_norm(x, weight, eps)
    return reference.rms_norm_ref(x, weight, eps)


@rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


# -- residual add + RMSNorm ------------------------------------------------------------------------------------------
def add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
    """residual <- residual + x (in place, in its dtype, as `residual + hidden_states` rounds); returns
    transformers' LlamaRMSNorm of the new residual."""
    residual.copy_(residual + x.to(residual.dtype))  # a float32 x (a GEMV's out= sum) rounds first
    return reference.rms_norm_ref(residual, weight, eps)


@torch.library.custom_op("teal_quant::add_rms_norm", mutates_args=("residual",))
def add_rms_norm_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
    if use_triton(x):
        from . import elementwise_triton

        return elementwise_triton.add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_ref(x, residual, weight, eps)


@add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return residual.new_empty(residual.shape, dtype=torch.promote_types(residual.dtype, weight.dtype))


# -- SiLU-and-mul ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("teal_quant::silu_mul", mutates_args=())
def silu_mul_op(gate: Tensor, up: Tensor) -> Tensor:
    if use_triton(gate):
        from . import elementwise_triton

        return elementwise_triton.silu_mul(gate, up)
    return reference.silu_mul_ref(gate, up)


@silu_mul_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


# -- rotary ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("teal_quant::rotary", mutates_args=())
def rotary_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton(q):
        from . import elementwise_triton

        return elementwise_triton.rotary(q, k, cos, sin)
    return reference.rotary_ref(q, k, cos, sin)


@rotary_op.register_fake
def _(q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)


# -- the greedy tail of a decode step --------------------------------------------------------------------------------
def greedy_workspace_size(batch: int, vocab: int) -> int:
    """float32 elements the greedy tail's workspace needs."""
    return 2 * batch * -(-vocab // 4096)


def greedy_advance_ref(logits: Tensor, tokens: Tensor, finished: Tensor, eos: Tensor, out: Tensor, pos: Tensor) -> None:
    """nxt = argmax(logits) (lowest index on ties); rows already finished emit eos instead; finished |= nxt == eos;
    tokens[:, 0] = nxt; pos += 1; out[:, pos] = nxt. eos is -1 when there is none."""
    nxt = torch.where(finished, eos, logits.argmax(dim=-1))
    finished |= nxt == eos
    tokens.copy_(nxt.unsqueeze(1))
    pos.add_(1)
    out.index_copy_(1, pos, nxt.unsqueeze(1))


@torch.library.custom_op("teal_quant::greedy_advance", mutates_args=("tokens", "finished", "out", "pos", "workspace"))
def greedy_advance_op(logits: Tensor, tokens: Tensor, finished: Tensor, eos: Tensor, out: Tensor, pos: Tensor,
                      workspace: Tensor) -> None:
    if use_triton(logits):
        from . import elementwise_triton

        elementwise_triton.greedy_advance(logits, tokens, finished, eos, out, pos, workspace)
    else:
        greedy_advance_ref(logits, tokens, finished, eos, out, pos)


@greedy_advance_op.register_fake
def _(logits, tokens, finished, eos, out, pos, workspace):
    return None
