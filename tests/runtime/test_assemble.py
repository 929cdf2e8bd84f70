"""runtime.assemble: config + TealQuantConfig + tensors (one mapping or a stream of per-layer mappings) -> the
TealLinear model that load(), from_pretrained and synthetic models share; bad tensors are one clear line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from teal_quant.architecture import LAYERS_PREFIX, build_skeleton, materialize_non_persistent_buffers
from teal_quant.artifact.format import LM_HEAD_KEY, read_artifact, stored_float32
from teal_quant.errors import ArtifactError
from teal_quant.runtime.assemble import assemble, quantized_module_names, replace_linears
from teal_quant.runtime.modules import set_sparsity, teal_linears

IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2]])
LEVELS = (0.0, 0.25, 0.4, 0.5)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def parts(tiny_artifact):
    """(config, quant, tensors) of the artifact, as load() reads them."""
    from transformers import AutoConfig

    artifact = read_artifact(tiny_artifact)
    config = AutoConfig.from_pretrained(tiny_artifact)
    return config, artifact.quant, artifact.tensors("cpu")


def by_layer(tensors: dict[str, torch.Tensor]):
    """The tensors as a stream: the non-layer ones, then one mapping per decoder layer (the synthetic generator's
    order)."""
    def layer_of(key):
        return int(key.split(".")[2]) if key.startswith(LAYERS_PREFIX + ".") else -1

    for index in sorted({layer_of(k) for k in tensors}):
        yield {k: t for k, t in tensors.items() if layer_of(k) == index}


def previous_load(tiny_artifact, level):
    """What teal_quant.load did before assemble() existed (float32 on the CPU), kept here as the reference."""
    config, quant, tensors = parts(tiny_artifact)
    del config.quantization_config
    model = build_skeleton(config, torch.float32)
    replace_linears(model, read_artifact(tiny_artifact).quantized_modules(), quant, torch.float32)
    state = {k: t if not t.is_floating_point() or k.endswith((".thresholds", ".channel_scale")) else t.float()
             for k, t in tensors.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    for _, module in teal_linears(model):
        module.materialize_runtime_state("cpu")
    materialize_non_persistent_buffers(model, "cpu")
    model.teal_quant_config = quant
    model.eval()
    set_sparsity(model, level)
    return model


def test_assemble_gives_the_previous_load_paths_logits(tiny_artifact):
    import teal_quant

    config, quant, tensors = parts(tiny_artifact)
    streamed = assemble(config, quant, by_layer(tensors), device="cpu", dtype=torch.float32)
    assert streamed.teal_sparsity == quant.default  # the artifact's default level unless told
    for level in LEVELS:
        reference = previous_load(tiny_artifact, level)
        loaded = teal_quant.load(tiny_artifact, sparsity=level, device="cpu")
        set_sparsity(streamed, level)
        for ids in (IDS, IDS[:, :1]):  # prefill (dense GEMM) and decode (the sparse GEMV)
            want = logits(reference, ids)
            assert torch.equal(logits(loaded, ids), want), level
            assert torch.equal(logits(streamed, ids), want), level


def test_nothing_is_left_on_meta_and_no_dense_weight_exists(tiny_artifact):
    config, quant, tensors = parts(tiny_artifact)
    model = assemble(config, quant, tensors, device="cpu", dtype=torch.float32)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert not t.is_meta and t.device.type == "cpu", name
    quantized = quantized_module_names(model.config, quant)
    assert [n for n, _ in teal_linears(model)] == quantized and len(quantized) == 14
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert dense == ["lm_head"], "a quantized projection holds a dense weight"
    assert all(t.dtype == torch.float32 for k, t in model.state_dict().items() if stored_float32(k))
    assert model.config.quantization_config["quant_method"] == "teal_quant" and not model.training


def corrupt(tensors, kind):
    key = "model.layers.1.mlp.down_proj.scales"
    if kind == "missing":
        tensors.pop(key)
    elif kind == "unexpected":
        tensors["model.layers.1.mlp.down_proj.extra"] = torch.zeros(3)
    else:
        tensors[key] = tensors[key][:, :-8].clone()
    return tensors


@pytest.mark.parametrize("kind, message", [
    ("missing", "tensor model.layers.1.mlp.down_proj.scales is missing"),
    ("unexpected", "unexpected tensor model.layers.1.mlp.down_proj.extra"),
    ("shape", "tensor shapes do not match the config (Error(s) in loading state_dict for LlamaForCausalLM:"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["mapping", "stream"])
def test_a_bad_tensor_is_one_line_naming_it(tiny_artifact, kind, message, stream):
    config, quant, tensors = parts(tiny_artifact)
    tensors = corrupt(tensors, kind)
    with pytest.raises(ArtifactError) as e:
        assemble(config, quant, by_layer(tensors) if stream else tensors, device="cpu", dtype=torch.float32,
                 where="artifact 'X'")
    text = str(e.value)
    assert text.startswith("artifact 'X': ") and message in text and "\n" not in text, text


def test_bad_thresholds_are_one_line(tiny_artifact):
    config, quant, tensors = parts(tiny_artifact)
    tensors["model.layers.0.self_attn.o_proj.thresholds"][1] = float("nan")
    with pytest.raises(ArtifactError) as e:
        assemble(config, quant, tensors, device="cpu", dtype=torch.float32, where="artifact 'X'")
    assert str(e.value) == ("artifact 'X': model.layers.0.self_attn.o_proj.thresholds must be finite, >= 0 and "
                            "non-decreasing")


def test_tied_embeddings_share_storage(tiny_artifact):
    config, quant, tensors = parts(tiny_artifact)
    config.tie_word_embeddings = True
    embedding = tensors["model.embed_tokens.weight"]
    tensors.pop(LM_HEAD_KEY)
    model = assemble(config, quant, tensors, device="cpu", dtype=torch.float32)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.lm_head.weight, embedding)
    hidden = model.model(IDS).last_hidden_state
    assert torch.allclose(logits(model), hidden @ embedding.t(), atol=1e-5)


def test_modules_to_not_convert_stay_dense(tiny_artifact):
    """quantized_module_names (also from_pretrained's list) leaves out modules_to_not_convert: a layer kept dense
    then needs its dense weight among the tensors, and its packed tensors are unexpected."""
    from dataclasses import replace

    config, quant, tensors = parts(tiny_artifact)
    quant = replace(quant, modules_to_not_convert=["lm_head", "model.layers.1.mlp"])
    names = quantized_module_names(config, quant)
    assert len(names) == 11 and not any(n.startswith("model.layers.1.mlp.") for n in names)
    with pytest.raises(ArtifactError, match="tensor model.layers.1.mlp.gate_proj.weight is missing"):
        assemble(config, quant, tensors, device="cpu", dtype=torch.float32)


def test_a_quantized_name_the_config_lacks_is_refused(tiny_artifact):
    config, quant, tensors = parts(tiny_artifact)
    with pytest.raises(ArtifactError, match="artifact has tensors for 'model.layers.9.mlp.up_proj', which the model"):
        assemble(config, quant, tensors, device="cpu", dtype=torch.float32, quantized=["model.layers.9.mlp.up_proj"])
