"""teal_quant.generate (teal_quant.runtime.generation) on the CPU: the sampler's filtering against transformers'
logits warpers (pure torch), its draws against the softmax they sample, greedy against the Decoder's own loop,
per-row EOS with padding, streaming, the realized-sparsity switch of the fast path, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import teal_quant
from teal_quant.errors import TealQuantError
from teal_quant.runtime.decoding import Decoder
from teal_quant.runtime.generation import Sampler, SamplingConfig, filter_scores, generate, uniform_noise
from teal_quant.runtime.modules import teal_linears

PROMPT = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2], [1, 77, 8, 300, 64, 21, 99, 13]])
CONFIGS = [(1.0, None, None), (0.7, 50, None), (1.3, None, 0.9), (0.8, 40, 0.8), (1.0, 5, 0.3), (0.5, 1, None),
           (2.0, None, 0.05), (1.0, 0, 1.0)]


def hf_filtered(logits: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """transformers' own warpers, in generate's order: the reference of which tokens survive."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits.float()
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


@pytest.fixture(scope="module")
def dense_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def artifact_model(tiny_artifact):
    return teal_quant.load(tiny_artifact, sparsity=0.4, device="cpu")


@pytest.mark.parametrize("temperature,top_k,top_p", CONFIGS)
def test_filtering_keeps_exactly_the_tokens_transformers_keeps(temperature, top_k, top_p):
    """Same surviving set as TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper, both for the
    whole-vocabulary form and for the sampler's top-k candidate form; surviving scores equal logits / T."""
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)) * 3
    config = SamplingConfig(temperature, top_k, top_p, seed=0)
    ref = hf_filtered(logits, temperature, top_k, top_p)
    ours = filter_scores(logits, config)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)], rtol=0, atol=0)
    scores, ids = Sampler(config).candidates(logits)
    kept = torch.zeros_like(logits, dtype=torch.bool)
    if ids is None:
        kept = ~torch.isinf(scores)
    else:
        kept.scatter_(1, ids, ~torch.isinf(scores))
    assert torch.equal(kept, ~torch.isinf(ref))


