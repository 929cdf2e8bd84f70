"""The pure-torch reference against float64 truth (runs on the CPU, no triton needed)."""

import math

import pytest
import torch
from _kernel_helpers import make_layer, threshold_for, tol, truth
from teal_quant.kernels import reference


def test_pack_int4_layout_and_roundtrip():
    q = torch.randint(0, 16, (5, 24), dtype=torch.uint8)
    p = reference.pack_int4(q)
    assert p.dtype == torch.int32 and p.shape == (5, 3)
    for k in range(5):
        for j in range(3):
            word = int(p[k, j]) & 0xFFFFFFFF
            assert [(word >> (4 * i)) & 0xF for i in range(8)] == q[k, 8 * j : 8 * j + 8].tolist()
    assert torch.equal(reference.unpack_int4(p), q)
    assert torch.equal(reference.unpack(reference.pack(q, 8), 8), q)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        reference.pack_int4(torch.zeros(2, 12, dtype=torch.uint8))
    with pytest.raises(ValueError):
        reference.pack_int4(torch.full((2, 8), 16, dtype=torch.uint8))


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_matches_float64(bits):
    q, qw, s, z = make_layer(64, 16, 32, bits, torch.float32, "cpu")
    w = reference.dequantize(qw, s, z, bits=bits, group_size=32)
    want = (q.double() - z.double().repeat_interleave(32, 0)) * s.double().repeat_interleave(32, 0)
    torch.testing.assert_close(w.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("m", [1, 4])
def test_sparse_gemv_ref(bits, dtype, sparsity, m):
    k, n, g = 256, 40, 64
    q, qw, s, z = make_layer(k, n, g, bits, dtype, "cpu")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    t = threshold_for(x, sparsity)
    y = reference.sparse_gemv_ref(x, qw, s, z, t, bits=bits, group_size=g)
    assert y.dtype == dtype and y.shape == (m, n)
    want = truth(x, q, s, z, g, t)
    if sparsity == 1.0:
        assert torch.equal(y, torch.zeros_like(y))
    scale = want.abs().max().item()
    torch.testing.assert_close(y.double(), want, rtol=0, atol=tol(dtype, scale))


def test_sparse_gemv_ref_nan_and_threshold_forms():
    k, n, g = 128, 16, 128  # per-channel: group_size == K
    q, qw, s, z = make_layer(k, n, g, 4, torch.bfloat16, "cpu")
    x = torch.randn(2, k).to(torch.bfloat16)
    x[0, 3] = math.nan
    x[1, 7] = math.nan
    for t in (0.3, torch.tensor(0.3), torch.full((k,), 0.3)):
        y = reference.sparse_gemv_ref(x, qw, s, z, t, bits=4, group_size=g)
        assert torch.isfinite(y).all()  # NaN compares False: dropped like an inactive input
        want = truth(x, q, s, z, g, 0.3)
        torch.testing.assert_close(y.double(), want, rtol=0, atol=tol(torch.bfloat16, want.abs().max().item()))
    per_channel = torch.rand(k) * 2
    y = reference.sparse_gemv_ref(x, qw, s, z, per_channel, bits=4, group_size=g)
    want = truth(x, q, s, z, g, per_channel)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=tol(torch.bfloat16, want.abs().max().item()))


def test_fused_ref_is_per_part():
    q, qw, s, z = make_layer(64, 48, 32, 4, torch.float16, "cpu")
    x = torch.randn(1, 64).half()
    th = torch.tensor([0.2, 0.8, 1.5])
    y = reference.sparse_gemv_fused_ref(x, qw, s, z, th, [24, 8, 16], bits=4, group_size=32)
    full = [reference.sparse_gemv_ref(x, qw, s, z, float(t), bits=4, group_size=32) for t in th]
    torch.testing.assert_close(y, torch.cat([full[0][:, :24], full[1][:, 24:32], full[2][:, 32:]], 1))


def test_dense_gemm_ref():
    q, qw, s, z = make_layer(64, 24, 16, 8, torch.float32, "cpu")
    x = torch.randn(2, 3, 64)
    y = reference.dense_gemm_ref(x, qw, s, z, bits=8, group_size=16)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y.double(), truth(x.reshape(6, 64), q, s, z, 16, -1.0).reshape(2, 3, 24), rtol=1e-5, atol=1e-4)


def test_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, teal_quant.kernels as k; assert 'triton' not in sys.modules, 'triton imported'; print(k.sparse_gemv)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
