"""teal-quant: int4/int8 weight quantization + TEAL activation sparsity in one Hugging Face artifact."""

__version__ = "0.1.0"

import logging as _logging  # noqa: E402

from teal_quant.compression.recipe import Recipe  # noqa: E402
from teal_quant.errors import ArtifactError, DataError, HubError, ModelSourceError, RecipeError, TealQuantError  # noqa: E402
from teal_quant.harness import install as _install_lm_eval_integration  # noqa: E402
from teal_quant.runtime.hf import install as _install_transformers_integration  # noqa: E402

# AutoModelForCausalLM.from_pretrained(artifact) works after `import teal_quant`: the quantizer is registered when
# transformers' quantizer registry is imported (at once if it already is); see teal_quant/runtime/hf.py.
_install_transformers_integration()

# lm-evaluation-harness finds the model type `teal` once lm_eval's model registry is imported (teal_quant/harness.py).
_install_lm_eval_integration()

# What the library reports goes to the standard logger "teal_quant" (module loggers teal_quant.*); it prints nothing.
_logging.getLogger("teal_quant").addHandler(_logging.NullHandler())


def __getattr__(name: str):
    # Heavy entry points (transformers, the pipeline) are imported on first use, so `import teal_quant`
    # and the CLI's argument errors stay fast.
    if name in ("compress", "RunSummary"):
        from teal_quant import workflow

        return getattr(workflow, name)
    if name in ("load", "set_sparsity", "realized_sparsity"):
        from teal_quant.runtime import loading

        return getattr(loading, name)
    if name in ("set_prefill_mode", "track_sparsity"):
        from teal_quant.runtime import modules

        return getattr(modules, name)
    if name == "TealQuantConfig":  # transformers' QuantizationConfigMixin: imports transformers on first use
        from teal_quant.runtime.hf import TealQuantConfig

        return TealQuantConfig
    if name == "generate":
        from teal_quant.runtime.generation import generate

        return generate
    if name == "Decoder":
        from teal_quant.runtime.decoding import Decoder

        return Decoder
    if name == "shard_for_tensor_parallel":
        from teal_quant.runtime.tensor_parallel import shard_for_tensor_parallel

        return shard_for_tensor_parallel
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
    "RunSummary",
    "TealQuantConfig",
    "load",
    "set_sparsity",
    "realized_sparsity",
    "set_prefill_mode",
    "track_sparsity",
    "push",
    "generate",
    "Decoder",
    "shard_for_tensor_parallel",
]
