"""The dense-tile split-K tensor-core GEMV (kernels/gemv_splitk_triton.py) against float64 truth and the reference:
M = 2..16, fp16 / bf16 (and fp32 x, int8 weights), every threshold form with NaN inputs, fused parts, the
deterministic reduction, and the dispatch of its launch shapes. GPU when there is one, else the Triton interpreter.

Tolerance as in test_triton_kernels.py: 4 ulps of the output dtype at max|truth|.
"""

import math

import pytest
import torch
from _kernel_helpers import ON_GPU, make_layer, threshold_for, tol, truth
from teal_quant.kernels import reference

pytest.importorskip("triton")
from teal_quant.kernels import dispatch, gemv_splitk_triton  # noqa: E402
from teal_quant.kernels import gemv_launch as gemv  # noqa: E402
from teal_quant.kernels.dispatch import SplitKShape  # noqa: E402


def check(y, want, dtype):
    assert y.dtype == dtype and torch.isfinite(y).all()
    scale = want.abs().max().item()
    err = (y.double().cpu() - want).abs().max().item()
    assert err <= tol(dtype, scale), f"max error {err} > {tol(dtype, scale)} (max |y| {scale})"


CASES = [  # (launch shape, x dtype, M): each knob at least once, both dtypes, M = 2..16
    (SplitKShape(32, 32, 4, 2, programs=8), torch.bfloat16, 4),
    (SplitKShape(32, 64, 4, 3, programs=4, swap=False), torch.float16, 16),
    (SplitKShape(16, 16, 4, 2, programs=100, skip=True), torch.bfloat16, 2),
    (SplitKShape(64, 32, 4, 2, programs=1, prefetch=False), torch.float16, 8),  # one K-range per column tile: no split
    (SplitKShape(32, 128, 4, 2, programs=8, swap=False, skip=True), torch.bfloat16, 5),  # K-step fitted to the group
    (SplitKShape(32, 32, 2, 3, programs=12), torch.bfloat16, 4),  # round 13: a narrow two-warp tile
    (SplitKShape(32, 32, 2, 3, programs=12, sum_dot=True), torch.bfloat16, 4),  # round 13: sum of x by a ones dot
    (SplitKShape(32, 64, 4, 3, programs=4, swap=False, sum_dot=True), torch.float16, 16),
]
if ON_GPU:
    CASES += [(SplitKShape(128, 128, 4, 4), dt, m) for dt in (torch.float16, torch.bfloat16) for m in (4, 16)]
    CASES += [(SplitKShape(256, 128, 8, 3, programs=264), torch.bfloat16, 8), (SplitKShape(64, 128, 4, 5), torch.float16, 3),
              (SplitKShape(64, 128, 4, 4, programs=1056, prefetch=False), torch.bfloat16, 16),
              (SplitKShape(64, 64, 2, 4, programs=2112), torch.bfloat16, 4),
              (SplitKShape(128, 128, 4, 6, skip=True), torch.bfloat16, 4), (SplitKShape(128, 64, 4, 4, swap=False), torch.float16, 12)]
    CASES += [  # round 13's batch-4 candidates (register caps only matter on the GPU)
        (SplitKShape(64, 128, 2, 4, maxnreg=128), torch.bfloat16, 4),
        (SplitKShape(64, 128, 4, 4, programs=768, maxnreg=72), torch.float16, 4),
        (SplitKShape(32, 128, 2, 5, programs=1056), torch.bfloat16, 4),
        (SplitKShape(128, 128, 4, 3, programs=384), torch.bfloat16, 3),
        (SplitKShape(64, 128, 4, 5, sum_dot=True), torch.bfloat16, 4), (SplitKShape(64, 128, 4, 5, sum_dot=True), torch.float16, 3),
        (SplitKShape(128, 128, 4, 3, sum_dot=True), torch.bfloat16, 4),
        (SplitKShape(64, 128, 4, 4, programs=1056, swap=False, sum_dot=True), torch.bfloat16, 16)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n%dk%dw%ds%dp%d%s%s%s%s%s-%s-m%d" % (
    c[0].block_n, c[0].block_k, c[0].warps, c[0].stages, c[0].programs, "-swap" if c[0].swap else "",
    "-skip" if c[0].skip else "", "" if c[0].prefetch else "-noprefetch", "-r%d" % c[0].maxnreg if c[0].maxnreg else "", "-sumdot" if c[0].sum_dot else "",
    str(c[1])[6:], c[2]))
def test_splitk_kernel_shapes(device, poison, case):
    """Each launch shape twice (the split-K workspace and counters must be left zero): a 0-dim threshold tensor at
    s50, then per-input-channel thresholds with NaN inputs (dropped) and a K-step inactive for every row."""
    shape, dtype, m = case
    k, n, g = (256, 72, 64) if not ON_GPU else (1024, 3000, 128)
    q, qw, s, z = make_layer(k, n, g, 4, dtype, device, seed=11)
    for seed in (1, 2):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
        if seed == 1:
            th = torch.tensor(threshold_for(x, 0.5), device=device)
        else:
            x[0, 3] = math.nan
            x[m - 1, 40] = -math.nan
            x[:, 16:32] = 0.01  # below every threshold: a skipped K-step where the step is 16 rows
            th = (torch.rand(k, generator=torch.Generator().manual_seed(3)) * 0.8 + 0.05).to(device)
        x = x.to(device)
        y = gemv.sparse_gemv(x, qw, s, z, th, bits=4, group_size=g, shape=shape)
        check(y, truth(x, q, s, z, g, th), dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [3, 16])
