"""The decode-step kernels: residual add + RMSNorm, GQA decode attention over a static cache (against transformers'
eager attention), and the greedy tail. CUDA when there is one, else the Triton interpreter (tests/kernels/conftest.py)."""

from dataclasses import replace

import pytest
import torch
from teal_quant.kernels.attention import decode_attention_ref
from teal_quant.kernels.dispatch import AttentionShape
from teal_quant.kernels.elementwise import add_rms_norm_ref, greedy_advance_ref

from teal_quant import kernels

pytest.importorskip("triton")
from teal_quant.kernels import attention_triton  # noqa: E402


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 200])
def test_add_rms_norm_matches_the_eager_residual_add_and_norm(device, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g).to(device, dtype)
    residual = torch.randn(3, n, generator=g).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype)
    want_res = residual + x
    ref_res = residual.clone()
    add_rms_norm_ref(x, ref_res, weight, 1e-5)
    assert torch.equal(ref_res, want_res)
    res = residual.clone()
    y = kernels.add_rms_norm(x, res, weight, 1e-5)
    # the residual is rounded exactly like `residual + hidden_states` (the interpreter truncates bf16 casts: one
    # rounding step there); the norm within one rounding step
    if device == "cuda" or dtype == torch.float32:
        assert torch.equal(res, want_res)
    else:
        assert torch.allclose(res.float(), want_res.float(), rtol=2 ** -7, atol=0)
    # the norm of the new residual like transformers' LlamaRMSNorm: 4 fp32 steps, 2 bf16 rounding steps
    from teal_quant.kernels.reference import rms_norm_ref

    want_y = rms_norm_ref(res, weight, 1e-5)
    steps, eps = (4, 2.0**-23) if dtype == torch.float32 else (2, 2.0**-7)
    assert ((y.double() - want_y.double()).abs() <= steps * eps * want_y.double().abs().clamp(min=1e-3)).all()
    if dtype == torch.float32:  # and the definition in float64
        h = want_res.double()
        exact = weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        assert ((y.double() - exact).abs() <= 4 * eps * exact.abs().clamp(min=1e-3)).all()


def _llama_parts(hq, hkv, d, length, dtype, device, seed):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d,
                         max_position_embeddings=4096, rope_theta=10000.0)
    rot = LlamaRotaryEmbedding(config).to(device)
    probe = torch.zeros(1, dtype=dtype, device=device)
    cos, sin = rot(probe, torch.arange(length, device=device)[None])
    return config, cos[0], sin[0]


