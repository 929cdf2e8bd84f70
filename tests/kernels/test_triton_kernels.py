"""Triton kernels (GPU, or the CPU interpreter under TRITON_INTERPRET=1) against the reference and float64 truth.

Tolerance: |y - truth| <= 4 ulps of the output dtype at max|truth| (fp32 accumulation in a different order on
each side, then one rounding to fp16/bf16). Every buffer the launchers allocate is filled with garbage first
(``poison``), so an element the kernels forget to write fails.
"""

import math

import pytest
import torch
from _kernel_helpers import ON_GPU, make_layer, threshold_for, tol, truth
from teal_quant.kernels import reference

from teal_quant import kernels

pytest.importorskip("triton")
from teal_quant.kernels import gemv_launch as gemv  # noqa: E402
from teal_quant.kernels import gemv_triton  # noqa: E402
from teal_quant.kernels.dispatch import CoreShape, MmaShape, fits  # noqa: E402

# (K, N, group_size): N a multiple of 8 but not of the block, per-channel, several group sizes
SHAPES = [(256, 72, 64), (128, 40, 128), (192, 24, 32)]
if ON_GPU:
    SHAPES += [(4096, 1048, 128), (2048, 3000 - 3000 % 8, 2048), (1024, 4096, 64)]


def check(y, want, dtype, exact_zero=False):
    assert y.dtype == dtype and torch.isfinite(y).all()
    if exact_zero:
        assert torch.equal(y, torch.zeros_like(y))
    scale = want.abs().max().item()
    err = (y.double().cpu() - want).abs().max().item()
    assert err <= tol(dtype, scale), f"max error {err} > {tol(dtype, scale)} (max |y| {scale})"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K%d-N%d-G%d" % s)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_sparse_gemv(device, poison, shape, bits, m, dtype, sparsity):
    k, n, g = shape
    q, qw, s, z = make_layer(k, n, g, bits, dtype, device, seed=k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(device)
    t = threshold_for(x, sparsity)
    y = gemv.sparse_gemv(x, qw, s, z, t, bits=bits, group_size=g)
    want = truth(x, q, s, z, g, t)
    check(y, want, dtype, exact_zero=sparsity == 1.0)
    ref = reference.sparse_gemv_ref(x, qw, s, z, t, bits=bits, group_size=g)
    check(y, ref.double().cpu(), dtype)


@pytest.mark.parametrize("shape", SHAPES[:1] + SHAPES[3:], ids=lambda s: "K%d-N%d-G%d" % s)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 8])
def test_float32_inputs_keep_float32_precision(device, poison, shape, bits, m):
    """fp32 x (M = 1: the CUDA-core kernel; M = 8: the tensor-core kernel, also prefill of short prompts) within
    1e-5 of max|truth|: Triton's default fp32 tl.dot on NVIDIA rounds operands to TF32 (~5e-4 relative), which
    fails this bound, and flipped threshold decisions downstream in a real model (SmolLM2, level 0.4)."""
    k, n, g = shape
    q, qw, s, z = make_layer(k, n, g, bits, torch.float32, device, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7)).to(device)
    t = threshold_for(x, 0.5)
    y = gemv.sparse_gemv(x, qw, s, z, t, bits=bits, group_size=g)
    want = truth(x, q, s, z, g, t)
    assert y.dtype == torch.float32
    err, scale = (y.double().cpu() - want).abs().max().item(), want.abs().max().item()
    assert err <= 1e-5 * scale, f"max error {err} > 1e-5 x {scale}"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 3])