def test_splitk_plain_unpack(device, poison, bits, dtype, m):
    """int8 weights and fp32 x take the integer unpack; fp32 keeps fp32 precision (no TF32 dot)."""
    k, n, g = 128, 40, 64
    q, qw, s, z = make_layer(k, n, g, bits, dtype, device, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4)).to(dtype).to(device)
    t = threshold_for(x, 0.4)
    y = gemv.sparse_gemv(x, qw, s, z, t, bits=bits, group_size=g, shape=SplitKShape(16, 32, 4, 2, programs=8, swap=m == 3))
    want = truth(x, q, s, z, g, t)
    if dtype == torch.float32:
        err, scale = (y.double().cpu() - want).abs().max().item(), want.abs().max().item()
        assert err <= 1e-5 * scale, f"max error {err} > 1e-5 x {scale}"
    else:
        check(y, want, dtype)


@pytest.mark.parametrize("swap", [True, False])
def test_splitk_fused_parts(device, poison, swap):
    """Up to three parts along N with their own thresholds (per part scalar, then per part and channel)."""
    k, g, m = 128, 32, 4
    splits = [40, 16, 24]  # not multiples of the block
    q, qw, s, z = make_layer(k, sum(splits), g, 4, torch.float16, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)).half().to(device)
    shape = SplitKShape(16, 32, 4, 2, programs=20, swap=swap)
    for th in (torch.tensor([0.2, 0.9, 1.6], device=device), torch.rand(3, k, device=device)):
        y = gemv.sparse_gemv_fused(x, qw, s, z, th, splits, bits=4, group_size=g, shape=shape)
        want = reference.sparse_gemv_fused_ref(x.cpu(), qw.cpu(), s.cpu(), z.cpu(), th.cpu(), splits, bits=4, group_size=g)
        check(y, want.double(), torch.float16)


def test_splitk_deterministic_reduction_is_bit_reproducible(device, poison):
    """Under torch.use_deterministic_algorithms(True) the partials go to ordered slots: three calls give the same
    bits, within rounding of the atomic reduction's values."""
    k, n, g, m = 256, 72, 64, 6
    q, qw, s, z = make_layer(k, n, g, 4, torch.bfloat16, device, seed=5)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16).to(device)
    t = threshold_for(x, 0.3)
    shape = SplitKShape(32, 32, 4, 2, programs=16)
    tiles = math.ceil(n / shape.block_n)
    assert math.ceil(k / gemv_splitk_triton.k_range_for(shape, tiles, k)) > 1  # the reduction is exercised
    atomic = gemv.sparse_gemv(x, qw, s, z, t, bits=4, group_size=g, shape=shape)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [gemv.sparse_gemv(x, qw, s, z, t, bits=4, group_size=g, shape=shape) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(was)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    check(runs[0], truth(x, q, s, z, g, t), torch.bfloat16)
    check(atomic, truth(x, q, s, z, g, t), torch.bfloat16)


def test_k_range_for_comes_near_the_wanted_programs():
    shape = SplitKShape(128, 128, programs=528)
    assert gemv_splitk_triton.k_range_for(shape, 224, 8192) == 4096  # 70B gate/up: 224 tiles x 2 = 448 programs
    assert gemv_splitk_triton.k_range_for(shape, 32, 4096) == 256  # 8B q/o: 32 x 16 = 512
    assert gemv_splitk_triton.k_range_for(shape, 8, 4096) == 128  # 8B k/v: one step per program
    assert gemv_splitk_triton.k_range_for(shape, 1000, 4096) == 4096  # more tiles than wanted programs: no split


def test_splitk_shapes_in_tables_and_dispatch():
    """A split-K rule is data like the others: parsed, round-tripped, its K-step fitted to the group size, and a
    group that no K-step of >= 16 rows divides takes the reference."""
    shape = dispatch.shape_from_dict({"kernel": "splitk", "block_n": 256, "block_k": 128, "warps": 8, "stages": 3})
    assert shape == SplitKShape(256, 128, 8, 3)
    assert dispatch.shape_from_dict(dispatch.shape_to_dict(shape)) == shape
    with pytest.raises(ValueError, match="unknown splitk launch parameters"):
        dispatch.shape_from_dict({"kernel": "splitk", "k_range": 128})
    assert dispatch.fit_k_range(shape, 64).block_k == 64
    assert dispatch.fit_k_range(shape, 576).block_k == 64
    assert dispatch.fits(dispatch.fit_k_range(shape, 576), 4, 576 * 4, 4, 576)
    assert not dispatch.fits(dispatch.fit_k_range(shape, 8), 4, 64, 4, 8)


def test_splitk_group_smaller_than_16_uses_the_reference(device, poison):
    q, qw, s, z = make_layer(64, 16, 8, 4, torch.float16, device, seed=1)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)).half().to(device)
    y = gemv.sparse_gemv(x, qw, s, z, 0.3, bits=4, group_size=8, shape=SplitKShape(16, 16, 4, 2))
    check(y, truth(x, q, s, z, 8, 0.3), torch.float16)
