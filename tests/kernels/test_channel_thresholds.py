"""Per-input-channel [K] thresholds (the weight-aware criterion: t / channel_scale) on every sparse GEMV path.

The other kernel tests use [K] thresholds that are constant or uniform-random; here they are what a weight-aware
layer really holds: a wide spread of values and +inf for zero-norm input columns (never kept). Each launch path
(CUDA-core one-launch kernel, tensor-core kernel for int4 batch 2..4, the fused multi-part launch, the reference)
is checked against float64 truth, so a kernel that read one threshold for all channels, or mishandled inf, fails.
Tolerances: `tol` of _kernel_helpers (a few output ulps).
"""

import math

import pytest
import torch
from _kernel_helpers import make_layer, tol, truth
from teal_quant.kernels import reference

pytest.importorskip("triton")
from teal_quant.kernels import gemv_launch as gemv  # noqa: E402
from teal_quant.kernels.dispatch import MmaShape  # noqa: E402


def channel_thresholds(k, x, sparsity, seed):
    """t / c with c spread over two decades and four zero columns (threshold inf), t set for ~`sparsity`."""
    g = torch.Generator().manual_seed(seed)
    c = torch.exp(torch.randn(k, generator=g) * 1.2)
    c[torch.randperm(k, generator=g)[:4]] = 0.0
    score = x.float().abs().cpu() * c
    t = torch.quantile(score.flatten(), sparsity).item()
    return torch.where(c > 0, t / c.clamp(min=1e-30), torch.tensor(math.inf)), c == 0


def check(y, want, dtype):
    assert y.dtype == dtype and torch.isfinite(y).all()
    err = (y.double().cpu() - want).abs().max().item()
    assert err <= tol(dtype, want.abs().max().item()), err


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 3])
def test_sparse_gemv_per_channel_with_inf(device, poison, bits, m):
    k, n, g = 256, 72, 64
    q, qw, s, z = make_layer(k, n, g, bits, torch.float16, device, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4)).half()
    th, dead = channel_thresholds(k, x, 0.5, seed=5)
    want = truth(x, q, s, z, g, th)
    # the per-channel mask really differs from any scalar one, and dead columns are dropped
    assert not torch.equal(want, truth(x, q, s, z, g, th[~dead].median()))
    x, th = x.to(device), th.to(device)
    check(gemv.sparse_gemv(x, qw, s, z, th, bits=bits, group_size=g), want, torch.float16)
    check(reference.sparse_gemv_ref(x, qw, s, z, th, bits=bits, group_size=g), want, torch.float16)
    x_dead_only = torch.zeros_like(x)
    x_dead_only[:, dead.to(x.device)] = 100.0  # large inputs on zero-norm channels only: nothing is kept
    y = gemv.sparse_gemv(x_dead_only, qw, s, z, th, bits=bits, group_size=g)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("m", [2, 4])
def test_tensor_core_kernel_per_channel(device, poison, m):
    k, n, g = 256, 72, 128
    q, qw, s, z = make_layer(k, n, g, 4, torch.bfloat16, device, seed=7)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    th, _ = channel_thresholds(k, x, 0.6, seed=9)
    shape = MmaShape(block_n=32, block_k=16, warps=4, k_range=32)
    y = gemv.sparse_gemv(x.to(device), qw, s, z, th.to(device), bits=4, group_size=g, shape=shape)
    check(y, truth(x, q, s, z, g, th), torch.bfloat16)


@pytest.mark.parametrize("m", [1, 2])
def test_fused_parts_per_channel_with_inf(device, poison, m):
    k, g = 128, 32
    splits = [40, 16, 24]
    q, qw, s, z = make_layer(k, sum(splits), g, 4, torch.float16, device, seed=10)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(11)).half()
    th = torch.stack([channel_thresholds(k, x, sp, seed=12 + i)[0] for i, sp in enumerate((0.3, 0.5, 0.7))])
    y = gemv.sparse_gemv_fused(x.to(device), qw, s, z, th.to(device), splits, bits=4, group_size=g)
    ends = [0] + list(torch.tensor(splits).cumsum(0).tolist())
    want = torch.cat([truth(x, q[:, a:b], s[:, a:b], z[:, a:b], g, th[p]) for p, (a, b) in enumerate(zip(ends, ends[1:]))], 1)
    check(y, want, torch.float16)
    ref = reference.sparse_gemv_fused_ref(x, qw.cpu(), s.cpu(), z.cpu(), th, splits, bits=4, group_size=g)
    check(ref, want, torch.float16)
