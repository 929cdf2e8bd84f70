"""TealLinear (teal_quant.runtime.modules) on the CPU: every path against a float64 reference of
(x * (|x| > t)) @ W^T, where W^T[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n] is computed here from the
codes (not through the package's dequantization); level switching in place; prefill dense / sparse / last half; the
realized-sparsity counters and their switch.

Tolerance: the module computes in float32 (CPU reference kernels), so outputs match the float64 reference to
rtol = atol = 1e-5 (|y| ~ 1, K <= 128: float32 summation error ~1e-6). Threshold decisions are the same on both sides
(float32 |x| compared with the float32 threshold, exactly representable in float64).
"""

from __future__ import annotations

import pytest
import torch

import teal_quant
from teal_quant import kernels
from teal_quant.runtime.fusion import fuse_projections
from teal_quant.runtime.modules import (
    TealLinear,
    realized_sparsity,
    reset_stats,
    set_prefill_mode,
    teal_linears,
    track_sparsity,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}
THRESHOLDS = [0.0, 0.5, 1.0]  # levels 0 (dense), 1, 2


def make_linear(k=128, n=64, group_size=32, bits=4, prefill="dense", bias=False, seed=0):
    """(module, W^T float64 [K, N], bias float64 or None): random codes, scales and zeros, THRESHOLDS as levels."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (k, n), generator=g)
    scales = torch.rand(k // group_size, n, generator=g) * 0.02 + 0.005
    zeros = torch.randint(0, 2**bits, (k // group_size, n), generator=g).float()
    b = torch.randn(n, generator=g) if bias else None
    module = TealLinear(k, n, bits=bits, group_size=group_size, n_levels=len(THRESHOLDS), bias=bias,
                        dtype=torch.float32, prefill=prefill)
    state = {"qweight": kernels.pack(q, bits), "scales": scales, "zeros": zeros,
             "thresholds": torch.tensor(THRESHOLDS)}
    if bias:
        state["bias"] = b
    module.load_state_dict(state, strict=False)
    module.set_level(0)
    groups = torch.arange(k) // group_size
    w_t = (q.double() - zeros.double()[groups]) * scales.double()[groups]
    return module, w_t, (b.double() if bias else None)


def reference(x, w_t, t, bias=None):
    x = x.double()
    y = (x * (x.abs() > t)) @ w_t
    return y if bias is None else y + bias


def test_dequantized_weight_is_the_stored_codes():
    for bits in (4, 8):
        module, w_t, _ = make_linear(bits=bits)
        torch.testing.assert_close(module.dequantized_weight().double(), w_t.t(), **TOL)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_equals_the_float64_reference_at_every_level(bits, bias):
    """One token per sequence (x [B, 1, K], or 2-D x [M, K] with M <= 16) takes the sparse GEMV."""
    module, w_t, b = make_linear(bits=bits, bias=bias)
    x3 = torch.randn(4, 1, 128, generator=torch.Generator().manual_seed(1))
    x2 = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    previous = None
    for level, t in enumerate(THRESHOLDS):
        module.set_level(level)
        with torch.no_grad():
            y3, y2 = module(x3), module(x2)
        assert y3.shape == (4, 1, 64) and y2.shape == (3, 64)
        torch.testing.assert_close(y3.double(), reference(x3, w_t, t, b), **TOL)
        torch.testing.assert_close(y2.double(), reference(x2, w_t, t, b), **TOL)
        if previous is not None:  # the level reached the product
            assert (y3 - previous).abs().max() > 1e-3
        previous = y3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_one_decode_row_equals_the_float64_reference(bits, bias):
    """One row (x [1, 1, K] or [K]: the CPU path's gathered-row product) at every level, with the counters of that
    row; the dense level takes the matvec branch, the others the row gather."""
    module, w_t, b = make_linear(bits=bits, bias=bias)
    for level, t in enumerate(THRESHOLDS):
        module.set_level(level)
        for seed, shape in ((8, (1, 1, 128)), (9, (128,)), (10, (1, 128))):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
            reset_stats(module)
            with torch.no_grad():
                y = module(x)
            assert y.shape == (*shape[:-1], 64)
            torch.testing.assert_close(y.double(), reference(x, w_t, t, b), **TOL)
            assert float(module.last_sparsity) == pytest.approx(float((x.abs() <= t).float().mean()), abs=1e-6)


def test_one_decode_row_with_per_channel_thresholds_and_perm():
    """The one-row path of a weight-aware (per-channel thresholds) act-order (perm) layer: x gathered by perm,
    each channel against its own threshold."""
    module, w_t, _ = make_linear()
    k = 128
    scale = torch.rand(k, generator=torch.Generator().manual_seed(11)) + 0.5
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(12)).to(torch.int32)
    wa = TealLinear(k, 64, bits=4, group_size=32, n_levels=len(THRESHOLDS), dtype=torch.float32, channel_scale=True,
                    perm=True)
    wa.load_state_dict({**{n: getattr(module, n) for n in ("qweight", "scales", "zeros", "thresholds")},
                        "channel_scale": scale, "perm": perm})
    wa.set_level(1)
    x = torch.randn(1, 1, k, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        y = wa(x)
    xp = x.double()[..., perm.long()]  # stored row j is input channel perm[j]
    t = (THRESHOLDS[1] / scale.double())[perm.long()]
    torch.testing.assert_close(y.double(), (xp * (xp.abs() > t)) @ w_t, **TOL)


def test_cpu_weight_is_built_once_and_follows_in_place_changes():
    module, w_t, _ = make_linear()
    first = module.cpu_weight()
    assert module.cpu_weight() is first and first.dtype == torch.float32 and first.shape == (128, 64)
    torch.testing.assert_close(first.double(), w_t, **TOL)
    with torch.no_grad():
        module.scales.mul_(2)  # an in-place write: the copy is rebuilt
    torch.testing.assert_close(module.cpu_weight().double(), 2 * w_t, **TOL)
    module.to(torch.device("cpu"), torch.float64)  # a cast drops it (and the next call rebuilds from the buffers)
    assert module._cpu_weight is None


def test_nan_input_gives_nan_output_on_the_cpu_path():
    """On the CPU a NaN input propagates, as in (x * (|x| > t)) @ W^T (the CUDA kernels drop it instead)."""
    module, _, _ = make_linear()
    module.set_level(1)
    x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(14))
    x[..., 3] = float("nan")
    with torch.no_grad():
        assert torch.isnan(module(x)).all()


def test_prefill_dense_ignores_the_threshold_and_sparse_applies_it():
    module, w_t, _ = make_linear()
    x = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(3))
    module.set_level(2)
    with torch.no_grad():
        dense = module(x)
        torch.testing.assert_close(dense.double(), reference(x, w_t, 0.0), **TOL)
        set_prefill_mode(module, "sparse")
        sparse = module(x)
    torch.testing.assert_close(sparse.double(), reference(x, w_t, THRESHOLDS[2]), **TOL)
    assert (sparse - dense).abs().max() > 1e-2
    with pytest.raises(ValueError, match="prefill mode must be one of"):
        set_prefill_mode(module, "half")


def test_last_half_prefill_mode_thresholds_only_the_second_half():
    """TealLinear in 'sparse_last_half' vs a float64 reference: positions < T//2 dense, the rest thresholded.
    (Moved from tests/test_quality.py.)"""
    torch.manual_seed(0)
    K, N, G = 64, 32, 32
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (K, N), generator=g)
    scales = torch.rand(K // G, N, generator=g) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (K // G, N), generator=g).float()
    lin = TealLinear(K, N, bits=4, group_size=G, n_levels=2, dtype=torch.float32, prefill="sparse_last_half")
    lin.load_state_dict({"qweight": kernels.pack(q, 4), "scales": scales, "zeros": zeros,
                         "thresholds": torch.tensor([0.0, 0.7])}, strict=False)
    lin.set_level(1)
    x = torch.randn(2, 7, K)
    y = lin(x)
    groups = torch.arange(K) // G
    w_t = (q.double() - zeros.double()[groups]) * scales.double()[groups]
    x_ref = x.double().clone()
    x_ref[:, 3:] *= (x_ref[:, 3:].abs() > 0.7)
    torch.testing.assert_close(y.double(), x_ref @ w_t, rtol=1e-5, atol=1e-5)
    expected = float((x[:, 3:].abs() <= 0.7).sum()) / x.numel()
    assert realized_sparsity(lin) == pytest.approx(expected, rel=1e-6)
    assert not torch.allclose(y[:, 3:].double(), x[:, 3:].double() @ w_t, atol=1e-3)  # the threshold did act


def test_set_level_overwrites_the_threshold_in_place():
    """Switching levels copies into the same storage (a captured CUDA graph keeps reading it)."""
    module, _, _ = make_linear()
    ptr = module.threshold.data_ptr()
    for level in (2, 0, 1):
        module.set_level(level)
        assert module.level_index == level and float(module.threshold) == THRESHOLDS[level]
        assert module.threshold.data_ptr() == ptr and module.threshold.shape == ()


def test_counters_count_the_zeroed_inputs():
    module, _, _ = make_linear()
    module.set_level(1)
    xs = [torch.randn(2, 1, 128, generator=torch.Generator().manual_seed(s)) for s in (4, 5)]
    with torch.no_grad():
        for x in xs:
            module(x)
    zeros = [float((x.abs() <= THRESHOLDS[1]).sum()) for x in xs]
    assert float(module.last_sparsity) == pytest.approx(zeros[1] / xs[1].numel(), rel=1e-6)
    assert realized_sparsity(module) == pytest.approx(zeros[1] / xs[1].numel(), rel=1e-6)
    assert realized_sparsity(module, cumulative=True) == pytest.approx(sum(zeros) / (2 * xs[0].numel()), rel=1e-6)
    assert 0.3 < realized_sparsity(module) < 0.5  # P(|N(0,1)| <= 0.5) = 0.38
    reset_stats(module)
    assert realized_sparsity(module) == 0.0 and float(module.input_count) == 0.0
    track_sparsity(module, False)
    with torch.no_grad():
        module(xs[0])
    assert float(module.input_count) == 0.0 and realized_sparsity(module) == 0.0


def test_realized_sparsity_is_weighted_by_layer_size():
    small, _, _ = make_linear(k=64, n=32, seed=1)
    large, _, _ = make_linear(k=128, n=64, seed=2)
    model = torch.nn.ModuleDict({"small": small, "large": large})
    small.set_level(2)  # threshold 1.0
    large.set_level(0)  # dense: nothing zeroed
    with torch.no_grad():
        xs = torch.randn(1, 64, generator=torch.Generator().manual_seed(6))
        small(xs)
        large(torch.randn(1, 128, generator=torch.Generator().manual_seed(7)))
    s = float((xs.abs() <= 1.0).float().mean())
    assert float(large.last_sparsity) == 0.0
    assert realized_sparsity(model) == pytest.approx(s * 64 * 32 / (64 * 32 + 128 * 64), rel=1e-6)
    assert [n for n, _ in teal_linears(model)] == ["small", "large"]


def test_shape_errors():
    with pytest.raises(ValueError, match="group_size 48 does not divide in_features 64"):
        TealLinear(64, 32, bits=4, group_size=48, n_levels=1)
    with pytest.raises(ValueError, match="out_features 30 is not a multiple of 8"):
        TealLinear(64, 30, bits=4, group_size=32, n_levels=1)
    assert TealLinear(64, 32, bits=8, group_size=-1, n_levels=1).group_size == 64  # -1: per channel


PROMPT = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2], [1, 77, 8, 300, 64, 21, 99, 13]])


@pytest.mark.parametrize("fused", [False, True])
def test_track_sparsity_switch(tiny_artifact, fused):
    """(Moved from tests/test_decoding.py.) Counters off: nothing counted; on: each of q/k/v counts its own
    threshold's zeros, fused or not."""
    model = teal_quant.load(tiny_artifact, sparsity=0.4, device="cpu")
    if fused:
        fuse_projections(model)
    layer0 = model.model.layers[0]
    captured = {}
    hook = layer0.self_attn.q_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    reset_stats(model)
    track_sparsity(model, False)
    with torch.no_grad():
        model(PROMPT[:, :1])
    assert realized_sparsity(model) == 0.0 and realized_sparsity(model, cumulative=True) == 0.0
    track_sparsity(model, True)
    with torch.no_grad():
        model(PROMPT[:, :1])
    hook.remove()
    x = captured["x"].reshape(-1, layer0.self_attn.q_proj.in_features)
    for name in ("q_proj", "k_proj", "v_proj"):
        m = getattr(layer0.self_attn, name)
        want = float((x.float().abs() <= m.thresholds[m.level_index]).float().mean())
        assert float(m.last_sparsity) == pytest.approx(want, abs=1e-6)
        assert float(m.input_count) == x.numel()
    assert 0.2 < realized_sparsity(model) < 0.6
