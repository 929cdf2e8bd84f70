"""teal_quant.load (teal_quant.runtime.loading) beyond what other modules test: the dtype rule (float32 on the CPU
by default; a requested dtype for weights, thresholds and channel scales kept float32), the level chosen at load, and
one clear line for a path that is not an artifact directory or a model that load did not build.

Assembly itself (meta skeleton, module swap, tensor checks) has tests/test_assemble.py; artifact reading
tests/test_artifact.py; Hub resolution tests/test_hub.py; the levels and set_sparsity tests/test_pipeline.py.
"""

from __future__ import annotations

import pytest
import torch

import teal_quant
from teal_quant.errors import ArtifactError
from teal_quant.runtime.loading import resolve_artifact
from teal_quant.runtime.modules import teal_linears


def test_cpu_default_is_float32_and_a_requested_dtype_keeps_sparsity_tensors_float32(tiny_artifact):
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    f32 = teal_quant.load(tiny_artifact, sparsity=0.0, device="cpu")
    bf16 = teal_quant.load(tiny_artifact, sparsity=0.0, device="cpu", dtype=torch.bfloat16)
    assert f32.get_input_embeddings().weight.dtype == torch.float32
    assert bf16.get_input_embeddings().weight.dtype == torch.bfloat16
    for _, m in teal_linears(bf16):
        assert m.scales.dtype == m.zeros.dtype == torch.bfloat16
        assert m.thresholds.dtype == m.threshold.dtype == torch.float32
    with torch.no_grad():
        want, got = f32(ids).logits.double(), bf16(ids).logits.double()
    # bf16 keeps 8 mantissa bits: a 2-layer model's logits move by ~1 % of their norm, not more
    assert 0 < float((got - want).norm() / want.norm()) < 0.05


def test_the_level_asked_for_is_active_after_load(tiny_artifact):
    levels = teal_quant.load(tiny_artifact, device="cpu").teal_quant_config.levels
    for level in levels:
        model = teal_quant.load(tiny_artifact, sparsity=level, device="cpu")
        index = model.teal_quant_config.level_index(level)
        assert model.teal_sparsity == level
        assert all(m.level_index == index and float(m.threshold) == float(m.thresholds[index])
                   for _, m in teal_linears(model))


def test_not_an_artifact_directory_is_one_line(tiny_artifact, tmp_path):
    for path, message in ((tiny_artifact / "config.json", "is a file, expected an artifact directory"),
                          (tmp_path / "missing", "no such directory")):
        with pytest.raises(ArtifactError) as info:
            resolve_artifact(path)
        assert "\n" not in str(info.value) and message in str(info.value)
        with pytest.raises(ArtifactError, match=message):
            teal_quant.load(path, device="cpu")


def test_set_sparsity_needs_a_model_that_load_built(tiny_llama):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with pytest.raises(ValueError, match="not loaded by teal_quant.load"):
        teal_quant.set_sparsity(plain, 0.4)


def test_a_level_not_in_the_artifact_is_refused_before_the_weights_are_read(tiny_artifact, monkeypatch):
    from teal_quant.artifact.format import Artifact

    def no_reading(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(Artifact, "tensors", no_reading)
    with pytest.raises(ArtifactError) as err:
        teal_quant.load(tiny_artifact, sparsity=0.3)
    assert "0.3" in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)
