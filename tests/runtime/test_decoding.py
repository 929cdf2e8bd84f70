"""Decoder / teal_quant.generate against HF generate (CPU, reference kernels). Fusion: tests/test_fusion.py; the
realized-sparsity switch: tests/test_modules.py."""

from __future__ import annotations

import pytest
import torch

import teal_quant
from teal_quant.runtime.decoding import Decoder

PROMPT = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2], [1, 77, 8, 300, 64, 21, 99, 13]])


def hf_greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones_like(ids))


@pytest.fixture(scope="module")
def dense_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def load(path, level=0.4):
    return teal_quant.load(path, sparsity=level, device="cpu")


def test_generate_matches_hf_on_dense_llama(dense_model):
    ref = hf_greedy(dense_model, PROMPT, 20)
    out = teal_quant.generate(dense_model, PROMPT, 20)
    assert out.shape == (2, 28)
    assert torch.equal(out, ref)


def test_decoder_step_api_and_reuse(dense_model):
    """prefill + step give the same tokens as generate; a second prompt on the same Decoder starts afresh."""
    dec = Decoder(dense_model, batch_size=2, max_length=20)
    ref = hf_greedy(dense_model, PROMPT, 6)
    with torch.no_grad():
        full = dense_model(ref[:, :10]).logits
    for _ in range(2):
        toks = [dec.prefill(PROMPT)]
        torch.testing.assert_close(dec.logits, full[:, 7], rtol=1e-5, atol=1e-5)
        for i in range(5):
            toks.append(dec.step(toks[-1]))
            if i < 2:  # the logits of the step that fed token 8 + i
                torch.testing.assert_close(dec.logits, full[:, 8 + i], rtol=1e-4, atol=1e-4)
        assert torch.equal(torch.stack(toks, 1), ref[:, 8:])
    single = Decoder(dense_model, batch_size=1, max_length=20).generate(PROMPT[1:], 6)
    assert torch.equal(single, ref[1:])


def test_eos_rows_keep_emitting_eos_and_loop_stops(dense_model):
    ref = hf_greedy(dense_model, PROMPT[:1], 12)
    eos = int(ref[0, 8 + 3])  # the 4th generated token of row 0
    dec = Decoder(dense_model, batch_size=1, max_length=40, eos_check_every=4)
    out = dec.generate(PROMPT[:1], 30, eos_token_id=eos)
    first = int((ref[0, 8:] == eos).nonzero()[0])
    assert torch.equal(out[0, : 8 + first + 1], ref[0, : 8 + first + 1])
    assert (out[0, 8 + first :] == eos).all()
    assert out.shape[1] < 8 + 30  # stopped early (checked every 4 tokens)


def test_errors_are_value_errors(dense_model):
    dec = Decoder(dense_model, batch_size=2, max_length=10)
    with pytest.raises(ValueError, match="batch_size=2"):
        dec.prefill(PROMPT[:1])
    with pytest.raises(ValueError, match="max_length=10"):
        dec.generate(PROMPT, 5)
    with pytest.raises(ValueError, match="prefill"):
        dec.step()
    dec.prefill(PROMPT)
    with pytest.raises(ValueError, match="batch_size=2"):
        dec.step(torch.tensor([1, 2, 3]))
    dec.step()  # position 9: the last slot of max_length 10
    with pytest.raises(ValueError, match="exceeded"):
        dec.step()
    with pytest.raises(ValueError, match="cuda_graph=True"):
        Decoder(dense_model, batch_size=1, max_length=10, cuda_graph=True)


def test_generate_matches_hf_on_artifact(tiny_artifact):
    model = load(tiny_artifact)
    ref = hf_greedy(model, PROMPT, 16)
    assert torch.equal(teal_quant.generate(model, PROMPT, 16), ref)
