"""Round 10 (docs/kernels.md): where the small layers' time goes at batch 1 (and 8B q/o, qkv at batch 4), measured;
since round 12 also the 8B MLP layers (``--layers mlp``: gate_up, down and the fused gate/up's grid as one N = 28672
call, with a probe that loads no weights); since stop 28 the 70B layers with them (``--layers large``) and a probe
whose active-row list costs nothing (``free_compact``: no scratch stores, barrier or slot loads; rows computed).

    PYTHONPATH=. python benchmarks/gemv_probe_small.py --out DIR [--workers 14] [--layers small|mlp]

Leave-out probes run a copy of ``_sgemv_kernel`` whose jit helpers are swapped for probe versions (the copies share
the product's source; kernels/ holds no probe switches): no counter / last-program tail (partials added, nothing
else), partials stored (no atomics), no unpack / FMA (the row words XOR-folded), an empty kernel with the same grid
and the same x / y traffic, no weights (every weight load replaced by zeros: the program's chain without the weight
stream; the FMAs stay, on zeros), and programmatic dependent launch (PDL: ``launch_pdl``; ``pdl_top``: griddepcontrol.wait
first, so nothing is read before the previous kernel ends; ``pdl_early``: the scales / zeros (and preloaded rows)
loaded before the wait, x and every scratch / workspace access after it). Probes give wrong results on purpose; the
table's shapes, the PDL copies and the new ``preload`` shapes are first checked against float64 on the GPU.
Timing: benchmarks/gemv.py's method (CUDA graphs of 40 calls over weight copies that defeat the L2, median of 15
replays), tinygemm and cuBLAS bf16 in the same run. Writes DIR/gemv_probe_small_<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import types

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import gemv as bench  # noqa: E402  (benchmarks/gemv.py: timing method, layers, baselines)

from kernels import dispatch, gemv_common, gemv_triton  # noqa: E402
from kernels import gemv_launch as kernel  # noqa: E402
from kernels.dispatch import CoreShape  # noqa: E402
from kernels.gemv_common import prepare  # noqa: E402

try:  # griddepcontrol (PDL), triton >= 3.3 on sm_90
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - the probes that need it are skipped
    gdc_launch_dependents = gdc_wait = None

GROUP = bench.GROUP
LAYER_SETS = {
    "small": {("8B", "q_o"): (4096, 4096), ("8B", "k_v"): (1024, 4096), ("8B", "qkv"): (6144, 4096),
              ("70B", "k_v"): (1024, 8192)},
    # round 12: the 8B MLP layers at batch 1; "gate_up_n28672" is the fused gate/up's grid and launch shape as one
    # plain N = 28672 call (the fused call adds a threshold per part and a compaction per part and K-range)
    "mlp": {("8B", "gate_up"): (14336, 4096), ("8B", "down"): (4096, 14336), ("8B", "gate_up_n28672"): (28672, 4096)},
    # stop 28: the 70B layers (several waves) beside the 8B MLP layers (one wave), for the free-compaction probe
    "large": {("70B", "q_o"): (8192, 8192), ("70B", "qkv"): (10240, 8192), ("70B", "gate_up"): (28672, 8192),
              ("70B", "down"): (8192, 28672), ("8B", "gate_up_n28672"): (28672, 4096), ("8B", "down"): (4096, 14336)},
}
LAYERS = LAYER_SETS["small"]
KR_FREE = tl.constexpr(128)  # the K-range of every compacting pick the large set measures (v2/v4 kr128)
TITLES = {"small": "Small-layer", "mlp": "8B MLP-layer", "large": "Large-layer (70B, 8B MLP)"}


# -- probe versions of the kernel's helpers ---------------------------------------------------------------------------
@triton.jit
def _reduce_atomics_only(y, y_ptrs, ws_ptrs, lock_ptr, out_ok, pid_k, n_ksplit, ws_stride_k,
                         SPLIT: tl.constexpr, DET: tl.constexpr, OUT_DTYPE: tl.constexpr,
                         clear_ptrs=None, ACC: tl.constexpr = False, CLEAR: tl.constexpr = False):
    """no tail: the partial is added to the workspace; no counter, no last program, y never written."""
    if SPLIT:
        tl.atomic_add(ws_ptrs, y, mask=out_ok, sem="relaxed")
    else:
        tl.store(y_ptrs, y.to(OUT_DTYPE), mask=out_ok)


@triton.jit
def _reduce_store_only(y, y_ptrs, ws_ptrs, lock_ptr, out_ok, pid_k, n_ksplit, ws_stride_k,
                       SPLIT: tl.constexpr, DET: tl.constexpr, OUT_DTYPE: tl.constexpr,
                       clear_ptrs=None, ACC: tl.constexpr = False, CLEAR: tl.constexpr = False):
    """stores: every program stores its partial (same addresses), no atomics, no counter."""
    tl.store(ws_ptrs, y, mask=out_ok)


@triton.jit
def _row_xor(wd, xr, magic, xscale, a0, a1, a2, a3, a4, a5, a6, a7, BITS: tl.constexpr, M_P: tl.constexpr,
             W: tl.constexpr, F16: tl.constexpr, EMULATE: tl.constexpr, H2: tl.constexpr = False):
    """no unpack / FMA: the row's words are XOR-folded into a0 (keeps the loads; x is not used)."""
    if H2:
        a0 = a0 ^ wd
    else:
        a0 = (a0.to(tl.int32, bitcast=True) ^ wd).to(tl.float32, bitcast=True)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _row_load_none(qw_ptr, row, word, w_ok, stride_qk, M_P: tl.constexpr, ALIGNED: tl.constexpr, EVICT: tl.constexpr):
    """no weights: zeros in the shape of a gathered row's words, no load."""
    if M_P == 1:
        wd = (row[:, None] + word[None, :]) * 0
    else:
        wd = (row[None, :, None] + word[None, None, :]) * 0
    return wd


