"""The quantized lm_head (recipe `quantization.lm_head: int8 | int4`): RTN of the output projection into the
artifact's lm_head.qweight / scales / zeros (docs/artifact-format.md). Used by the pipeline and by synthetic models.

RTN for every recipe method: the head has no calibrated Hessian in the layer-streaming pipeline, and its input
(the final norm's output) is never thresholded. A tied head is quantized from the embedding; the embedding stays float.
"""

from __future__ import annotations

import torch

from teal_quant.artifact.format import HEAD_FORMATS, HEAD_MODULE, linear_key
from teal_quant.compression.quantize.rtn import QuantSpec, rtn_quantize
from teal_quant.errors import ModelSourceError
from teal_quant.kernels import pack


def head_bits(lm_head: str) -> int | None:
    """'dense' -> None, 'int8' -> 8, 'int4' -> 4."""
    return HEAD_FORMATS[lm_head]


def check_head_shape(config, bits: int | None) -> None:
    """A quantized lm_head packs the vocabulary along N: it must be a multiple of 8 (int4 words, GEMV tiles)."""
    vocab = int(config.vocab_size)
    if bits is not None and vocab % 8:
        raise ModelSourceError(f"quantization.lm_head: int{bits} needs a vocabulary that is a multiple of 8, "
                               f"this model has {vocab} tokens (use lm_head: dense)")


def quantized_head(weight: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The artifact tensors of the output projection `weight` [vocab, hidden] quantized with RTN at `spec`, scales
    and zeros rounded to the artifact dtype."""
    q, scales, zeros = rtn_quantize(weight.float(), spec)
    return {linear_key(HEAD_MODULE, "qweight"): pack(q, spec.bits),
            linear_key(HEAD_MODULE, "scales"): scales.to(dtype), linear_key(HEAD_MODULE, "zeros"): zeros.to(dtype)}
