"""The RMSNorm between two projections split over their GEMVs (kernels/gemv_launch.py): the producer form
(``residual=, norm_sums=``: the product added into the residual stream, the new stream's sums of squares per column
tile) and the consumer form (``sparse_gemv_fused(..., norm=)``: RMSNorm of the stream computed where the input is
loaded), for the CUDA-core family that runs them in its launch and a family that runs them apart, against the
separate computation and float64 truth.

Bounds:
- producer: the new residual equals (residual + y).to(dtype) for the ordinary call's y to the bit under deterministic
  reductions on the GPU; with atomics, or on the interpreter (whose fp32 -> bf16 casts truncate where torch rounds to
  nearest), within one ulp of max|y| plus one of max|residual|; each core column tile's slot within 1e-5 relative of
  the fp32 sum of its squares, the slots past the tiles zero (they held garbage before), the row sum within 1e-5
  relative;
- consumer: with statistics that make the factor a power of two (eps 0, mean(h^2) = 4^j, split over several slots)
  and power-of-two norm weights, every rounding of the norm is exact, so y equals the plain call on
  rms_norm_from_sums_ref's output to the bit under deterministic reductions and within one ulp of max|y| with atomics;
  against float64 truth within test_triton_kernels' tolerance;
- producer then consumer against add_rms_norm then the plain call: within 2 ulps of max|y| (the sums of squares are
  added in another order), threshold 0 so no entry flips.
"""

import pytest
import torch
from _kernel_helpers import ON_GPU, make_layer, tol, truth

from teal_quant import kernels

pytest.importorskip("triton")
from teal_quant.kernels import gemv_launch as gemv  # noqa: E402
from teal_quant.kernels import reference  # noqa: E402
from teal_quant.kernels.dispatch import CoreShape, MmaShape  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16
CORE = CoreShape(vec=1, warps=2, rows=2, k_range=32, h2=True)  # block_n 256
CASES = [  # (launch shape, batch): split-K core, one K-split (no atomics), in place + preload, apart (mma)
    (CORE, 1),
    (CoreShape(vec=1, warps=2, rows=2, k_range=32, h2=True, groups=8), 1),
    (CoreShape(vec=1, warps=2, rows=4, k_range=32, dense=100, h2=True, preload=1), 2),
    (CoreShape(vec=1, warps=2, rows=2, k_range=32, h2=True, preload=2), 1),  # (NORM: x from the scratch list)
    (CoreShape(vec=1, warps=2, rows=2, k_range=32, h2=True, dense=60), 1),  # in place or compacted by the count
    (MmaShape(32, 16, 4, 32), 3),
]
IDS = [f"{type(s).__name__}-m{m}-{i}" for i, (s, m) in enumerate(CASES)]


def _ulp(t: torch.Tensor) -> float:
    return float(t.float().abs().max()) * torch.finfo(DTYPE).eps


