"""Leave-out probes and launch-shape sweep of the sparse GEMV kernels on one GPU (measurement for docs/kernels.md).

    PYTHONPATH=. python benchmarks/gemv_probe.py --out DIR [--quick]

For the first kernel (benchmarks/gemv_v1_kernels.py, two launches) and the one-launch kernel (kernels/gemv_triton.py)
it times, like benchmarks/gemv.py (CUDA-graph replays over enough weight copies to defeat the L2, median):
the full call, the call without a stage (compaction launch, split-K atomics, index indirection, unpack/FMA), and
launch shapes (vec, warps, rows, k_range). Probe results are wrong on purpose; only the full calls are checked
(against the pure-torch reference, on the GPU, before timing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import gemv_v1_kernels as v1  # noqa: E402
from gemv import GROUP, SHAPES, make_tinygemm, n_copies, time_graph  # noqa: E402

from kernels import gemv_triton as g  # noqa: E402
from kernels import reference  # noqa: E402

OUT = []
OLD = False  # --old: also the leave-out probes of the first kernel


def emit(**r):
    OUT.append(r)
    print(json.dumps(r), flush=True)


def layer(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(k // GROUP, n, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // GROUP, n), generator=gen).to(torch.bfloat16)
    return q, reference.pack_int4(q), scales, zeros


def touched(x, thr, n, k):
    m = x.shape[0]
    active = (x.float().abs() > thr).any(0)
    groups = active.view(-1, GROUP).any(1).sum().item()
    return int(active.sum().item()) * n // 2 + groups * n * 4 + m * k * 2 + m * n * 2 + k * 8


def fused_call(x, c, t, cfg, ws=None):
    m, n, k = g._check(x, c[0], c[1], c[2], 4, GROUP)
    return g._launch_fused(x, c[0], c[1], c[2], 1, t, 0.0, 0, (n,), 4, GROUP, cfg, m, n, k, probe_ws=ws)


def check_shape(model, proj, n, k, m, cfg=None):
    q, qw, s, z = layer(n, k, seed=1)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    for sp in (0.0, 0.5, 0.9):
        thr = float(torch.quantile(x.float().abs().flatten(), sp)) if sp else 0.0
        want = reference.sparse_gemv_ref(x.cuda(), qw.cuda(), s.cuda(), z.cuda(), thr, bits=4, group_size=GROUP).float()
        for rep in range(2):  # twice: the self-cleaning workspace must be zero again
            y = g.sparse_gemv(x.cuda(), qw.cuda(), s.cuda(), z.cuda(), torch.tensor(thr, device="cuda"), bits=4,
                              group_size=GROUP, config=cfg).float()
            err = ((y - want).norm() / want.norm()).item()
            ok = bool(torch.isfinite(y).all()) and err < 1e-2
            emit(kind="check", model=model, proj=proj, m=m, sparsity=sp, rep=rep, rel_err=err, ok=ok,
                 cfg=None if cfg is None else cfg.__dict__)
            assert ok, (model, proj, m, sp, err)


def bench(model, proj, n, k, batches, sps, sweep, old_probes):
    q, qw, s, z = layer(n, k)
    nb = k * n // 2 + 2 * (k // GROUP) * n * 2
    ours = [(qw.cuda(), s.cuda(), z.cuda())]
    ours += [tuple(t.clone() for t in ours[0]) for _ in range(n_copies(nb) - 1)]
    w_bf16 = reference.dequantize(qw, s, z, bits=4, group_size=GROUP).t().contiguous().to(torch.bfloat16)
    bf16 = [w_bf16.cuda() for _ in range(n_copies(k * n * 2))]
    del w_bf16
    tg = make_tinygemm(q, s, z)
    tgs = [tg] + [(tg[0].clone(), tg[1].clone()) for _ in range(n_copies(nb) - 1)]
    for m in batches:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).cuda()
        base = dict(model=model, proj=proj, N=n, K=k, m=m)
        t_cb = time_graph([lambda w=w: F.linear(x, w) for w in bf16], 40)
        t_tg = time_graph([lambda c=c: torch._weight_int4pack_mm(x, c[0], GROUP, c[1]) for c in tgs], 40)
        emit(kind="time", method="cublas_bf16", sparsity=0, us=t_cb, **base)
        emit(kind="time", method="tinygemm", sparsity=0, us=t_tg, **base)
        for sp in sps:
            thr = float(torch.quantile(x.float().abs().flatten().cpu(), sp / 100)) if sp else 0.0
            t = torch.tensor(thr, device="cuda")
            tb = touched(x, thr, n, k)
            d = g.pick_fused(m, n, k, 4, GROUP, x.device)
            variants = [("new", d)]
            for name, kw in (("new_pipe", dict(pipe=True)), ("new_f32", dict(f16=False)), ("new_f16", dict(f16=True)),
                             ("new_pipe_f32", dict(pipe=True, f16=False)), ("new_pipe_f16", dict(pipe=True, f16=True))):
                cfg = g.FusedConfig(**{**d.__dict__, **kw})
                if cfg != d and cfg not in [v for _, v in variants] and (m == 1 or "f32" not in name):
                    variants.append((name, cfg))
            if sweep and m == 1:
                variants += [(f"new_v{v}_w{w}_r{r}_kr{kr}_{'f16' if f else 'f32'}", g.FusedConfig(vec=v, warps=w, rows=r, k_range=kr, f16=f))
                             for (v, w, r, kr, f) in sweep]
            if old_probes:
                variants += [(f"new_probe{p}", g.FusedConfig(**{**d.__dict__, "probe": p})) for p in (1, 2, 3)]
            for name, cfg in variants:
                ws = None
                if cfg.probe == 1:
                    ws = (torch.zeros(k // cfg.k_range * m * n, device="cuda"), torch.zeros(4096, dtype=torch.int32, device="cuda"))
                try:
                    us = time_graph([lambda c=c, cfg=cfg, ws=ws: fused_call(x, c, t, cfg, ws) for c in ours], 40)
                except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported
                    emit(kind="error", name=name, err=repr(e)[:300], **base)
                    continue
                lc = g.LAST_COMPILED
                emit(kind="time", method=name, sparsity=sp, us=us, tbps=tb / us / 1e6, vs_tg=t_tg / us, vs_cb=t_cb / us,
                     cfg=cfg.__dict__, n_regs=getattr(lc, "n_regs", None), n_spills=getattr(lc, "n_spills", None), **base)
            if old_probes and m == 1 and OLD:
                bufs = [v1.probe_setup(x, c[0], c[1], c[2], t) for c in ours]
                for name, probe, compact in (("old", 0, True), ("old_no_compact_launch", 0, False),
                                             ("old_no_atomics", 1, True), ("old_contig_rows", 2, True),
                                             ("old_no_fma", 3, True), ("old_no_atomics_contig", 4, True)):
                    us = time_graph([lambda c=c, b=b, probe=probe, compact=compact: v1.probe_call(x, c[0], c[1], c[2], t, b, probe, compact)
                                     for c, b in zip(ours, bufs)], 40)
                    emit(kind="time", method=name, sparsity=sp, us=us, tbps=tb / us / 1e6, vs_tg=t_tg / us, **base)
                del bufs
    del ours, bf16, tgs
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds: skip the remaining shapes after this")
    ap.add_argument("--old", action="store_true")
    args = ap.parse_args()
    global OLD
    OLD = args.old
    import triton

    emit(kind="meta", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
         sms=torch.cuda.get_device_properties(0).multi_processor_count)
    # copy ceiling
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        b.copy_(a)
    e1.record()
    e1.synchronize()
    emit(kind="copy", tbps=2 * a.numel() * 10 / (e0.elapsed_time(e1) * 1e-3) / 1e12)
    del a, b
    t0 = time.time()
    for model, proj, m in (("70B", "q_o", 1), ("70B", "k_v", 1), ("8B", "q_o", 1), ("70B", "q_o", 4), ("8B", "k_v", 4), ("8B", "k_v", 2)):
        n, k = SHAPES[model][proj]
        check_shape(model, proj, n, k, m)
    emit(kind="checks_done", s=time.time() - t0)
    small_sw = [(4, 4, 4, 128, False), (4, 8, 4, 128, True), (2, 8, 4, 128, False), (1, 4, 4, 64, False)]
    plan = [("70B", "q_o", None, False), ("70B", "gate_up", None, False), ("70B", "down", None, False),
            ("70B", "qkv", None, False), ("70B", "k_v", small_sw, False),
            ("8B", "q_o", small_sw, False), ("8B", "qkv", small_sw, False), ("8B", "gate_up", None, False),
            ("8B", "down", None, False), ("8B", "k_v", small_sw, False)]
    for model, proj, sw, old in plan:
        if time.time() - t0 > args.budget:
            emit(kind="skipped", model=model, proj=proj)
            continue
        n, k = SHAPES[model][proj]
        bench(model, proj, n, k, [1, 4], [0, 50, 70, 90], sw, old)
        with open(os.path.join(args.out, "probe.json"), "w") as f:
            json.dump(OUT, f)
    # summary
    print("\nSUMMARY (us)")
    for r in OUT:
        if r.get("kind") == "error":
            print("ERROR", r)
        if r.get("kind") == "time" and (r["method"] in ("new", "new_pipe", "new_f32", "new_f16", "old", "cublas_bf16", "tinygemm") or "probe" in r["method"] or r["method"].startswith("old_")):
            print(f"{r['model']:3s} {r['proj']:7s} m{r['m']} s{r['sparsity']:2d} {r['method']:24s} {r['us']:7.2f}"
                  + (f" {r['tbps']:.2f}TB/s x{r['vs_tg']:.2f}tg" if 'tbps' in r else ""))


if __name__ == "__main__":
    main()