def test_noise_is_uniform_and_a_function_of_seed_position_row_token():
    ids = torch.arange(4096).expand(3, -1)
    u = uniform_noise(7, torch.tensor([11]), ids)
    assert u.dtype == torch.float32 and bool((u > 0).all()) and bool((u < 1).all())
    assert torch.equal(u, uniform_noise(7, torch.tensor([11]), ids))  # deterministic
    assert not torch.equal(u[0], u[1])  # rows differ
    assert not torch.equal(u, uniform_noise(8, torch.tensor([11]), ids))  # seed matters
    assert not torch.equal(u, uniform_noise(7, torch.tensor([12]), ids))  # position matters
    # 12 288 draws: mean 1/2 (sd 0.0026), 10 equal bins each 1/10 (sd 0.0027)
    assert abs(float(u.mean()) - 0.5) < 0.012
    counts = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert float((counts - 0.1).abs().max()) < 0.012


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 4, None), (1.0, None, 0.8), (1.5, 5, 0.9)])
def test_draws_follow_the_filtered_softmax(temperature, top_k, top_p):
    """Over 20 000 positions, each token's frequency is within 5 standard errors of its probability under the
    reference filtering (and filtered-out tokens are never drawn)."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    probs = hf_filtered(logits, temperature, top_k, top_p).softmax(-1)[0].double()
    sampler = Sampler(SamplingConfig(temperature, top_k, top_p, seed=3))
    n = 20_000
    draws = torch.stack([sampler(logits, torch.tensor([pos])) for pos in range(n)]).flatten()
    freq = torch.bincount(draws, minlength=8).double() / n
    se = (probs * (1 - probs) / n).sqrt()
    assert bool((freq[probs == 0] == 0).all())
    assert bool(((freq - probs).abs() <= 5 * se + 1e-12).all()), (freq, probs)


def test_greedy_is_the_decoders_greedy_loop_bit_for_bit(artifact_model):
    ref = Decoder(artifact_model, batch_size=2, max_length=8 + 12).generate(PROMPT, 12)
    out = teal_quant.generate(artifact_model, PROMPT, 12)
    assert torch.equal(out, ref)


def test_same_seed_same_tokens_other_seed_other_tokens(dense_model):
    kwargs = dict(do_sample=True, temperature=1.0, top_k=50)
    a = generate(dense_model, PROMPT, 16, seed=1, **kwargs)
    b = generate(dense_model, PROMPT, 16, seed=1, **kwargs)
    c = generate(dense_model, PROMPT, 16, seed=2, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :8], PROMPT)
    # the sampled tokens are the sampler applied to the model's own logits along the generated sequence
    with torch.no_grad():
        logits = dense_model(a).logits
    sampler = Sampler(SamplingConfig(1.0, 50, None, seed=1))
    for pos in range(7, 7 + 16):
        assert torch.equal(sampler(logits[:, pos], torch.tensor([pos])), a[:, pos + 1])


def test_per_row_eos_pads_finished_rows_and_stops(dense_model):
    """Row 0 meets the EOS id at its 3rd new token: from then on it pads; row 1 goes on as without EOS (unless it
    meets the id too); generation stops once every row has finished."""
    kwargs = dict(do_sample=True, temperature=1.0, seed=5)
    free = generate(dense_model, PROMPT, 24, **kwargs)
    eos = int(free[0, 8 + 2])
    out = generate(dense_model, PROMPT, 24, eos_token_id=[eos, 10_000], pad_token_id=0, eos_check_every=2, **kwargs)
    for row in range(2):
        new = free[row, 8:]
        hits = (new == eos).nonzero()
        end = int(hits[0]) + 1 if hits.numel() else new.numel()
        assert torch.equal(out[row, 8 : 8 + end], new[:end])
        assert bool((out[row, 8 + end :] == 0).all())
    if bool((free[1, 8:] == eos).any()):  # both rows finish: the loop stops early
        assert out.shape[1] < 8 + 24


def test_streamer_gets_the_prompt_then_every_new_token_up_to_eos(dense_model):
    class Collect:
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, value):
            self.puts.append(value.flatten().tolist())

        def end(self):
            self.ended += 1

    free = generate(dense_model, PROMPT[:1], 20, do_sample=True, seed=9)
    eos = int(free[0, 8 + 5])
    first = int((free[0, 8:] == eos).nonzero()[0])
    for every in (1, 3):
        s = Collect()
        out = generate(dense_model, PROMPT[:1], 20, do_sample=True, seed=9, eos_token_id=eos, streamer=s,
                       stream_every=every)
        assert s.puts[0] == PROMPT[0].tolist() and s.ended == 1
        streamed = sum(s.puts[1:], [])
        assert streamed == free[0, 8 : 8 + first + 1].tolist()
        assert torch.equal(out[0, : 8 + first + 1], free[0, : 8 + first + 1])
        if every == 1:
            assert all(len(p) == 1 for p in s.puts[1:])


def test_counters_are_off_in_the_fast_path_unless_asked(artifact_model):
    model = artifact_model
    linears = [m for _, m in teal_linears(model)]
    teal_quant.runtime.modules.reset_stats(model)
    generate(model, PROMPT, 4)
    assert all(float(m.input_count) == 0 for m in linears)  # default: nothing counted
    assert all(m.track for m in linears)  # a plain forward still counts afterwards
    generate(model, PROMPT, 4, track_sparsity=True)
    assert all(float(m.input_count) > 0 for m in linears)
    assert 0.3 < teal_quant.realized_sparsity(model) < 0.5
    teal_quant.runtime.modules.reset_stats(model)
    teal_quant.track_sparsity(model, True)  # the model's choice reaches the fast path
    try:
        generate(model, PROMPT, 4)
        assert all(float(m.input_count) > 0 for m in linears)
    finally:
        teal_quant.track_sparsity(model, True)
        del model.teal_track_sparsity


@pytest.mark.parametrize("kwargs,match", [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=math.nan), "temperature"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(streamer=object()), "streamer"),
])
def test_bad_input_is_one_tealquant_error(dense_model, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(TealQuantError, match=match):
        generate(dense_model, PROMPT, **kwargs)
