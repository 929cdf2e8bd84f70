"""Stop 28, one device call: the register list (``CoreShape.shfl``) against the table's picks at batch 1.

    PYTHONPATH=. python benchmarks/profile/shfl_call1.py --out DIR

1. correctness on the GPU against float64 (the table's pick with shfl on, every threshold form: python float, 0-dim
   tensor, per-channel [K], the SiLU-and-mul call, a two-part fused call; s0 / s50 / s70, two calls in a row) and
   the sums against the scratch-list kernel's (same slots, same order: expected bit-identical);
2. µs per call (benchmarks/gemv.py's CUDA-graph method over weight copies that defeat the L2) of the pick without
   shfl (the scratch list) and with it on the 70B layers and the 8B MLP calls the decode step makes, s0 / s50 / s70, tinygemm beside them.
Writes DIR/gemv_shfl_h200.{json,md} and prints a table (``--render JSON`` rewrites the md of a result json).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gemv as bench  # noqa: E402

from kernels import dispatch  # noqa: E402
from kernels import gemv_launch as kernel  # noqa: E402

G = 128
LAYERS = {("70B", "q_o"): (8192, 8192, 1), ("70B", "qkv"): (10240, 8192, 1), ("70B", "gate_up"): (28672, 8192, 1),
          ("70B", "down"): (8192, 28672, 1), ("8B", "gate_up_fused"): (28672, 4096, 2), ("8B", "down"): (4096, 14336, 1),
          ("8B", "gate_up"): (14336, 4096, 1)}


def pick(n, k):
    """The table's pick without shfl (the scratch list)."""
    return dataclasses.replace(dispatch.pick_gemv(1, n, k, 4, G, torch.device("cuda")), shfl=False)


def with_shfl(sh):
    s2 = dataclasses.replace(sh, shfl=True)
    return s2 if dispatch.fits(s2, 1, 8192, 4, G) else None


def ref(x, q, s, z, thr):
    xm = torch.where(x.double().abs() > thr, x.double(), 0.0)
    return xm @ ((q.double() - z.double().repeat_interleave(G, 0)) * s.double().repeat_interleave(G, 0))


def checks():
    out = []
    for (model, proj), (n, k, parts) in LAYERS.items():
        sh = pick(n, k)
        s2 = with_shfl(sh)
        if s2 is None:
            out.append(dict(model=model, proj=proj, note=f"shfl does not fit {sh}"))
            continue
        q, qw, s, z = bench.make_layer(n, k, seed=3)
        x = bench.activations(1, k, 5)
        u = bench.activations(1, k, 6)
        for sp in (0, 50, 70):
            thr = bench.threshold_for(x, sp)
            want = ref(x, q, s, z, thr)
            tol = 4 * 2**-7 * want.abs().max().item()
            forms = {"float": thr, "tensor": torch.tensor(thr, device="cuda"),
                     "per_channel": torch.full((k,), thr, device="cuda")}
            for form, t in forms.items():
                for rep in range(2):
                    y = kernel.sparse_gemv(x, qw, s, z, t, bits=4, group_size=G, shape=s2)
                    y0 = kernel.sparse_gemv(x, qw, s, z, t, bits=4, group_size=G, shape=sh)
                    out.append(dict(model=model, proj=proj, sp=sp, form=form, rep=rep,
                                    err=(y.double() - want).abs().max().item() / tol,
                                    vs_scratch=(y.float() - y0.float()).abs().max().item()))
            # SiLU-and-mul inside the call (the decode step's down projection)
            g = x
            h = torch.nn.functional.silu(g.float()) * u.float()
            thr_h = bench.threshold_for(h.to(torch.bfloat16), sp)
            ys = kernel.sparse_gemv_silu(g, u, qw, s, z, torch.tensor(thr_h, device="cuda"), bits=4, group_size=G, shape=s2)
            y0 = kernel.sparse_gemv_silu(g, u, qw, s, z, torch.tensor(thr_h, device="cuda"), bits=4, group_size=G, shape=sh)
            out.append(dict(model=model, proj=proj, sp=sp, form="silu", vs_scratch=(ys.float() - y0.float()).abs().max().item(),
                            err=(ys.double() - ref(h.to(torch.bfloat16), q, s, z, thr_h)).abs().max().item()
                            / (4 * 2**-7 * ref(h.to(torch.bfloat16), q, s, z, thr_h).abs().max().item())))
            # two parts, their own thresholds
            half = n // 2
            ts = torch.tensor([thr, bench.threshold_for(x, min(sp + 20, 90))], device="cuda")
            yf = kernel.sparse_gemv_fused(x, qw, s, z, ts, [half, n - half], bits=4, group_size=G, shape=s2)
            want_f = torch.cat([ref(x, q, s, z, ts[0].item())[:, :half], ref(x, q, s, z, ts[1].item())[:, half:]], 1)
            out.append(dict(model=model, proj=proj, sp=sp, form="fused2",
                            err=(yf.double() - want_f).abs().max().item() / (4 * 2**-7 * want_f.abs().max().item())))
    return out


