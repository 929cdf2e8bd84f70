"""transformers integration: AutoModelForCausalLM.from_pretrained on an artifact after `import teal_quant`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_import_registers_lazily_and_from_pretrained_builds_teal_linears(tiny_artifact):
    """In a fresh interpreter: `import teal_quant` does not import transformers' quantizer registry (seconds), yet
    from_pretrained afterwards finds the teal_quant quantizer."""
    code = f"""
import sys
import teal_quant
assert "transformers.quantizers.auto" not in sys.modules
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tiny_artifact)!r})
from teal_quant.runtime.modules import TealLinear
linears = [n for n, m in model.named_modules() if isinstance(m, TealLinear)]
print(len(linears), type(model.config.quantization_config).__name__, model.teal_sparsity)
"""
    env = {**os.environ, "TEAL_QUANT_QUIET": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["14", "TealQuantConfig", "0.4"]


def test_from_pretrained_matches_teal_quant_load(tiny_artifact):
    from transformers import AutoModelForCausalLM

    import teal_quant  # noqa: F401  (registers the quantizer)
    from teal_quant.runtime.loading import load, set_sparsity
    from teal_quant.runtime.modules import TealLinear

    model = AutoModelForCausalLM.from_pretrained(tiny_artifact)
    reference = load(tiny_artifact, device="cpu")
    assert isinstance(model.model.layers[1].mlp.down_proj, TealLinear)
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "weight"), "no dense weight of a quantized layer"
    assert model.dtype == reference.dtype == torch.float32
    assert torch.equal(logits(model), logits(reference))
    assert torch.equal(logits(model, IDS[:, :1]), logits(reference, IDS[:, :1]))  # decode: the sparse GEMV path
    for level in (0.0, 0.5):
        set_sparsity(model, level)
        set_sparsity(reference, level)
        assert torch.equal(logits(model, IDS[:, :1]), logits(reference, IDS[:, :1]))


def test_save_pretrained_round_trips_to_an_identical_artifact(tiny_artifact, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import teal_quant  # noqa: F401
    from teal_quant.artifact.format import read_artifact
    from teal_quant.runtime.loading import load

    original = read_artifact(tiny_artifact)
    model = AutoModelForCausalLM.from_pretrained(tiny_artifact)
    out = tmp_path / "saved"
    model.save_pretrained(out, max_shard_size="100KB")  # sharded: with model.safetensors.index.json like the artifact

    saved = read_artifact(out)
    assert saved.quant == original.quant
    assert saved.config["quantization_config"] == original.config["quantization_config"]
    ignore = {"transformers_version"}
    assert {k: v for k, v in saved.config.items() if k not in ignore} == {
        k: v for k, v in original.config.items() if k not in ignore}
    a, b = original.tensors(), saved.tensors()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name

    assert torch.equal(logits(load(out, device="cpu")), logits(load(tiny_artifact, device="cpu")))

    single = tmp_path / "single"  # transformers' default for a small model: one model.safetensors, no index
    model.save_pretrained(single)
    tensors = load_file(single / "model.safetensors")
    assert tensors.keys() == a.keys() and all(torch.equal(tensors[n], a[n]) for n in a)
    again = AutoModelForCausalLM.from_pretrained(single)
    assert torch.equal(logits(again), logits(model))
    assert json.loads((single / "config.json").read_text())["quantization_config"] == original.config["quantization_config"]


def test_from_pretrained_refuses_to_quantize_on_the_fly(tiny_llama):
    from transformers import AutoModelForCausalLM

    import teal_quant  # noqa: F401
    from teal_quant import TealQuantConfig

    config = TealQuantConfig(**{
        "quant_method": "teal_quant", "format_version": 1, "bits": 4, "group_size": 32, "sym": False,
        "packing": "int4-n8", "quantizer": "rtn", "modules_to_not_convert": ["lm_head"],
        "sparsity": {"method": "teal", "allocation": "greedy", "levels": [0.0, 0.4], "default": 0.4}})
    with pytest.raises(ValueError, match="pre-quantized"):  # transformers' own check (requires_calibration)
        AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config)


def test_load_time_options_override_the_artifacts_level_and_prefill(tiny_artifact):
    """from_pretrained(..., quantization_config=TealQuantConfig(sparsity=, prefill=)) selects the level and the prefill
    mode; the model computes exactly what teal_quant.load + set_sparsity + set_prefill_mode compute."""
    import warnings

    from transformers import AutoModelForCausalLM

    from teal_quant import TealQuantConfig, load, realized_sparsity, set_prefill_mode, set_sparsity
    from teal_quant.runtime.modules import reset_stats, teal_linears

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: "loading attributes ... will be overwritten" (what we want)
        model = AutoModelForCausalLM.from_pretrained(tiny_artifact, quantization_config=TealQuantConfig(sparsity=0.5,
                                                                                                        prefill="sparse"))
    assert model.teal_sparsity == 0.5
    assert {m.prefill for _, m in teal_linears(model)} == {"sparse"}
    reference = load(tiny_artifact, device="cpu")
    assert reference.teal_sparsity == 0.4 and {m.prefill for _, m in teal_linears(reference)} == {"dense"}
    set_sparsity(reference, 0.5)
    set_prefill_mode(reference, "sparse")
    assert torch.equal(logits(model), logits(reference))
    reset_stats(model)
    logits(model)  # an 8-token prompt: sparse prefill thresholds it
    assert realized_sparsity(model, cumulative=True) > 0.25

    # the default load keeps the artifact's default level and dense prefill: prompts see no sparsity
    default = AutoModelForCausalLM.from_pretrained(tiny_artifact)
    assert default.teal_sparsity == 0.4
    reset_stats(default)
    logits(default)
    assert realized_sparsity(default, cumulative=True) == 0.0
    # the saved config is the artifact's, without the load-time options
    assert "prefill" not in model.config.quantization_config.to_dict()
    assert model.config.quantization_config.to_dict() == default.config.quantization_config.to_dict()


def test_load_time_options_are_checked(tiny_artifact):
    import warnings

    from transformers import AutoModelForCausalLM

    from teal_quant import TealQuantConfig

    with pytest.raises(ValueError, match="prefill"):
        TealQuantConfig(prefill="half")
    with pytest.raises(ValueError, match="sparsity"):
        TealQuantConfig(sparsity=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="not in this artifact"):
            AutoModelForCausalLM.from_pretrained(tiny_artifact, quantization_config=TealQuantConfig(sparsity=0.33))
    assert repr(TealQuantConfig(sparsity=0.5)) == "TealQuantConfig(sparsity=0.5)"
