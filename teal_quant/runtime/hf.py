"""transformers integration: `AutoModelForCausalLM.from_pretrained(artifact_or_repo_id)` after `import teal_quant`.

A thin adapter (after transformers' quantizer_compressed_tensors.py): `TealQuantConfig` (a
QuantizationConfigMixin for quant_method "teal_quant", also the user's load-time options:
`from_pretrained(path, quantization_config=teal_quant.TealQuantConfig(sparsity=0.5, prefill="sparse"))`; transformers
merges its get_loading_attributes() into the artifact's config once the class is in
transformers.quantizers.auto.LOADING_ATTRIBUTES_CONFIG_TYPES, which register() extends) and `TealQuantHfQuantizer`,
registered with
transformers.quantizers.register_quantization_config / register_quantizer. Before the weights load, the quantizer
swaps the seven projections of every decoder layer for TealLinear modules on the meta device (assemble.replace_linears),
so the packed tensors load straight into their buffers and no dense weight is ever allocated; after, it builds the
runtime state, checks thresholds / channel_scale / perm and selects the artifact's default level
(assemble.finish_assembly), as teal_quant.load does, then applies the load-time sparsity / prefill. `save_pretrained` writes the same tensors and config back.

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
    after_import(_REGISTRY_MODULE, register)


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        import transformers.quantizers.auto as auto
        from transformers.quantizers.auto import (
            AUTO_QUANTIZATION_CONFIG_MAPPING,
            AUTO_QUANTIZER_MAPPING,
            register_quantization_config,
            register_quantizer,
        )

        from teal_quant.artifact.format import QUANT_METHOD

        config_cls, quantizer_cls = _classes()
        # A user's TealQuantConfig(sparsity=..., prefill=...) passed to from_pretrained is merged into the artifact's
        # config only for the classes in this tuple (merge_quantization_configs copies get_loading_attributes()).
        if config_cls not in auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
            auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto.LOADING_ATTRIBUTES_CONFIG_TYPES, config_cls)
        if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
            register_quantization_config(QUANT_METHOD)(config_cls)
        if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
            register_quantizer(QUANT_METHOD)(quantizer_cls)
        _registered = True


class AfterImportHook(importlib.abc.MetaPathFinder):
    """Wraps the loader of module `fullname` so that `callback()` runs right after the module first executes.
    Also used by teal_quant.harness for lm-evaluation-harness's model registry."""

    def __init__(self, fullname: str, callback) -> None:
        self.fullname, self.callback = fullname, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.fullname:
            return None
        sys.meta_path.remove(self)  # find the real spec without ourselves; one shot
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module
        callback = self.callback

        def exec_module(module):
            original_exec(module)
            callback()

        loader.exec_module = exec_module
        return spec


def after_import(fullname: str, callback) -> None:
    """Run `callback()` now if module `fullname` is imported, else right after it is first imported."""
    if fullname in sys.modules:
        callback()
    elif not any(isinstance(f, AfterImportHook) and f.fullname == fullname for f in sys.meta_path):
        sys.meta_path.insert(0, AfterImportHook(fullname, callback))


_CLASSES = None


