"""Model sources: where the base model's config, tokenizer and tensors come from.

`open_model` picks the reader: a GGUF file (dequantized whole by transformers), safetensors shards read lazily
tensor by tensor (base.py), or an existing GPTQ checkpoint whose packed codes are imported as they are (gptq.py).
"""

from __future__ import annotations

from teal_quant.architecture import SUPPORTED_MODEL_TYPES
from teal_quant.compression.sources.base import ModelSource, index_safetensors, read_gguf, resolve_local_path
from teal_quant.compression.sources.gptq import gptq_settings, open_gptq
from teal_quant.errors import ModelSourceError, first_line

__all__ = ["ModelSource", "open_model"]


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
        settings = gptq_settings(path, f"model '{source}'")
        if settings is not None:  # an existing GPTQ checkpoint: imported as is (quantization.method: from_checkpoint)
            return open_gptq(path, config, settings, source=source, revision=revision,
                             index=index_safetensors(path, source))
    if getattr(config, "quantization_config", None) and not gguf_file:
        method = dict(config.quantization_config).get("quant_method", "?") if isinstance(config.quantization_config, dict) else "?"
        raise ModelSourceError(f"model '{source}': is already quantized ({method}); start from a float checkpoint")
    src = ModelSource(path=path, config=config, gguf_file=gguf_file, revision=revision)
    if gguf_file:
        src._tensors = read_gguf(path, gguf_file)
    else:
        src._index = index_safetensors(path, source)
    if getattr(src.config, "quantization_config", None) is not None:
        # GGUF configs carry a placeholder quantization_config; the tensors we hold are float.
        del src.config.quantization_config
    return src
