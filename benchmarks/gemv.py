"""Decode GEMV benchmark on one GPU: cuBLAS bf16 F.linear vs torch int4 tinygemm vs teal_quant's sparse GEMV.

    PYTHONPATH=. python benchmarks/gemv.py [--out benchmarks/results --tag gemv_h200 --models 8B,70B --batches 1,4]

``ours`` is kernels.gemv_triton.sparse_gemv with its default dispatch and launch shape (M = 1: the CUDA-core
one-launch kernel; M >= 2: the tensor-core kernel where pick_mma picks it, else the CUDA-core kernel).

Method: every call is captured in a CUDA graph that cycles through enough copies of the weight to defeat the
60 MB L2; a replay is timed with CUDA events (median of several replays) and divided by the calls in it.
Touched bytes: weights read (ours: only the rows of W^T active for some row of x, plus the scales/zeros of every
group with an active row), plus x and y. TB/s = touched bytes / time. Thresholds are 0-dim device tensors set to
the quantile of |x| that gives the wanted sparsity (x ~ N(0, 1), one draw per batch row).
Imports `kernels` from the repository folder (no teal_quant install needed).
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
from kernels import gemv_triton, reference  # noqa: E402

L2_BYTES = 60 * 2**20
GROUP = 128
SHAPES = {  # name: (N, K) of y = x @ W^T, W^T [K, N]
    "8B": {"q_o": (4096, 4096), "k_v": (1024, 4096), "qkv": (6144, 4096), "gate_up": (14336, 4096), "down": (4096, 14336)},
    "70B": {"q_o": (8192, 8192), "k_v": (1024, 8192), "qkv": (10240, 8192), "gate_up": (28672, 8192), "down": (8192, 28672)},
}
SPARSITIES = [0, 25, 40, 50, 60, 70, 90]


def time_graph(fn_list, reps_per_graph: int, replays: int = 15) -> float:
    """µs per call: capture reps_per_graph calls (cycling fn_list) in one graph, replay, median."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fn_list:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps_per_graph):
            fn_list[i % len(fn_list)]()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps_per_graph)
    times.sort()
    return times[len(times) // 2]


def n_copies(bytes_one: int) -> int:
    return max(2, math.ceil(3 * L2_BYTES / bytes_one))


def make_tinygemm(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """torch int4 tinygemm operands from our q [K, N] (uint8), scales/zeros [K/G, N].
    tinygemm computes (q - 8) * scale + zero_tinygemm, so zero_tinygemm = (8 - z) * scale."""
    k, n = q.shape
    w_nk = q.t().contiguous().to(torch.int32)  # [N, K] values 0..15
    packed_u8 = (w_nk[:, ::2] << 4 | w_nk[:, 1::2]).to(torch.uint8)  # [N, K/2]
    w_int4 = torch.ops.aten._convert_weight_to_int4pack(packed_u8.cuda(), 8)
    sz = torch.stack([scales.float(), ((8 - zeros.float()) * scales.float())], dim=-1).to(torch.bfloat16).cuda()  # [K/G, N, 2]
    return w_int4, sz.contiguous()


def bench_shape(model, proj, n, k, batches, sparsities, results):
    dev = "cuda"
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(k // GROUP, n, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // GROUP, n), generator=gen).to(torch.bfloat16)
    qweight = reference.pack_int4(q)
    w_bytes_bf16 = k * n * 2
    w_bytes_int4 = k * n // 2 + 2 * (k // GROUP) * n * 2

    # cuBLAS bf16: W [N, K]
    w_bf16 = reference.dequantize(qweight, scales, zeros, bits=4, group_size=GROUP).t().contiguous().to(torch.bfloat16)
    bf16_copies = [w_bf16.cuda() for _ in range(n_copies(w_bytes_bf16))]
    del w_bf16
    tg_ok = True
    try:
        tg = make_tinygemm(q, scales, zeros)
        tg_copies = [tg] + [(tg[0].clone(), tg[1].clone()) for _ in range(n_copies(w_bytes_int4) - 1)]
    except Exception as e:  # noqa: BLE001 - report and go on without the baseline
        print(f"tinygemm unavailable: {e!r}")
        tg_ok = False
    ours = [(qweight.cuda(), scales.cuda(), zeros.cuda())]
    ours += [tuple(t.clone() for t in ours[0]) for _ in range(n_copies(w_bytes_int4) - 1)]

    for m in batches:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).to(dev)
        io_bytes = m * k * 2 + m * n * 2
        reps = 40
        t_bf16 = time_graph([lambda w=w: F.linear(x, w) for w in bf16_copies], reps)
        row = dict(model=model, proj=proj, N=n, K=k, batch=m, group_size=GROUP)
        results.append({**row, "method": "cublas_bf16", "sparsity": 0, "us": t_bf16, "bytes": w_bytes_bf16 + io_bytes,
                        "tbps": (w_bytes_bf16 + io_bytes) / t_bf16 / 1e6})
        t_tg = None
        if tg_ok:
            t_tg = time_graph([lambda c=c: torch._weight_int4pack_mm(x, c[0], GROUP, c[1]) for c in tg_copies], reps)
            results.append({**row, "method": "tinygemm_int4", "sparsity": 0, "us": t_tg, "bytes": w_bytes_int4 + io_bytes,
                            "tbps": (w_bytes_int4 + io_bytes) / t_tg / 1e6})
        for sp in sparsities:
            thr = float(torch.quantile(x.float().abs().flatten().cpu(), sp / 100)) if sp > 0 else 0.0
            t = torch.tensor(thr, device=dev)
            active = (x.float().abs() > thr).any(0)
            union = 1 - active.float().mean().item()
            groups_touched = active.view(-1, GROUP).any(1).sum().item()
            touched = int(active.sum().item()) * n // 2 + groups_touched * n * 4 + io_bytes + k * 8
            us = time_graph([lambda c=c: gemv_triton.sparse_gemv(x, c[0], c[1], c[2], t, bits=4, group_size=GROUP)
                             for c in ours], reps)
            # the launch shape the dispatch takes (tensor-core kernel for M >= 2, if picked)
            cfg = gemv_triton.pick_mma(m, n, k, 4, GROUP, x.device) or gemv_triton.pick_fused(m, n, k, 4, GROUP, x.device)
            r = {**row, "method": "ours", "sparsity": sp, "union_sparsity": round(union, 4), "us": us, "bytes": touched,
                 "tbps": touched / us / 1e6, "speedup_vs_cublas": t_bf16 / us}
            if t_tg:
                r["speedup_vs_tinygemm"] = t_tg / us
            if cfg is not None:
                r["config"] = {"kernel": type(cfg).__name__, **cfg.__dict__}
            results.append(r)
            print(f"{model:4s} {proj:8s} N={n:6d} K={k:6d} M={m} s={sp:2d} ours {us:8.2f} us {touched / us / 1e6:5.2f} TB/s "
                  f"x{t_bf16 / us:5.2f} vs cuBLAS ({t_bf16:.1f}) x{(t_tg or float('nan')) / us:5.2f} vs tinygemm ({t_tg or float('nan'):.1f})",
                  flush=True)
    del bf16_copies, ours
    if tg_ok:
        del tg_copies
    torch.cuda.empty_cache()


def markdown(results, meta):
    lines = [f"# Sparse GEMV benchmark ({meta['gpu']})", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}", f"- git commit: {meta['commit']}",
             f"- torch {meta['torch']}, triton {meta['triton']}; int4, group size {GROUP}, bf16 activations",
             "- time: CUDA-graph replays over enough weight copies to defeat the 60 MB L2, µs per call (median)",
             "- TB/s: bytes the call must touch (ours: active rows of W^T + scales/zeros of touched groups + x, y) / time",
             "- union sparsity (batch 4): fraction of rows of W^T inactive for every row of x", ""]
    keyed = {}
    for r in results:
        keyed.setdefault((r["model"], r["proj"], r["batch"]), []).append(r)
    for (model, proj, m), rs in keyed.items():
        base = {r["method"]: r for r in rs if r["sparsity"] == 0 and r["method"] in ("cublas_bf16", "tinygemm_int4")}
        cb, tg = base.get("cublas_bf16"), base.get("tinygemm_int4")
        n, k = rs[0]["N"], rs[0]["K"]
        lines.append(f"## Llama-3-{model} {proj} (N={n}, K={k}), batch {m}")
        lines.append("")
        lines.append(f"cuBLAS bf16: {cb['us']:.1f} µs ({cb['tbps']:.2f} TB/s); "
                     + (f"tinygemm int4: {tg['us']:.1f} µs ({tg['tbps']:.2f} TB/s)" if tg else "tinygemm: n/a"))
        lines.append("")
        lines.append("| sparsity | union | ours µs | TB/s | vs cuBLAS | vs tinygemm |")
        lines.append("|---:|---:|---:|---:|---:|---:|")
        for r in rs:
            if r["method"] == "ours":
                lines.append(f"| {r['sparsity']} | {r['union_sparsity']:.2f} | {r['us']:.1f} | {r['tbps']:.2f} | "
                             f"{r['speedup_vs_cublas']:.2f}x | {r.get('speedup_vs_tinygemm', float('nan')):.2f}x |")
        cfgs = [r["config"] for r in rs if r["method"] == "ours" and "config" in r]
        if cfgs:
            lines.append("")
            lines.append(f"Launch shape: {cfgs[0]}")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--models", default="8B,70B")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    ap.add_argument("--tag", default="gemv_h200")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    batches = [int(b) for b in args.batches.split(",")]
    sparsities = [int(s) for s in args.sparsities.split(",")]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        commit = commit if commit and commit != "HEAD" else os.environ.get("GIT_COMMIT", "unknown")
    except OSError:
        commit = "unknown"
    import triton

    meta = dict(gpu=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=commit, command="PYTHONPATH=. python " + " ".join(sys.argv), torch=torch.__version__, triton=triton.__version__,
                tinygemm_schema=str(torch.ops.aten._weight_int4pack_mm.default._schema),
                convert_schema=str(torch.ops.aten._convert_weight_to_int4pack.default._schema))
    print(meta, flush=True)
    results = []
    for model in args.models.split(","):
        for proj, (n, k) in SHAPES[model].items():
            bench_shape(model, proj, n, k, batches, sparsities, results)
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)
            with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:  # also after each shape (partial runs)
                f.write(markdown(results, meta))
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
        f.write(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
