"""teal_quant.runtime.elementwise: which modules take the one-launch RMSNorm / SiLU-and-mul / rotary, and that a model
decodes the same with them (Triton interpreter on the CPU, the kernels themselves on a GPU).

Bounds: fp32 logits within 1e-5 of the eager model's, relative to the logits' max magnitude (the kernels differ
from eager only in summation order and rsqrt / exp approximations); bf16 within 0.05 (a handful of bf16 rounding
steps, which the interpreter's truncating casts make larger than a GPU's, propagated through every layer).
"""

from __future__ import annotations

import copy

import pytest
import torch

from teal_quant import kernels
from teal_quant.runtime.elementwise import fuse_elementwise, unfuse_elementwise

pytest.importorskip("triton")


def tiny_llama(dtype=torch.float32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval().to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of each elementwise kernel entry point."""
    counts = {"rms_norm": 0, "silu_mul": 0, "rotary": 0}
    for name in counts:
        real = getattr(kernels, name)

        def counted(*a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(kernels, name, counted)
    return counts


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_llama_takes_every_fast_path_and_matches_eager(device, dtype, bound, calls):
    model = tiny_llama(dtype).to(device)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        want = model(ids).logits
        done = fuse_elementwise(model)
        assert (done.norms, done.mlps, done.attentions) == (2 * 2 + 1, 2, 2)
        got = model(ids).logits
    assert calls == {"rms_norm": 5, "silu_mul": 2, "rotary": 2}
    assert rel(got, want) <= bound
    assert fuse_elementwise(model).total == 0  # idempotent


def test_unfuse_restores_eager_and_other_models_keep_the_original_rotary(device, calls):
    model, other = tiny_llama().to(device), tiny_llama().to(device)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        want = model(ids).logits
        fuse_elementwise(model)
        other(ids)  # same modeling file, not fused: its attention must not take the rebound fast path
        assert calls == {"rms_norm": 0, "silu_mul": 0, "rotary": 0}
        assert unfuse_elementwise(model) == 5 + 2 + 2
        assert torch.equal(model(ids).logits, want)
    assert calls["rotary"] == 0


def test_deepcopy_of_a_fused_model_calls_its_own_modules(device):
    model = tiny_llama().to(device)
    fuse_elementwise(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.norm.weight.mul_(2.0)
        ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(3)).to(device)
        assert not torch.allclose(twin(ids).logits, model(ids).logits)
    assert twin.model.norm.forward.__self__ is twin.model.norm


def test_other_norms_and_activations_keep_their_eager_code(device):
    """Gemma's RMSNorm (1 + weight, fp32 weight product) and GELU MLP are not Llama's: left alone; its rotary is."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    model = GemmaForCausalLM(cfg).eval().to(device)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4)).to(device)
    with torch.no_grad():
        want = model(ids).logits
        done = fuse_elementwise(model)
        assert (done.norms, done.mlps) == (0, 0)
        assert rel(model(ids).logits, want) <= 1e-5


def test_teal_model_decodes_the_same_with_fused_projections_and_elementwise(device, tiny_artifact, monkeypatch):
    """A real artifact (TealLinear, sparse decode kernels, fused gate/up feeding silu_mul) through the Decoder:
    prefill + 4 decode steps, logits of every step against the eager, unfused model. On the CPU the eager model runs
    the pure-torch reference (the product's CPU path) rather than the interpreted kernels: an independent reference,
    and half the interpreted launches (each costs seconds)."""
    import teal_quant
    from teal_quant.runtime.decoding import Decoder
    from teal_quant.runtime.fusion import fuse_projections

    eager = teal_quant.load(tiny_artifact, device="cpu", dtype=torch.float32).to(device)
    fast = copy.deepcopy(eager)
    assert fuse_projections(fast) > 0
    assert fuse_elementwise(fast).total > 0
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(5)).to(device)
    logits = {}
    for name, model in (("eager", eager), ("fast", fast)):
        with monkeypatch.context() as env:
            if name == "eager" and device == "cpu":
                env.delenv("TRITON_INTERPRET", raising=False)
            dec = Decoder(model, batch_size=1, max_length=12, cuda_graph=False, fuse=False)
            tok = dec.prefill(ids)
            steps = [dec.logits.clone()]
            for _ in range(4):
                tok = dec.step(tok)
                steps.append(dec.logits.clone())
        logits[name] = torch.stack(steps)
    assert rel(logits["fast"], logits["eager"]) <= 1e-4
