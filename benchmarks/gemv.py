"""Decode GEMV benchmark on one GPU: teal_quant's sparse GEMV against tinygemm int4 and cuBLAS bf16, side by side.

    PYTHONPATH=. python benchmarks/gemv.py [--out benchmarks/results --tag gemv_h200 --models 8B,70B --batches 1,2,4,8,16]

``ours`` is kernels.gemv_launch.sparse_gemv with the dispatch of the device's launch-shape table (kernels/configs/<gpu>.json);
``ours_det`` the same under ``torch.use_deterministic_algorithms(True)`` (ordered split-K reduction, no fp32 atomics);
``ours_step`` the call in the form the decode step makes it (STEP_FORM: q/k/v, o_proj, down at batch 1-4).
Baselines: ``cublas_bf16`` (F.linear on the dequantized bf16 weight), ``tinygemm_int4`` (torch._weight_int4pack_mm,
the same int4 values, group 128) and, where it is installed, ``gemlite_int4`` (gemlite's GemLiteLinearTriton, A16W4
with the same codes, bf16 scales and zeros, group 128; its sm_90 autotune cache ``configs/h100.json`` is loaded, and
shapes missing from it are autotuned on their first call). gemlite is no dependency of this project: carry its
wheel to the GPU machine (``pip wheel gemlite==0.6.0.post2 --no-deps``; it needs Triton >= 3.6, numpy and tqdm).

Method: every call is captured in a CUDA graph that cycles through enough copies of the weight to defeat the 60 MB
L2; a replay is timed with CUDA events (median of 15 replays) and divided by the calls in it. Touched bytes: weights
read (ours: only the rows of W^T active for some row of x, plus the scales/zeros of every group with an active row),
plus x and y. TB/s = touched bytes / time. Thresholds are 0-dim device tensors set to the quantile of |x| that gives
the wanted sparsity (x ~ N(0, 1), one draw per batch row: the union over the rows is what a batch reads; the
``union`` column gives its inactive fraction). Weights are generated on the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from decode_glue import graph_us  # noqa: E402  (CUDA-graph timing of back-to-back calls)

from kernels import dispatch  # noqa: E402
from kernels import gemv_launch as gemv  # noqa: E402

# kernels timed back to back without programmatic dependent launch, as tinygemm and cuBLAS are (and as every round
# before it was): PDL's gain belongs to the decode step, where the previous kernel is a norm or attention, not another
# GEMV (benchmarks/decode_pdl.py, docs/kernels.md "Programmatic dependent launch"). The sweeps and probes import this.
dispatch.set_programmatic_launch({})

L2_BYTES = 60 * 2**20
GROUP = 128
SHAPES = {  # name: (N, K) of y = x @ W^T, W^T [K, N]
    "8B": {"q_o": (4096, 4096), "k_v": (1024, 4096), "qkv": (6144, 4096), "gate_up": (14336, 4096), "down": (4096, 14336),
           "gate_up_fused": (28672, 4096)},
    "70B": {"q_o": (8192, 8192), "k_v": (1024, 8192), "qkv": (10240, 8192), "gate_up": (28672, 8192), "down": (8192, 28672),
            "gate_up_fused": (57344, 8192)},
}
# projections timed as one fused call of this many equal parts (kernels.sparse_gemv_fused, one threshold per part):
# the decoder's gate and up projections share their input and run as one launch (teal_quant/runtime/fusion.py)
PARTS = {"gate_up_fused": 2}
SPARSITIES = [0, 25, 40, 50, 60, 70, 90]
DEV = "cuda"
SMOKE = os.environ.get("GEMV_BENCH_SMOKE") == "1"  # a logic check on the CPU under TRITON_INTERPRET=1: tiny shapes, no graphs
if SMOKE:
    DEV = "cpu"
    SHAPES = {"tiny": {"q_o": (512, 256), "down": (256, 512), "gate_up_fused": (1024, 256)}}
SUMMARY_BATCHES, SUMMARY_SPARSITIES = (1, 4, 16), (0, 50, 70)


def time_graph(fn_list, reps_per_graph: int = 40, replays: int = 15) -> float:
    """µs per call: capture reps_per_graph calls (cycling fn_list) in one graph, replay, median (SMOKE: one eager
    call, timed on the host)."""
    if SMOKE:
        import time

        t0 = time.perf_counter()
        fn_list[0]()
        return (time.perf_counter() - t0) * 1e6
    return graph_us(fn_list, reps_per_graph, replays)


def n_copies(bytes_one: int) -> int:
    return max(2, math.ceil(3 * L2_BYTES / bytes_one))


def pack_int4_gpu(q: torch.Tensor) -> torch.Tensor:
    """q [K, N] uint8 0..15 on the GPU -> int32 [K, N // 8] (kernels.reference.pack_int4's layout)."""
    k, n = q.shape
    q32 = q.to(torch.int32).reshape(k, n // 8, 8)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int32)
    return (q32 << shifts).sum(-1, dtype=torch.int32)


def make_layer(n: int, k: int, seed: int = 0):
    """Random int4 codes, scales, zeros on the GPU: (q uint8 [K, N], qweight, scales, zeros)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, device=DEV, dtype=torch.uint8)
    scales = (torch.rand(k // GROUP, n, generator=gen, device=DEV) * 0.01 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // GROUP, n), generator=gen, device=DEV).to(torch.bfloat16)
    return q, pack_int4_gpu(q), scales, zeros


def make_weights(n: int, k: int, bits: int, seed: int = 0):
    """(q uint8 [K, N], qweight, scales, zeros) of a random int4 (make_layer) or int8 layer on the GPU."""
    if bits == 4:
        return make_layer(n, k, seed)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randint(0, 256, (k, n), generator=gen, device=DEV, dtype=torch.uint8)
    scales = (torch.rand(k // GROUP, n, generator=gen, device=DEV) * 1e-4 + 1e-5).to(torch.bfloat16)
    zeros = torch.randint(0, 256, (k // GROUP, n), generator=gen, device=DEV).to(torch.bfloat16)
    return q, q.clone(), scales, zeros


def dequantized(q, scales, zeros) -> torch.Tensor:
    """W [N, K] bf16."""
    s = scales.float().repeat_interleave(GROUP, 0)
    z = zeros.float().repeat_interleave(GROUP, 0)
    return ((q.float() - z) * s).t().contiguous().to(torch.bfloat16)


def make_tinygemm(q, scales, zeros):
    """torch int4 tinygemm operands from our q [K, N], scales/zeros [K/G, N]: tinygemm computes
    (q - 8) * scale + zero_tinygemm, so zero_tinygemm = (8 - z) * scale."""
    w_nk = q.t().contiguous().to(torch.int32)  # [N, K] values 0..15
    packed_u8 = (w_nk[:, ::2] << 4 | w_nk[:, 1::2]).to(torch.uint8)  # [N, K/2]
    w_int4 = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    sz = torch.stack([scales.float(), ((8 - zeros.float()) * scales.float())], dim=-1).to(torch.bfloat16)
    return w_int4, sz.contiguous()


def gemlite_or_reason():
    """(the gemlite module, None) where it imports on CUDA, else (None, why not) for the report."""
    if SMOKE:
        return None, "not measured (needs CUDA)"
    try:
        import gemlite
    except Exception as e:  # noqa: BLE001 - an import that fails for any reason leaves the baseline out, said so
        return None, f"not measured (import gemlite: {type(e).__name__}: {str(e).splitlines()[0][:120]})"
    cache = os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
    if "H200" in torch.cuda.get_device_name() and os.path.isfile(cache):  # gemlite matches caches by device name
        gemlite.load_config(cache)
    return gemlite, None


def make_gemlite(gemlite, q, scales, zeros):
    """gemlite's A16W4 layer on our q [K, N] codes and scales / zeros [K/G, N]: HQQ's (W_q - zeros) * scales with
    W_q [N, K], scales and zeros [N, K/G], the same dequantized weights as ours."""
    k, n = q.shape
    layer = gemlite.GemLiteLinearTriton(4, group_size=GROUP, in_features=k, out_features=n,
                                        input_dtype=gemlite.DType.BF16, output_dtype=gemlite.DType.BF16)
    layer.pack(q.t().contiguous(), scales.t().contiguous(), zeros.t().contiguous(), None)
    return layer


def _gemlite_error(layer, x, want) -> float:
    """max |gemlite(x) - want| / max |want|."""
    return ((layer(x).float() - want).abs().max() / want.abs().max()).item()


def time_gemlite(gemlite, layers, x, w_bf16, log, what: str) -> dict:
    """gemlite's layers on x, timed as time_graph after one call is checked against F.linear on the dequantized
    weight (max error <= 2 % of max |y|): {"us": ...} or {"us": None, "failure": why}. On sm_90 gemlite's batch 1-4
    GEMV adds its split-K partials with native bf16 atomics (its default), whose rounding can exceed that bound
    on K = 4096-8192; then it is timed in its fp32-atomic mode (``set_native_atomic_bfp16(False)``), and the
    default mode's time and error are reported beside it (``us_bf16_atomics``, ``error_bf16_atomics``)."""
    try:
        want = F.linear(x.float(), w_bf16.float())
        fns = [lambda g=g: g(x) for g in layers]
        err = _gemlite_error(layers[0], x, want)
        if err <= 0.02:
            return {"us": time_graph(fns), "error": err}
        row = {"us_bf16_atomics": time_graph(fns), "error_bf16_atomics": err}
        gemlite.set_native_atomic_bfp16(False)
        try:
            err = _gemlite_error(layers[0], x, want)
            if err > 0.02:
                return {**row, "us": None, "failure": f"wrong result (max error {err:.1%} of max |y|)"}
            return {**row, "us": time_graph(fns), "error": err, "mode": "fp32 atomics"}
        finally:
            gemlite.set_native_atomic_bfp16(True)
    except Exception as e:  # noqa: BLE001 - the baseline is reported as failed, the benchmark goes on
        log(f"{what}: gemlite failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return {"us": None, "failure": f"failed ({type(e).__name__})"}


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=DEV).manual_seed(1000 + seed)
    return torch.randn(m, k, generator=gen, device=DEV).to(torch.bfloat16)


def threshold_for(x: torch.Tensor, sparsity: int) -> float:
    return float(torch.quantile(x.float().abs().flatten(), sparsity / 100)) if sparsity > 0 else 0.0


def touched_bytes(x: torch.Tensor, thr: float, n: int) -> tuple[int, float]:
    """Bytes a sparse call must touch and the union sparsity (fraction of rows of W^T no row of x needs)."""
    m, k = x.shape
    active = (x.float().abs() > thr).any(0)
    groups_touched = int(active.view(-1, GROUP).any(1).sum())
    io = m * k * 2 + m * n * 2
    return int(active.sum()) * n // 2 + groups_touched * n * 4 + io, 1 - active.float().mean().item()


def union_block_sparsity(x: torch.Tensor, thr: float, block: int = GROUP) -> float:
    """Fraction of the K-steps of ``block`` rows in which no row of x has an active entry: what the split-K kernel's
    ``skip`` can leave unread (docs/kernels.md round 6)."""
    active = (x.float().abs() > thr).any(0)
    return 1 - active.view(-1, block).any(1).float().mean().item()


def ours_call(x, t, c, proj: str, shape=None):
    """One sparse-GEMV call on weights ``c`` = (qweight, scales, zeros) with the 0-dim threshold tensor ``t``: a fused
    call of PARTS[proj] equal parts (each with threshold t) for the fused projections, else a plain one. ``shape``
    overrides the table's launch shape (sweeps)."""
    parts = PARTS.get(proj, 1)
    if parts == 1:
        return gemv.sparse_gemv(x, c[0], c[1], c[2], t, bits=4, group_size=GROUP, shape=shape)
    n = c[2].shape[1]
    return gemv.sparse_gemv_fused(x, c[0], c[1], c[2], t.reshape(1).repeat(parts), [n // parts] * parts, bits=4,
                                  group_size=GROUP, shape=shape)


# The decode step's form of a call (teal_quant/runtime/decode_step.py): at batch 1-4 the fused q/k/v (three parts, one
# threshold each), o_proj (the q_o shape) and down (its SiLU form: silu(gate) * up made as it loads x) add their sums
# into float32 buffers (``out=``, no split-K tail). Round 17 (docs/kernels.md) found that form reorders launch shapes
# against the plain call, so gemv_sweep.py times it (``--form step``).
STEP_FORM = {"qkv": "parts", "q_o": "out", "down": "silu"}
STEP_FORM_MAX_BATCH = 4
SILU_GATE = 2.0  # the gate of the SiLU form: up = x / silu(2.0), so silu(gate) * up is x (the threshold's input)


def step_form_fns(model: str, proj: str, x, t, copies, shape=None) -> list | None:
    """Calls in the decode step's form where the step has one (STEP_FORM at batch <= STEP_FORM_MAX_BATCH), else
    None: each call adds into one of two float32 buffers and clears the other (the step's ``out=`` / ``clear=``),
    cycling the weight copies."""
    m, k = x.shape
    form = STEP_FORM.get(proj)
    if form is None or m > STEP_FORM_MAX_BATCH:
        return None
    n = copies[0][2].shape[1]
    bufs = [torch.zeros(m, n, device=x.device, dtype=torch.float32) for _ in range(2)]
    if form == "silu":
        gate = torch.full_like(x, SILU_GATE)
        up = (x.float() / F.silu(gate.float())).to(x.dtype)
    kv = SHAPES[model]["k_v"][0] if model in SHAPES and "k_v" in SHAPES[model] else n // 4
    parts = [n - 2 * kv, kv, kv]

    def call(c, out, clear):
        if form == "parts":
            return gemv.sparse_gemv_fused(x, c[0], c[1], c[2], t.reshape(1).repeat(3), parts, bits=4, group_size=GROUP,
                                          shape=shape, out=out, clear=clear)
        if form == "silu":
            return gemv.sparse_gemv_silu(gate, up, c[0], c[1], c[2], t, bits=4, group_size=GROUP, shape=shape, out=out,
                                         clear=clear)
        return gemv.sparse_gemv(x, c[0], c[1], c[2], t, bits=4, group_size=GROUP, shape=shape, out=out, clear=clear)

    return [lambda c=copies[j % len(copies)], j=j: call(c, bufs[j % 2], bufs[(j + 1) % 2])
            for j in range(2 * len(copies))]


def ours_fns(x, t, copies, proj: str, deterministic=False):
    def call(c):
        if deterministic:
            torch.use_deterministic_algorithms(True)
        try:
            return ours_call(x, t, c, proj)
        finally:
            if deterministic:
                torch.use_deterministic_algorithms(False)
    return [lambda c=c: call(c) for c in copies]


def check_layer(m: int, seed: int):
    """A layer and input on which every launch shape compiles to the specialization it is timed with (N, K, K-splits
    and strides multiples of 16; the batch size itself)."""
    k, n = (2048, 4096) if not SMOKE else (256, 512)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, device=DEV, dtype=torch.uint8)
    scales = (torch.rand(k // GROUP, n, generator=gen, device=DEV) * 0.02 + 0.002).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // GROUP, n), generator=gen, device=DEV).to(torch.bfloat16)
    x = torch.randn(m, k, generator=gen, device=DEV).to(torch.bfloat16)
    return q, scales, zeros, x


def warm_one(job):
    """Worker process: run one (launch shape, batch, deterministic[, parts]) once, which compiles it into the Triton
    cache on disk that every process shares; parts > 1: also a fused call of that many parts (one threshold per part:
    another specialization). -> None, or the error in one line."""
    shape_dict, m, det, parts = (*job, 1) if len(job) == 3 else job
    q, scales, zeros, x = check_layer(m, 0)
    torch.use_deterministic_algorithms(det)
    try:
        shape = dispatch.shape_from_dict(shape_dict)
        qw = pack_int4_gpu(q)
        gemv.sparse_gemv(x, qw, scales, zeros, torch.tensor(0.5, device=DEV), bits=4, group_size=GROUP, shape=shape)
        if parts > 1:
            n = scales.shape[1]
            gemv.sparse_gemv_fused(x, qw, scales, zeros, torch.full((parts,), 0.5, device=DEV), [n // parts] * parts,
                                   bits=4, group_size=GROUP, shape=shape)
        if shape.kernel == "splitk":  # also its no-split specialization (one K-step: K = GROUP)
            gemv.sparse_gemv(x[:, :GROUP].contiguous(), qw[:GROUP], scales[:1], zeros[:1], torch.tensor(0.5, device=DEV),
                             bits=4, group_size=GROUP, shape=shape)
        if not SMOKE:
            torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - reported by the parent
        return f"{shape_dict} M={m} det={det}: {e!r}"[:500]


def precompile(jobs, workers: int) -> list:
    """Compile many kernel variants at once (Triton compiles one at a time per process): -> the errors."""
    import multiprocessing as mp

    if SMOKE:
        return [e for e in map(warm_one, jobs) if e]
    with mp.get_context("spawn").Pool(max(1, min(workers, len(jobs)))) as pool:
        return [e for e in pool.map(warm_one, jobs, chunksize=1) if e]


def bench_shape(model, proj, n, k, batches, sparsities, det_sparsities, results, log, gemlite=None):
    q, qweight, scales, zeros = make_layer(n, k)
    w_bytes_bf16 = k * n * 2
    w_bytes_int4 = k * n // 2 + 2 * (k // GROUP) * n * 2
    w_bf16 = dequantized(q, scales, zeros)
    bf16_copies = [w_bf16] + [w_bf16.clone() for _ in range(n_copies(w_bytes_bf16) - 1)]
    tg = make_tinygemm(q, scales, zeros) if not SMOKE else None
    tg_copies = [tg] + [(tg[0].clone(), tg[1].clone()) for _ in range(n_copies(w_bytes_int4) - 1)] if tg else []
    ours = [(qweight, scales, zeros)] + [(qweight.clone(), scales.clone(), zeros.clone()) for _ in range(n_copies(w_bytes_int4) - 1)]
    gl_copies = [make_gemlite(gemlite, q, scales, zeros) for _ in range(n_copies(w_bytes_int4))] if gemlite else []
    del q
    for m in batches:
        x = activations(m, k, m)
        io_bytes = m * k * 2 + m * n * 2
        row = dict(model=model, proj=proj, N=n, K=k, batch=m, group_size=GROUP)
        t_bf16 = time_graph([lambda w=w: F.linear(x, w) for w in bf16_copies])
        if SMOKE:  # no tinygemm on the CPU
            t_tg = t_bf16
        else:
            t_tg = time_graph([lambda c=c: torch._weight_int4pack_mm(x, c[0], GROUP, c[1]) for c in tg_copies])
        for method, us, nbytes in (("cublas_bf16", t_bf16, w_bytes_bf16 + io_bytes), ("tinygemm_int4", t_tg, w_bytes_int4 + io_bytes)):
            results.append({**row, "method": method, "sparsity": 0, "us": us, "bytes": nbytes, "tbps": nbytes / us / 1e6})
        t_gl = None
        if gl_copies:
            gl = time_gemlite(gemlite, gl_copies, x, w_bf16, log, f"{model} {proj} M={m}")
            t_gl = gl["us"]
            nbytes = w_bytes_int4 + io_bytes
            results.append({**row, "method": "gemlite_int4", "sparsity": 0, "bytes": nbytes,
                            "tbps": nbytes / t_gl / 1e6 if t_gl else None, **gl})
        shape = dispatch.pick_gemv(m, n, k, 4, GROUP, x.device)
        for sp in sparsities:
            thr = threshold_for(x, sp)
            t = torch.tensor(thr, device=DEV)
            touched, union = touched_bytes(x, thr, n)
            union_block = union_block_sparsity(x, thr)
            step_fns = step_form_fns(model, proj, x, t, ours)
            methods = ([("ours", False)] + ([("ours_det", True)] if sp in det_sparsities else [])
                       + ([("ours_step", False)] if step_fns else []))
            for method, det in methods:
                us = time_graph(step_fns if method == "ours_step" else ours_fns(x, t, ours, proj, det))
                results.append({**row, "method": method, "sparsity": sp, "union_sparsity": round(union, 4),
                                "union_block_sparsity": round(union_block, 4), "us": us,
                                "bytes": touched, "tbps": touched / us / 1e6, "vs_cublas": t_bf16 / us, "vs_tinygemm": t_tg / us,
                                **({"vs_gemlite": t_gl / us} if t_gl else {}), "shape": dispatch.shape_to_dict(shape)})
                log(f"{model:4s} {proj:8s} M={m:2d} s={sp:2d} {method:8s} {us:8.2f} us {touched / us / 1e6:5.2f} TB/s "
                    f"x{t_tg / us:5.2f} vs tinygemm ({t_tg:.1f}) x{t_bf16 / us:5.2f} vs cuBLAS ({t_bf16:.1f})")
    del bf16_copies, tg_copies, ours, gl_copies, w_bf16
    if not SMOKE:
        torch.cuda.empty_cache()


HEADS = {"8B": (128256, 4096), "70B": (128256, 8192)}  # lm_head: N = vocabulary, K = hidden


def bench_heads(models, heads, log):
    """A quantized lm_head at batch 1 (int4 and int8, group 128): ours with the python-float threshold 0.0 that
    QuantLinear passes (the table's dense_threshold rules), ours with a 0-dim tensor threshold 0 (the ordinary rules:
    what such a call took before them), cuBLAS bf16 on the dequantized weight and tinygemm (int4)."""
    for model in models:
        if model not in HEADS:
            continue
        n, k = HEADS[model] if not SMOKE else (512, 256)
        x = activations(1, k, 1)
        t_bf16 = None
        for bits in (4, 8):
            q, qweight, scales, zeros = make_weights(n, k, bits)
            io = 2 * k + 2 * n
            w_bytes = k * n * bits // 8 + 2 * (k // GROUP) * n * 2
            row = dict(model=model, proj="lm_head", N=n, K=k, batch=1, bits=bits, group_size=GROUP)
            if t_bf16 is None:
                w_bf16 = dequantized(q, scales, zeros)
                copies = [w_bf16] + [w_bf16.clone() for _ in range(n_copies(k * n * 2) - 1)]
                t_bf16 = time_graph([lambda w=w: F.linear(x, w) for w in copies])
                del copies, w_bf16
            heads.append({**row, "method": "cublas_bf16", "us": t_bf16, "bytes": k * n * 2 + io, "tbps": (k * n * 2 + io) / t_bf16 / 1e6})
            if bits == 4 and not SMOKE:
                tg = make_tinygemm(q, scales, zeros)
                tgs = [tg] + [(tg[0].clone(), tg[1].clone()) for _ in range(n_copies(w_bytes) - 1)]
                us = time_graph([lambda c=c: torch._weight_int4pack_mm(x, c[0], GROUP, c[1]) for c in tgs])
                heads.append({**row, "method": "tinygemm_int4", "us": us, "bytes": w_bytes + io, "tbps": (w_bytes + io) / us / 1e6})
                del tgs, tg
            del q
            ours = [(qweight, scales, zeros)] + [(qweight.clone(), scales.clone(), zeros.clone()) for _ in range(n_copies(w_bytes) - 1)]
            for method, t in (("ours", 0.0), ("ours_tensor_threshold", torch.tensor(0.0, device=DEV))):
                shape = dispatch.pick_gemv(1, n, k, bits, GROUP, x.device, threshold=t)
                us = time_graph([lambda c=c: gemv.sparse_gemv(x, c[0], c[1], c[2], t, bits=bits, group_size=GROUP) for c in ours])
                heads.append({**row, "method": method, "us": us, "bytes": w_bytes + io, "tbps": (w_bytes + io) / us / 1e6,
                              "shape": dispatch.shape_to_dict(shape, defaults=False) if shape else None})
            base = {h["method"]: h["us"] for h in heads if h["model"] == model and h["bits"] == bits}
            log(f"{model:4s} lm_head  int{bits} M= 1 ours {base['ours']:8.2f} us (tensor threshold {base['ours_tensor_threshold']:.2f}) "
                f"cuBLAS {t_bf16:.1f} tinygemm {base.get('tinygemm_int4', float('nan')):.1f}")
            del ours, qweight, scales, zeros
            if not SMOKE:
                torch.cuda.empty_cache()


def heads_markdown(heads) -> list:
    if not heads:
        return []
    lines = ["", "## Quantized lm_head, batch 1 (threshold: the python float 0.0 QuantLinear passes)", "",
             "µs (TB/s over every packed byte); `tensor t` = the same call with a 0-dim tensor threshold 0 (the table's "
             "ordinary rules, which such a call took before the dense_threshold rules)", "",
             "| head | bits | ours | ours, tensor t | cuBLAS bf16 | tinygemm int4 | × vs cuBLAS | × vs tinygemm | shape |",
             "|---|---:|---|---|---|---|---:|---:|---|"]
    for (model, bits) in sorted({(h["model"], h["bits"]) for h in heads}, key=lambda v: (v[0], -v[1])):
        hs = {h["method"]: h for h in heads if h["model"] == model and h["bits"] == bits}
        cell = lambda m: f"{hs[m]['us']:.1f} ({hs[m]['tbps']:.2f})" if m in hs else "-"  # noqa: E731
        o = hs["ours"]
        vs_tg = f"{hs['tinygemm_int4']['us'] / o['us']:.2f}" if "tinygemm_int4" in hs else "-"
        lines.append(f"| {model} N={o['N']} K={o['K']} | {bits} | {cell('ours')} | {cell('ours_tensor_threshold')} | "
                     f"{cell('cublas_bf16')} | {cell('tinygemm_int4')} | {hs['cublas_bf16']['us'] / o['us']:.2f} | {vs_tg} | "
                     f"{o['shape']} |")
    return lines


def _gemlite_cell(r) -> str:
    """The summary's gemlite cell: µs, '-' where not measured (a row kept from a run without it), 'failed'; a
    time in the fp32-atomic mode is marked *, with the default mode's time and error in brackets."""
    if r is None:
        return "-"
    if not r["us"]:
        return "failed"
    if r.get("mode") == "fp32 atomics":
        return f"{r['us']:.1f}* ({r['us_bf16_atomics']:.1f}, {r['error_bf16_atomics']:.1%})"
    return f"{r['us']:.1f}"


def _fmt(r):
    return f"{r['us']:.1f} ({r['tbps']:.2f}; {r['vs_tinygemm']:.2f}× / {r['vs_cublas']:.2f}×)"


def _plain_row(results, r):
    """The plain call's (``ours``) row of the same layer, batch and sparsity as ``r``."""
    return next(b for b in results if b["method"] == "ours" and all(b[f] == r[f] for f in ("model", "proj", "batch", "sparsity")))


def markdown(results, meta, heads=()):
    lines = [f"# Sparse GEMV benchmark ({meta['gpu']})", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}", f"- git commit: {meta['commit']}",
             f"- torch {meta['torch']}, triton {meta['triton']}; int4, group size {GROUP}, bf16 activations",
             f"- launch shapes: kernels/configs/{meta['table']}.json",
             "- time: CUDA-graph replays over enough weight copies to defeat the 60 MB L2, µs per call (median)",
             "- TB/s: bytes the call must touch (ours: active rows of W^T + scales/zeros of touched groups + x, y) / time",
             "- union: fraction of rows of W^T inactive for every row of x (independent N(0,1) rows: a pessimistic union);",
             "  block union: fraction of 128-row K-steps inactive for every row of x (what the split-K kernel can skip)",
             "- ours_det: torch.use_deterministic_algorithms(True) (ordered split-K reduction, bit-reproducible)",
             f"- gemlite: {meta.get('gemlite') or 'not measured (not installed)'}"]
    if meta.get("kept"):
        lines.append(f"- {meta['kept']}")
    lines.append("")
    keyed: dict = {}
    for r in results:
        keyed.setdefault((r["model"], r["proj"], r["batch"]), []).append(r)

    def get(rs, method, sp=0):
        return next((r for r in rs if r["method"] == method and r["sparsity"] == sp), None)

    lines += ["## Summary (µs; TB/s over touched bytes; speedup vs tinygemm int4 / vs cuBLAS bf16)", "",
              "| shape | M | kernel | cuBLAS | tinygemm | gemlite | " + " | ".join(f"s{s}" for s in SUMMARY_SPARSITIES) + " |",
              "|---|---:|---|---:|---:|---:|" + "---|" * len(SUMMARY_SPARSITIES)]
    for m in SUMMARY_BATCHES:
        for (model, proj, mm), rs in keyed.items():
            if mm != m:
                continue
            cb, tg, o = get(rs, "cublas_bf16"), get(rs, "tinygemm_int4"), get(rs, "ours")
            cells = [_fmt(get(rs, "ours", s)) if get(rs, "ours", s) else "" for s in SUMMARY_SPARSITIES]
            lines.append(f"| {model} {proj} | {m} | {o['shape']['kernel']} | {cb['us']:.1f} | {tg['us']:.1f} | "
                         f"{_gemlite_cell(get(rs, 'gemlite_int4'))} | " + " | ".join(cells) + " |")
    det = [r for r in results if r["method"] == "ours_det"]
    if det:
        lines += ["", "## Deterministic reduction: time / atomic time (same shape, batch, sparsity)", "",
                  "| shape | M | s | atomic µs | deterministic µs | ratio |", "|---|---:|---:|---:|---:|---:|"]
        for r in det:
            base = _plain_row(results, r)
            lines.append(f"| {r['model']} {r['proj']} | {r['batch']} | {r['sparsity']} | {base['us']:.1f} | {r['us']:.1f} | {r['us'] / base['us']:.2f} |")
    step = [r for r in results if r["method"] == "ours_step" and r["sparsity"] in SUMMARY_SPARSITIES]
    if step:
        lines += ["", "## The decode step's form (batch 1-4): ours called as the decode step calls it", "",
                  "q/k/v in three parts, o_proj (q_o) and down in its SiLU form, each adding into a float32 buffer "
                  "without the split-K tail (STEP_FORM; docs/kernels.md round 17); µs (× vs tinygemm), against the "
                  "plain call above", "",
                  "| shape | M | s | plain µs | step-form µs | step-form × vs tinygemm |", "|---|---:|---:|---:|---:|---:|"]
        for r in step:
            base = _plain_row(results, r)
            lines.append(f"| {r['model']} {r['proj']} | {r['batch']} | {r['sparsity']} | {base['us']:.1f} | {r['us']:.1f} | "
                         f"{r['vs_tinygemm']:.2f}× |")
    lines += heads_markdown(list(heads))
    lines += ["", "## Every measurement", ""]
    for (model, proj, m), rs in keyed.items():
        cb, tg = get(rs, "cublas_bf16"), get(rs, "tinygemm_int4")
        gl = get(rs, "gemlite_int4")
        gl_text = "" if gl is None else (f"; gemlite int4: {gl['us']:.1f} µs ({gl['tbps']:.2f} TB/s)" if gl["us"]
                                         else f"; gemlite int4: {gl.get('failure')}")
        lines += [f"### Llama-3-{model} {proj} (N={rs[0]['N']}, K={rs[0]['K']}), batch {m}", "",
                  f"cuBLAS bf16: {cb['us']:.1f} µs ({cb['tbps']:.2f} TB/s); tinygemm int4: {tg['us']:.1f} µs ({tg['tbps']:.2f} TB/s)"
                  + gl_text, "",
                  "| sparsity | union | block union | ours µs | TB/s | vs tinygemm | vs cuBLAS |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            if r["method"] == "ours":
                ub = f"{r['union_block_sparsity']:.2f}" if "union_block_sparsity" in r else "-"
                lines.append(f"| {r['sparsity']} | {r['union_sparsity']:.2f} | {ub} | {r['us']:.1f} | {r['tbps']:.2f} | "
                             f"{r['vs_tinygemm']:.2f}x | {r['vs_cublas']:.2f}x |")
        shape = next(r["shape"] for r in rs if r["method"] == "ours")
        lines += ["", f"Launch shape: {shape}", ""]
    return "\n".join(lines)


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return os.environ.get("GIT_COMMIT") or commit or "unknown"


def with_provenance(row: dict, meta: dict) -> dict:
    """A row kept from an earlier results file, with the run that measured it (files written before rows carried
    their own `measured` are taken as measured by that file's run)."""
    return {**row, "measured": row.get("measured") or {"commit": meta["commit"], "date": meta["date"]}}


def kept_note(kept: list, heads: list, measured: set = frozenset()) -> str:
    """One flat line naming, per earlier run, the batch sizes (and lm_head rows) this file keeps from it; a batch size
    of which some layers were measured now names the layers it keeps."""
    runs: dict = {}
    for r in kept:
        runs.setdefault((r["measured"]["commit"], r["measured"]["date"]), {}).setdefault(r["batch"], set()).add(
            (r.get("model"), r.get("proj")))
    new_batches = {m for _, _, m in measured}

    def batch_words(b, layers):
        if b not in new_batches:
            return str(b)
        return f"{b} ({', '.join(f'{model} {proj}' for model, proj in sorted(layers, key=row_rank_of))})"

    parts = [f"batch {', '.join(batch_words(b, ls) for b, ls in sorted(bs.items()))} at commit {c} ({d})"
             for (c, d), bs in sorted(runs.items(), key=lambda item: min(item[1]))]
    parts += [f"lm_head rows at commit {c} ({d})" for c, d in sorted({(h["measured"]["commit"], h["measured"]["date"])
                                                                     for h in heads})]
    return "rows kept from earlier runs (same method): " + "; ".join(parts)


def row_rank_of(layer: tuple) -> tuple:
    """(model, proj) in the report's order: 70B before 8B, projections in SHAPES order."""
    model, proj = layer
    projs = list(SHAPES.get(model, {}))
    return ({"70B": 0, "8B": 1}.get(model, 2), projs.index(proj) if proj in projs else len(projs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--models", default="70B,8B")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    ap.add_argument("--det-sparsities", default="0,50", help="sparsities also timed with the deterministic reduction")
    ap.add_argument("--tag", default="gemv_h200")
    ap.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--heads", default="8B,70B", help="lm_head shapes timed at batch 1 (int4 and int8); '' for none")
    ap.add_argument("--layers", default=None, help="projections to time (e.g. gate_up,down,gate_up_fused; default: all "
                    "of SHAPES)")
    ap.add_argument("--keep-from", default=None, help="a previous results json: its rows of (layer, batch size) pairs "
                    "not measured now are kept (and said so in the report)")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    import triton

    meta = dict(gpu=torch.cuda.get_device_name() if not SMOKE else "cpu (smoke)", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=git_commit(), command="PYTHONPATH=. python " + " ".join(sys.argv), torch=torch.__version__,
                triton=triton.__version__, table=dispatch.table_name(torch.device(DEV)))
    gemlite, why_not = gemlite_or_reason()
    meta["gemlite"] = (f"gemlite {gemlite.__version__} (GemLiteLinearTriton A16W4, bf16; autotune cache: "
                       f"{'configs/h100.json' if 'H200' in meta['gpu'] else 'its default for this GPU'}; * timed with "
                       "fp32 split-K atomics because its default native bf16 atomics missed the 2 % check: that mode's "
                       "µs and max error / max |y| in brackets)") if gemlite else why_not
    print(meta, flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    layers = {model: {proj: nk for proj, nk in SHAPES[model].items() if not args.layers or proj in args.layers.split(",")}
              for model in args.models.split(",")}
    measured = {(model, proj, m) for model in layers for proj in layers[model] for m in batches}
    det_sparsities = [int(s) for s in args.det_sparsities.split(",") if s]
    jobs = {(json.dumps(dispatch.shape_to_dict(dispatch.pick_gemv(m, n, k, 4, GROUP, torch.device(DEV))), sort_keys=True), m, det,
             PARTS.get(proj, 1))
            for model in layers for proj, (n, k) in layers[model].items() for m in batches
            for det in ((False, True) if det_sparsities else (False,))}
    errors = precompile([(json.loads(s), m, det, parts) for s, m, det, parts in sorted(jobs)], args.workers)
    print(f"precompiled {len(jobs)} kernel variants; errors: {errors}", flush=True)
    results: list = []
    kept: list = []
    previous: dict = {}
    if args.keep_from:
        with open(args.keep_from) as f:
            previous = json.load(f)
        kept = [with_provenance(r, previous["meta"]) for r in previous["results"]
                if (r["model"], r["proj"], r["batch"]) not in measured]
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, f"{args.tag}.log"), "w")

    def log(line):
        print(line, flush=True)
        log_file.write(line + "\n")

    heads: list = []
    if args.keep_from and not args.heads:  # lm_heads not timed now: keep the previous run's
        heads = [with_provenance(r, previous["meta"]) for r in previous.get("heads", [])]
    if kept or (heads and not args.heads):
        meta["kept"] = kept_note(kept, [] if args.heads else heads, measured)

    def write():
        for r in results + heads:
            r.setdefault("measured", {"commit": meta["commit"], "date": meta["date"]})
        everything = sorted(results + kept, key=lambda r: (r["batch"], row_rank_of((r["model"], r["proj"]))))
        with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
            json.dump({"meta": meta, "results": everything, "heads": heads}, f, indent=1)
        with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:  # also after each shape (partial runs)
            f.write(markdown(everything, meta, heads))

    if args.heads:
        bench_heads(args.heads.split(","), heads, log)
        write()
    for model in layers:
        for proj, (n, k) in layers[model].items():
            bench_shape(model, proj, n, k, batches, [int(s) for s in args.sparsities.split(",")], det_sparsities, results, log,
                        gemlite)
            write()
    print(markdown(results, meta, heads).split("## Every measurement")[0])


if __name__ == "__main__":
    main()