def _classes():
    """Define the classes on first use (their bases live in the transformers module that triggered registration)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from teal_quant.artifact.format import QUANT_METHOD
    from teal_quant.artifact.format import TealQuantConfig as FormatConfig
    from teal_quant.errors import ArtifactError

    class TealQuantConfig(QuantizationConfigMixin):
        """`quantization_config` of a teal-quant artifact as transformers sees it, and the load-time options a user
        passes to `from_pretrained(path, quantization_config=TealQuantConfig(sparsity=0.5, prefill="sparse"))`.

        Built from an artifact's config.json it holds the JSON dict unchanged (save_pretrained writes back exactly
        what was read; `teal_config` is the validated format config). Built by a user it holds only the load-time
        options, which transformers copies onto the artifact's config (get_loading_attributes):
          sparsity: one of the artifact's levels (0 = dense activations); default: the artifact's default level.
          prefill: "dense" (default: prompts run dense, decode is sparse), "sparse" (every token thresholded, as
            evaluation needs), or "sparse_last_half".
        """

        def __init__(self, sparsity: float | None = None, prefill: str | None = None, **kwargs):
            self.quant_method = QUANT_METHOD
            fields = {k: v for k, v in kwargs.items() if k != "quant_method"}
            if isinstance(sparsity, dict):  # config.json's "sparsity" section (levels, default, ...), not an option
                fields["sparsity"], sparsity = sparsity, None
            self.sparsity = _check_sparsity(sparsity)
            self.prefill = _check_prefill(prefill)
            self._fields = {**fields, "quant_method": QUANT_METHOD} if fields else {}
            self.teal_config = FormatConfig.from_dict(self._fields, where="quantization_config") if fields else None
            self.modules_to_not_convert = list(self.teal_config.modules_to_not_convert) if fields else []

        def get_loading_attributes(self) -> dict:
            return {k: v for k, v in (("sparsity", self.sparsity), ("prefill", self.prefill)) if v is not None}

        def to_dict(self) -> dict:  # the artifact's config only: load-time options are not part of the artifact
            import copy

            return copy.deepcopy(self._fields) if self._fields else {"quant_method": QUANT_METHOD, **self.get_loading_attributes()}

        def __iter__(self):
            yield from self.to_dict().items()

        def to_diff_dict(self) -> dict:
            return self.to_dict()

        def __repr__(self) -> str:
            opts = ", ".join(f"{k}={v!r}" for k, v in self.get_loading_attributes().items())
            return f"TealQuantConfig({opts})" if not self._fields else f"TealQuantConfig({opts}; {self._fields})"

    class TealQuantHfQuantizer(HfQuantizer):
        """Loads pre-quantized teal-quant artifacts (no on-the-fly quantization: that is `teal-quant run`)."""

        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            if not self.pre_quantized or self.quantization_config.teal_config is None:
                raise ValueError("TealQuantConfig only loads teal-quant artifacts (made by `teal-quant run RECIPE`); "
                                 "this model has no teal_quant quantization_config")

        def update_dtype(self, dtype):
            return dtype

        def _process_model_before_weight_loading(self, model, **kwargs):
            from teal_quant.runtime.assemble import quantized_module_names, replace_head, replace_linears

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
            replace_head(model, quant, dtype)  # quantization_config.lm_head: a QuantLinear head (no tied weight)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from teal_quant.runtime.assemble import finish_assembly
            from teal_quant.runtime.modules import set_prefill_mode, set_sparsity, teal_linears

            for name, module in teal_linears(model):  # transformers leaves a buffer it found no tensor for on meta
                if module.qweight.is_meta:
                    raise ArtifactError(f"checkpoint has no packed tensors for {name} (is it a teal-quant artifact?)")
            head = model.get_output_embeddings()
            if any(t.is_meta for t in head.buffers()):
                raise ArtifactError("checkpoint has no packed tensors for lm_head (quantization_config.lm_head is set)")
            config = self.quantization_config
            finish_assembly(model, config.teal_config)
            if config.sparsity is not None:
                set_sparsity(model, config.sparsity)
            if config.prefill is not None:
                set_prefill_mode(model, config.prefill)
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

    _CLASSES = (TealQuantConfig, TealQuantHfQuantizer)
    return _CLASSES


def _check_sparsity(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"TealQuantConfig(sparsity=...): expected a level in [0, 1), got {value!r}")
    return float(value)


def _check_prefill(value):
    from teal_quant.runtime.modules import PREFILL_MODES

    if value is not None and value not in PREFILL_MODES:
        raise ValueError(f"TealQuantConfig(prefill=...): expected one of {', '.join(PREFILL_MODES)}, got {value!r}")
    return value


def __getattr__(name: str):
    # TealQuantConfig subclasses transformers' QuantizationConfigMixin, so it is defined on first use; asking for it
    # also registers the quantizer (the class transformers builds from an artifact's config.json is this one).
    if name in ("TealQuantConfig", "TealQuantHfConfig", "TealQuantHfQuantizer"):
        register()
        config_cls, quantizer_cls = _classes()
        return quantizer_cls if name == "TealQuantHfQuantizer" else config_cls
    raise AttributeError(f"module 'teal_quant.runtime.hf' has no attribute {name!r}")
