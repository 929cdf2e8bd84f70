"""Run ONE sparse-GEMV launch configuration a few times, for a profiler (Nsight Compute) or a quick check / timing.

    PYTHONPATH=. python benchmarks/gemv_profile.py --layer 70B.gate_up --m 1 --sparsity 0 \\
        --shape '{"kernel": "core", "vec": 4, "warps": 4, "rows": 4, "k_range": 128, "evict_first": true}'
    ncu --clock-control none --target-processes all -k regex:sgemv --launch-skip 2 --launch-count 1 ... \\
        python3 benchmarks/gemv_profile.py ...

``--shape table`` takes what the device's table picks (kernels/configs/<gpu>.json). ``--layer`` is MODEL.PROJ of
benchmarks/gemv.py's SHAPES, ``head8B`` / ``head70B`` (an lm_head: N = 128256, K = 4096 / 8192) or ``NxK``.
``--threshold float`` passes the threshold as a python float (T_MODE 0: what a quantized lm_head passes, 0.0), the
default ``tensor`` a 0-dim device tensor (what the decoder passes). The layer is built by benchmarks/gemv.py's
helpers (random int4 codes, bf16 scales / zeros, x ~ N(0, 1), threshold at the wanted quantile of |x|).

``--cases FILE`` runs a JSON list of such cases ({"name", "layer", "m", "sparsity", "shape", "bits", "threshold"})
in one process; with ``--profile-range`` each case's ``--launches``-th launch (the earlier ones warm up and compile)
is wrapped in cudaProfilerStart / Stop, so one ``ncu --profile-from-start off`` run profiles one launch per case.
``--check`` compares with a float64 reference (error / tolerance, as benchmarks/gemv_sweep.py); ``--time`` times the
case like benchmarks/gemv.py (CUDA-graph replays over weight copies that defeat the L2) and reports touched-bytes
TB/s. One JSON line per case goes to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import gemv as bench  # noqa: E402  (benchmarks/gemv.py: layers, activations, thresholds, timing)

from kernels import dispatch  # noqa: E402
from kernels import gemv_launch as kernel  # noqa: E402

HEADS = {"head8B": (128256, 4096), "head70B": (128256, 8192)}


def layer_dims(layer: str) -> tuple[int, int]:
    """(N, K) of ``MODEL.PROJ``, ``headNB`` or ``NxK``."""
    if layer in HEADS:
        return HEADS[layer]
    if "." in layer:
        model, proj = layer.split(".", 1)
        return bench.SHAPES[model][proj]
    n, k = layer.lower().split("x")
    return int(n), int(k)


def truth(x, q, scales, zeros, thr: float) -> torch.Tensor:
    x64 = x.double()
    xm = torch.where(x64.abs() > thr, x64, torch.zeros((), dtype=torch.float64, device=x.device))
    s = scales.double().repeat_interleave(bench.GROUP, 0)
    z = zeros.double().repeat_interleave(bench.GROUP, 0)
    return xm @ ((q.double() - z) * s)


def touched(x, thr: float, n: int, bits: int) -> int:
    """Bytes the call must touch: active rows of W^T, scales / zeros of touched groups, x and y."""
    m, k = x.shape
    active = (x.float().abs() > thr).any(0)
    groups = int(active.view(-1, bench.GROUP).any(1).sum())
    return int(active.sum()) * n * bits // 8 + groups * n * 4 + m * k * 2 + m * n * 2


def run_case(case: dict, launches: int, profile_range: bool, check: bool, time_it: bool) -> dict:
    n, k = layer_dims(case["layer"])
    m, sp, bits = int(case.get("m", 1)), int(case.get("sparsity", 0)), int(case.get("bits", 4))
    q, qweight, scales, zeros = bench.make_weights(n, k, bits)
    x = bench.activations(m, k, m)
    thr = bench.threshold_for(x, sp)
    t = thr if case.get("threshold", "tensor") == "float" else torch.tensor(thr, device=bench.DEV)
    spec = case.get("shape", "table")
    shape = None if spec == "table" else dispatch.shape_from_dict(spec if isinstance(spec, dict) else json.loads(spec))

    def call(w=qweight, s=scales, z=zeros):
        return kernel.sparse_gemv(x, w, s, z, t, bits=bits, group_size=bench.GROUP, shape=shape)

    picked = shape or dispatch.pick_gemv(m, n, k, bits, bench.GROUP, x.device, threshold=t)
    out = dict(name=case.get("name", ""), layer=case["layer"], N=n, K=k, m=m, sparsity=sp, bits=bits,
               threshold=case.get("threshold", "tensor"), shape=dispatch.shape_to_dict(picked) if picked else None)
    for i in range(launches):
        last = i == launches - 1
        if last and profile_range:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        y = call()
        if last and profile_range:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
    if check:
        want = truth(x, q, scales, zeros, thr)
        for _ in range(2):  # two calls in a row: the self-zeroing split-K workspace is checked too
            y = call()
            err = (y.double() - want).abs().max().item()
            tol = 4 * 2**-7 * max(want.abs().max().item(), 1e-3)
            ratio = err / tol if math.isfinite(err) else float("inf")
            out["error_over_tolerance"] = max(out.get("error_over_tolerance", 0.0), ratio)
        out["correct"] = out["error_over_tolerance"] <= 1
    if time_it:
        w_bytes = k * n * bits // 8 + 2 * (k // bench.GROUP) * n * 2
        copies = [(qweight, scales, zeros)] + [(qweight.clone(), scales.clone(), zeros.clone())
                                               for _ in range(bench.n_copies(w_bytes) - 1)]
        us = bench.time_graph([lambda c=c: call(*c) for c in copies])
        nbytes = touched(x, thr, n, bits)
        out.update(us=round(us, 2), bytes=nbytes, tbps=round(nbytes / us / 1e6, 3))
        del copies
    del q, qweight, scales, zeros
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", default="70B.gate_up")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--sparsity", type=int, default=0)
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--shape", default="table", help="launch shape as JSON (kernels/dispatch.py), or 'table'")
    ap.add_argument("--threshold", default="tensor", choices=("tensor", "float"))
    ap.add_argument("--name", default="")
    ap.add_argument("--cases", default=None, help="a JSON file: a list of cases (overrides the single-case flags)")
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--profile-range", action="store_true", help="wrap each case's last launch in cudaProfilerStart/Stop")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--out", default=None, help="append the JSON lines here")
    args = ap.parse_args(argv)
    if args.cases:
        with open(args.cases) as f:
            cases = json.load(f)
    else:
        cases = [dict(name=args.name, layer=args.layer, m=args.m, sparsity=args.sparsity, bits=args.bits,
                      shape=args.shape, threshold=args.threshold)]
    sink = open(args.out, "a") if args.out else None
    for case in cases:
        try:
            res = run_case(case, args.launches, args.profile_range, args.check, args.time)
        except Exception as e:  # noqa: BLE001 - one failing case is reported, the others still run
            res = dict(name=case.get("name", ""), error=repr(e)[:400])
        line = json.dumps(res)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()
        if not bench.SMOKE:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
