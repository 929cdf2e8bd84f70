"""The quantized lm_head (recipe `quantization.lm_head: int8 | int4`) end to end on tiny random Llamas, tied and
untied: the artifact's tensors and config (docs/artifact-format.md), the layers unchanged by it, the head's codes
against RTN of the float head, logits of `teal_quant.load` and of transformers' from_pretrained against a float64
reference built from the stored codes, the checks of a malformed artifact, and QuantLinear's own paths."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _support import tiny_recipe_text, write_tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file

import teal_quant
from teal_quant import kernels
from teal_quant.artifact.format import read_artifact
from teal_quant.compression.quantize.rtn import QuantSpec, rtn_quantize
from teal_quant.errors import ArtifactError
from teal_quant.runtime.modules import QuantLinear, teal_linears

TOL = {"rtol": 1e-5, "atol": 1e-5}
IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2]])


def tensors_of(path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for file in set(index.values()):
        with safe_open(str(path / file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


def build(model_dir, out, head: str):
    from teal_quant import Recipe, compress

    quant = f"quantization: {{bits: 4, group_size: 32, lm_head: {head}}}"
    return compress(Recipe.from_yaml_text(tiny_recipe_text(model_dir, out, quantization=quant))).artifact


CASES = [(False, "int8"), (True, "int4")]  # (tied, head): each format once, each head kind once (tiny builds are slow)


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tied_llama, tiny_artifact, tmp_path_factory):
    """The builds, and their dense-head twins (the session's tiny_artifact is the untied one: the same recipe)."""
    root = tmp_path_factory.mktemp("heads")
    out = {(False, "dense"): tiny_artifact, (True, "dense"): build(tied_llama, root / "tied-dense", "dense")}
    for tied, head in CASES:
        out[(tied, head)] = build(tied_llama if tied else tiny_llama, root / f"{int(tied)}-{head}", head)
    return out


def float_head(model_dir) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).lm_head.weight.detach()


