"""teal_quant.kernels: TEAL sparse decode GEMV and dense prefill GEMM over int4/int8 group-quantized weights.

Imports only torch at import time (triton is imported lazily, on first use of a Triton path), does no device work
at import, and never imports teal_quant.*.

Files, per kernel family a torch-only module with its custom ops and fakes (``<family>.py``) beside its Triton
kernels and launchers (``<family>_triton.py``): gemv.py (sparse GEMV ops) with gemv_triton.py (CUDA cores, batch 1),
gemv_mma_triton.py (tensor cores, any batch), gemv_launch.py (validation and dispatch) and gemv_common.py (what the
two share); gemm.py / gemm_triton.py (prefill); elementwise.py / elementwise_triton.py; attention.py /
attention_triton.py; counters_triton.py (realized-sparsity counters). dispatch.py holds the backend switch
(:func:`.dispatch.use_triton`: CUDA tensors -> Triton kernels; CPU tensors -> the Triton kernels under the interpreter
when ``TRITON_INTERPRET=1`` is set and triton imports, else the pure-torch reference :mod:`.reference`, which on the
CPU is the product's decode path) and the per-GPU launch-shape tables (configs/*.json).

Layouts and semantics: see :mod:`.reference` and docs/kernels.md.
"""

from __future__ import annotations

from torch import Tensor

from .dispatch import triton_available, use_triton
from .reference import (
    count_inactive_ref,
    dense_gemm_ref,
    dequantize,
    pack,
    pack_int4,
    sparse_gemv_ref,
    sparse_gemv_silu_ref,
    unpack,
    unpack_int4,
)

__all__ = [
    "sparse_gemv",
    "sparse_gemv_fused",
    "sparse_gemv_silu",
    "dense_gemm",
    "count_inactive",
    "rms_norm",
    "silu_mul",
    "rotary",
    "add_rms_norm",
    "decode_attention",
    "attention_workspace_sizes",
    "greedy_advance",
    "greedy_workspace_size",
    "sparse_gemv_ref",
    "sparse_gemv_silu_ref",
    "dense_gemm_ref",
    "dequantize",
    "pack",
    "unpack",
    "pack_int4",
    "unpack_int4",
    "triton_available",
]


def _split_threshold(threshold) -> tuple[Tensor | None, float]:
    if isinstance(threshold, Tensor):
        return threshold, 0.0
    return None, float(threshold)


def sparse_gemv(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, threshold, *, bits: int, group_size: int,
                out: Tensor | None = None, clear: Tensor | None = None) -> Tensor:
    """y [M, N] in x.dtype = (x * (|x| > threshold)) @ W^T (DESIGN.md "Kernel API").

    threshold: python float, 0-dim tensor on x's device (changing its value needs no recompile / graph recapture),
    or a [K] tensor of per-input-channel thresholds. Registered as the custom op ``teal_quant::sparse_gemv``.

    out: a float32 [M, N] buffer that is zero: the product is added into it (in fp32, not rounded) and ``out`` is
    returned; its reader rounds it to the activation dtype (add_rms_norm and decode_attention take such inputs).
    This drops the kernel's split-K tail. clear: another float32 [M, N] buffer that the same launch zeroes (an earlier
    call's ``out``, already read), so that buffers are reused without a memset launch. Custom op
    ``teal_quant::sparse_gemv_into``.
    """
    from . import gemv

    t_tensor, t_value = _split_threshold(threshold)
    if out is not None:
        gemv.sparse_gemv_into_op(x, qweight, scales, zeros, t_tensor, t_value, bits, group_size, out, clear)
        return out
    if clear is not None:
        raise ValueError("clear needs out")
    return gemv.sparse_gemv_op(x, qweight, scales, zeros, t_tensor, t_value, bits, group_size)


def sparse_gemv_silu(gate: Tensor, up: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, threshold, *, bits: int,
                     group_size: int, out: Tensor | None = None, clear: Tensor | None = None) -> Tensor:
    """The Llama MLP's down projection of a decode step in one launch: ``sparse_gemv(silu_mul(gate, up), ...)``, the
    GEMV computing silu(gate) * up (rounded as :func:`silu_mul` rounds, so the result is the same to the bit) where it
    reads its input, the threshold applied to that product. gate, up [M, K] (e.g. the halves of a fused gate/up
    output); threshold, out and clear as for :func:`sparse_gemv`. Custom op ``teal_quant::sparse_gemv_silu`` (with
    out: ``teal_quant::sparse_gemv_silu_into``)."""
    from . import gemv

    t_tensor, t_value = _split_threshold(threshold)
    if out is not None:
        gemv.sparse_gemv_silu_into_op(gate, up, qweight, scales, zeros, t_tensor, t_value, bits, group_size, out, clear)
        return out
    if clear is not None:
        raise ValueError("clear needs out")
    return gemv.sparse_gemv_silu_op(gate, up, qweight, scales, zeros, t_tensor, t_value, bits, group_size)


