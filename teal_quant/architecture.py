"""Facts about the model families teal-quant handles, shared by compression, the artifact and the runtime.

A leaf module (imports torch and, lazily, transformers): which architectures are supported, where the seven
projections sit in a decoder layer, which activation point feeds which projection, the sparsity criteria, the
projection shapes a quantization format must divide, and the meta-device skeleton every part builds models from.
"""

from __future__ import annotations

import torch
from torch import nn

from teal_quant.errors import ModelSourceError, RecipeError

# Decoder-only families whose layers have q/k/v/o + gate/up/down projections at model.model.layers[i].
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LAYERS_PREFIX = "model.layers"
# The seven projections of a decoder layer: short name -> module path inside the layer.
PROJECTIONS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
# The four activation points of a decoder layer (TEAL's thresholds sit on them) and the projections that read each.
ACTIVATION_POINTS: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "o": ("o",), "gateup": ("gate", "up"), "down": ("down",)}
POINT_OF = {proj: point for point, projs in ACTIVATION_POINTS.items() for proj in projs}
# Sparsity criteria: keep x_k when |x_k| > t (magnitude) or |x_k| * ||W[:, k]||_2 > t (weight_aware, WINA).
CRITERIA = ("magnitude", "weight_aware")


def layer_module_names(num_layers: int) -> list[str]:
    """Fully qualified names of every decoder projection, layer by layer: model.layers.{i}.self_attn.q_proj, ..."""
    return [f"{LAYERS_PREFIX}.{i}.{path}" for i in range(num_layers) for path in PROJECTIONS.values()]


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection under `config` (GQA: k/v narrower than q)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    d, i = config.hidden_size, config.intermediate_size
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, i), "up": (d, i), "down": (i, d)}


def check_shapes(config, group_size: int, *, option: str = "quantization.group_size") -> None:
    """Every projection's in_features must split into groups and its out_features into int4 words (8 per word).

    Checked before any work starts; `option` names the setting a user would change."""
    for proj, (k, n) in projection_shapes(config).items():
        if group_size != -1 and k % group_size:
            raise RecipeError(f"{option}: {group_size} does not divide in_features {k} of {PROJECTIONS[proj]}")
        if n % 8:
            raise ModelSourceError(f"{PROJECTIONS[proj]}: out_features {n} is not a multiple of 8")


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device: shapes only, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def materialize_non_persistent_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Rebuild modules whose buffers are computed, not stored (rotary inv_freq), after a meta-device build."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device(device):
                setattr(parent, child, type(module)(config=model.config))
