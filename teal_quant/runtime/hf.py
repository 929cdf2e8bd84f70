"""transformers integration: `AutoModelForCausalLM.from_pretrained(artifact_or_repo_id)` after `import teal_quant`.

A thin adapter (after transformers' quantizer_compressed_tensors.py): `TealQuantHfConfig` (a
QuantizationConfigMixin for quant_method "teal_quant") and `TealQuantHfQuantizer`, registered with
transformers.quantizers.register_quantization_config / register_quantizer. Before the weights load, the quantizer
swaps the seven projections of every decoder layer for TealLinear modules on the meta device (assemble.replace_linears),
so the packed tensors load straight into their buffers and no dense weight is ever allocated; after, it builds the
runtime state, checks thresholds / channel_scale / perm and selects the artifact's default level
(assemble.finish_assembly), as teal_quant.load does. `save_pretrained` writes the same tensors and config back.

Hooks used (present in transformers 5.17 and 5.24): validate_environment, update_dtype, _process_model_before_weight_loading,
_process_model_after_weight_loading, is_serializable, is_trainable, is_qat_trainable, is_compileable.

Registration is lazy: importing transformers' quantizer registry costs seconds, and `import teal_quant` must stay
fast. `install()` (called by `import teal_quant`) registers at once when transformers.quantizers.auto is already
imported, and otherwise adds an import hook that registers right after that module is first imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading

_REGISTRY_MODULE = "transformers.quantizers.auto"
_lock = threading.Lock()
_registered = False


def install() -> None:
    """Make transformers load teal-quant artifacts: now if its quantizer registry is loaded, else when it is."""
    if _REGISTRY_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegistryImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryImportHook())


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        from transformers.quantizers.auto import (
            AUTO_QUANTIZATION_CONFIG_MAPPING,
            AUTO_QUANTIZER_MAPPING,
            register_quantization_config,
            register_quantizer,
        )

        from teal_quant.artifact.format import QUANT_METHOD

        config_cls, quantizer_cls = _classes()
        if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
            register_quantization_config(QUANT_METHOD)(config_cls)
        if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
            register_quantizer(QUANT_METHOD)(quantizer_cls)
        _registered = True


class _RegistryImportHook(importlib.abc.MetaPathFinder):
    """Wraps the loader of transformers.quantizers.auto so that `register()` runs right after it executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # find the real spec without ourselves; one shot
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            register()

        loader.exec_module = exec_module
        return spec


_CLASSES = None


def _classes():
    """Define the classes on first use (their bases live in the transformers module that triggered registration)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from teal_quant.artifact.format import QUANT_METHOD, TealQuantConfig
    from teal_quant.errors import ArtifactError

    class TealQuantHfConfig(QuantizationConfigMixin):
        """`quantization_config` of a teal-quant artifact, as transformers sees it. Holds the JSON dict unchanged,
        so save_pretrained writes back exactly what was read; `teal_config` is the validated TealQuantConfig."""

        def __init__(self, **kwargs):
            self.quant_method = QUANT_METHOD
            self._fields = {**kwargs, "quant_method": QUANT_METHOD}
            self.teal_config = TealQuantConfig.from_dict(self._fields, where="quantization_config")
            self.modules_to_not_convert = list(self.teal_config.modules_to_not_convert)

        def to_dict(self) -> dict:
            import copy

            return copy.deepcopy(self._fields)

        def __iter__(self):
            yield from self.to_dict().items()

        def to_diff_dict(self) -> dict:
            return self.to_dict()

        def __repr__(self) -> str:
            return f"TealQuantHfConfig({self._fields})"

    class TealQuantHfQuantizer(HfQuantizer):
        """Loads pre-quantized teal-quant artifacts (no on-the-fly quantization: that is `teal-quant run`)."""

        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            if not self.pre_quantized:
                raise ValueError("teal-quant artifacts are made by `teal-quant run RECIPE`; transformers can only load them")

        def update_dtype(self, dtype):
            return dtype

        def _process_model_before_weight_loading(self, model, **kwargs):
            from teal_quant.runtime.assemble import quantized_module_names, replace_linears

            # A teal-quant artifact loads from safetensors only: pickle checkpoints are never torch.load-ed.
            files = kwargs.get("checkpoint_files") or []
            pickled = [f for f in files if not str(f).endswith(".safetensors")]
            if pickled or not files:
                name = pickled[0] if pickled else "no safetensors file"
                raise ArtifactError(f"teal-quant artifact: refusing '{name}': a teal-quant artifact is read from "
                                    "safetensors only (model.safetensors or model.safetensors.index.json)")

            quant = self.quantization_config.teal_config
            dtype = kwargs.get("dtype") or model.dtype
            replace_linears(model, quantized_module_names(model.config, quant), quant, dtype)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from teal_quant.runtime.assemble import finish_assembly
            from teal_quant.runtime.modules import teal_linears

            for name, module in teal_linears(model):  # transformers leaves a buffer it found no tensor for on meta
                if module.qweight.is_meta:
                    raise ArtifactError(f"checkpoint has no packed tensors for {name} (is it a teal-quant artifact?)")
            finish_assembly(model, self.quantization_config.teal_config)
            return model

        def is_serializable(self, *args, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

        def is_qat_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            return True

    _CLASSES = (TealQuantHfConfig, TealQuantHfQuantizer)
    return _CLASSES


def __getattr__(name: str):
    if name in ("TealQuantHfConfig", "TealQuantHfQuantizer"):
        config_cls, quantizer_cls = _classes()
        return config_cls if name == "TealQuantHfConfig" else quantizer_cls
    raise AttributeError(f"module 'teal_quant.runtime.hf' has no attribute {name!r}")