def sparse_gemv_fused(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    thresholds: Tensor,
    split_sizes: list[int],
    *,
    bits: int,
    group_size: int,
    out: Tensor | None = None,
    clear: Tensor | None = None,
) -> Tensor:
    """One launch for several projections of one input (q/k/v, gate/up) concatenated along N.

    thresholds: [n_parts] tensor (or [n_parts, K] per-channel); split_sizes: N of each part (each a multiple of 8).
    Returns y [M, sum(split_sizes)]; part p is (x * (|x| > thresholds[p])) @ W_p^T. Split it with
    ``y.split(split_sizes, dim=-1)``. out / clear: as in `sparse_gemv` (custom op ``teal_quant::sparse_gemv_fused_into``).
    """
    from . import gemv

    if out is not None:
        gemv.sparse_gemv_fused_into_op(x, qweight, scales, zeros, thresholds, list(split_sizes), bits, group_size, out,
                                       clear)
        return out
    if clear is not None:
        raise ValueError("clear needs out")
    return gemv.sparse_gemv_fused_op(x, qweight, scales, zeros, thresholds, list(split_sizes), bits, group_size)


def dense_gemm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, *, bits: int, group_size: int) -> Tensor:
    """x [..., K] -> x @ W^T [..., N] in x.dtype: the dense prefill path (any M). Custom op ``teal_quant::dense_gemm``."""
    from . import gemm

    return gemm.dense_gemm_op(x, qweight, scales, zeros, bits, group_size)


def count_inactive(x: Tensor, thresholds: Tensor, zero_count: Tensor, input_count: Tensor, last_sparsity: Tensor) -> None:
    """Update the realized-sparsity counters of P parts in place for one call on x [M, K]: zero_count += inputs the
    threshold drops (|x| > t false, compared in fp32 like the GEMV), input_count += M*K, last_sparsity = this call's
    fraction. thresholds: 0-dim, [P], [K] (one part, per-channel) or [P, K]; counters: P contiguous values each
    (float64, float64, float32), e.g. 0-dim buffers for one part. One Triton launch on CUDA, no host sync."""
    x2 = x.reshape(-1, x.shape[-1])
    if use_triton(x2):
        from . import counters_triton

        counters_triton.count_inactive(x2, thresholds, zero_count, input_count, last_sparsity)
    else:
        count_inactive_ref(x2, thresholds, zero_count, input_count, last_sparsity)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm in one launch: weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype), x [..., N].
    Custom op ``teal_quant::rms_norm``."""
    from . import elementwise

    return elementwise.rms_norm_op(x, weight, float(eps))


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
    """A decoder layer's residual add and the next RMSNorm in one launch: residual <- residual + x (in place, rounded
    to its dtype like `residual + hidden_states`), returns rms_norm(residual, weight, eps). x may be a float32 sum (a
    GEMV's ``out=`` buffer): it is rounded to residual's dtype first. Custom op ``teal_quant::add_rms_norm``."""
    from . import elementwise

    return elementwise.add_rms_norm_op(x, residual, weight, float(eps))


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up in one launch (the Llama MLP's activation); gate, up [..., N] may be column slices of one
    fused gate/up output. Custom op ``teal_quant::silu_mul``."""
    from . import elementwise

    return elementwise.silu_mul_op(gate, up)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb (unsqueeze_dim=1) for q [B, Hq, S, D] and k [B, Hk, S, D] with cos, sin
    [B, S, D], one launch for both. Custom op ``teal_quant::rotary``."""
    from . import elementwise

    return elementwise.rotary_op(q, k, cos, sin)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, k_cache: Tensor,
                     v_cache: Tensor, workspace: Tensor, counter: Tensor, scale: float, *, fused_reduce: bool = True) -> Tensor:
    """One decode step of a GQA attention layer over a static cache, read in place: rotary of q and k, the cache write
    of k and v at `pos`, attention over positions 0..pos. q [B, Hq*D], k, v [B, Hkv*D] (row strides free), cos, sin
    [L, D], pos int64 [1], caches [B, Hkv, L, D]; workspace / counter from :func:`attention_workspace_sizes`
    (zeros). Returns [B, Hq*D]. Custom op ``teal_quant::decode_attention`` (kernels/attention.py)."""
    from . import attention

    return attention.decode_attention_op(q, k, v, cos, sin, pos, k_cache, v_cache, workspace, counter, float(scale),
                                         bool(fused_reduce))


def attention_workspace_sizes(batch: int, q_heads: int, kv_heads: int, max_length: int, head_dim: int, device) -> tuple[int, int]:
    """(float32 workspace elements, int32 counters) that :func:`decode_attention` needs for these shapes."""
    import torch

    from . import attention

    return attention.workspace_sizes(batch, q_heads, kv_heads, max_length, head_dim, torch.device(device))


def greedy_advance(logits: Tensor, tokens: Tensor, finished: Tensor, eos: Tensor, out: Tensor, pos: Tensor,
                   workspace: Tensor) -> None:
    """The greedy decode loop's tail, on the device, in place: nxt = argmax(logits [B, V]) (lowest index on ties);
    finished rows emit eos instead; finished |= nxt == eos; tokens [B, 1] = nxt; pos += 1; out[:, pos] = nxt.
    workspace: float32 of :func:`greedy_workspace_size` elements. Two launches on CUDA. Custom op
    ``teal_quant::greedy_advance``."""
    from . import elementwise

    elementwise.greedy_advance_op(logits, tokens, finished, eos, out, pos, workspace)


def greedy_workspace_size(batch: int, vocab: int) -> int:
    """float32 elements :func:`greedy_advance` needs as workspace."""
    from . import elementwise

    return elementwise.greedy_workspace_size(batch, vocab)