@pytest.mark.parametrize("tied,head", CASES)
def test_artifact_stores_the_rtn_head_and_leaves_the_rest_alone(artifacts, tiny_llama, tied_llama, tied, head):
    bits = 8 if head == "int8" else 4
    path = artifacts[(tied, head)]
    config = json.loads((path / "config.json").read_text())
    q = config["quantization_config"]
    assert q["lm_head"] == {"bits": bits, "group_size": 32, "packing": "int4-n8" if bits == 4 else "int8"}
    assert q["modules_to_not_convert"] == [] and config["tie_word_embeddings"] is False
    got, dense = tensors_of(path), tensors_of(artifacts[(tied, "dense")])
    assert "lm_head.weight" not in got
    assert set(got) - set(dense) == {"lm_head.qweight", "lm_head.scales", "lm_head.zeros"}
    for key, value in dense.items():  # calibration and every layer are untouched by the head's format
        if key != "lm_head.weight":
            assert torch.equal(got[key], value), key
    want_q, want_s, want_z = rtn_quantize(float_head(tied_llama if tied else tiny_llama), QuantSpec(bits, 32, False))
    assert torch.equal(kernels.unpack(got["lm_head.qweight"], bits), want_q)
    torch.testing.assert_close(got["lm_head.scales"], want_s, rtol=0, atol=0)  # float32 artifact: no rounding
    torch.testing.assert_close(got["lm_head.zeros"], want_z, rtol=0, atol=0)
    if tied:  # the embedding stays float, as it was
        assert torch.equal(got["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])


@pytest.mark.parametrize("tied,head", CASES)
def test_load_and_from_pretrained_compute_with_the_stored_codes(artifacts, tied, head):
    """Last hidden state @ the head dequantized in float64 from the stored codes = the loaded model's logits; the
    transformers path gives the same logits; the embedding is not the head any more."""
    from transformers import AutoModelForCausalLM

    path = artifacts[(tied, head)]
    stored = tensors_of(path)
    model = teal_quant.load(path, sparsity=0.4, device="cpu")
    assert isinstance(model.lm_head, QuantLinear)
    with torch.no_grad():
        out = model(IDS, output_hidden_states=True)
    bits = 8 if head == "int8" else 4
    q = kernels.unpack(stored["lm_head.qweight"], bits).double()
    groups = torch.arange(q.shape[0]) // 32
    w_t = (q - stored["lm_head.zeros"].double()[groups]) * stored["lm_head.scales"].double()[groups]
    want = out.hidden_states[-1].double() @ w_t
    torch.testing.assert_close(out.logits.double(), want, **TOL)
    with torch.no_grad():  # one decode step (the GEMV path) agrees too
        step = model.lm_head(out.hidden_states[-1][:, -1:])
    torch.testing.assert_close(step.double(), want[:, -1:], **TOL)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert isinstance(hf.lm_head, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, out.logits, rtol=0, atol=0)
    assert hf.get_input_embeddings().weight.shape == (512, 64)


def test_generate_and_bench_take_a_quantized_head(artifacts):
    model = teal_quant.load(artifacts[(True, "int4")], device="cpu", sparsity=0.0)
    out = teal_quant.generate(model, IDS, 6)
    with torch.no_grad():
        ref = model.generate(IDS, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(IDS), pad_token_id=0)
    assert torch.equal(out, ref)
    from teal_quant.bench import _dense_bytes, _weight_bytes, to_dense_twin

    head = model.lm_head
    nbytes = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    linears = [m for _, m in teal_linears(model)]
    want = nbytes(head.qweight, head.scales, head.zeros) + sum(nbytes(m.qweight, m.scales, m.zeros) for m in linears)
    want += nbytes(*model.parameters()) - nbytes(model.get_input_embeddings().weight)  # norms; not the embedding
    assert _weight_bytes(model, {}) == want  # level 0 counters: every packed row, and the head's every byte
    n_dense = sum(m.in_features * m.out_features for m in [*linears, head]) + sum(p.numel() for p in model.parameters())
    assert _dense_bytes(model, torch.float32) == 4 * n_dense
    want = head.dequantized_weight()
    to_dense_twin(model, torch.float32)  # the dense baseline gets a float head with the same values
    assert isinstance(model.lm_head, torch.nn.Linear) and torch.equal(model.lm_head.weight, want)


@pytest.mark.parametrize("damage,match", [
    ("drop_zeros", "lm_head.zeros is missing"),
    ("no_config", "present but quantization_config has no lm_head"),
    ("bad_bits", "lm_head bits 3"),
    ("bad_shape", "lm_head.qweight must be"),
])
def test_a_malformed_head_is_one_artifact_error(artifacts, tmp_path, damage, match):
    path = shutil.copytree(artifacts[(False, "int8")], tmp_path / "a")
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    if damage == "drop_zeros":
        del index["weight_map"]["lm_head.zeros"]
        index_file.write_text(json.dumps(index))
    elif damage == "no_config":
        del config["quantization_config"]["lm_head"]
    elif damage == "bad_bits":
        config["quantization_config"]["lm_head"]["bits"] = 3
    else:
        save_file({"lm_head.qweight": torch.zeros(64, 8, dtype=torch.uint8)}, str(path / "extra.safetensors"))
        index["weight_map"]["lm_head.qweight"] = "extra.safetensors"
        index_file.write_text(json.dumps(index))
    config_file.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=match):
        read_artifact(path)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantlinear_paths_equal_the_float64_product(bits):
    g = torch.Generator().manual_seed(0)
    k, n = 64, 48
    q = torch.randint(0, 2**bits, (k, n), generator=g)
    scales = torch.rand(2, n, generator=g) * 0.02 + 0.005
    zeros = torch.randint(0, 2**bits, (2, n), generator=g).float()
    bias = torch.randn(n, generator=g)
    m = QuantLinear(k, n, bits=bits, group_size=32, bias=True, dtype=torch.float32)
    m.load_state_dict({"qweight": kernels.pack(q, bits), "scales": scales, "zeros": zeros, "bias": bias})
    groups = torch.arange(k) // 32
    w_t = (q.double() - zeros.double()[groups]) * scales.double()[groups]
    for shape in ((1, 1, k), (3, 1, k), (2, 5, k), (4, k)):
        x = torch.randn(*shape, generator=g)
        x[..., :5] = 0.0  # zero inputs: a dense product, no threshold
        with torch.no_grad():
            y = m(x)
        torch.testing.assert_close(y.double(), x.double() @ w_t + bias.double(), **TOL)
    torch.testing.assert_close(m.dequantized_weight().double(), w_t.t(), **TOL)
