"""The fused decode step (teal_quant/runtime/decode_step.py) against transformers' own decoding, on the CPU with the
kernels' references (tests/kernels/test_decode_step_interpreted.py runs the Triton kernels under the interpreter)."""

from __future__ import annotations

import copy

import pytest
import torch

import teal_quant
from teal_quant.runtime.decode_step import fused_step_support
from teal_quant.runtime.decoding import Decoder
from teal_quant.runtime.fusion import ProjectionPart, fuse_linear_projections, fuse_projections
from teal_quant.runtime.modules import track_sparsity

PROMPT = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2], [1, 77, 8, 300, 64, 21, 99, 13]])


def hf_greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones_like(ids))


@pytest.fixture(scope="module")
def dense_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def forced_logits(model, forced, **kw):
    """Decoder logits [B, n, V] when the tokens `forced` [B, n] are fed (teacher forcing)."""
    dec = Decoder(model, batch_size=PROMPT.shape[0], max_length=PROMPT.shape[1] + forced.shape[1] + 1, **kw)
    dec.prefill(PROMPT)
    out = []
    for i in range(forced.shape[1]):
        dec.step(forced[:, i])
        out.append(dec.logits.clone())
    return torch.stack(out, 1), dec


def test_fused_step_gives_hf_greedy_tokens_and_logits(dense_model):
    assert fused_step_support(dense_model) is None
    ref = hf_greedy(dense_model, PROMPT, 20)
    dec = Decoder(dense_model, batch_size=2, max_length=28, fused_step=True)
    assert dec._fused is not None
    assert torch.equal(dec.generate(PROMPT, 20), ref)
    fused, _ = forced_logits(dense_model, ref[:, 8:], fused_step=True)
    eager, _ = forced_logits(dense_model, ref[:, 8:], fused_step=False)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the full forward of the whole sequence
        full = dense_model(ref).logits[:, 8:]
    torch.testing.assert_close(fused, full, rtol=1e-4, atol=1e-4)


def test_fused_step_on_the_artifact_fused_and_unfused(tiny_artifact):
    model = teal_quant.load(tiny_artifact, sparsity=0.4, device="cpu")
    ref = hf_greedy(model, PROMPT, 12)
    plain, _ = forced_logits(model, ref[:, 8:], fused_step=False)
    got, _ = forced_logits(model, ref[:, 8:], fused_step=True)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    assert fuse_projections(model) == 4  # q/k/v and gate/up of 2 layers: one launch each in the fused step
    fused, _ = forced_logits(model, ref[:, 8:], fused_step=True)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    track_sparsity(model, False)  # counters off: the step launches the fused group's product itself
    direct, _ = forced_logits(model, ref[:, 8:], fused_step=True)
    torch.testing.assert_close(direct, plain, rtol=1e-5, atol=1e-5)
    track_sparsity(model, True)
    assert torch.equal(Decoder(model, batch_size=2, max_length=20, fused_step=True).generate(PROMPT, 12), ref)


def test_fused_dense_projections_are_one_product(dense_model):
    model = copy.deepcopy(dense_model)
    ref = hf_greedy(dense_model, PROMPT, 10)
    assert fuse_linear_projections(model) == 4
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, ProjectionPart) and attn.q_proj.shared is attn.v_proj.shared
    assert fuse_linear_projections(model) == 0  # idempotent
    calls = []
    attn.q_proj.shared.inner.register_forward_hook(lambda *a: calls.append(1))
    assert torch.equal(hf_greedy(model, PROMPT, 10), ref)  # the transformers forward through the parts
    n_hf = len(calls)
    assert n_hf == 10  # one product per forward, not three
    assert torch.equal(Decoder(model, batch_size=2, max_length=18, fused_step=True).generate(PROMPT, 10), ref)
    assert len(calls) - n_hf == 10


def test_eos_in_the_fused_step(dense_model):
    ref = hf_greedy(dense_model, PROMPT[:1], 12)
    eos = int(ref[0, 8 + 3])
    out = Decoder(dense_model, batch_size=1, max_length=40, eos_check_every=4, fused_step=True).generate(
        PROMPT[:1], 30, eos_token_id=eos)
    first = int((ref[0, 8:] == eos).nonzero()[0])
    assert torch.equal(out[0, : 8 + first + 1], ref[0, : 8 + first + 1])
    assert (out[0, 8 + first :] == eos).all() and out.shape[1] < 38


def test_models_the_fused_step_does_not_support(dense_model):
    model = copy.deepcopy(dense_model)
    model.model.rotary_emb.rope_type = "dynamic"
    assert "dynamic" in fused_step_support(model)
    with pytest.raises(ValueError, match="dynamic"):
        Decoder(model, batch_size=1, max_length=10, fused_step=True)
    dec = Decoder(model, batch_size=1, max_length=10, fused_step=None)  # the CPU default: transformers' forward
    assert dec._fused is None
    model = copy.deepcopy(dense_model)

    class OtherMLP(type(model.model.layers[0].mlp)):
        def forward(self, x):
            return super().forward(x) * 1.0

    model.model.layers[1].mlp.__class__ = OtherMLP
    assert "layer 1's MLP" in fused_step_support(model)
