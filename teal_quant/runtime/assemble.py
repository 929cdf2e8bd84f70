"""assemble(): a model config, a TealQuantConfig and tensors -> a transformers model whose projections are TealLinear.

One owner for building the runtime model, whoever supplies the tensors: `teal_quant.load` (an artifact's shards),
transformers' from_pretrained (hf.py reuses `replace_linears` before the weights load and `finish_assembly` after)
and synthetic models (the per-layer generator's stream, teal_quant.bench). gpt-fast's recipe: build the model on the
meta device, swap in modules whose buffers already have the packed shapes, then load_state_dict(assign=True), so no
dense weight of a quantized layer ever exists in memory.

The tensors come as one mapping or as an iterable of mappings (one decoder layer at a time, as the synthetic
generator yields them); each is moved to the device and assigned as it arrives.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from teal_quant.architecture import build_skeleton, layer_module_names, materialize_non_persistent_buffers
from teal_quant.artifact.format import (
    HEAD_MODULE,
    LM_HEAD_KEY,
    PERM_SUFFIX,
    TealQuantConfig,
    check_perm,
    linear_key,
    stored_float32,
)
from teal_quant.errors import ArtifactError, first_line
from teal_quant.runtime.modules import QuantLinear, TealLinear, set_sparsity, teal_linears

__all__ = ["assemble", "quantized_module_names", "replace_linears", "replace_head", "check_sparsity_tensors",
           "finish_assembly"]


def quantized_module_names(config, quant: TealQuantConfig) -> list[str]:
    """The projections an artifact of `config` quantizes: the seven of every decoder layer, minus
    quantization_config.modules_to_not_convert."""
    skip = quant.modules_to_not_convert
    return [n for n in layer_module_names(config.num_hidden_layers) if not any(n == m or n.startswith(m + ".") for m in skip)]


def replace_linears(model: nn.Module, quantized: list[str], quant: TealQuantConfig, dtype: torch.dtype) -> None:
    """Swap every nn.Linear that the artifact holds packed for a TealLinear (on the meta device)."""
    for name in quantized:
        parent_name, _, child = name.rpartition(".")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"artifact has tensors for '{name}', which the model config does not have") from None
        if not isinstance(linear, nn.Linear):
            raise ArtifactError(f"artifact quantizes '{name}', which is not a linear layer")
        module = TealLinear(
            linear.in_features, linear.out_features, bits=quant.bits, group_size=quant.group_size_for(linear.in_features),
            n_levels=len(quant.levels), bias=linear.bias is not None, dtype=dtype, device="meta", prefill=quant.prefill,
            channel_scale=quant.criterion == "weight_aware",
            perm=quant.act_order,
        )
        setattr(model.get_submodule(parent_name), child, module)


def replace_head(model: nn.Module, quant: TealQuantConfig, dtype: torch.dtype) -> None:
    """With quantization_config.lm_head: swap the output projection for a QuantLinear (meta device) holding the
    packed head; the input embedding stays as it is (a tied head is untied: it has tensors of its own)."""
    if not quant.head_quantized:
        return
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ArtifactError(f"artifact quantizes '{HEAD_MODULE}', but this model's output layer is not a linear layer")
    module = QuantLinear(head.in_features, head.out_features, bits=quant.lm_head_bits,
                         group_size=quant.lm_head_group_size, bias=head.bias is not None, dtype=dtype, device="meta")
    model.set_output_embeddings(module)
    if getattr(model.config, "tie_word_embeddings", False):  # transformers must not tie a .weight onto it
        model.config.tie_word_embeddings = False


def check_sparsity_tensors(module: TealLinear) -> str | None:
    """What is wrong with a loaded module's thresholds / channel_scale ("thresholds must ..."), or None."""
    th = module.thresholds
    if not torch.isfinite(th).all() or (th[1:] < th[:-1]).any() or (th < 0).any():
        return "thresholds must be finite, >= 0 and non-decreasing"
    scale = module.channel_scale
    if scale is not None:
        if scale.shape != (module.in_features,):
            return f"channel_scale has shape {tuple(scale.shape)}, expected [{module.in_features}]"
        if not torch.isfinite(scale).all() or (scale < 0).any():
            return "channel_scale must be finite and >= 0"
    return None


def finish_assembly(model: nn.Module, quant: TealQuantConfig, *, level: float | None = None, where: str | None = None) -> None:
    """Once every TealLinear holds its tensors: its runtime state (on its own device), the checks of perm /
    thresholds / channel_scale (an ArtifactError prefixed by `where`), then `level` (default: the artifact's)."""
    prefix = f"{where}: " if where else ""
    for name, module in teal_linears(model):
        module.materialize_runtime_state(module.qweight.device)
        if module.perm is not None:
            check_perm(module.perm, module.in_features, prefix + linear_key(name, PERM_SUFFIX))
        problem = check_sparsity_tensors(module)
        if problem:
            raise ArtifactError(f"{prefix}{name}.{problem}")
    model.teal_quant_config = quant
    set_sparsity(model, quant.default if level is None else level)


def assemble(
    config,
    quant: TealQuantConfig,
    tensors: Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    quantized: Iterable[str] | None = None,
    level: float | None = None,
    where: str = "artifact",
) -> nn.Module:
    """The TealLinear model of `config` holding `tensors`, on `device`, in eval mode, at `level` (default: the
    artifact's default level).

    quantized: the projections to swap for TealLinear (default: `quantized_module_names(config, quant)`).
    Floating tensors are cast to `dtype`, except those the artifact keeps in float32 (thresholds, channel scales).
    A tensor the model has no place for, a model tensor that no mapping holds and a shape that does not match are
    each an ArtifactError naming it, prefixed by `where`; with tie_word_embeddings, lm_head is the embedding (no
    lm_head.weight needed).
    """
    device = torch.device(device)
    quantized = quantized_module_names(config, quant) if quantized is None else list(quantized)
    stored_quant = getattr(config, "quantization_config", None)
    if stored_quant is not None:
        del config.quantization_config  # keep transformers from looking for a quantizer while building the skeleton
    model = build_skeleton(config, dtype)
    replace_linears(model, quantized, quant, dtype)
    replace_head(model, quant, dtype)

    expected = list(model.state_dict())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for chunk in ([tensors] if isinstance(tensors, Mapping) else tensors):
        state = {k: t.to(device=device, dtype=t.dtype if not t.is_floating_point() or stored_float32(k) else dtype)
                 for k, t in chunk.items()}
        try:
            result = model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as e:
            raise ArtifactError(f"{where}: tensor shapes do not match the config ({first_line(e)})") from None
        unexpected += result.unexpected_keys
        loaded.update(state)
    tied = bool(getattr(config, "tie_word_embeddings", False)) and not quant.head_quantized
    missing = [k for k in expected if k not in loaded and not (tied and k == LM_HEAD_KEY)]
    if missing:
        raise ArtifactError(f"{where}: tensor {missing[0]} is missing")
    if unexpected:
        raise ArtifactError(f"{where}: unexpected tensor {unexpected[0]}")
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    materialize_non_persistent_buffers(model, device)
    finish_assembly(model, quant, level=level, where=where)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ArtifactError(f"{where}: {leftover[0]} is neither stored nor computed at load (still on the meta device)")
    config.quantization_config = stored_quant if stored_quant is not None else quant.to_dict()
    model.config = config
    return model.eval()
