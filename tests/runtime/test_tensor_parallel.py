"""Tensor-parallel decoding (teal_quant/runtime/tensor_parallel.py): the shard math in one process (column shards
concatenate, row shards sum, to the whole projection's output), and the whole model over 2 real processes with gloo
on the CPU (logits within 1e-4 of one process in float32, the same greedy tokens)."""

from __future__ import annotations

import pytest
import torch
from teal_quant.kernels import pack

from teal_quant.errors import TealQuantError
from teal_quant.runtime.modules import TealLinear
from teal_quant.runtime.tensor_parallel import check_tensor_parallel, shard_module
from teal_quant.testing import run_ranks


def make_linear(k, n, *, bits=4, group_size=32, bias=False, channel_scale=False, seed=0) -> TealLinear:
    g = torch.Generator().manual_seed(seed)
    group_size = k if group_size == -1 else group_size
    m = TealLinear(k, n, bits=bits, group_size=group_size, n_levels=2, bias=bias, dtype=torch.float32,
                   channel_scale=channel_scale)
    q = torch.randint(0, 2**bits, (k, n), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        m.qweight = pack(q, bits)
        m.scales.copy_(torch.rand(k // group_size, n, generator=g) * 0.1 + 0.01)
        m.zeros.copy_(torch.full((k // group_size, n), (2**bits - 1) / 2))
        m.thresholds.copy_(torch.tensor([0.0, 0.6]))
        if bias:
            m.bias.copy_(torch.randn(n, generator=g))
        if channel_scale:
            m.channel_scale.copy_(torch.rand(k, generator=g) + 0.5)
    m.materialize_runtime_state("cpu")
    m.set_level(1)
    return m


@pytest.mark.parametrize("bits,group_size,bias,channel_scale", [
    (4, 32, False, False), (4, 16, True, False), (8, 32, False, True), (4, -1, True, False)])
@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("rows", [1, 3, 20])  # decode (sparse GEMV), a batch of decode rows, a prompt (dense GEMM)
def test_shards_recompose_the_projection(bits, group_size, bias, channel_scale, size, rows):
    """Column shards side by side and row shards summed give the whole projection's output (threshold included:
    each row shard thresholds its own slice of x), within float32 summation order."""
    k, n = 128, 64
    full = make_linear(k, n, bits=bits, group_size=group_size, bias=bias, channel_scale=channel_scale)
    x = torch.randn(1, rows, k, generator=torch.Generator().manual_seed(1))
    want = full(x)
    assert float((want - (full.bias if bias else 0)).abs().max()) > 0
    tol = 4e-6 * float(want.abs().max())  # float32 sums of 128 terms in another order
    columns = [shard_module(full, "column", r, size) for r in range(size)]
    torch.testing.assert_close(torch.cat([c(x) for c in columns], dim=-1), want, rtol=0, atol=tol)
    assert all(c.in_features == k and c.out_features == n // size for c in columns)
    shards = [shard_module(full, "row", r, size) for r in range(size)]
    pieces = [s(x[..., r * k // size:(r + 1) * k // size]) for r, s in enumerate(shards)]
    torch.testing.assert_close(sum(pieces), want, rtol=0, atol=tol)
    assert all(s.in_features == k // size and s.out_features == n for s in shards)
    assert [s.bias is not None for s in shards] == [bias] + [False] * (size - 1)  # the bias is added once
    if bits == 4:  # a column shard holds whole words of the packed layout: the very bits of the full qweight
        assert torch.equal(columns[1].qweight, full.qweight[:, n // size // 8: 2 * n // size // 8])


def test_shard_keeps_the_level_and_switches_levels():
    full = make_linear(128, 64)
    shard = shard_module(full, "row", 1, 2)
    assert shard.level_index == 1 and float(shard.threshold) == pytest.approx(0.6)
    shard.set_level(0)
    assert float(shard.threshold) == 0.0


def test_shapes_that_do_not_split_are_one_clear_error():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    check_tensor_parallel(config, 2, 32)
    with pytest.raises(TealQuantError, match="key/value heads must both divide by 4"):
        check_tensor_parallel(config, 4, 32)
    with pytest.raises(TealQuantError, match="not a whole number of groups of 64"):
        check_tensor_parallel(config, 2, 64)
    with pytest.raises(TealQuantError, match="cannot be split along its inputs"):
        m = make_linear(128, 64)
        m.perm = torch.arange(128, dtype=torch.int32)
        shard_module(m, "row", 0, 2)


# ---------------------------------------------------------------------------------------------- 2 processes
PROMPT = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2], [1, 77, 8, 300, 64, 21, 99, 13]])
NEW_TOKENS = 6


def _decode(model, prompt, steps, fused_step=False):
    """Greedy tokens and the logits of the prefill and of every step (float32); fused_step: the step through
    runtime/decode_step.py (the CUDA decode path, here with the kernels' references)."""
    from teal_quant.runtime.decoding import Decoder

    dec = Decoder(model, batch_size=prompt.shape[0], max_length=prompt.shape[1] + steps + 1, fused_step=fused_step)
    tokens = [dec.prefill(prompt)]
    logits = [dec.logits.clone()]
    for _ in range(steps):
        tokens.append(dec.step(tokens[-1]))
        logits.append(dec.logits.clone())
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def _tp_rank(artifact: str, levels: tuple[float, ...]) -> dict:
    import torch.distributed as dist

    import teal_quant

    one = teal_quant.load(artifact, device="cpu")
    reference = {}
    for level in levels:
        teal_quant.set_sparsity(one, level)
        reference[level] = _decode(one, PROMPT, NEW_TOKENS)
    teal_quant.set_sparsity(one, levels[0])
    reference["fused"] = _decode(one, PROMPT, NEW_TOKENS, fused_step=True)
    del one
    model = teal_quant.load(artifact, device="cpu", tp=True)
    layer = model.model.layers[0]
    out = {
        "rank": dist.get_rank(), "world": dist.get_world_size(), "tp": model.tensor_parallel.size,
        "shapes": {n: (layer.get_submodule(p).in_features, layer.get_submodule(p).out_features)
                   for n, p in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("o", "self_attn.o_proj"),
                                ("up", "mlp.up_proj"), ("down", "mlp.down_proj"))},
        "levels": {},
    }
    teal_quant.track_sparsity(model, True)  # the decode fast path counts only when asked
    for level in levels:
        teal_quant.set_sparsity(model, level)
        tokens, logits = _decode(model, PROMPT, NEW_TOKENS)
        ref_tokens, ref_logits = reference[level]
        out["levels"][level] = {
            "max_logit_diff": float((logits - ref_logits).abs().max()), "logit_scale": float(ref_logits.abs().max()),
            "tokens": tokens.tolist(), "ref_tokens": ref_tokens.tolist(),
            "sparsity": teal_quant.realized_sparsity(model),
        }
    teal_quant.set_sparsity(model, levels[0])
    tokens, logits = _decode(model, PROMPT, NEW_TOKENS, fused_step=True)
    ref_tokens, ref_logits = reference["fused"]
    out["fused"] = {"max_logit_diff": float((logits - ref_logits).abs().max()), "tokens": tokens.tolist(),
                    "ref_tokens": ref_tokens.tolist()}
    return out


def test_tensor_parallel_decoding_matches_one_process(tiny_artifact):
    """2 gloo processes, each `teal_quant.load(..., tp=True)`: every rank holds half the heads and half the MLP,
    reads half of o's and down's rows, and produces the one-process logits within 1e-4 and the same greedy
    tokens, at the default level (sparse decode) and at level 0, through transformers' forward and through the fused
    decode step (runtime/decode_step.py, the CUDA path: local heads, o and down summed in their modules)."""
    results = run_ranks(_tp_rank, 2, str(tiny_artifact), (0.4, 0.0), timeout=120)
    for rank, r in enumerate(results):
        assert (r["rank"], r["world"], r["tp"]) == (rank, 2, 2)
        # tiny Llama: hidden 64, 4 heads of 16, 2 KV heads, intermediate 128
        assert r["shapes"] == {"q": (64, 32), "k": (64, 16), "o": (32, 64), "up": (64, 64), "down": (64, 64)}
        for level, got in r["levels"].items():
            assert got["logit_scale"] > 0.1
            assert got["max_logit_diff"] < 1e-4, (level, got)
            assert got["tokens"] == got["ref_tokens"]
            if level > 0:  # each rank counts its own slice of o's and down's inputs
                assert 0.2 < got["sparsity"] < 0.7
        assert r["fused"]["max_logit_diff"] < 1e-4, r["fused"]
        assert r["fused"]["tokens"] == r["fused"]["ref_tokens"]
    assert results[0]["levels"] == results[1]["levels"] or all(
        results[0]["levels"][lv]["tokens"] == results[1]["levels"][lv]["tokens"] for lv in (0.4, 0.0))
