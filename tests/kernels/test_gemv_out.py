"""The decode step's form of the sparse GEMV: ``out=`` (the product added, in fp32, into a zero float32 buffer, with no
split-K tail) and ``clear=`` (another buffer zeroed by the same launch), for every family and the plain, fused and
SiLU forms, against the ordinary call and float64 truth; and the readers that round such sums (add_rms_norm,
decode_attention) against the same call on the rounded values.

Bounds:
- ``out`` rounded to the activation dtype equals the ordinary call's y to the bit under deterministic reductions (the
  same fp32 sum, the ordinary path adds its y into out), and with atomics within one ulp of y at max|y| (the order of
  the fp32 additions differs);
- ``out`` in fp32 within 4 ulps of the activation dtype at max|truth| of float64 truth (as test_triton_kernels.py);
- ``clear`` is all zeros afterwards.
"""

import pytest
import torch
from _kernel_helpers import ON_GPU, make_layer, tol, truth

from teal_quant import kernels

pytest.importorskip("triton")
from teal_quant.kernels import gemv_launch as gemv  # noqa: E402
from teal_quant.kernels.dispatch import CoreShape, MmaShape, SplitKShape  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
CASES = [  # (launch shape, batch): the three families, split-K and one K-split (no atomics)
    (CoreShape(vec=1, warps=2, rows=2, k_range=32, h2=True), 1),
    (CoreShape(vec=1, warps=2, rows=4, k_range=32, dense=100, h2=True), 2),
    (SplitKShape(32, 32, 4, 2, programs=8), 4),
    (MmaShape(32, 16, 4, 32), 3),
    (CoreShape(vec=1, warps=2, rows=2, k_range=32, h2=True, groups=8), 1),  # one program covers K: no split
    # round 16's picks from the decode-step sweep (70B o_proj; 8B down), scaled down: the list in registers
    (CoreShape(vec=2, warps=2, rows=4, k_range=32, dense=85, h2=True, evict_first=True, shfl=True), 1),
    (CoreShape(vec=1, warps=2, rows=8, k_range=32, pipe=True, h2=True, evict_first=True, loads_first=True, shfl=True), 1),
]
if ON_GPU:
    CASES += [(None, m) for m in (1, 4, 16)]


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> float:
    return float(t.abs().max()) * torch.finfo(dtype).eps