@triton.jit
def _live_row_load_none(qw_ptr, row, act, word, w_ok, stride_qk, EVICT: tl.constexpr):
    """no weights (the in-place loop and preload 2): zeros in the shape of the rows' words, no load."""
    live = tl.reshape(act, [row.shape[0]])
    return (live[:, None].to(tl.int32) + word[None, :]) * 0


@triton.jit
def _compact_free(act, xm, mm, k0, part, K, scr_i_ptr, scr_x_ptr, M_P: tl.constexpr, KR: tl.constexpr):
    """free compaction (stop 28): only the active count; no scratch stores, no barrier (slots: _slot_load_free)."""
    c = tl.sum(tl.max(act.to(tl.int32), axis=0), axis=0)
    return c, part * K + k0


@triton.jit
def _slot_load_free(scr_i_ptr, scr_x_ptr, ibase, k0, slot, c, mm, M_P: tl.constexpr, MASK: tl.constexpr = True):
    """free compaction: slot j is row k0 + 2 j (mod KR_FREE, then the odd rows: as many distinct rows as the real list, none loaded from a list),
    x = 1 (slots past c: row k0, x = 0): the time the call would take if the active-row list cost nothing."""
    ok = slot < c
    r2 = 2 * slot  # even rows for slots < KR / 2, then the odd ones: c distinct rows of the K-range
    row = tl.where(ok, k0 + r2 % KR_FREE + r2 // KR_FREE, k0)
    xr = (ok[None, :] & (mm[:, None] >= 0)).to(tl.float32)
    return row, xr


@triton.jit
def _warp_sums_joined(a0, a1, a2, a3, a4, a5, a6, a7, BITS: tl.constexpr, M_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """joined: one reduction over the warps of the joined [M_P, W, NB, 2, 2, 2] tile instead of one per value (SASS,
    v1 w4 kr128 preload: 27 instead of 43 BAR.SYNC)."""
    RA: tl.constexpr = 1
    if BITS == 4:
        a = tl.sum(tl.join(tl.join(tl.join(a0, a4), tl.join(a2, a6)), tl.join(tl.join(a1, a5), tl.join(a3, a7))), axis=RA)
    else:
        a = tl.sum(tl.join(tl.join(a0, a2), tl.join(a1, a3)), axis=RA)
    return tl.reshape(a, [M_P, BLOCK_N])


@triton.jit
def _program_tile_pdl_top(N, END0, END1, SPAN: tl.constexpr, KR: tl.constexpr, ALIGNED: tl.constexpr,
                          HINT: tl.constexpr = True):
    gdc_wait()
    gdc_launch_dependents()
    return gemv_common.program_tile(N, END0, END1, SPAN, KR, ALIGNED, HINT)


@triton.jit
def _program_tile_pdl_trigger(N, END0, END1, SPAN: tl.constexpr, KR: tl.constexpr, ALIGNED: tl.constexpr,
                              HINT: tl.constexpr = True):
    gdc_launch_dependents()
    return gemv_common.program_tile(N, END0, END1, SPAN, KR, ALIGNED, HINT)


@triton.jit
def _threshold_rows_wait(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0, M,
                         M_P: tl.constexpr, KR: tl.constexpr, T_MODE: tl.constexpr, SILU: tl.constexpr,
                         X_DTYPE: tl.constexpr):
    gdc_wait()
    return gemv_common.threshold_rows(x_ptr, u_ptr, stride_xm, t_ptr, t_value, t_stride_part, part, k0, M, M_P, KR,
                                      T_MODE, SILU, X_DTYPE)


@triton.jit
def _empty_kernel(x_ptr, y_ptr, N, KR: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """The launch + drain floor: the table shape's grid and warps, each program reads its K-range of x and the
    programs of the first K-range write their y tile (nothing else)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    xs = tl.sum(tl.load(x_ptr + pid_k * KR + tl.arange(0, KR)).to(tl.float32), axis=0)
    if pid_k == 0:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + cols, (cols.to(tl.float32) * 0.0 + xs).to(y_ptr.dtype.element_ty), mask=cols < N)


def _variant(**swaps):
    """A copy of _sgemv_kernel whose helpers named in ``swaps`` are replaced: every jit function of
    kernels/gemv_triton.py is re-created with a globals dict holding the swaps (same source, own compile cache key)."""
    g = dict(vars(gemv_triton))
    g.update(swaps)
    for name, obj in list(g.items()):
        fn = getattr(obj, "fn", None)
        if name in swaps or not isinstance(fn, types.FunctionType) or fn.__module__ != gemv_triton.__name__:
            continue
        clone = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
        clone.__module__, clone.__qualname__, clone.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
        clone.__annotations__, clone.__kwdefaults__ = dict(fn.__annotations__), fn.__kwdefaults__  # tl.constexpr
        g[name] = triton.jit(clone)
    return g["_sgemv_kernel"]


VARIANTS = {
    "copy": dict(),
    "no_tail": dict(reduce_split_k=_reduce_atomics_only),
    "stores": dict(reduce_split_k=_reduce_store_only),
    "no_fma": dict(_row_fma=_row_xor),
    "no_weights": dict(_row_load=_row_load_none, _live_row_load=_live_row_load_none),
    "free_compact": dict(compact_rows=_compact_free, _slot_load=_slot_load_free),
    "free_compact_no_tail": dict(compact_rows=_compact_free, _slot_load=_slot_load_free,
                                 reduce_split_k=_reduce_atomics_only),
    "joined": dict(_warp_sums=_warp_sums_joined),
    "pdl_top": dict(program_tile=_program_tile_pdl_top),
    "pdl_early": dict(program_tile=_program_tile_pdl_trigger, threshold_rows=_threshold_rows_wait),
}
KERNELS = {name: _variant(**swaps) for name, swaps in VARIANTS.items()}
PDL = {"pdl_top", "pdl_early"}
WRONG = {"no_tail", "stores", "no_fma", "no_weights", "free_compact", "free_compact_no_tail"}  # probes that give wrong results on purpose


_PROBE_WS: dict = {}


def launch_variant(name: str, p: gemv_common.GemvProblem, shape: CoreShape) -> torch.Tensor:
    """gemv_triton.launch with the kernel copy ``name`` (int4, bf16 x; PDL variants launched with launch_pdl)."""
    block_n = 32 * shape.vec * (32 // p.bits)
    steps_fit = shape.k_range % (shape.warps * shape.rows) == 0
    preload = shape.preload if not shape.pipe and shape.stages == 1 and shape.k_range % shape.warps == 0 else 0
    dense = 100 if preload else shape.dense if not shape.pipe and shape.stages == 1 and steps_fit else 0
    call = prepare(p, block_n, shape.k_range)
    h2 = shape.h2 and p.bits == 4 and p.m <= dispatch.CORE_MAX_M
    extra = {"launch_pdl": True} if name in PDL else {}
    if name in ("no_tail", "stores", "free_compact_no_tail") and call.constants["SPLIT"]:  # these leave the workspace dirty: their own
        ws = _PROBE_WS.get(p.x.device)
        if ws is None or ws.numel() < p.m * p.n:
            ws = _PROBE_WS[p.x.device] = torch.zeros(max(p.m * p.n, 1 << 16), dtype=torch.float32, device=p.x.device)
        call.args["ws_ptr"] = ws
    KERNELS[name][call.grid](
        **call.args, magic=gemv_triton.FP32_MAGIC, **call.constants,
        BITS=p.bits, W=shape.warps, R=shape.rows, VEC=shape.vec, F16=shape.f16,
        PIPE=shape.pipe and (shape.rows == 4 or shape.loads_first), STAGES=1, GROUPS=1, DENSE=dense, H2=h2,
        PRELOAD=preload, LOOKAHEAD=shape.lookahead if preload else 0, LOADS_FIRST=shape.loads_first,
        EVICT=shape.evict_first,
        num_warps=shape.warps, num_stages=1, **extra)
    return call.y


def launch_empty(p: gemv_common.GemvProblem, shape: CoreShape, pdl: bool) -> torch.Tensor:
    block_n = 32 * shape.vec * 8
    y = torch.empty(p.m, p.n, dtype=p.x.dtype, device=p.x.device)
    grid = (triton.cdiv(p.n, block_n), p.k // shape.k_range)
    _empty_kernel[grid](p.x, y, p.n, KR=shape.k_range, BLOCK_N=block_n, PDL=pdl, num_warps=shape.warps,
                        **({"launch_pdl": True} if pdl else {}))
    return y


def problem(x, qw, s, z, t) -> gemv_common.GemvProblem:
    return gemv_common.GemvProblem(x, qw, s, z, 1, t, 0.0, 0, (qw.shape[1] * 8,), 4, GROUP)


def run(kind: str, shape, x, qw, s, z, t):
    """kind: 'table' (the product, the table's pick; ``shape`` unused), 'product' (the product with ``shape``), a
    VARIANTS name, 'empty', 'empty_pdl'."""
    if kind == "table":
        return kernel.sparse_gemv(x, qw, s, z, t, bits=4, group_size=GROUP)
    if kind == "product":
        return kernel.sparse_gemv(x, qw, s, z, t, bits=4, group_size=GROUP, shape=shape)
    if kind in ("empty", "empty_pdl"):
        return launch_empty(problem(x, qw, s, z, t), shape, kind == "empty_pdl")
    return launch_variant(kind, problem(x, qw, s, z, t), shape)


# -- what is measured ---------------------------------------------------------------------------------------------
def S(**kw) -> CoreShape:
    return CoreShape(**{"rows": 4, "h2": True, **kw})


PREVIOUS = {  # the table's batch-1 picks before round 10 (kernels/configs/h200.json at a479fd2)
    ("8B", "q_o"): CoreShape(2, 4, 4, 64, dense=85, h2=True), ("8B", "k_v"): CoreShape(1, 4, 8, 64, f16=False),
    ("8B", "qkv"): CoreShape(4, 4, 4, 64, evict_first=True, dense=85, h2=True),
    ("70B", "k_v"): CoreShape(1, 4, 8, 64, f16=False)}
EXTRA = [  # batch 1, beyond round 10's first sweep: 8 warps per program over a 128-row K-range (fewer K-splits)
    S(vec=1, warps=8, k_range=128, preload=1), S(vec=2, warps=8, k_range=128, preload=2),
    S(vec=2, warps=4, k_range=128, preload=2)]


def table_shape(m, n, k):
    return dispatch.pick_gemv(m, n, k, 4, GROUP, torch.device("cuda"))


def plan():
    """[(model, proj, m, kind, shape, label)] for every timed (and checked) call (batch 1)."""
    out = []
    for (model, proj), (n, k) in LAYERS.items():
        tab = table_shape(1, n, k)
        out.append((model, proj, 1, "table", tab, "table"))
        for v in VARIANTS:
            out.append((model, proj, 1, v, tab, f"table {v}"))
        out.append((model, proj, 1, "empty", tab, "empty"))
        out.append((model, proj, 1, "empty_pdl", tab, "empty pdl"))
        if (model, proj) in PREVIOUS:
            out.append((model, proj, 1, "product", PREVIOUS[(model, proj)], "previous table " + short(PREVIOUS[(model, proj)])))
        for sh in EXTRA if LAYERS is LAYER_SETS["small"] else []:
            out.append((model, proj, 1, "product", sh, short(sh)))
    return out


def short(sh: CoreShape) -> str:
    words = [f"v{sh.vec} w{sh.warps} kr{sh.k_range}"] + [f"preload{sh.preload}"] * bool(sh.preload)
    words += [f"r{sh.rows} dense{sh.dense}"] * bool(sh.dense and not sh.preload) + ["fp32-unpack"] * (not sh.f16)
    return " ".join(words)


def warm_one(job):
    """Worker: compile one (kind, shape, m) on a layer with the timed specialization. -> None or the error."""
    kind, shape_d, m = job
    try:
        q, scales, zeros, x = bench.check_layer(m, 0)
        qw = bench.pack_int4_gpu(q)
        shape = dispatch.shape_from_dict(shape_d) if shape_d else None
        run("product" if kind == "table" else kind, shape, x, qw, scales, zeros, torch.tensor(0.5, device="cuda"))
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{kind} {shape_d} M={m}: {e!r}"[:400]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--layers", default="small", choices=sorted(LAYER_SETS))
    args = ap.parse_args(argv)
    global LAYERS
    LAYERS = LAYER_SETS[args.layers]
    import multiprocessing as mp

    meta = dict(gpu=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=bench.git_commit(), command="PYTHONPATH=. python " + " ".join(sys.argv), torch=torch.__version__,
                triton=triton.__version__)
    print(meta, flush=True)
    items = plan()
    jobs = sorted({(kind, json.dumps(dispatch.shape_to_dict(sh)) if sh else "", m) for _, _, m, kind, sh, _ in items})
    jobs = [(kind, json.loads(s) if s else None, m) for kind, s, m in jobs]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        errors = [e for e in pool.map(warm_one, jobs, chunksize=1) if e]
    print(f"precompiled {len(jobs)}; errors: {errors}", flush=True)
    # correctness of everything that must be right (float64, fresh inputs per layer, two calls in a row)
    checks, bad = [], set()
    for (model, proj), (n, k) in LAYERS.items():
        for m in (1, 4):
            mine = [it for it in items if it[:3] == (model, proj, m) and it[3] not in WRONG | {"empty", "empty_pdl"}]
            if not mine:
                continue
            q, qw, s, z = bench.make_layer(n, k, seed=7)
            x = bench.activations(m, k, 99)
            for sp in (0, 50):
                thr = bench.threshold_for(x, sp)
                t = torch.tensor(thr, device="cuda")
                xm = torch.where(x.double().abs() > thr, x.double(), 0.0)
                want = xm @ ((q.double() - z.double().repeat_interleave(GROUP, 0)) * s.double().repeat_interleave(GROUP, 0))
                tol = 4 * 2**-7 * want.abs().max().item()
                for _, _, _, kind, sh, label in mine:
                    worst = 0.0
                    for _ in range(2):
                        try:
                            y = run(kind, sh, x, qw, s, z, t)
                            worst = max(worst, (y.double() - want).abs().max().item() / tol)
                        except Exception as e:  # noqa: BLE001
                            print(f"FAILED to run {model} {proj} M={m} {label}: {e!r}"[:400], flush=True)
                            worst = math.inf
                    if not worst <= 1:
                        bad.add((model, proj, m, label))
                    checks.append(dict(model=model, proj=proj, batch=m, sparsity=sp, label=label, error_over_tolerance=worst))
    print(f"correctness: {len(checks) - sum(c['error_over_tolerance'] > 1 for c in checks)} of {len(checks)} pass; "
          f"failed: {sorted(bad)}", flush=True)
    rows = []
    for (model, proj), (n, k) in LAYERS.items():
        q, qweight, scales, zeros = bench.make_layer(n, k)
        w_bytes = k * n // 2 + 2 * (k // GROUP) * n * 2
        copies = [(qweight, scales, zeros)] + [(qweight.clone(), scales.clone(), zeros.clone())
                                                for _ in range(bench.n_copies(w_bytes) - 1)]
        tg = bench.make_tinygemm(q, scales, zeros)
        tgs = [tg] + [(tg[0].clone(), tg[1].clone()) for _ in range(bench.n_copies(w_bytes) - 1)]
        w_bf16 = bench.dequantized(q, scales, zeros)
        bfs = [w_bf16] + [w_bf16.clone() for _ in range(bench.n_copies(k * n * 2) - 1)]
        for m in (1, 4):
            mine = [it for it in items if it[:3] == (model, proj, m)]
            if not mine:
                continue
            x = bench.activations(m, k, m)
            t_tg = bench.time_graph([lambda c=c: torch._weight_int4pack_mm(x, c[0], GROUP, c[1]) for c in tgs])
            t_bf = bench.time_graph([lambda w=w: torch.nn.functional.linear(x, w) for w in bfs])
            base = dict(model=model, proj=proj, N=n, K=k, batch=m)
            rows += [dict(base, sparsity=0, label="tinygemm", us=t_tg, tbps=(w_bytes + 2 * m * (n + k)) / t_tg / 1e6),
                     dict(base, sparsity=0, label="cublas_bf16", us=t_bf, tbps=(2 * k * n + 2 * m * (n + k)) / t_bf / 1e6)]
            for sp in (0, 50):
                thr = bench.threshold_for(x, sp)
                t = torch.tensor(thr, device="cuda")
                touched, union = bench.touched_bytes(x, thr, n)
                for _, _, _, kind, sh, label in mine:
                    if (model, proj, m, label) in bad and kind not in WRONG:
                        continue
                    try:
                        us = bench.time_graph([lambda c=c, kind=kind, sh=sh: run(kind, sh, x, c[0], c[1], c[2], t) for c in copies])
                    except Exception as e:  # noqa: BLE001
                        print(f"FAILED to time {model} {proj} M={m} {label}: {e!r}"[:300], flush=True)
                        continue
                    rows.append(dict(base, sparsity=sp, label=label, kind=kind, us=us, tbps=touched / us / 1e6,
                                     vs_tinygemm=t_tg / us, shape=dispatch.shape_to_dict(sh) if sh else None))
                best = min((r for r in rows if r["model"] == model and r["proj"] == proj and r["batch"] == m
                            and r["sparsity"] == sp and r.get("kind") in ("table", "product", "pdl_early", "pdl_top")),
                           key=lambda r: r["us"])
                tab = next(r for r in rows if r["model"] == model and r["proj"] == proj and r["batch"] == m
                           and r["sparsity"] == sp and r["label"] == "table")
                print(f"{model:4s} {proj:4s} M={m} s{sp:2d} tinygemm {t_tg:5.1f} table {tab['us']:5.1f} best "
                      f"{best['us']:5.1f} ({best['label']})", flush=True)
        del copies, tgs, bfs
        torch.cuda.empty_cache()
        write(args.out, meta, checks, rows, args.layers)
    write(args.out, meta, checks, rows, args.layers)


def write(out, meta, checks, rows, layers="small"):
    os.makedirs(out, exist_ok=True)
    name = dispatch.table_name(torch.device("cuda"))
    with open(os.path.join(out, f"gemv_probe_{layers}_{name}.json"), "w") as f:
        json.dump({"meta": meta, "correctness": checks, "timings": rows}, f, indent=1)
    with open(os.path.join(out, f"gemv_probe_{layers}_{name}.md"), "w") as f:
        f.write(markdown(meta, checks, rows, layers))


def markdown(meta, checks, rows, layers="small") -> str:
    ok = sum(c["error_over_tolerance"] <= 1 for c in checks)
    lines = [f"# {TITLES[layers]} probes of the sparse GEMV ({meta['gpu']})", "",
             f"- command: `{meta['command']}`; date {meta['date']}; git commit {meta['commit']}; torch {meta['torch']}, "
             f"triton {meta['triton']}",
             "- µs per call, CUDA graphs of 40 calls over weight copies that defeat the L2 (benchmarks/gemv.py); int4 "
             "g128, bf16 x; `x tg` = tinygemm µs / µs (same run)",
             f"- correctness against float64 (s0 and s50, two calls in a row) of every non-probe row: {ok} of "
             f"{len(checks)} pass; probes (no_tail, stores, no_fma, no_weights) give wrong results on purpose", ""]
    layers = []
    for r in rows:
        key = (r["model"], r["proj"], r["batch"])
        if key not in layers:
            layers.append(key)
    for model, proj, m in layers:
        mine = [r for r in rows if (r["model"], r["proj"], r["batch"]) == (model, proj, m)]
        lines += [f"## {model} {proj} (N={mine[0]['N']}, K={mine[0]['K']}), batch {m}", "",
                  "| what | s0 µs (TB/s; x tg) | s50 µs (TB/s; x tg) |", "|---|---|---|"]
        labels = []
        for r in mine:
            if r["label"] not in labels:
                labels.append(r["label"])
        for label in labels:
            cells = []
            for sp in (0, 50):
                r = next((r for r in mine if r["label"] == label and r["sparsity"] == sp), None)
                if r is None:
                    cells.append("-")
                elif "vs_tinygemm" in r:
                    cells.append(f"{r['us']:.2f} ({r['tbps']:.2f}; {r['vs_tinygemm']:.2f})")
                else:
                    cells.append(f"{r['us']:.2f} ({r['tbps']:.2f})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
