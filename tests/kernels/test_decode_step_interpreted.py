"""The fused decode step with the Triton kernels (CUDA, or the CPU's Triton interpreter) gives transformers' greedy
tokens and logits on a tiny float32 Llama, batch 1 and 2, with and without a CUDA graph."""

import pytest
import torch

from teal_quant.runtime.decoding import Decoder

pytest.importorskip("triton")

PROMPT = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2], [1, 77, 8, 300, 64, 21, 99, 13]])


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_step_with_triton_kernels_matches_transformers(tiny_llama, device, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval().to(device)
    ids = PROMPT[:batch].to(device)
    n = 10
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones_like(ids))
        full = model(ref).logits[:, 8:].float()
    for graph in ([False, True] if device == "cuda" else [False]):
        dec = Decoder(model, batch_size=batch, max_length=8 + n + 1, fused_step=True, cuda_graph=graph)
        dec.prefill(ids)
        logits = []
        for i in range(n):
            dec.step(ref[:, 8 + i])
            logits.append(dec.logits.float().clone())
        got = torch.stack(logits, 1)
        assert float((got - full).norm() / full.norm()) < 1e-4
        assert torch.equal(dec.generate(ids, n), ref)