def test_threshold_forms_and_nan(device, poison, bits, m):
    k, n, g = 256, 48, 64
    q, qw, s, z = make_layer(k, n, g, bits, torch.bfloat16, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    x[0, 3] = math.nan
    x[m - 1, 100] = math.nan
    x[0, 10] = -math.nan
    x = x.to(device)
    per_channel = (torch.rand(k, generator=torch.Generator().manual_seed(6)) * 1.5).to(device)
    for t in (0.7, torch.tensor(0.7, device=device), torch.full((k,), 0.7, device=device), per_channel):
        y = gemv.sparse_gemv(x, qw, s, z, t, bits=bits, group_size=g)
        check(y, truth(x, q, s, z, g, t), torch.bfloat16)


def test_all_nan_and_all_inactive_give_zeros(device, poison):
    q, qw, s, z = make_layer(128, 16, 64, 4, torch.float16, device)
    x = torch.full((1, 128), math.nan, dtype=torch.float16, device=device)
    assert torch.equal(gemv.sparse_gemv(x, qw, s, z, 0.0, bits=4, group_size=64), torch.zeros(1, 16, dtype=torch.float16, device=device))
    x = torch.full((2, 128), 0.5, dtype=torch.float16, device=device)
    assert torch.equal(gemv.sparse_gemv(x, qw, s, z, 0.5, bits=4, group_size=64), torch.zeros(2, 16, dtype=torch.float16, device=device))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 2])
def test_fused_parts(device, poison, bits, m):
    k, g = 128, 32
    splits = [40, 16, 24]  # not multiples of the block
    q, qw, s, z = make_layer(k, sum(splits), g, bits, torch.float16, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)).half().to(device)
    th = torch.tensor([0.2, 0.9, 1.6], device=device)
    y = gemv.sparse_gemv_fused(x, qw, s, z, th, splits, bits=bits, group_size=g)
    want = reference.sparse_gemv_fused_ref(x.cpu(), qw.cpu(), s.cpu(), z.cpu(), th.cpu(), splits, bits=bits, group_size=g)
    check(y, want.double(), torch.float16)
    per_channel = torch.rand(3, k, device=device)
    y = gemv.sparse_gemv_fused(x, qw, s, z, per_channel, splits, bits=bits, group_size=g)
    want = reference.sparse_gemv_fused_ref(x.cpu(), qw.cpu(), s.cpu(), z.cpu(), per_channel.cpu(), splits, bits=bits, group_size=g)
    check(y, want.double(), torch.float16)


@pytest.mark.parametrize("m", [1, 5, 40])
def test_dense_gemm(device, poison, m):
    q, qw, s, z = make_layer(128, 48, 64, 4, torch.bfloat16, device)
    x = torch.randn(2, m, 128, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).to(device)
    y = kernels.dense_gemm(x, qw, s, z, bits=4, group_size=64) if ON_GPU else __import__(
        "teal_quant.kernels.gemm_triton", fromlist=["x"]).dense_gemm(x, qw, s, z, bits=4, group_size=64)
    assert y.shape == (2, m, 48)
    want = truth(x.reshape(-1, 128), q, s, z, 64, -1.0).reshape(2, m, 48)
    check(y, want, torch.bfloat16)


def test_public_dispatch_and_custom_op(device):
    q, qw, s, z = make_layer(128, 32, 64, 4, torch.float16, device)
    x = torch.randn(1, 128, device=device).half()
    y = kernels.sparse_gemv(x, qw, s, z, torch.tensor(0.4, device=device), bits=4, group_size=64)
    check(y, truth(x, q, s, z, 64, 0.4), torch.float16)
    y2 = torch.ops.teal_quant.sparse_gemv(x, qw, s, z, None, 0.4, 4, 64)
    check(y2, truth(x, q, s, z, 64, 0.4), torch.float16)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fx = torch.empty(3, 128, dtype=torch.float16, device=device)
        fq = torch.empty(128, 4, dtype=torch.int32, device=device)
        fs = torch.empty(2, 32, dtype=torch.float16, device=device)
        out = torch.ops.teal_quant.sparse_gemv(fx, fq, fs, fs, None, 0.4, 4, 64)
        assert out.shape == (3, 32) and out.dtype == torch.float16


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs and compile cache need a GPU")
def test_cuda_graph_replay_with_new_threshold(device):
    q, qw, s, z = make_layer(1024, 512, 128, 4, torch.bfloat16, device)
    x = torch.randn(1, 1024, device=device).to(torch.bfloat16)
    t = torch.tensor(0.5, device=device)
    kernels.sparse_gemv(x, qw, s, z, t, bits=4, group_size=128)  # compile outside the capture
    n_compiled = len(str(gemv_triton._sgemv_kernel.device_caches))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernels.sparse_gemv(x, qw, s, z, t, bits=4, group_size=128)
    for value in (0.0, 0.5, 1.2, 100.0):
        t.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        check(y, truth(x, q, s, z, 128, value), torch.bfloat16, exact_zero=value == 100.0)
    assert len(str(gemv_triton._sgemv_kernel.device_caches)) == n_compiled  # no recompile on a new value
    compiled = torch.compile(lambda a, th: kernels.sparse_gemv(a, qw, s, z, th, bits=4, group_size=128), fullgraph=True)
    t.fill_(0.8)
    check(compiled(x, t), truth(x, q, s, z, 128, 0.8), torch.bfloat16)


