"""teal_quant.load(): an artifact -> a transformers model whose linear layers are TealLinear.

gpt-fast's recipe: build the model on the meta device, swap in modules whose buffers already have the
packed shapes, then load_state_dict(assign=True) from the safetensors shards, so no dense weight of a
quantized layer ever exists in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from teal_quant.architecture import build_skeleton, materialize_non_persistent_buffers
from teal_quant.artifact.format import Artifact, TealQuantConfig, check_perm, read_artifact
from teal_quant.artifact.hub import looks_like_local_path
from teal_quant.devices import resolve_dtype, select_device
from teal_quant.errors import ArtifactError, HubError, first_line
from teal_quant.runtime.modules import TealLinear, realized_sparsity, teal_linears

__all__ = ["load", "set_sparsity", "realized_sparsity", "resolve_artifact"]


def resolve_artifact(path_or_repo_id: str | Path, revision: str | None = None) -> Artifact:
    """A local artifact directory, or a Hub repo id fetched through huggingface_hub's cache (teal_quant.hub)."""
    source = str(path_or_repo_id)
    path = Path(source).expanduser()
    if not path.is_dir():
        if path.exists():
            raise ArtifactError(f"artifact '{source}': is a file, expected an artifact directory")
        if looks_like_local_path(source) or isinstance(path_or_repo_id, Path):
            raise ArtifactError(f"artifact '{source}': no such directory")
        from teal_quant.artifact.hub import download

        try:
            path = download(source, revision)
        except HubError as e:
            raise ArtifactError(f"artifact '{source}': not a local directory; {e}") from None
    return read_artifact(path)


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


# Tensors kept in float32 whatever the model dtype (the artifact stores them so).
FLOAT32_SUFFIXES = (".thresholds", ".channel_scale")


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


def load(
    path_or_repo_id: str | Path,
    *,
    sparsity: float | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
):
    """Load an artifact as a transformers model, at `sparsity` (default: the artifact's default level).

    dtype defaults to the artifact's dtype on CUDA and float32 on the CPU (CPU half-precision matmuls are slow).
    """
    from transformers import AutoConfig, GenerationConfig

    artifact = resolve_artifact(path_or_repo_id, revision)
    quant = artifact.quant
    device = select_device(device)
    try:
        config = AutoConfig.from_pretrained(artifact.path)
    except Exception as e:
        raise ArtifactError(f"artifact '{artifact.path}': config.json is not a model config ({first_line(e)})") from None
    if dtype is None:
        dtype = resolve_dtype("auto", getattr(config, "dtype", None)) if device.type == "cuda" else torch.float32
    quant_dict = config.quantization_config
    del config.quantization_config  # keep transformers from looking for a quantizer while building the skeleton
    model = build_skeleton(config, dtype)
    replace_linears(model, artifact.quantized_modules(), quant, dtype)

    state = {}
    for name, t in artifact.iter_tensors("cpu"):
        state[name] = t if (not t.is_floating_point() or name.endswith(FLOAT32_SUFFIXES)) else t.to(dtype)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise ArtifactError(f"artifact '{artifact.path}': tensor shapes do not match the config ({first_line(e)})") from None
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing:
        raise ArtifactError(f"artifact '{artifact.path}': tensor {missing[0]} is missing")
    if result.unexpected_keys:
        raise ArtifactError(f"artifact '{artifact.path}': unexpected tensor {result.unexpected_keys[0]}")
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    for _, module in teal_linears(model):
        module.materialize_runtime_state("cpu")
    materialize_non_persistent_buffers(model, device)
    model.to(device)
    for name, module in teal_linears(model):
        if module.perm is not None:
            check_perm(module.perm, module.in_features, f"artifact '{artifact.path}': {name}.perm")
        problem = check_sparsity_tensors(module)
        if problem:
            raise ArtifactError(f"artifact '{artifact.path}': {name}.{problem}")
    config.quantization_config = quant_dict
    model.config = config
    model.teal_quant_config = quant
    if (artifact.path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(artifact.path)
    model.eval()
    set_sparsity(model, quant.default if sparsity is None else sparsity)
    if device.type == "cuda":  # q/k/v, gate/up, norms, SiLU-and-mul, rotary: one launch each (teal_quant/fusion.py)
        from teal_quant.runtime.fusion import fuse_for_decode

        fuse_for_decode(model)
    return model


def set_sparsity(model: nn.Module, level: float) -> None:
    """Switch every TealLinear to the thresholds of `level` (one of the artifact's levels; 0 = dense activations)."""
    quant: TealQuantConfig | None = getattr(model, "teal_quant_config", None)
    if quant is None:
        raise ValueError("this model was not loaded by teal_quant.load (no teal_quant_config)")
    index = quant.level_index(float(level))
    for _, module in teal_linears(model):
        module.set_level(index)
    model.teal_sparsity = float(level)
