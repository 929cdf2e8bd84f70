"""Tensor-core kernel for 2 <= M <= 16 (kernels.gemv_triton._sgemv_mma_kernel): CUDA correctness of every launch
shape, then a launch-shape sweep at batch 4 (and 8, 16) against the CUDA-core one-launch kernel (FusedConfig) and
the two-launch tl.dot path (GemvConfig), with tinygemm as the baseline; picks the launch shapes.

    PYTHONPATH=. python benchmarks/gemv_mma_sweep.py --out $OUT [--choice mma_choice.json] [--full]

--full then runs benchmarks/gemv.py (all shapes, batch 1 and 4) with the picked shapes (gemv_triton.pick_mma is
replaced for that run by the sweep's choice; the committed pick_mma encodes the same choice afterwards).
Times: the CUDA-graph method of benchmarks/gemv.py (weight copies defeat the L2), µs per call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import gemv as B  # noqa: E402

from kernels import gemv_triton, reference  # noqa: E402
from kernels.gemv_triton import MmaConfig  # noqa: E402

GROUP = 128
CANDS = {  # run 1 (15:30 UTC): n256k64w4 best of BLOCK_N 64-256, BLOCK_K 32/64, 4/8 warps, stages 1-3, K-range 64/128
    "n256k64w4": MmaConfig(256, 64, 4, 128, 1),
    "n256k128w4": MmaConfig(256, 128, 4, 128, 1),
    "n256k128w8": MmaConfig(256, 128, 8, 128, 1),
    "n512k32w8": MmaConfig(512, 32, 8, 128, 1),
    "n512k64w8": MmaConfig(512, 64, 8, 128, 1),
    "n256k16w4": MmaConfig(256, 16, 4, 128, 1),
    "n256k32w4r128": MmaConfig(256, 32, 4, 128, 1, 128),
    "n256k64w4r128": MmaConfig(256, 64, 4, 128, 1, 128),
    "n128k128w4": MmaConfig(128, 128, 4, 128, 1),
}
SWEEP = [("70B", "q_o"), ("70B", "gate_up"), ("8B", "q_o"), ("70B", "k_v")]
LARGE = [("70B", "q_o"), ("70B", "gate_up")]


def truth(x, q, s, z, t):
    x64 = x.double().cpu()
    xm = torch.where(x64.abs() > t, x64, torch.zeros((), dtype=torch.float64))
    return xm @ ((q.double() - z.double().cpu().repeat_interleave(GROUP, 0)) * s.double().cpu().repeat_interleave(GROUP, 0))


def correctness(log):
    ok = {}
    for name, cfg in CANDS.items():
        good = True
        for (k, n) in ((1024, 3000), (2048, 4096)):
            g = torch.Generator().manual_seed(k + n)
            q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8)
            s = (torch.rand(k // GROUP, n, generator=g) * 0.02 + 0.002).to(torch.bfloat16)
            z = torch.randint(0, 16, (k // GROUP, n), generator=g).to(torch.bfloat16)
            qw = reference.pack_int4(q).cuda()
            for m, dtype in ((4, torch.bfloat16), (4, torch.float16)):
                x = torch.randn(m, k, generator=g).to(dtype)
                for sp in (0.0, 0.5):
                    t = float(torch.quantile(x.float().abs().flatten(), sp)) if sp else 0.0
                    try:
                        for _ in range(2):
                            y = gemv_triton.sparse_gemv(x.cuda(), qw, s.to(dtype).cuda(), z.to(dtype).cuda(),
                                                        torch.tensor(t, device="cuda"), bits=4, group_size=GROUP, config=cfg)
                        want = truth(x, q, s.to(dtype), z.to(dtype), t)
                        err = (y.double().cpu() - want).abs().max().item()
                        lim = 4 * {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype] * max(want.abs().max().item(), 1e-3)
                        good &= bool(torch.isfinite(y).all()) and err <= lim
                        log.append(dict(cand=name, k=k, n=n, m=m, dtype=str(dtype), sp=sp, err=err, lim=lim))
                    except Exception as e:  # noqa: BLE001
                        log.append(dict(cand=name, k=k, n=n, m=m, error=repr(e)[:400]))
                        print(name, "FAILED", repr(e)[:2000], flush=True)
                        traceback.print_exc()
                        good = False
                        break
        ok[name] = good
        print(f"correctness {name}: {'ok' if good else 'FAIL'}", flush=True)
    return ok


def sweep(ok, out, rows):
    for model, proj in SWEEP:
        n, k = B.SHAPES[model][proj]
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
        scales = (torch.rand(k // GROUP, n, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
        zeros = torch.randint(0, 16, (k // GROUP, n), generator=gen).to(torch.bfloat16)
        qweight = reference.pack_int4(q)
        w_bytes = k * n // 2 + 2 * (k // GROUP) * n * 2
        tg = B.make_tinygemm(q, scales, zeros)
        tg_copies = [tg] + [(tg[0].clone(), tg[1].clone()) for _ in range(B.n_copies(w_bytes) - 1)]
        ours = [(qweight.cuda(), scales.cuda(), zeros.cuda())]
        ours += [tuple(t.clone() for t in ours[0]) for _ in range(B.n_copies(w_bytes) - 1)]
        batches = (4, 8, 16) if (model, proj) == ("70B", "q_o") else (4,)
        for m in batches:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).cuda()
            t_tg = B.time_graph([lambda c=c: torch._weight_int4pack_mm(x, c[0], GROUP, c[1]) for c in tg_copies], 40)
            rows.append(dict(model=model, proj=proj, N=n, K=k, batch=m, method="tinygemm_int4", sparsity=0, us=t_tg))
            print(f"{model} {proj} M={m} tinygemm {t_tg:.2f} us", flush=True)
            base = {"two_launch": gemv_triton.pick_config(m, n, k, 4, GROUP, x.device)}
            if m <= 4:
                base["cuda_core"] = gemv_triton.pick_fused(m, n, k, 4, GROUP, x.device)
            cands = {**base, **{f"mma_{nm}": c for nm, c in CANDS.items() if ok.get(nm)}}
            if m > 4:
                cands = {nm: c for nm, c in cands.items() if nm in ("two_launch", "mma_n256k64w4", "mma_n256k128w4", "mma_n512k32w8", "mma_n256k64w4r128")}
            for sp in (0, 50, 70):
                thr = float(torch.quantile(x.float().abs().flatten().cpu(), sp / 100)) if sp else 0.0
                t = torch.tensor(thr, device="cuda")
                for nm, cfg in cands.items():
                    try:
                        us = B.time_graph([lambda c=c, cfg=cfg: gemv_triton.sparse_gemv(x, c[0], c[1], c[2], t, bits=4,
                                           group_size=GROUP, config=cfg) for c in ours], 40)
                    except Exception as e:  # noqa: BLE001
                        print(f"{nm} failed: {e!r}"[:500], flush=True)
                        continue
                    rows.append(dict(model=model, proj=proj, N=n, K=k, batch=m, method=nm, sparsity=sp, us=us,
                                     vs_tinygemm=t_tg / us, config=cfg.__dict__))
                    print(f"{model} {proj} M={m} s={sp} {nm:20s} {us:8.2f} us  x{t_tg / us:.2f} vs tinygemm", flush=True)
            with open(os.path.join(out, "mma_sweep.json"), "w") as f:
                json.dump(rows, f, indent=1)
        del ours, tg_copies
        torch.cuda.empty_cache()


def pick(rows, shapes):
    """Candidate with the lowest summed time over shapes x sparsity at batch 4; None if cuda_core is faster."""
    tot = {}
    for r in rows:
        if r["batch"] == 4 and (r["model"], r["proj"]) in shapes and r["method"] not in ("tinygemm_int4", "two_launch"):
            tot.setdefault(r["method"], []).append(r["us"])
    n = max(len(v) for v in tot.values())
    tot = {k: sum(v) for k, v in tot.items() if len(v) == n}
    best = min(tot, key=tot.get)
    print("totals", shapes, {k: round(v, 1) for k, v in sorted(tot.items(), key=lambda kv: kv[1])}, flush=True)
    return None if best == "cuda_core" else CANDS[best[4:]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--choice", help="mma_choice.json of a previous sweep: skip correctness and sweep")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    print(torch.cuda.get_device_name(), torch.__version__, gemv_triton.triton.__version__, flush=True)
    if args.choice:  # a previous sweep's choice
        with open(args.choice) as f:
            choice = json.load(f)
    else:
        log = []
        ok = correctness(log)
        with open(os.path.join(args.out, "mma_correctness.json"), "w") as f:
            json.dump(dict(ok=ok, log=log), f, indent=1)
        if not any(ok.values()):
            print("no launch shape is correct: stop", flush=True)
            sys.exit(3)
        rows = []
        sweep(ok, args.out, rows)
        large = pick(rows, LARGE)
        small = pick(rows, [("8B", "q_o"), ("70B", "k_v")])
        choice = dict(large=large.__dict__ if large else None, small=small.__dict__ if small else None)
        print("choice", choice, f"elapsed {time.time() - t0:.0f} s", flush=True)
        with open(os.path.join(args.out, "mma_choice.json"), "w") as f:
            json.dump(choice, f, indent=1)
    large = MmaConfig(**choice["large"]) if choice["large"] else None
    small = MmaConfig(**choice["small"]) if choice["small"] else None
    if args.full:
        sms = torch.cuda.get_device_properties(0).multi_processor_count

        def pick_mma(m, n, k, bits, group_size, device, n_parts=1):
            if bits != 4 or not 2 <= m <= gemv_triton.MAX_M or group_size % 128:
                return None
            large_shape = (triton_cdiv(n, 256) + n_parts - 1) * (k // 128) >= 4 * sms
            return large if large_shape else small

        gemv_triton.pick_mma = pick_mma
        sys.argv = ["benchmarks/gemv.py", "--out", args.out, "--models", "70B,8B", "--tag", "gemv_h200"]
        B.main()


def triton_cdiv(a, b):
    return -(-a // b)


if __name__ == "__main__":
    main()