def timings():
    rows = []
    for (model, proj), (n, k, parts) in LAYERS.items():
        sh = pick(n, k)
        s2 = with_shfl(sh)
        q, qw, s, z = bench.make_layer(n, k)
        w_bytes = k * n // 2 + 2 * (k // G) * n * 2
        copies = [(qw, s, z)] + [(qw.clone(), s.clone(), z.clone()) for _ in range(bench.n_copies(w_bytes) - 1)]
        tg = bench.make_tinygemm(q, s, z)
        tgs = [tg] + [(tg[0].clone(), tg[1].clone()) for _ in range(bench.n_copies(w_bytes) - 1)]
        x = bench.activations(1, k, 1)
        t_tg = bench.time_graph([lambda c=c: torch._weight_int4pack_mm(x, c[0], G, c[1]) for c in tgs])
        for sp in (0, 50, 70):
            thr = bench.threshold_for(x, sp)
            touched, _ = bench.touched_bytes(x, thr, n)
            if parts == 2:
                t = torch.tensor([thr, thr], device="cuda")
                call = lambda c, shp: kernel.sparse_gemv_fused(x, c[0], c[1], c[2], t, [n // 2, n // 2], bits=4,  # noqa: E731
                                                               group_size=G, shape=shp)
            else:
                t = torch.tensor(thr, device="cuda")
                call = lambda c, shp: kernel.sparse_gemv(x, c[0], c[1], c[2], t, bits=4, group_size=G, shape=shp)  # noqa: E731
            res = {}
            for label, shp in (("scratch", sh), ("shfl", s2), ("scratch again", sh), ("shfl again", s2)):
                if shp is None:
                    continue
                res[label] = bench.time_graph([lambda c=c, shp=shp: call(c, shp) for c in copies])
            r = dict(model=model, proj=proj, N=n, K=k, sp=sp, tinygemm=t_tg, touched=touched,
                     shape=dispatch.shape_to_dict(sh), **res)
            rows.append(r)
            print(f"{model} {proj:13s} s{sp:2d} tg {t_tg:6.1f} " + " ".join(
                f"{lb} {v:6.2f} ({touched / v / 1e6:.2f} TB/s)" for lb, v in res.items()), flush=True)
        del copies, tgs
        torch.cuda.empty_cache()
    return rows


def markdown(res: dict) -> str:
    """The result file's md: meta, the correctness summary, µs (TB/s over touched bytes) per layer and sparsity."""
    meta, cs, rows = res["meta"], res["checks"], res["timings"]
    worst = max(c.get("err", 0) for c in cs)
    lines = ["# shfl (the compacted list in registers) against the scratch list, batch 1 (" + meta["gpu"] + ")", "",
             f"- command: `{meta['command']}`", f"- git commit: {meta['commit']}; date: {meta.get('date', '-')}",
             "- µs per call: CUDA graphs over weight copies that defeat the L2 (benchmarks/gemv.py's method), each "
             "variant timed twice in the run (first / again); TB/s over the bytes the call must touch",
             f"- correctness on the GPU: {len(cs)} checks (python-float, 0-dim and per-channel thresholds, the SiLU "
             f"form, two-part calls; s0/s50/s70), {sum(c.get('err', 0) > 1 for c in cs)} over tolerance (worst "
             f"{worst:.3f} of the 4-ulp bound); max |shfl - scratch| {max(c.get('vs_scratch', 0) for c in cs):.3g}", "",
             "| layer | s | tinygemm | scratch | shfl | shfl / scratch |", "|---|---:|---:|---|---|---:|"]
    for r in rows:
        tb = r["touched"] / 1e6
        sc = (r["scratch"] + r["scratch again"]) / 2
        sh = (r["shfl"] + r["shfl again"]) / 2 if "shfl" in r else None
        cell = lambda v: f"{v:.2f} ({tb / v:.2f})"  # noqa: E731
        lines.append(f"| {r['model']} {r['proj']} | {r['sp']} | {r['tinygemm']:.1f} | {cell(sc)} | "
                     + (f"{cell(sh)} | {sh / sc:.3f} |" if sh else "- | - |"))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--render", default=None, help="a result json: write its md beside --out's json name, no GPU")
    a = ap.parse_args()
    if a.render:
        with open(a.render) as f:
            res = json.load(f)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gemv_shfl_h200.md"), "w") as f:
            f.write(markdown(res))
        return
    meta = dict(gpu=torch.cuda.get_device_name(), commit=os.environ.get("TEAL_QUANT_GIT_COMMIT", ""),
                command="PYTHONPATH=. python " + " ".join(sys.argv),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    cs = checks()
    bad = [c for c in cs if c.get("err", 0) > 1]
    print(f"checks: {len(cs)}, over tolerance: {len(bad)}; worst err {max(c.get('err', 0) for c in cs):.3f}; "
          f"max |shfl - scratch| {max(c.get('vs_scratch', 0) for c in cs):.3g}", flush=True)
    for c in bad[:10]:
        print("BAD", c, flush=True)
    for c in cs:
        if "note" in c:
            print(c["note"], flush=True)
    rows = timings()
    os.makedirs(a.out, exist_ok=True)
    res = dict(meta=meta, checks=cs, timings=rows)
    with open(os.path.join(a.out, "gemv_shfl_h200.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "gemv_shfl_h200.md"), "w") as f:
        f.write(markdown(res))


if __name__ == "__main__":
    main()
