"""teal-quant: int4/int8 weight quantization + TEAL activation sparsity in one Hugging Face artifact."""

__version__ = "0.1.0"

from teal_quant.compression.recipe import Recipe  # noqa: E402
from teal_quant.errors import ArtifactError, DataError, HubError, ModelSourceError, RecipeError, TealQuantError  # noqa: E402
from teal_quant.runtime.hf import install as _install_transformers_integration  # noqa: E402

# AutoModelForCausalLM.from_pretrained(artifact) works after `import teal_quant`: the quantizer is registered when
# transformers' quantizer registry is imported (at once if it already is); see teal_quant/runtime/hf.py.
_install_transformers_integration()


def __getattr__(name: str):
    # Heavy entry points (transformers, the pipeline) are imported on first use, so `import teal_quant`
    # and the CLI's argument errors stay fast.
    if name == "compress":
        from teal_quant.compression.pipeline import compress

        return compress
    if name in ("load", "set_sparsity", "realized_sparsity"):
        from teal_quant.runtime import loading

        return getattr(loading, name)
    if name in ("generate", "Decoder"):
        from teal_quant.runtime import decoding

        return getattr(decoding, name)
    if name == "push":
        from teal_quant.artifact.hub import push

        return push
    raise AttributeError(f"module 'teal_quant' has no attribute {name!r}")


__all__ = [
    "Recipe",
    "RecipeError",
    "TealQuantError",
    "ModelSourceError",
    "DataError",
    "ArtifactError",
    "HubError",
    "compress",
    "load",
    "set_sparsity",
    "realized_sparsity",
    "push",
    "generate",
    "Decoder",
]
