"""The SiLU form of the sparse GEMV (``kernels.sparse_gemv_silu``: the down projection reads gate and up and computes
silu(gate) * up where it loads x) against the two launches it replaces and against float64 / pure-torch truth.

Every x-loading path of the three families runs (the threshold + compaction pass, the in-place row loads, the
preloaded x, several K-ranges per program, the h2 pairs at batch 2-4, the split-K x tiles, the tensor-core kernel),
at batch 1-4 (CUDA cores), 2-16 (split-K) and 1, 5 (tensor cores), with a python-float, a 0-dim and a per-channel
threshold, NaN in gate and in up (dropped: |NaN| > t is False).

Bounds:
- bit-equal to ``sparse_gemv(kernels.silu_mul(gate, up))`` with the same launch shape under deterministic reductions
  (the SiLU form rounds as silu_mul rounds; this is what keeps decoding bit-identical);
- within 4 ulps of the output dtype at max|truth| of float64 truth on silu_mul's output (as test_triton_kernels.py);
- within the same bound of the pure-torch reference (torch's F.silu(gate) * up, then sparse_gemv_ref): entries of
  silu(gate) * up within 2 % of the threshold are zeroed in the inputs (up = 0), so torch's rounding and the Triton
  interpreter's truncating bf16 casts (docs/kernels.md) take the same threshold decisions.
"""

import math

import pytest
import torch
from _kernel_helpers import ON_GPU, make_layer, tol, truth

from teal_quant import kernels
from teal_quant.kernels import reference

pytest.importorskip("triton")
from teal_quant.kernels import gemv_launch as gemv  # noqa: E402
from teal_quant.kernels.dispatch import CoreShape, MmaShape, SplitKShape, fits  # noqa: E402

CASES = [  # (launch shape or None for the table's pick, batch): every place a family loads x
    (None, 1),
    (CoreShape(vec=1, warps=2, rows=2, k_range=32, f16=False), 1),  # compacted, fp32-exponent unpack
    (CoreShape(vec=1, warps=2, rows=2, k_range=32, h2=True), 1),  # compacted, h2
    (CoreShape(vec=1, warps=2, rows=4, k_range=32, pipe=True, h2=True, evict_first=True), 1),  # the 8B down pick
    (CoreShape(vec=2, warps=2, rows=2, k_range=64, dense=60, h2=True), 1),  # in place or compacted, per K-range
    (CoreShape(vec=1, warps=2, rows=2, k_range=32, dense=100, h2=True), 1),  # in place, x from the scratch list
    (CoreShape(vec=1, warps=2, rows=4, k_range=32, dense=100), 1),  # the same with the fp16-pair unpack into fp32
    (CoreShape(vec=1, warps=2, rows=4, k_range=32, preload=1), 1),  # x preloaded after the rows
    (CoreShape(vec=1, warps=2, rows=4, k_range=32, preload=2, lookahead=2, h2=True), 1),  # x before predicated rows
    (CoreShape(vec=1, warps=2, rows=2, k_range=32, groups=2), 1),  # several K-ranges per program
    (CoreShape(vec=1, warps=2, rows=2, k_range=32, groups=2, h2=True), 2),  # ... with the per-row pairs (max |x| pass)
    (CoreShape(vec=1, warps=1, rows=4, k_range=32, dense=100, h2=True), 2),  # in place, pairs from the scratch list
    (CoreShape(vec=1, warps=2, rows=2, k_range=32, dense=100), 3),  # in place, x per row (_row_x at M_P > 1)
    (CoreShape(vec=1, warps=1, rows=8, k_range=32, dense=100, h2=True, loads_first=True), 4),  # 8B down, batch 3-4
    # the 8B down pick at batch 1 (round 16): all row loads of a step first, the compacted list in registers
    (CoreShape(vec=1, warps=2, rows=8, k_range=32, pipe=True, h2=True, evict_first=True, loads_first=True, shfl=True), 1),
    (SplitKShape(32, 32, 4, 2, programs=8), 2),
    (SplitKShape(32, 32, 4, 2, programs=8, sum_dot=True), 4),
    (SplitKShape(32, 64, 4, 3, programs=4, swap=False), 8),
    (SplitKShape(16, 16, 4, 2, programs=100, skip=True), 16),
    (MmaShape(32, 16, 4, 32), 1),
    (MmaShape(32, 16, 4, 32, swap=True, tiles=2), 5),
]
if ON_GPU:  # the H200 table's picks for the 8B / 70B down projections at batch 1, 4, 16 (the table itself: None)
    CASES += [(None, m) for m in (2, 3, 4, 8, 16)]
    CASES += [(CoreShape(vec=4, warps=4, rows=4, k_range=128, dense=85, h2=True, evict_first=True), 1),
              (CoreShape(vec=4, warps=4, rows=4, k_range=128, dense=85, h2=True, evict_first=True, shfl=True), 1),
              (CoreShape(vec=2, warps=4, rows=4, k_range=128, pipe=True, h2=True, evict_first=True, shfl=True), 1),
              (CoreShape(vec=2, warps=4, rows=8, k_range=128, pipe=True, h2=True, evict_first=True, loads_first=True,
                         shfl=True), 1),
              # most K-ranges in place at these thresholds (x from the scratch list there), the rest from the lanes
              (CoreShape(vec=2, warps=4, rows=4, k_range=128, dense=60, h2=True, shfl=True), 1),
              (SplitKShape(64, 128, 4, 4, programs=1056, prefetch=False), 16),
              (SplitKShape(64, 128, 4, 5), 8)]


