"""Model sources: where the base model's config, tokenizer and tensors come from.

`open_model` picks the reader: a GGUF file (dequantized whole by transformers), safetensors shards read lazily
tensor by tensor (base.py), or an existing GPTQ checkpoint whose packed codes are imported as they are (gptq.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from teal_quant.architecture import SUPPORTED_MODEL_TYPES
from teal_quant.artifact.hub import download_file
from teal_quant.compression.sources.base import (
    ModelSource,
    index_safetensors,
    is_hub_id,
    read_gguf,
    read_weight_map,
    resolve_local_path,
)
from teal_quant.compression.sources.gptq import gptq_settings, open_gptq
from teal_quant.compression.sources.hub import HubShards
from teal_quant.errors import HubError, ModelSourceError, first_line
from teal_quant.gguf_files import shared_gguf_parse

__all__ = ["ModelSource", "open_model"]

logger = logging.getLogger(__name__)


METADATA_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt"]  # what a Hub model's first download fetches


def open_model(source: str, *, gguf_file: str | None = None, revision: str | None = None,
               keep_download: bool = True) -> ModelSource:
    """Resolve the model, check its architecture, and index its tensors (without reading them).

    A Hub id downloads only the metadata first; its safetensors shards are fetched as the layers need them
    (sources.hub.HubShards), and with `keep_download` False deleted once their layers are done."""
    from transformers import AutoConfig

    from_hub = is_hub_id(source)
    if not keep_download and not from_hub:
        logger.info("model.keep_download: false deletes only shards a run downloads from the Hub; '%s' is local, and "
                    "teal-quant never deletes a local model's files", source)
    patterns = METADATA_PATTERNS + ([gguf_file] if gguf_file else [] if from_hub else ["*.safetensors"])
    path = resolve_local_path(source, revision, allow_patterns=patterns)
    if from_hub and not gguf_file:
        _fetch_single_shard(path, source, revision)
    if gguf_file and not (path / gguf_file).is_file():
        raise ModelSourceError(f"model '{source}': GGUF file '{gguf_file}' not found in {path}")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if not gguf_file and not (path / "config.json").is_file():
        raise ModelSourceError(f"model '{source}': no config.json in {path}")
    try:
        with shared_gguf_parse():
            config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as e:
        raise ModelSourceError(f"model '{source}': cannot read its config ({first_line(e)})") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSourceError(
            f"model '{source}': unsupported architecture '{model_type}' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if not gguf_file:
        settings = gptq_settings(path, f"model '{source}'")
        if settings is not None:  # an existing GPTQ checkpoint: imported as is (quantization.method: from_checkpoint)
            src = open_gptq(path, config, settings, source=source, revision=revision,
                            index=index_safetensors(path, source))
            if from_hub:
                src.hub = _hub_shards(source, path, keep_download)
            return src
    if getattr(config, "quantization_config", None) and not gguf_file:
        method = dict(config.quantization_config).get("quant_method", "?") if isinstance(config.quantization_config, dict) else "?"
        raise ModelSourceError(f"model '{source}': is already quantized ({method}); start from a float checkpoint")
    src = ModelSource(path=path, config=config, gguf_file=gguf_file, revision=revision)
    if gguf_file:
        src._tensors = read_gguf(path, gguf_file, config)
    else:
        src._index = index_safetensors(path, source)
    if from_hub and not gguf_file:
        src.hub = _hub_shards(source, path, keep_download)
    if getattr(src.config, "quantization_config", None) is not None:
        # GGUF configs carry a placeholder quantization_config; the tensors we hold are float.
        del src.config.quantization_config
    return src


def _fetch_single_shard(path: Path, source: str, revision: str | None) -> None:
    """A Hub model without a shard index has one model.safetensors: fetch it now (there is nothing to stream)."""
    if (path / "model.safetensors.index.json").is_file() or (path / "model.safetensors").exists():
        return
    try:
        download_file(source, "model.safetensors", revision=_snapshot_revision(path, revision),
                      cache_dir=path.parents[2] if path.parent.name == "snapshots" else None)
    except HubError:  # no such file: index_safetensors says what the folder lacks
        return


def _snapshot_revision(path: Path, revision: str | None) -> str | None:
    """The commit of a huggingface_hub snapshot folder (<cache>/models--org--name/snapshots/<commit>)."""
    return path.name if path.parent.name == "snapshots" else revision


def _hub_shards(source: str, path: Path, keep_download: bool) -> HubShards | None:
    index = path / "model.safetensors.index.json"
    if not index.is_file() or path.parent.name != "snapshots":
        return None
    weight_map = read_weight_map(index, source)
    return HubShards.from_weight_map(source, path.name, path, weight_map, keep=keep_download)