@pytest.mark.parametrize("cfg", [(1, 1, 1, 16, 0, 0, 1), (2, 2, 3, 32, 0, 1, 1), (4, 4, 2, 64, 0, 0, 1), (1, 4, 1, 128, 0, 1, 1),
                                 (2, 2, 4, 32, 1, 0, 1), (1, 2, 8, 32, 0, 0, 1),
                                 (2, 2, 2, 32, 0, 0, 3), (1, 4, 8, 16, 0, 1, 4)],  # pipelined: unmasked / masked slots
                         ids=lambda c: "v%dw%dr%dkr%dpipe%devict%dstages%d" % c)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 3])
def test_core_kernel_shapes(device, poison, cfg, bits, m):
    """Launch shapes of the CUDA-core kernel (vec, warps, rows, k_range, prefetch, evict-first, stages), twice in a
    row: the split-K workspace and counters must be left zero by each call (no memset launch between calls). Stages
    > 1 read whole steps of scratch slots unmasked where k_range allows: the poisoned scratch lists check that the
    compaction wrote every slot."""
    vec, warps, rows, kr, pipe, evict, stages = cfg
    k, n, g = 256, (72 if not ON_GPU else 3000), 128
    if not ON_GPU and kr <= 64:
        k, g = 128, 64  # interpreter (cost ~ K): still >= 2 K-ranges (split-K) and 2 quantization groups, kr <= g
    q, qw, s, z = make_layer(k, n, g, bits, torch.bfloat16, device, seed=7)
    for seed, sp, f16 in ((1, 0.5, True), (2, 0.0, False)):  # both int4 unpacks (fp16 pairs, fp32 exponent trick)
        shape = CoreShape(vec=vec, warps=warps, rows=rows, k_range=kr, f16=f16, pipe=bool(pipe), evict_first=bool(evict),
                          stages=stages)
        assert fits(shape, m, k, bits, g)  # the core kernel, not a fallback, takes every call
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).to(device)
        t = threshold_for(x, sp)
        y = gemv.sparse_gemv(x, qw, s, z, torch.tensor(t, device=device), bits=bits, group_size=g, shape=shape)
        check(y, truth(x, q, s, z, g, t), torch.bfloat16)


GROUP_SHAPES = [  # several K-ranges per program (plain and pipelined loop), and dense (no compaction)
    dict(vec=1, warps=2, rows=2, k_range=32, groups=2), dict(vec=2, warps=2, rows=4, k_range=32, groups=4, evict_first=True),
    dict(vec=1, warps=4, rows=2, k_range=16, groups=8, stages=3), dict(vec=1, warps=2, rows=2, k_range=32, groups=4, stages=4),
    dict(vec=1, warps=2, rows=4, k_range=32, dense=1), dict(vec=2, warps=4, rows=2, k_range=64, dense=60),
    dict(vec=1, warps=2, rows=2, k_range=32, dense=100),
    # round 10: every row of the K-range loaded at the program's start (before x; or after x, inactive rows
    # predicated off), no compaction
    dict(vec=1, warps=2, rows=4, k_range=32, preload=1), dict(vec=2, warps=4, rows=4, k_range=64, preload=2),
    # round 11: row r's FMAs wait for rows r and r + lookahead only
    dict(vec=1, warps=2, rows=4, k_range=32, preload=2, lookahead=3),
    # round 12: every load of a step before its FMAs at any R (pipe over tuples; R = 3 leaves a partial last step)
    dict(vec=1, warps=2, rows=3, k_range=32, pipe=True, loads_first=True)]


