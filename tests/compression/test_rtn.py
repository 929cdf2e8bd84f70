"""RTN group-wise quantization against a float64 reference."""

import itertools

import pytest
import torch

from teal_quant.compression.quantize.rtn import QuantSpec, compute_qparams, dequantize_codes, quantize, rtn_quantize

N, K = 48, 256


def _weight(seed: int, n: int = N, k: int = K) -> torch.Tensor:
    """A linear weight [N, K] with per-row scale spread and a few outliers, like real projections."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    w[torch.rand(n, k, generator=g) < 0.002] *= 8.0
    return w


def _reference(weight: torch.Tensor, spec: QuantSpec):
    """Float64 RTN, written per group: (q, scales, zeros, deq) with W^T = weight.t()."""
    w_t = weight.t().double()
    group = K if spec.group_size == -1 else spec.group_size
    qmax = 2**spec.bits - 1
    scales = torch.empty(K // group, weight.shape[0], dtype=torch.float64)
    zeros = torch.empty_like(scales)
    q = torch.empty_like(w_t)
    for i in range(K // group):
        block = w_t[i * group : (i + 1) * group]
        if spec.sym:
            s = block.abs().amax(0) / (2 ** (spec.bits - 1) - 1)
            z = torch.full_like(s, 2.0 ** (spec.bits - 1))
        else:
            s = (block.amax(0) - block.amin(0)) / qmax
            z = -block.amin(0) / s
        scales[i], zeros[i] = s, z
        q[i * group : (i + 1) * group] = torch.clamp(torch.round(block / s + z), 0, qmax)
    deq = (q - zeros.repeat_interleave(group, 0)) * scales.repeat_interleave(group, 0)
    return q, scales, zeros, deq


SPECS = [
    QuantSpec(bits, group, sym)
    for bits, group, sym in itertools.product((4, 8), (32, 64, 128, -1), (False, True))
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"int{s.bits}-g{s.group_size}-{'sym' if s.sym else 'asym'}")
def test_matches_float64_reference_and_error_within_half_step(spec):
    weight = _weight(seed=spec.bits * 1000 + spec.group_size + 7 * spec.sym)
    q, scales, zeros = rtn_quantize(weight, spec)
    group = spec.resolved_group_size(K)
    assert q.dtype == torch.uint8 and q.shape == (K, N) and q.is_contiguous()
    assert scales.dtype == zeros.dtype == torch.float32 and scales.shape == zeros.shape == (K // group, N)
    assert int(q.max()) <= 2**spec.bits - 1

    q_ref, s_ref, z_ref, _ = _reference(weight, spec)
    torch.testing.assert_close(scales.double(), s_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(zeros.double(), z_ref, rtol=1e-5, atol=1e-5)
    mismatch = (q.double() != q_ref).double().mean().item()
    assert mismatch <= 1e-3, mismatch  # only fp32-vs-fp64 rounding ties may differ, and by one code

    w_t = weight.t().double()
    deq = dequantize_codes(q, scales, zeros, spec).double()
    step = scales.double().repeat_interleave(group, 0)
    absmax = w_t.abs().reshape(K // group, group, N).amax(1).repeat_interleave(group, 0)
    err = (w_t - deq).abs()
    assert bool((err <= step / 2 + 1e-6 * absmax).all()), float((err - step / 2).max())


def test_reproduces_q4_1_blocks_exactly():
    # llama.cpp Q4_1: per block of 32 weights along K, w = d * q + m with fp16 d, m and codes 0..15; its quantizer
    # takes d = (max - min) / 15 and m = min, so every block holds codes 0 and 15.
    g = torch.Generator().manual_seed(11)
    n_blocks = K // 32
    d = (torch.rand(N, n_blocks, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(N, n_blocks, generator=g) * 0.15).half().float()
    codes = torch.randint(0, 16, (N, n_blocks, 32), generator=g)
    codes[:, :, 0], codes[:, :, 31] = 0, 15
    weight = (codes * d.unsqueeze(-1) + m.unsqueeze(-1)).reshape(N, K)

    spec = QuantSpec(bits=4, group_size=32, sym=False)
    q, scales, zeros = rtn_quantize(weight, spec)
    assert torch.equal(q.t().reshape(N, n_blocks, 32).long(), codes)
    deq = dequantize_codes(q, scales, zeros, spec)
    assert (deq - weight.t()).abs().max().item() < 1e-6


def test_sym_keeps_zero_exact_and_codes_symmetric():
    weight = _weight(seed=12)
    weight[:, ::5] = 0.0
    for bits in (4, 8):
        spec = QuantSpec(bits=bits, group_size=64, sym=True)
        q, scales, zeros = rtn_quantize(weight, spec)
        half = 2 ** (bits - 1)
        assert bool((zeros == half).all())
        assert int(q.min()) >= 1 and int(q.max()) <= 2 * half - 1  # codes half +- (half - 1)
        deq = dequantize_codes(q, scales, zeros, spec)
        assert bool((deq.t()[:, ::5] == 0.0).all())
        assert bool((q.t()[:, ::5] == half).all())


def test_int8_per_channel_error_is_tiny_and_as_predicted():
    weight = torch.randn(N, 1024, generator=torch.Generator().manual_seed(13))
    for sym in (False, True):
        spec = QuantSpec(bits=8, group_size=-1, sym=sym)
        q, scales, zeros = rtn_quantize(weight, spec)
        deq = dequantize_codes(q, scales, zeros, spec)
        rel = ((deq - weight.t()).norm() / weight.norm()).item()
        # Rounding error is uniform on [-scale/2, scale/2]: rms = scale / sqrt(12).
        predicted = ((scales.double() ** 2).mean().sqrt() / 12**0.5 / weight.double().pow(2).mean().sqrt()).item()
        assert rel < 0.01
        assert rel == pytest.approx(predicted, rel=0.1)


def test_constant_groups_give_no_nan_and_exact_values():
    weight = _weight(seed=14)
    weight[3, :32] = 0.37
    weight[5, 32:64] = 0.0
    weight[7, :] = -2.5  # constant across a whole per-channel group
    for spec in (QuantSpec(4, 32, False), QuantSpec(4, 32, True), QuantSpec(8, -1, False), QuantSpec(8, -1, True)):
        q, scales, zeros = rtn_quantize(weight, spec)
        deq = dequantize_codes(q, scales, zeros, spec)
        assert torch.isfinite(scales).all() and torch.isfinite(zeros).all() and torch.isfinite(deq).all()
        assert bool((scales > 0).all())
        torch.testing.assert_close(deq.t()[7], weight[7], rtol=1e-6, atol=0)
        if spec.group_size == 32:
            torch.testing.assert_close(deq.t()[3, :32], weight[3, :32], rtol=1e-6, atol=0)
            assert bool((deq.t()[5, 32:64] == 0.0).all())


def test_functions_compose_and_requantize_is_idempotent():
    weight = _weight(seed=15).to(torch.bfloat16)
    spec = QuantSpec(4, 64, False)
    w_t = weight.t()
    scales, zeros = compute_qparams(w_t, spec)
    q = quantize(w_t, scales, zeros, spec)
    q2, s2, z2 = rtn_quantize(weight, spec)
    assert torch.equal(q, q2) and torch.equal(scales, s2) and torch.equal(zeros, z2)
    deq = dequantize_codes(q, scales, zeros, spec)
    assert torch.equal(quantize(deq, scales, zeros, spec), q)


def test_bad_specs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"K=100 is not divisible by group_size=32"):
        rtn_quantize(torch.randn(8, 100), QuantSpec(4, 32, False))
    with pytest.raises(ValueError, match=r"K=100.*group_size=32"):
        QuantSpec(4, 32, True).resolved_group_size(100)
    assert QuantSpec(4, -1, True).resolved_group_size(100) == 100
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(3, 32, False)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(4, 0, False)
    with pytest.raises(ValueError, match="shape"):
        rtn_quantize(torch.randn(4, 4, 4), QuantSpec(4, -1, False))
