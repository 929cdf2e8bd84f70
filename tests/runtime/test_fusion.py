"""q/k/v and gate/up fusion (teal_quant.runtime.fusion) on the CPU, reference kernels: one launch per group,
shared memory, the same outputs as separate calls at every level and in every prefill mode, idempotent fuse /
unfuse, and the members that must stay separate. (The first five tests moved here from tests/test_decoding.py.)"""

from __future__ import annotations

import torch

import teal_quant
from teal_quant import kernels
from teal_quant.runtime import modules
from teal_quant.runtime.fusion import fuse_projections, fused_groups, unfuse_projections
from teal_quant.runtime.modules import set_prefill_mode, teal_linears

PROMPT = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2], [1, 77, 8, 300, 64, 21, 99, 13]])


def load(path, level=0.4):
    return teal_quant.load(path, sparsity=level, device="cpu")


def test_fusion_shares_memory_and_uses_one_launch(tiny_artifact, monkeypatch):
    model = load(tiny_artifact)
    before = {n: m.qweight.clone() for n, m in teal_linears(model)}
    assert fuse_projections(model) == 4  # 2 layers x (qkv, gate/up)
    assert fuse_projections(model) == 0  # idempotent
    for group in fused_groups(model):
        base = group.qweight.untyped_storage().data_ptr()
        for m in group.members:  # views of the group's buffer: no second copy of the weight
            assert m.qweight.untyped_storage().data_ptr() == base
    for n, m in teal_linears(model):
        assert torch.equal(m.qweight, before[n])
    state = model.state_dict()
    assert all(state[f"{n}.qweight"].is_contiguous() for n, _ in teal_linears(model))

    calls = {"fused": 0, "single": 0}
    # an unfused member on the CPU takes the module's own CPU path (float32 W^T), not kernels.sparse_gemv
    real_fused, real_single = kernels.sparse_gemv_fused, modules.TealLinear._cpu_forward

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(kernels, "sparse_gemv_fused", count("fused", real_fused))
    monkeypatch.setattr(modules.TealLinear, "_cpu_forward", count("single", real_single))
    with torch.no_grad():
        model(PROMPT[:, :1])
    assert calls == {"fused": 4, "single": 4}  # per layer: qkv + gate/up fused, o and down alone