@pytest.mark.parametrize("kw", GROUP_SHAPES, ids=lambda d: "-".join(f"{k[:2]}{int(v)}" for k, v in d.items()))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 3])
def test_core_kernel_groups_and_dense(device, poison, kw, bits, m):
    """Several K-ranges per program (``groups``): one row loop over all of them, padded to the longest K-range's
    step count, scales applied per warp at each K-range's end (also K-ranges smaller than a quantization group and
    spans crossing groups), plain and pipelined; ``dense``: rows read in place, inactive ones predicated off. Both
    int4 unpacks, per-channel thresholds with a NaN input (dropped), unaligned N, calls in a row (split-K workspace
    left zero), and a span covering all of K (no split-K)."""
    k, n, g = 256, (72 if not ON_GPU else 3000), 64
    if not ON_GPU and kw.get("groups", 1) * kw["k_range"] <= 64:
        k = 128  # interpreter (cost ~ K), as test_core_kernel_h2: still >= 2 spans (split-K), g 64 spans 2 groups
    q, qw, s, z = make_layer(k, n, g, bits, torch.bfloat16, device, seed=9)
    for seed, sp, f16 in ((1, 0.5, True), (2, 0.0, False), (3, 0.8, True)):
        shape = CoreShape(f16=f16, **kw)
        assert fits(shape, m, k, bits, g)  # the core kernel, not a fallback, takes every call
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
        t = threshold_for(x, sp)
        x[0, 5] = float("nan")
        x = x.to(torch.bfloat16).to(device)
        th = torch.tensor(t, device=device) if seed != 3 else torch.linspace(0.1, 2.0, k, device=device)
        y = gemv.sparse_gemv(x, qw, s, z, th, bits=bits, group_size=g, shape=shape)
        check(y, truth(x, q, s, z, g, th), torch.bfloat16)
    if kw.get("groups", 1) > 1:
        y = gemv.sparse_gemv(x, qw, s, z, th, bits=bits, group_size=g, shape=CoreShape(**{**kw, "groups": k // kw["k_range"]}))
        check(y, truth(x, q, s, z, g, th), torch.bfloat16)


H2_SHAPES = [  # fp16-pair accumulation: plain compacted loop, R = 4 (loads first), in place always / by the switch
    dict(vec=1, warps=2, rows=2, k_range=32), dict(vec=2, warps=2, rows=4, k_range=32, evict_first=True),
    dict(vec=1, warps=2, rows=2, k_range=32, dense=100), dict(vec=1, warps=2, rows=4, k_range=64, dense=60),
    # round 8: several K-ranges per program (one power of two per span, fp16 pairs folded into fp32 per K-range),
    # plain and pipelined, a span covering all of K; the next step's slots loaded ahead (pipe); triton's pipeliner
    dict(vec=1, warps=2, rows=2, k_range=32, groups=2), dict(vec=2, warps=2, rows=4, k_range=32, groups=4, stages=2),
    dict(vec=1, warps=2, rows=4, k_range=32, groups=8), dict(vec=1, warps=2, rows=4, k_range=32, pipe=True),
    dict(vec=1, warps=2, rows=2, k_range=32, stages=2),
    # round 10: rows preloaded at the program's start (1: before x, inactive rows read too; 2: after x, predicated)
    dict(vec=1, warps=2, rows=4, k_range=32, preload=1), dict(vec=2, warps=1, rows=4, k_range=64, preload=2),
    # round 11: lookahead (row r's FMAs wait for rows r and r + lookahead only; 64: each row for itself)
    dict(vec=2, warps=2, rows=4, k_range=32, preload=2, lookahead=64), dict(vec=1, warps=2, rows=4, k_range=32, preload=1, lookahead=2),
    # round 12: loads_first at R = 8 (the first FMA of a step waits for all its loads), both loops of the switch
    dict(vec=1, warps=2, rows=8, k_range=32, dense=60, loads_first=True)]
if ON_GPU:  # round 14: the compacted list in registers (inline PTX; the interpreter takes the scratch list instead):
    # h2 R = 4, the in-place switch, pipe, loads_first at R = 8, one warp (its 32 lanes hold all 32 slots)
    H2_SHAPES += [dict(vec=1, warps=2, rows=4, k_range=64, shfl=True),
                  dict(vec=2, warps=2, rows=4, k_range=64, dense=60, shfl=True),
                  dict(vec=1, warps=2, rows=4, k_range=32, pipe=True, shfl=True),
                  dict(vec=1, warps=2, rows=8, k_range=64, loads_first=True, shfl=True),
                  dict(vec=1, warps=1, rows=4, k_range=32, shfl=True)]


# On the GPU every shape with both x dtypes at batch 1-4; the interpreter (CI) takes one dtype per shape, alternating
# along the list, and batch 1 and 3 (3 pads to 4 rows), since each interpreted call costs seconds: batch 2 and 4 of
# the h2 path run there in test_core_kernel_h2_scale_per_batch_row; and K 128 instead of 256 where a program's span
# (groups x k_range) is at most 64, i.e. every shape but the two with 4 and 8 K-ranges per program (cost ~ K); the same
# for test_core_kernel_h2_scale_per_batch_row at K 64, group 32 where the span is 32.
H2_DTYPES = (torch.float16, torch.bfloat16)
H2_CASES = ([(kw, dt) for kw in H2_SHAPES for dt in H2_DTYPES] if ON_GPU
            else [(kw, H2_DTYPES[i % 2]) for i, kw in enumerate(H2_SHAPES)])
H2_BITS_AND_BATCH = ((4, 1), (8, 1), (4, 2), (4, 3), (4, 4)) if ON_GPU else ((4, 1), (8, 1), (4, 3))


@pytest.mark.parametrize("kw,dtype", H2_CASES, ids=lambda c: "-".join(f"{k[:2]}{int(v)}" for k, v in c.items())
                         if isinstance(c, dict) else str(c).removeprefix("torch."))
def test_core_kernel_h2(device, poison, kw, dtype):
    """``h2``: products summed in fp16 pairs with x scaled by a power of two per K-range (and batch row), against
    float64 truth within 4 bf16 ulps of max |truth| (the fp16 sums round where the fp32 ones do not): x of norm 1,
    1e4 with an outlier of 3e7 (fp16 overflows without the scale; fp16 x: 1e2 and 5e2) and 1e-5 (fp16 subnormals
    without it), with a NaN input, a python-float, a 0-dim and a per-channel threshold; twice in a row (split-K
    workspace left zero). Batch 1-4 (batch 2-4: the unpack shared by the rows, x paired before the loop; the
    interpreter runs a subset, H2_CASES); bits 8 takes the unpack into fp32 instead (same results)."""
    k, n, g = 256, (72 if not ON_GPU else 3000), 64
    if not ON_GPU and kw.get("groups", 1) * kw["k_range"] <= 64:
        k = 128  # interpreter: each program costs seconds; K 128 keeps >= 2 K-ranges (split-K), g 64 spans 2 groups
    assert fits(CoreShape(h2=True, **kw), 4, k, 4, g)  # the core kernel, not a fallback, takes every call
    for bits, m in H2_BITS_AND_BATCH:
        q, qw, s, z = make_layer(k, n, g, bits, dtype, device, seed=11)
        big = 1e4 if dtype == torch.bfloat16 else 1e2  # fp16 y would overflow at 1e4
        for seed, sp, scale in ((1, 0.5, 1.0), (2, 0.0, big), (3, 0.8, 1e-5)):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * scale
            t = threshold_for(x, sp)
            x[0, 5] = float("nan")
            if seed == 2:
                x[0, 7] = 3e7 if dtype == torch.bfloat16 else 5e2
            x = x.to(dtype).to(device)
            th = {1: t, 2: torch.tensor(t, device=device), 3: torch.linspace(0.1, 2.0, k, device=device) * scale}[seed]
            # twice at batch 1 (the split-K workspace left zero); the interpreter repeats only the first seed's call
            for _ in range(2 if m == 1 and (ON_GPU or seed == 1) else 1):
                y = gemv.sparse_gemv(x, qw, s, z, th, bits=bits, group_size=g, shape=CoreShape(h2=True, **kw))
                want = truth(x, q, s, z, g, th)
                assert y.dtype == dtype and torch.isfinite(y).all()
                err = (y.double().cpu() - want).abs().max().item()
                assert err <= tol(torch.bfloat16, want.abs().max().item()), (bits, m, seed, err)


H2_BATCH_CASES = [(dict(vec=1, warps=2, rows=2, k_range=32), 4), (dict(vec=1, warps=1, rows=4, k_range=32, dense=100), 4),
                  (dict(vec=2, warps=2, rows=4, k_range=64, dense=60, evict_first=True), 2),
                  (dict(vec=1, warps=2, rows=2, k_range=32, groups=2), 3),
                  (dict(vec=1, warps=1, rows=4, k_range=32, preload=1), 4),
                  (dict(vec=1, warps=2, rows=4, k_range=32, preload=1, lookahead=5), 3),
                  (dict(vec=1, warps=1, rows=8, k_range=32, dense=100, loads_first=True), 4)]


@pytest.mark.parametrize("kw,m", H2_BATCH_CASES, ids=lambda c: "-".join(f"{k[:2]}{int(v)}" for k, v in c.items())
                         if isinstance(c, dict) else f"m{c}")
def test_core_kernel_h2_scale_per_batch_row(device, poison, kw, m):
    """``h2`` at batch 2-4 scales each batch row by its own power of two: rows of norm 1, 1e-8, 1e4 and 1e-3 (bf16 x)
    each within 4 bf16 ulps of that row's own max |truth| (one scale for all rows would put the 1e-8 row below
    fp16's subnormals); fused parts with per-part scalar and per-channel thresholds; the deterministic reduction
    (two calls bit-equal)."""
    k, g, splits = 128, 64, [40, 16, 24]
    if not ON_GPU and kw.get("groups", 1) * kw["k_range"] <= 32:
        k, g = 64, 32  # interpreter (cost ~ K): still 2 K-ranges (split-K) and 2 quantization groups
    assert fits(CoreShape(h2=True, **kw), m, k, 4, g)  # the core kernel, not a fallback, takes every call
    q, qw, s, z = make_layer(k, sum(splits), g, 4, torch.bfloat16, device, seed=13)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4))
    x *= torch.tensor([1.0, 1e-8, 1e4, 1e-3])[:m, None]
    x[m - 1, 9] = float("nan")
    x = x.to(torch.bfloat16).to(device)
    y = gemv.sparse_gemv(x, qw, s, z, 0.0, bits=4, group_size=g, shape=CoreShape(h2=True, **kw))
    want = truth(x, q, s, z, g, 0.0)
    for r in range(m):
        err = (y[r].double().cpu() - want[r]).abs().max().item()
        assert err <= 4 * 2**-7 * want[r].abs().max().item(), (r, err)
    for th in (torch.tensor([0.0, 1e-9, 0.5], device=device), torch.rand(3, k, device=device) * 1e-3):
        y = gemv.sparse_gemv_fused(x, qw, s, z, th, splits, bits=4, group_size=g, shape=CoreShape(h2=True, **kw))
        ends = [0, 40, 56, 80]
        want = torch.cat([truth(x, q[:, a:b], s[:, a:b], z[:, a:b], g, th[p]) for p, (a, b) in enumerate(zip(ends, ends[1:]))], 1)
        for r in range(m):
            err = (y[r].double().cpu() - want[r]).abs().max().item()
            assert err <= 4 * 2**-7 * max(want[r].abs().max().item(), 1e-30), (r, err)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [gemv.sparse_gemv(x, qw, s, z, 0.0, bits=4, group_size=g, shape=CoreShape(h2=True, **kw)) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(runs[0], runs[1])
    want = truth(x, q, s, z, g, 0.0)
    for r in range(m):
        assert (runs[0][r].double().cpu() - want[r]).abs().max().item() <= 4 * 2**-7 * want[r].abs().max().item()


MMA_SHAPES = [  # (launch shape, x dtype): each shape once, both dtypes across the list
    (MmaShape(32, 16, 4, 32), torch.float16), (MmaShape(64, 32, 4, 64), torch.bfloat16),
    (MmaShape(128, 16, 2, 128, stages=2), torch.bfloat16), (MmaShape(32, 16, 4, 32, swap=True), torch.float16),
    (MmaShape(32, 16, 4, 64, tiles=3), torch.bfloat16), (MmaShape(64, 32, 4, 32, swap=True, tiles=2), torch.bfloat16)]
if ON_GPU:
    MMA_SHAPES += [(MmaShape(256, 64, 4, 128, maxnreg=128), dt) for dt in (torch.float16, torch.bfloat16)]
    MMA_SHAPES += [(MmaShape(256, 64, 4, 128, swap=True), torch.bfloat16), (MmaShape(128, 64, 4, 128, swap=True, tiles=4), torch.float16),
                   (MmaShape(128, 32, 4, 64, swap=True), torch.bfloat16), (MmaShape(512, 32, 8, 128, swap=True), torch.float16)]


@pytest.mark.parametrize("case", MMA_SHAPES, ids=lambda c: "n%dk%dw%dkr%ds%dr%d%s%s-%s" % (
    c[0].block_n, c[0].block_k, c[0].warps, c[0].k_range, c[0].stages, c[0].maxnreg, "-swap" if c[0].swap else "",
    f"-t{c[0].tiles}", str(c[1])[6:]))
@pytest.mark.parametrize("m", [2, 16])
def test_mma_kernel_shapes(device, poison, case, m):
    """Launch shapes of the tensor-core kernel (block_n, block_k, warps, k_range, stages, maxnreg, swap, tiles),
    twice in a row (the split-K workspace must be left zero), unaligned N, per-channel thresholds on the second call."""
    shape, dtype = case
    k, n, g = 256, (72 if not ON_GPU else 3000), 128
    q, qw, s, z = make_layer(k, n, g, 4, dtype, device, seed=11)
    for seed, sp in ((1, 0.5), (2, 0.0)):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)
        t = threshold_for(x, sp)
        th = torch.tensor(t, device=device) if seed == 1 else torch.full((k,), t, device=device)
        y = gemv.sparse_gemv(x, qw, s, z, th, bits=4, group_size=g, shape=shape)
        check(y, truth(x, q, s, z, g, th), dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 5])