def case_id(c):
    shape, m = c
    if shape is None:
        return f"table-m{m}"
    return f"{shape.kernel}-" + "-".join(f"{k[:2]}{int(v)}" for k, v in vars(shape).items()) + f"-m{m}"


def inputs(m, k, dtype, device, seed, threshold):
    """gate, up: the two halves of one [m, 2k] tensor (the fused gate/up output: row stride 2k), NaN in each (and
    silu(-inf) = NaN), up = 0 where silu(gate) * up lies within 2 % of the threshold (see the module docstring)."""
    gu = (torch.randn(m, 2 * k, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)
    gate, up = gu[:, :k], gu[:, k:]
    a = torch.nn.functional.silu(gate.double()) * up.double()
    t = threshold.double().cpu() if isinstance(threshold, torch.Tensor) else torch.tensor(float(threshold)).double()
    up[(a.abs() - t).abs() <= 0.02 * t + 1e-6] = 0
    gate[0, 3] = math.nan
    up[m - 1, 7] = math.nan
    if m > 1:
        gate[1, 9] = -math.inf
    gu = gu.to(device)
    return gu[:, :k], gu[:, k:]


def deterministic(fn):
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return fn()
    finally:
        torch.use_deterministic_algorithms(was)


def close(y, want, dtype, what):
    assert y.dtype == dtype and torch.isfinite(y).all(), what
    scale = want.abs().max().item()
    err = (y.double().cpu() - want).abs().max().item()
    assert err <= tol(dtype, scale), f"{what}: max error {err} > {tol(dtype, scale)} (max |y| {scale})"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_silu_gemv_equals_silu_mul_then_gemv(device, poison, monkeypatch, case):
    """Every family's SILU path (split-K's too, which gemv_launch.SILU_FAMILIES leaves out by default)."""
    shape, m = case
    monkeypatch.setattr(gemv, "SILU_FAMILIES", frozenset({"core", "mma", "splitk"}))
    k, n, g = (128, 72, 64) if not ON_GPU else (1024, 3000, 128)
    dtype = torch.bfloat16 if m != 8 else torch.float16
    if shape is not None:
        assert fits(shape, m, k, 4, g)  # the family itself takes the call, not a fallback
    q, qw, s, z = make_layer(k, n, g, 4, dtype, device, seed=k + m)
    thresholds = (0.6, torch.tensor(0.3, device=device), torch.linspace(0.05, 1.5, k, device=device))
    for seed, th in enumerate(thresholds):
        gate, up = inputs(m, k, dtype, device, seed, th)
        y = deterministic(lambda: gemv.sparse_gemv_silu(gate, up, qw, s, z, th, bits=4, group_size=g, shape=shape))
        a = kernels.silu_mul(gate, up)
        two = deterministic(lambda: gemv.sparse_gemv(a, qw, s, z, th, bits=4, group_size=g, shape=shape))
        assert torch.equal(y, two), f"threshold {seed}: not bit-equal to silu_mul then the GEMV"
        close(y, truth(a, q, s, z, g, th), dtype, f"threshold {seed} vs float64")
        ref = reference.sparse_gemv_silu_ref(gate.cpu(), up.cpu(), qw.cpu(), s.cpu(), z.cpu(),
                                             th.cpu() if isinstance(th, torch.Tensor) else th, bits=4, group_size=g)
        close(y, ref.double(), dtype, f"threshold {seed} vs the pure-torch reference")
        if seed == 1:  # the atomic split-K reduction: same values within rounding, workspace left zero
            close(gemv.sparse_gemv_silu(gate, up, qw, s, z, th, bits=4, group_size=g, shape=shape),
                  truth(a, q, s, z, g, th), dtype, "atomic reduction")


def test_silu_gemv_fallbacks(device, poison, monkeypatch):
    """Up with another row stride than gate (two launches), a group below 16 rows (the reference after silu_mul),
    a family outside gemv_launch.SILU_FAMILIES (silu_mul first), all inputs inactive (exact zeros): the same bits as
    silu_mul then the GEMV."""
    k, n, g = 64, 16, 32
    q, qw, s, z = make_layer(k, n, g, 4, torch.float16, device, seed=2)
    gate, up = inputs(3, k, torch.float16, device, 4, 0.4)
    up = up.contiguous()  # row stride k, gate's 2k
    y = deterministic(lambda: kernels.sparse_gemv_silu(gate, up, qw, s, z, 0.4, bits=4, group_size=g))
    two = deterministic(lambda: kernels.sparse_gemv(kernels.silu_mul(gate, up), qw, s, z, 0.4, bits=4, group_size=g))
    assert torch.equal(y, two)
    q8, qw8, s8, z8 = make_layer(k, n, 8, 4, torch.float16, device, seed=3)
    y = kernels.sparse_gemv_silu(gate, up, qw8, s8, z8, 0.4, bits=4, group_size=8)
    assert torch.equal(y, kernels.sparse_gemv(kernels.silu_mul(gate, up), qw8, s8, z8, 0.4, bits=4, group_size=8))
    y = kernels.sparse_gemv_silu(gate, up, qw, s, z, math.inf, bits=4, group_size=g)
    assert torch.equal(y, torch.zeros_like(y))
    with pytest.raises(ValueError, match="up must be like gate"):
        kernels.sparse_gemv_silu(gate, up[:, :-8], qw, s, z, 0.4, bits=4, group_size=g)
    splitk = SplitKShape(16, 16, 4, 2, programs=8)
    monkeypatch.setattr(gemv, "SILU_FAMILIES", frozenset({"core", "mma"}))
    y = deterministic(lambda: gemv.sparse_gemv_silu(gate, up, qw, s, z, 0.4, bits=4, group_size=g, shape=splitk))
    a = kernels.silu_mul(gate, up)
    assert torch.equal(y, deterministic(lambda: gemv.sparse_gemv(a, qw, s, z, 0.4, bits=4, group_size=g, shape=splitk)))


def test_silu_gemv_custom_op_and_fake(device):
    """``teal_quant::sparse_gemv_silu``: the op's schema, its fake (torch.compile / FakeTensor shapes) and the real
    kernel agree (torch.library.opcheck), and the op called directly gives the public function's bits."""
    k, n, g = 64, 16, 32
    q, qw, s, z = make_layer(k, n, g, 4, torch.bfloat16, device, seed=5)
    gate, up = inputs(1, k, torch.bfloat16, device, 6, 0.3)
    t = torch.tensor(0.3, device=device)
    y = kernels.sparse_gemv_silu(gate, up, qw, s, z, t, bits=4, group_size=g)
    assert torch.equal(torch.ops.teal_quant.sparse_gemv_silu(gate, up, qw, s, z, t, 0.0, 4, g), y)
    torch.library.opcheck(torch.ops.teal_quant.sparse_gemv_silu.default, (gate, up, qw, s, z, t, 0.0, 4, g),
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fg = torch.empty(3, k, dtype=torch.bfloat16, device=device)
        fq = torch.empty(k, n // 8, dtype=torch.int32, device=device)
        fs = torch.empty(k // g, n, dtype=torch.bfloat16, device=device)
        out = torch.ops.teal_quant.sparse_gemv_silu(fg, fg, fq, fs, fs, None, 0.4, 4, g)
        assert out.shape == (3, n) and out.dtype == torch.bfloat16


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs and compile need a GPU")
def test_silu_gemv_in_cuda_graph_and_compile(device):
    """Captured once, replayed with new thresholds (read on the device) and new gate / up values; and through
    torch.compile(fullgraph=True)."""
    k, n, g = 1024, 512, 128
    q, qw, s, z = make_layer(k, n, g, 4, torch.bfloat16, device)
    gu = torch.zeros(1, 2 * k, dtype=torch.bfloat16, device=device)
    t = torch.tensor(0.5, device=device)
    kernels.sparse_gemv_silu(gu[:, :k], gu[:, k:], qw, s, z, t, bits=4, group_size=g)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernels.sparse_gemv_silu(gu[:, :k], gu[:, k:], qw, s, z, t, bits=4, group_size=g)
    for seed, value in enumerate((0.0, 0.5, 1.2, 100.0)):
        gu.copy_(torch.randn(1, 2 * k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16) * 2)
        t.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        close(y, truth(kernels.silu_mul(gu[:, :k], gu[:, k:]), q, s, z, g, value), torch.bfloat16, f"replay {value}")
    compiled = torch.compile(lambda a, b, th: kernels.sparse_gemv_silu(a, b, qw, s, z, th, bits=4, group_size=g),
                             fullgraph=True)
    t.fill_(0.8)
    close(compiled(gu[:, :k], gu[:, k:], t), truth(kernels.silu_mul(gu[:, :k], gu[:, k:]), q, s, z, g, 0.8),
          torch.bfloat16, "compiled")