def decode_logits(model, ids=PROMPT):
    """Logits of a prefill (dense) and of one decode step (sparse) after it, through HF's dynamic cache."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        step = model(nxt, past_key_values=out.past_key_values, use_cache=True)
    return out.logits, step.logits


def test_fused_equals_unfused_and_follows_set_level(tiny_artifact):
    plain, fused = load(tiny_artifact), load(tiny_artifact)
    fuse_projections(fused)
    for level in (0.4, 0.25, 0.0, 0.5):
        teal_quant.set_sparsity(plain, level)
        teal_quant.set_sparsity(fused, level)
        for g in fused_groups(fused):
            want = torch.stack([m.thresholds[m.level_index] for m in g.members])
            assert torch.equal(g.thresholds, want)
        (pp, ps), (fp, fs) = decode_logits(plain), decode_logits(fused)
        # decode: the fused reference runs the same per-part reference on column views -> identical numbers;
        # prefill: one fp32 matmul over the concatenated weight instead of three -> rounding order only
        assert torch.equal(fs, ps), level
        torch.testing.assert_close(fp, pp, rtol=1e-5, atol=1e-5)
    teal_quant.set_sparsity(fused, 0.5)
    teal_quant.set_sparsity(plain, 0.5)
    high = decode_logits(fused)[1]
    teal_quant.set_sparsity(fused, 0.0)
    assert (decode_logits(fused)[1] - high).abs().max() > 1e-3  # the level reached the fused launch
    teal_quant.set_sparsity(fused, 0.4)
    teal_quant.set_sparsity(plain, 0.4)
    assert torch.equal(teal_quant.generate(fused, PROMPT, 12), teal_quant.generate(plain, PROMPT, 12))
    assert unfuse_projections(fused) == 4
    assert all(m.qweight.is_contiguous() and m._fused_group is None for _, m in teal_linears(fused))
    assert torch.equal(decode_logits(fused)[1], decode_logits(plain)[1])


def test_perm_or_channel_scale_members_stay_unfused(tiny_artifact):
    model = load(tiny_artifact)
    k_proj = model.model.layers[0].self_attn.k_proj
    k_proj.register_buffer("perm", torch.arange(k_proj.in_features, dtype=torch.int32))
    up = model.model.layers[1].mlp.up_proj
    up.register_buffer("channel_scale", torch.ones(up.in_features))
    assert fuse_projections(model) == 2
    assert k_proj._fused_group is None and model.model.layers[0].self_attn.q_proj._fused_group is None
    assert model.model.layers[0].mlp.up_proj._fused_group is not None


def test_fused_member_on_other_input_recomputes(tiny_artifact):
    """The group's cache serves a sibling only for the very same, unmodified tensor."""
    plain, fused = load(tiny_artifact), load(tiny_artifact)
    fuse_projections(fused)
    pa, fa = plain.model.layers[0].self_attn, fused.model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(2, 1, 64, generator=g), torch.randn(2, 1, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(fa.q_proj(x1), pa.q_proj(x1))
        assert torch.equal(fa.k_proj(x2), pa.k_proj(x2))  # another tensor: not q's cached input
        assert torch.equal(fa.k_proj(x2), pa.k_proj(x2))  # k twice on one tensor
        x1.mul_(2.0)  # in place: same object, new version
        assert torch.equal(fa.v_proj(x1), pa.v_proj(x1))


def attention_like(bits=(4, 4, 4), group_sizes=(32, 32, 32), seed=0):
    """An nn.Module with q/k/v TealLinear projections of one input (out 64 / 32 / 32, K 128), each at its own
    threshold (levels 0.0 / 0.5 / 1.0 set to 1, 2, 1), and the same three modules' unfused twins."""
    from test_modules import make_linear

    def build():
        parent = torch.nn.Module()
        for i, (name, n) in enumerate((("q_proj", 64), ("k_proj", 32), ("v_proj", 32))):
            module, _, _ = make_linear(k=128, n=n, group_size=group_sizes[i], bits=bits[i], seed=seed + i)
            module.set_level((1, 2, 1)[i])
            setattr(parent, name, module)
        return parent

    return build(), build()


def call_all(parent, x):
    with torch.no_grad():
        return [parent.q_proj(x), parent.k_proj(x), parent.v_proj(x)]


def test_fused_group_equals_separate_calls_in_every_mode():
    """Decode (one fused launch, per-part thresholds), dense prefill (one dense product) and sparse prefill (each
    part its own threshold, so separate calls) give the separate modules' outputs."""
    fused, plain = attention_like()
    assert fuse_projections(fused) == 1
    decode = torch.randn(2, 1, 128, generator=torch.Generator().manual_seed(1))
    prompt = torch.randn(2, 9, 128, generator=torch.Generator().manual_seed(2))
    for want, got in zip(call_all(plain, decode), call_all(fused, decode)):
        assert torch.equal(got, want)  # the same reference kernel on column views: identical numbers
    for mode in ("dense", "sparse", "sparse_last_half"):
        set_prefill_mode(fused, mode)
        set_prefill_mode(plain, mode)
        for want, got in zip(call_all(plain, prompt), call_all(fused, prompt)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # dense: one matmul instead of three
    # the per-part thresholds really differ: k (threshold 1.0) drops more than q (0.5)
    assert float(fused.k_proj.last_sparsity) > float(fused.q_proj.last_sparsity) > 0


def test_fuse_and_unfuse_are_idempotent_and_reversible():
    fused, plain = attention_like()
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
    want = call_all(plain, x)
    assert fuse_projections(fused) == 1 and fuse_projections(fused) == 0
    (group,) = fused_groups(fused)
    assert group.members == [fused.q_proj, fused.k_proj, fused.v_proj]
    assert unfuse_projections(fused) == 1 and unfuse_projections(fused) == 0
    assert fused_groups(fused) == [] and all(m.qweight.is_contiguous() for _, m in teal_linears(fused))
    for w, got in zip(want, call_all(fused, x)):
        assert torch.equal(got, w)
    assert fuse_projections(fused) == 1  # fusable again after unfusing
    for w, got in zip(want, call_all(fused, x)):
        assert torch.equal(got, w)


def test_members_of_different_shapes_stay_separate():
    for bits, group_sizes in (((4, 8, 4), (32, 32, 32)), ((4, 4, 4), (32, 64, 32))):
        fused, _ = attention_like(bits=bits, group_sizes=group_sizes)
        assert fuse_projections(fused) == 0
        assert all(m._fused_group is None for _, m in teal_linears(fused))


def test_moving_a_fused_model_unfuses_it_first():
    """`model.to(...)` / `.float()` of a fused model: every member gets its own buffers back before the move (a moved
    column view would be a copy the group's fused launch never reads), and the outputs stay the separate modules'."""
    fused, plain = attention_like()
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(5))
    assert fuse_projections(fused) == 1
    fused.to("cpu")
    assert fused_groups(fused) == [] and all(m._fused_group is None for _, m in teal_linears(fused))
    storages = {m.qweight.untyped_storage().data_ptr() for _, m in teal_linears(fused)}
    assert len(storages) == 3 and all(m.qweight.is_contiguous() for _, m in teal_linears(fused))
    for w, got in zip(call_all(plain, x), call_all(fused, x)):
        assert torch.equal(got, w)
    assert fuse_projections(fused) == 1
    fused.float()
    assert fused_groups(fused) == []