def _det(on: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    return previous


@pytest.mark.parametrize("shape,m", CASES, ids=IDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_producer_adds_into_the_residual_and_writes_its_sums_of_squares(shape, m, deterministic):
    k, n, g = 256, 600, 32  # 3 column tiles of 256, the last one partial
    _, qw, s, z = make_layer(k, n, g, 4, DTYPE, DEVICE, seed=m)
    gen = torch.Generator().manual_seed(10 + m)
    x = torch.randn(m, k, generator=gen).to(DTYPE).to(DEVICE)
    residual = (4 * torch.randn(m, n, generator=gen)).to(DTYPE).to(DEVICE)
    before = residual.clone()
    sums = torch.randn(m, kernels.NORM_SLOTS, generator=gen).to(DEVICE)  # garbage: every slot must be written
    previous = _det(deterministic)
    try:
        y = gemv.sparse_gemv(x, qw, s, z, 0.5, bits=4, group_size=g, shape=shape)
        got = gemv.sparse_gemv(x, qw, s, z, 0.5, bits=4, group_size=g, shape=shape, residual=residual, norm_sums=sums)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert got is residual
    want = before + y
    if deterministic and ON_GPU:
        assert torch.equal(residual, want)
    else:
        assert (residual.float() - want.float()).abs().max() <= _ulp(y) + _ulp(want)
    sq = residual.float().pow(2)
    assert torch.allclose(sums.sum(1), sq.sum(1), rtol=1e-5, atol=0)
    if isinstance(shape, CoreShape):  # one slot per column tile, the rest zero
        tiles = sq.split(256, dim=1)
        for t, part in enumerate(tiles):
            assert torch.allclose(sums[:, t], part.sum(1), rtol=1e-5, atol=0)
        assert torch.count_nonzero(sums[:, len(tiles):]) == 0


def _exact_stats(m: int, k: int) -> torch.Tensor:
    """Row i: mean(h^2) = 4^(i + 1) spread over four slots (exact in any summation order): factor 2^-(i + 1)."""
    sums = torch.zeros(m, kernels.NORM_SLOTS)
    for i in range(m):
        sums[i, [0, 5, 17, kernels.NORM_SLOTS - 1]] = k * 4.0 ** (i + 1) / 4
    return sums.to(DEVICE)


@pytest.mark.parametrize("shape,m", CASES, ids=IDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_consumer_normalizes_the_stream_where_it_loads_it(shape, m, deterministic):
    k, n, g = 256, 96, 32
    q, qw, s, z = make_layer(k, n, g, 4, DTYPE, DEVICE, seed=20 + m)
    gen = torch.Generator().manual_seed(30 + m)
    h = (3 * torch.randn(m, k, generator=gen)).to(DTYPE).to(DEVICE)
    weight = (2.0 ** torch.randint(-1, 2, (k,), generator=gen)).to(DTYPE).to(DEVICE)  # 0.5, 1, 2
    sums = _exact_stats(m, k)
    thresholds = torch.tensor([0.4, 0.8], device=DEVICE)
    x = reference.rms_norm_from_sums_ref(h, weight, sums, 0.0)
    previous = _det(deterministic)
    try:
        want = gemv.sparse_gemv_fused(x, qw, s, z, thresholds, [64, 32], bits=4, group_size=g, shape=shape)
        got = gemv.sparse_gemv_fused(h, qw, s, z, thresholds, [64, 32], bits=4, group_size=g, shape=shape,
                                     norm=(weight, sums, 0.0))
    finally:
        torch.use_deterministic_algorithms(previous)
    if deterministic:
        assert torch.equal(got, want)
    else:
        assert (got.float() - want.float()).abs().max() <= _ulp(want)
    t64 = torch.cat([truth(x, q[:, :64], s[:, :64], z[:, :64], g, 0.4), truth(x, q[:, 64:], s[:, 64:], z[:, 64:], g, 0.8)], 1)
    assert (got.double().cpu() - t64).abs().max() <= tol(DTYPE, float(t64.abs().max()))


def test_producer_then_consumer_matches_add_rms_norm_then_the_plain_call():
    """Two layers' worth: o_proj in the producer form, then gate/up in the consumer form with out= (the decode step's
    use), against add_rms_norm and the plain calls; threshold 0 (no entry near the threshold flips)."""
    k, n, g, m = 256, 128, 32, 1
    _, qw_o, s_o, z_o = make_layer(k, k, g, 4, DTYPE, DEVICE, seed=41)
    _, qw_g, s_g, z_g = make_layer(k, n, g, 4, DTYPE, DEVICE, seed=42)
    gen = torch.Generator().manual_seed(43)
    a = torch.randn(m, k, generator=gen).to(DTYPE).to(DEVICE)
    residual = (5 * torch.randn(m, k, generator=gen)).to(DTYPE).to(DEVICE)
    weight = (1 + 0.2 * torch.randn(k, generator=gen)).to(DTYPE).to(DEVICE)
    zero = torch.zeros(2, device=DEVICE)
    r_ref = residual.clone()
    x_ref = kernels.add_rms_norm(kernels.sparse_gemv(a, qw_o, s_o, z_o, 0.0, bits=4, group_size=g), r_ref, weight, 1e-5)
    want = kernels.sparse_gemv_fused(x_ref, qw_g, s_g, z_g, zero, [64, 64], bits=4, group_size=g)
    sums = torch.empty(m, kernels.NORM_SLOTS, device=DEVICE)
    kernels.sparse_gemv(a, qw_o, s_o, z_o, 0.0, bits=4, group_size=g, residual=residual, norm_sums=sums)
    out, clear = torch.zeros(m, n, device=DEVICE), torch.ones(m, n, device=DEVICE)
    got = kernels.sparse_gemv_fused(residual, qw_g, s_g, z_g, zero, [64, 64], bits=4, group_size=g,
                                    norm=(weight, sums, 1e-5), out=out, clear=clear)
    assert got is out and torch.count_nonzero(clear) == 0
    assert (residual.float() - r_ref.float()).abs().max() <= _ulp(r_ref)
    assert (out - want.float()).abs().max() <= 2 * _ulp(want)
    plain = kernels.sparse_gemv_fused(residual, qw_g, s_g, z_g, zero, [64, 64], bits=4, group_size=g,
                                      norm=(weight, sums, 1e-5))
    assert (plain.float() - want.float()).abs().max() <= 2 * _ulp(want)


def test_silu_producer_is_the_silu_call_added_into_the_residual():
    k, n, g, m = 256, 256, 32, 1
    _, qw, s, z = make_layer(k, n, g, 4, DTYPE, DEVICE, seed=51)
    gen = torch.Generator().manual_seed(52)
    gate, up = (torch.randn(m, k, generator=gen).to(DTYPE).to(DEVICE) for _ in range(2))
    residual = torch.randn(m, n, generator=gen).to(DTYPE).to(DEVICE)
    sums = torch.empty(m, kernels.NORM_SLOTS, device=DEVICE)
    previous = _det(True)
    try:
        want = residual + kernels.sparse_gemv_silu(gate, up, qw, s, z, 0.1, bits=4, group_size=g)
        assert kernels.sparse_gemv_silu(gate, up, qw, s, z, 0.1, bits=4, group_size=g, residual=residual,
                                        norm_sums=sums) is residual
    finally:
        torch.use_deterministic_algorithms(previous)
    if ON_GPU:
        assert torch.equal(residual, want)
    else:  # (the interpreter's casts truncate)
        assert (residual.float() - want.float()).abs().max() <= 2 * _ulp(want)
    assert torch.allclose(sums.sum(1), residual.float().pow(2).sum(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", ["sums_shape", "sums_dtype", "residual_dtype", "residual_shape", "with_out",
                                  "alone", "weight_shape", "norm_tuple"])
def test_bad_norm_form_arguments_are_one_clear_error(case):
    k, n, g, m = 64, 64, 32, 1
    _, qw, s, z = make_layer(k, n, g, 4, DTYPE, DEVICE, seed=61)
    x = torch.randn(m, k).to(DTYPE).to(DEVICE)
    r = torch.zeros(m, n, dtype=DTYPE, device=DEVICE)
    sums = torch.zeros(m, kernels.NORM_SLOTS, device=DEVICE)
    w = torch.ones(k, dtype=DTYPE, device=DEVICE)
    t2 = torch.zeros(2, device=DEVICE)
    calls = {
        "sums_shape": lambda: gemv.sparse_gemv(x, qw, s, z, 0.0, bits=4, group_size=g, residual=r, norm_sums=sums[:, :8]),
        "sums_dtype": lambda: gemv.sparse_gemv(x, qw, s, z, 0.0, bits=4, group_size=g, residual=r,
                                               norm_sums=sums.double()),
        "residual_dtype": lambda: gemv.sparse_gemv(x, qw, s, z, 0.0, bits=4, group_size=g, residual=r.float(),
                                                   norm_sums=sums),
        "residual_shape": lambda: gemv.sparse_gemv(x, qw, s, z, 0.0, bits=4, group_size=g, residual=r[:, :32],
                                                   norm_sums=sums),
        "with_out": lambda: gemv.sparse_gemv(x, qw, s, z, 0.0, bits=4, group_size=g, residual=r, norm_sums=sums,
                                             out=torch.zeros(m, n, device=DEVICE)),
        "alone": lambda: gemv.sparse_gemv(x, qw, s, z, 0.0, bits=4, group_size=g, residual=r),
        "weight_shape": lambda: gemv.sparse_gemv_fused(x, qw, s, z, t2, [32, 32], bits=4, group_size=g,
                                                       norm=(w[:8], sums, 1e-5)),
        "norm_tuple": lambda: gemv.sparse_gemv_fused(x, qw, s, z, t2, [32, 32], bits=4, group_size=g, norm=(w, sums)),
    }
    with pytest.raises(ValueError) as e:
        calls[case]()
    assert "\n" not in str(e.value)