def _eager_reference(q, k, v, cos, sin, pos, keys_before, values_before, hq, hkv, d, scale):
    """transformers' own decode attention: apply_rotary_pos_emb, the cache write, eager_attention_forward
    (repeat_kv, matmul, fp32 softmax) over positions 0..pos."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

    b = q.shape[0]
    qs = q.reshape(b, 1, hq, d).transpose(1, 2)
    ks = k.reshape(b, 1, hkv, d).transpose(1, 2)
    vs = v.reshape(b, 1, hkv, d).transpose(1, 2)
    c, s = cos[pos][None, None].expand(b, 1, d), sin[pos][None, None].expand(b, 1, d)
    qs, ks = apply_rotary_pos_emb(qs, ks, c, s)
    keys, values = keys_before.clone(), values_before.clone()
    keys[:, :, pos] = ks[:, :, 0]
    values[:, :, pos] = vs[:, :, 0]
    module = SimpleNamespace(num_key_value_groups=hq // hkv, training=False)
    out, _ = eager_attention_forward(module, qs, keys[:, :, : pos + 1], values[:, :, : pos + 1], None, scaling=scale)
    return out.reshape(b, hq * d), keys, values


OLD = AttentionShape(registers=False, wide=False)  # the kernel before the short-context round: new key written,
# then read back; loop combination
NEW = AttentionShape(registers=True, wide=True)
ATTENTION_VARIANTS = {  # name: (fused_reduce, launch shape)
    "old_every_block_a_split": (True, replace(OLD, split_factor=100.0)),
    "old_few_splits": (True, replace(OLD, split_factor=0.5)),
    "old_combine_launch": (False, OLD),
    "new_every_block_a_split": (True, replace(NEW, split_factor=100.0)),
    "new_one_split": (True, replace(NEW, split_factor=0.25)),
    "new_combine_launch": (False, NEW),
    "new_block16_chunks": (True, replace(NEW, block_n=16, split_factor=100.0)),  # > 8 working splits: 2+ chunks
    "registers_loop_combine": (True, replace(NEW, wide=False, block_n=32)),
    "cache_write_wide_combine": (True, replace(OLD, wide=True, block_n=32, split_factor=100.0)),
}


ATTENTION_SHAPES = [(1, 8, 2, 32, 300), (3, 16, 4, 16, 140), (2, 4, 4, 64, 70), (1, 4, 1, 16, 200)]
# on the GPU every variant on every shape and dtype; under the (slow) interpreter the shipped shape's variants
# (NEW at each split factor, its combine launch and chunks) on every shape and dtype, the others on the shape whose
# three splits exercise the combination, in both dtypes
CPU_FULL = {"new_every_block_a_split", "new_one_split", "new_combine_launch", "new_block16_chunks"}
ATTENTION_CASES = [(v, shape, dt) for v in ATTENTION_VARIANTS for shape in ATTENTION_SHAPES
                   for dt in (torch.float32, torch.bfloat16)
                   if torch.cuda.is_available() or v in CPU_FULL or shape == (3, 16, 4, 16, 140)]


@pytest.mark.parametrize("variant,attention_shape,dtype", ATTENTION_CASES,
                         ids=[f"{v}-{'-'.join(map(str, sh))}-{str(dt)[6:]}" for v, sh, dt in ATTENTION_CASES])
def test_decode_attention_matches_transformers_eager_attention(device, dtype, attention_shape, variant):
    """Every launch variant (kernels/dispatch.py AttentionShape): split factor 100: every key block its own split;
    0.25-2: fewer working splits of several blocks, one at the first blocks' positions (the output written without
    partial results); positions 0, 1, the block edges, the middle and the last of the cache."""
    batch, hq, hkv, d, length = attention_shape
    fused_reduce, shape = ATTENTION_VARIANTS[variant]
    if variant == "new_block16_chunks" and (hkv, length) != (1, 200):
        pytest.skip("the multi-chunk combination needs > 8 working splits: the one-KV-head case")
    g = torch.Generator().manual_seed(batch * 100 + hq + d)
    _, cos, sin = _llama_parts(hq, hkv, d, length, dtype, device, 0)
    scale = d ** -0.5
    ws_n = attention_triton.workspace_size(batch, hq, hkv, length, d, torch.device(device), shape)
    block_n, splits = attention_triton.launch_shape(batch, hkv, length, d, torch.device(device), shape)
    workspace = torch.full((ws_n,), float("nan"), device=device)  # poison: every read must have been written
    counter = torch.zeros(batch * hkv, dtype=torch.int32, device=device)
    # the cache holds earlier keys; slots after pos hold garbage that must not be read
    keys = (2 * torch.randn(batch, hkv, length, d, generator=g)).to(device, dtype)
    values = torch.randn(batch, hkv, length, d, generator=g).to(device, dtype)
    positions = sorted({p for p in (0, 1, block_n - 1, block_n, block_n + 1, 2 * block_n, length // 2, length - 1)
                        if p < length})
    for pos in positions:
        # q, k, v as column slices of one fused projection output (row stride > width)
        qkv = (2 * torch.randn(batch, (hq + 2 * hkv) * d + 8, generator=g)).to(device, dtype)
        q, k, v = qkv[:, : hq * d], qkv[:, hq * d : (hq + hkv) * d], qkv[:, (hq + hkv) * d : (hq + 2 * hkv) * d]
        p = torch.tensor([pos], device=device)
        want, want_keys, want_values = _eager_reference(q, k, v, cos, sin, pos, keys, values, hq, hkv, d, scale)
        garbage_k, garbage_v = keys.clone(), values.clone()
        garbage_k[:, :, pos + 1 :] = float("nan")
        garbage_v[:, :, pos + 1 :] = float("nan")
        got = attention_triton.decode_attention(q, k, v, cos, sin, p, garbage_k, garbage_v, workspace, counter, scale,
                                                fused_reduce=fused_reduce, shape=shape)
        ref_k, ref_v = keys.clone(), values.clone()
        ref = decode_attention_ref(q, k, v, cos, sin, p, ref_k, ref_v, scale)
        # the cache write: rotary rounded like transformers' apply_rotary_pos_emb, within 2 rounding steps of the
        # terms' magnitude (bf16: the interpreter truncates where a GPU rounds; fp32: a GPU fuses the product and
        # the sum into one FMA, the H200 measured 1 step)
        got_k, want_k = garbage_k[:, :, pos].double(), want_keys[:, :, pos].double()
        step = 2.0**-23 if dtype == torch.float32 else 2.0**-7
        tol_k = 2 * step * want_k.abs().amax(-1, keepdim=True)
        assert ((got_k - want_k).abs() <= tol_k).all()
        assert torch.equal(garbage_v[:, :, pos], want_values[:, :, pos])
        assert torch.equal(garbage_k[:, :, :pos], keys[:, :, :pos])
        assert torch.equal(garbage_v[:, :, :pos], values[:, :, :pos])
        assert got.shape == (batch, hq * d) and not got.isnan().any()
        # against the definition in float64 (same inputs; fp32 is the exact check: a key too many or too few is
        # ~1e-2 off; bf16 within the roundings of q, k, the probabilities and the output, which the interpreter
        # truncates); eager rounds the scores and probabilities to bf16 where these kernels keep fp32 (eager alone
        # is up to ~1.5e-2 off in bf16 here), so against eager within its own error on top
        exact = decode_attention_ref(q.double(), k.double(), v.double(), cos.double(), sin.double(), p,
                                     keys.double().clone(), values.double().clone(), scale)
        tol = 2e-5 if dtype == torch.float32 else 2.5e-2
        assert _rel(got, exact) < tol, (pos, _rel(got, exact))
        assert _rel(got, want) < tol + _rel(want, exact), (pos, _rel(got, want), _rel(want, exact))
        assert _rel(got, ref) < tol, pos  # the reference in the model dtype (its own roundings)
        assert int(counter.abs().sum()) == 0  # every counter reset for the next call
        keys, values = ref_k, ref_v
    if variant == "new_block16_chunks":  # the case exists for this: the last position had 2+ combine chunks
        assert splits > attention_triton.COMBINE_CHUNK


def test_attention_shapes_of_the_tables():
    """Every shipped table's attention entry parses (unknown keys and out-of-range values are errors); the override
    wins over the table and goes back with None."""
    from teal_quant.kernels import dispatch

    for path in dispatch.CONFIG_DIR.glob("*.json"):
        dispatch._table_attention(path.stem)
    with pytest.raises(ValueError):
        dispatch.attention_shape_from_dict({"block": 64})
    with pytest.raises(ValueError):
        dispatch.attention_shape_from_dict({"block_n": 48})
    cpu = torch.device("cpu")
    dispatch.set_attention_shape(NEW)
    try:
        assert dispatch.pick_attention(cpu) == NEW
    finally:
        dispatch.set_attention_shape(None)
    assert dispatch.pick_attention(cpu) == dispatch._table_attention("interpreter")


def test_decode_attention_reference_is_eager_attention_in_float64():
    d, hq, hkv, length = 16, 4, 2, 20
    _, cos, sin = _llama_parts(hq, hkv, d, length, torch.float64, "cpu", 0)
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, hkv, length, d, generator=g, dtype=torch.float64), torch.randn(2, hkv, length, d, generator=g, dtype=torch.float64)
    q, k, v = (torch.randn(2, h * d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    want, _, _ = _eager_reference(q, k, v, cos, sin, 7, keys, values, hq, hkv, d, 0.25)
    got = decode_attention_ref(q, k, v, cos, sin, torch.tensor([7]), keys.clone(), values.clone(), 0.25)
    assert _rel(got, want) < 1e-6  # the reference's fp32 scores


@pytest.mark.parametrize("batch", [1, 5])
def test_greedy_advance_matches_the_decode_loop_tail(device, batch):
    g = torch.Generator().manual_seed(batch)
    vocab = 9000  # three argmax chunks
    logits = torch.randn(batch, vocab, generator=g).to(device, torch.bfloat16)
    logits[0, 5000] = logits[0, 7000] = logits[0].max() + 1  # a tie across chunks: the lower index wins
    if batch > 1:
        logits[1, 100] = logits[1, 101] = logits[1].max() + 1  # a tie inside a chunk
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    if batch > 1:
        finished[2] = True
    eos = torch.tensor(int(logits[-1].float().argmax()), device=device)  # the last row emits eos now
    state = [torch.full((batch, 1), -5, device=device), finished, torch.zeros(batch, 12, dtype=torch.long, device=device),
             torch.tensor([4], device=device)]
    ref = [t.clone() for t in state]
    ws = torch.full((kernels.greedy_workspace_size(batch, vocab),), float("nan"), device=device)
    kernels.greedy_advance(logits, state[0], state[1], eos, state[2], state[3], ws)
    greedy_advance_ref(logits, ref[0], ref[1], eos, ref[2], ref[3])
    for got, want in zip(state, ref):
        assert torch.equal(got, want)
    assert int(state[0][0, 0]) == 5000 and int(state[3]) == 5 and int(state[2][0, 5]) == 5000
    assert bool(state[1][-1]) and (batch == 1 or int(state[0][2, 0]) == int(eos))