@pytest.mark.parametrize("shape,m", CASES, ids=[f"{type(s).__name__ if s else 'table'}-m{m}-{i}" for i, (s, m) in
                                                enumerate(CASES)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_out_adds_the_product_in_fp32_and_clear_is_zeroed(shape, m, deterministic):
    k, n, g = 256, 72 if not ON_GPU else 3000, 32
    dtype = torch.bfloat16
    q, qw, s, z = make_layer(k, n, g, 4, dtype, DEVICE, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEVICE)
    t = torch.tensor(0.6, device=DEVICE)
    want = truth(x, q, s, z, g, 0.6)
    out = torch.zeros(m, n, dtype=torch.float32, device=DEVICE)
    clear = torch.randn(m, n, device=DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        y = gemv.sparse_gemv(x, qw, s, z, t, bits=4, group_size=g, shape=shape)
        got = gemv.sparse_gemv(x, qw, s, z, t, bits=4, group_size=g, shape=shape, out=out, clear=clear)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert got is out and out.dtype == torch.float32
    assert torch.count_nonzero(clear) == 0
    assert (out.double().cpu() - want).abs().max() <= tol(dtype, float(want.abs().max()))
    rounded = out.to(dtype)
    if deterministic:
        assert torch.equal(rounded, y)
    else:
        assert (rounded.float() - y.float()).abs().max() <= _ulp(y.float(), dtype)


def test_fused_and_silu_forms_through_the_public_ops():
    """kernels.sparse_gemv_fused / sparse_gemv_silu with out= (the custom ops ``*_into``) against their ordinary calls."""
    k, n, g, m = 128, 64, 32, 1
    dtype = torch.bfloat16
    _, qw, s, z = make_layer(k, n, g, 4, dtype, DEVICE, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEVICE)
    up = torch.randn(m, k, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    thresholds = torch.tensor([0.3, 0.9], device=DEVICE)
    y = kernels.sparse_gemv_fused(x, qw, s, z, thresholds, [32, 32], bits=4, group_size=g)
    out, clear = torch.zeros(m, n, device=DEVICE), torch.ones(m, n, device=DEVICE)
    assert kernels.sparse_gemv_fused(x, qw, s, z, thresholds, [32, 32], bits=4, group_size=g, out=out,
                                     clear=clear) is out
    assert (out - y.float()).abs().max() <= _ulp(y.float(), dtype) and torch.count_nonzero(clear) == 0
    t = torch.tensor(0.05, device=DEVICE)
    y = kernels.sparse_gemv_silu(x, up, qw, s, z, t, bits=4, group_size=g)
    out, clear = torch.zeros(m, n, device=DEVICE), torch.ones(m, n, device=DEVICE)
    kernels.sparse_gemv_silu(x, up, qw, s, z, t, bits=4, group_size=g, out=out, clear=clear)
    assert (out - y.float()).abs().max() <= _ulp(y.float(), dtype) and torch.count_nonzero(clear) == 0


def test_bad_out_or_clear_is_one_clear_error():
    k, n, g = 128, 64, 32
    _, qw, s, z = make_layer(k, n, g, 4, torch.bfloat16, DEVICE)
    x = torch.randn(1, k).to(torch.bfloat16).to(DEVICE)
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        kernels.sparse_gemv(x, qw, s, z, 0.5, bits=4, group_size=g, out=torch.zeros(1, n, dtype=torch.bfloat16,
                                                                                     device=DEVICE))
    with pytest.raises(ValueError, match="clear needs out"):
        kernels.sparse_gemv(x, qw, s, z, 0.5, bits=4, group_size=g, clear=torch.zeros(1, n, device=DEVICE))
    out = torch.zeros(1, n, device=DEVICE)
    with pytest.raises(ValueError, match="clear needs an out of its own"):
        kernels.sparse_gemv(x, qw, s, z, 0.5, bits=4, group_size=g, out=out, clear=out)


def test_readers_round_float32_sums_like_the_ordinary_call():
    """add_rms_norm and decode_attention given float32 sums give what they give on the sums rounded to bf16. (The
    Triton interpreter truncates where the GPU rounds to nearest: on the CPU the float32 inputs are bf16 values, so
    the path is checked there and the rounding on the GPU.)"""
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(7)

    def sums(*shape):
        t = torch.randn(*shape, generator=gen)
        return (t if ON_GPU else t.to(dtype).float()).to(DEVICE)

    h32 = sums(2, 64)
    residual = torch.randn(2, 64, generator=gen).to(dtype).to(DEVICE)
    weight = torch.rand(64, generator=gen).to(dtype).to(DEVICE)
    r1, r2 = residual.clone(), residual.clone()
    a = kernels.add_rms_norm(h32, r1, weight, 1e-5)
    b = kernels.add_rms_norm(h32.to(dtype), r2, weight, 1e-5)
    assert torch.equal(a, b) and torch.equal(r1, r2)
    bsz, hq, hkv, d, length = 1, 4, 2, 16, 32
    q32, k32, v32 = (sums(bsz, h * d) for h in (hq, hkv, hkv))
    cos, sin = (torch.rand(length, d, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    pos = torch.tensor([5], device=DEVICE)
    caches = [torch.randn(bsz, hkv, length, d, generator=gen).to(dtype).to(DEVICE) for _ in range(2)]
    ws_n, cnt_n = kernels.attention_workspace_sizes(bsz, hq, hkv, length, d, DEVICE)
    outs = []
    for q, k, v in ((q32, k32, v32), (q32.to(dtype), k32.to(dtype), v32.to(dtype))):
        kc, vc = caches[0].clone(), caches[1].clone()
        ws, cnt = torch.zeros(ws_n, device=DEVICE), torch.zeros(cnt_n, dtype=torch.int32, device=DEVICE)
        outs.append((kernels.decode_attention(q, k, v, cos, sin, pos, kc, vc, ws, cnt, d ** -0.5), kc, vc))
    for got, want in zip(outs[0], outs[1]):
        assert torch.equal(got, want)