def test_mma_kernel_plain_unpack(device, poison, bits, dtype, m):
    """int8 weights and fp32 x take the tensor-core kernel's integer unpack (any M, also M = 1)."""
    k, n, g = 128, 40, 64
    q, qw, s, z = make_layer(k, n, g, bits, dtype, device, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4)).to(dtype).to(device)
    t = threshold_for(x, 0.4)
    y = gemv.sparse_gemv(x, qw, s, z, t, bits=bits, group_size=g, shape=MmaShape(32, 16, 4, 32, swap=m == 5))
    check(y, truth(x, q, s, z, g, t), dtype)


@pytest.mark.parametrize("shape", [CoreShape(vec=1, warps=2, rows=2, k_range=32), MmaShape(32, 16, 4, 32),
                                   MmaShape(32, 16, 4, 32, swap=True, tiles=2),
                                   CoreShape(vec=1, warps=2, rows=2, k_range=32, groups=2),
                                   CoreShape(vec=1, warps=2, rows=2, k_range=32, dense=50)],
                         ids=["core", "mma", "mma-swap", "core-groups", "core-dense"])
def test_deterministic_reduction_is_bit_reproducible(device, poison, shape):
    """torch.use_deterministic_algorithms(True): partials go to ordered workspace slots, so repeated calls give the
    same bits, and the same values (within rounding) as the atomic reduction."""
    k, n, g = 256, 72, 64
    m = 1 if isinstance(shape, CoreShape) else 3
    q, qw, s, z = make_layer(k, n, g, 4, torch.float16, device, seed=5)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(6)).half().to(device)
    t = threshold_for(x, 0.3)
    atomic = gemv.sparse_gemv(x, qw, s, z, t, bits=4, group_size=g, shape=shape)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [gemv.sparse_gemv(x, qw, s, z, t, bits=4, group_size=g, shape=shape) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(was)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    check(runs[0], truth(x, q, s, z, g, t), torch.float16)
    check(atomic, truth(x, q, s, z, g, t), torch.float16)


def test_group_smaller_than_16_uses_the_reference(device, poison):
    q, qw, s, z = make_layer(64, 16, 8, 4, torch.float16, device, seed=1)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(2)).half().to(device)
    check(gemv.sparse_gemv(x, qw, s, z, 0.3, bits=4, group_size=8), truth(x, q, s, z, 8, 0.3), torch.float16)
