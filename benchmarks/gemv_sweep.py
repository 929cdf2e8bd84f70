"""Launch-shape sweep of the sparse GEMV on one GPU; writes the launch-shape table the dispatch reads.

    PYTHONPATH=. python benchmarks/gemv_sweep.py --out DIR [--table kernels/configs/h200.json]

1. compiles every candidate launch shape in parallel worker processes (the Triton cache is shared on disk),
2. checks every candidate against a float64 reference at batch 1 / 4 / 16 (fresh random inputs, two calls in a row,
   so the self-zeroing split-K workspace is checked too) and drops any that fails,
3. times every surviving candidate on the Llama-3 8B and 70B shapes at batch 1, 2, 4, 8, 16 and sparsity 0 and 50
   (benchmarks/gemv.py's method: CUDA graphs over weight copies that defeat the L2),
4. writes the table (kernels/dispatch.py's rule format): per batch class (1; 2; 3-4 from batch 4; 5-8 from batch 8;
   9-16 from batch 16) one exact rule per measured shape with its fastest candidate (geometric mean over the
   sparsities), then rules by weight size (nearest measured size) and a catch-all with the best candidate overall
   (``--batches 1 --merge OLD``: only batch 1 is swept; OLD's rules for batch sizes not swept are kept),
and the raw timings as ``gemv_sweep_<gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import gemv as bench  # noqa: E402  (benchmarks/gemv.py: the timing method, layers, precompilation)
from gemv import GROUP, SHAPES, activations, git_commit, make_layer, n_copies, threshold_for, time_graph, touched_bytes  # noqa: E402

from kernels import dispatch  # noqa: E402
from kernels import gemv_launch as kernel  # noqa: E402
from kernels.dispatch import CoreShape, MmaShape, SplitKShape  # noqa: E402

CORE = [  # batch 1. Round 14: the picks of the compacting layers without and with `shfl` (the compacted list in
    # registers), and shfl with more programs (v2), fewer steps (R = 8, loads_first), always compacted, a later
    # in-place switch (dense 95); registers from benchmarks/profile/sass_core.py (sm_90, 70B q/o specialization)
    CoreShape(4, 4, 4, 128, evict_first=True, dense=85, h2=True),  # 8B gate/up, 70B qkv, gate/up, down; 72 registers
    CoreShape(4, 4, 4, 128, evict_first=True, dense=85, h2=True, shfl=True),  # 72
    CoreShape(2, 4, 4, 128, pipe=True, evict_first=True, h2=True),  # 8B down; 56
    CoreShape(2, 4, 4, 128, pipe=True, evict_first=True, h2=True, shfl=True),  # 48
    CoreShape(4, 4, 4, 128, pipe=True, evict_first=True, h2=True),  # 70B q/o
    CoreShape(2, 4, 4, 128, evict_first=True, dense=85, h2=True, shfl=True),  # 48
    CoreShape(2, 4, 8, 128, evict_first=True, dense=85, h2=True, loads_first=True, shfl=True),  # 56
    CoreShape(4, 4, 4, 128, evict_first=True, h2=True, shfl=True),  # 56
    CoreShape(4, 4, 4, 128, evict_first=True, dense=95, h2=True, shfl=True),
    CoreShape(2, 4, 8, 128, pipe=True, evict_first=True, h2=True, loads_first=True, shfl=True),  # 58
    # earlier rounds' candidates (git history of this file): groups, stages, pipe, w8 / r8 (rows interleaved with
    # the FMAs), kr32 compacted, preload 1 and 2 at other vec / warps / k_range (rounds 10-11), lookahead (round 11),
    # loads_first at R = 8 / 16 and two- / one-warp programs (round 12)
]
# batch 2-4 on the CUDA-core kernel with h2 (round 9: the unpack shared by the batch rows, one power of two per row,
# x paired before the loop). Round 10: the table's picks for batch 3-4 and the preload shapes (SASS at M = 4:
# registers)
CORE_BATCHED = [  # round 12: the 8B gate/up and down picks at batch 3-4, and loads_first at R = 8 (in place)
    CoreShape(2, 2, 4, 128, evict_first=True, dense=100, h2=True),  # 70B q/o, 8B down
    CoreShape(2, 1, 4, 64, evict_first=True, dense=100, h2=True),  # 8B gate/up
    CoreShape(1, 1, 8, 128, evict_first=True, dense=100, h2=True),  # 8B fused gate/up (the nearest-size rule)
    CoreShape(2, 1, 8, 64, evict_first=True, dense=100, h2=True, loads_first=True),
    CoreShape(2, 2, 8, 128, evict_first=True, dense=100, h2=True, loads_first=True),
    # earlier rounds' candidates (git history of this file): round 9-10's batched h2 and preload shapes
]
# always-dense shapes for calls whose threshold is a python number <= 0 (a quantized lm_head passes 0.0): the table's
# ``dense_threshold`` rules, timed at batch 1 with that threshold on every layer and on the lm_head shapes, int4 and
# int8 (h2 is int4-only: int8 calls take the fp32 path of the same shape)
DENSE = [
    CoreShape(4, 4, 4, 128, evict_first=True, dense=100),  # 96 registers
    CoreShape(4, 4, 4, 128, evict_first=True, dense=100, h2=True),  # 71 registers
    CoreShape(2, 4, 4, 128, evict_first=True, dense=100, h2=True),
    CoreShape(4, 8, 4, 128, f16=False, dense=100),
    CoreShape(1, 4, 8, 64, f16=False, dense=100),
    CoreShape(2, 4, 4, 64, dense=100, h2=True),
]
HEADS = {"8B": (128256, 4096), "70B": (128256, 8192)}  # lm_head (N = vocabulary, K = hidden)
MMA = [
    MmaShape(256, 64, 4, 128, maxnreg=128),  # the previous M = 2..4 small-layer shape
    MmaShape(256, 64, 4, 128, swap=True),
    MmaShape(128, 64, 4, 128, swap=True),
    MmaShape(128, 32, 4, 64, swap=True),
    MmaShape(256, 64, 4, 128, swap=True, tiles=2),
    MmaShape(128, 64, 4, 128, swap=True, tiles=4),
    MmaShape(128, 64, 4, 128, swap=True, tiles=8),
    MmaShape(512, 32, 8, 128, swap=True),
    MmaShape(256, 64, 8, 128, swap=True),
]
SPLITK = [  # dense weight tiles, split-K (docs/kernels.md round 6); batch 2-16. The table's split-K shapes first (the
    # first sweeps, commit 3cb5de1 / 111aa39: block_n 64-256, block_k 64/128, 2/4/8 warps, stages 2-6, 264-2112
    # programs, swap, skip, prefetch; round 9-10 re-sweeps at batch 2-4), then round 13's one-wave shapes for the 8B
    # q/o and qkv at batch 4 (registers / shared memory from benchmarks/profile/sass_core.py at M = 4: programs per SM,
    # waves and instructions per scheduler in docs/kernels.md round 13)
    SplitKShape(64, 128, 4, 5),  # batch 3-8 pick of the 8B q/o and qkv (91 registers, 32 KB: 5 per SM)
    SplitKShape(64, 128, 4, 5, prefetch=False),
    SplitKShape(64, 128, 4, 4, programs=1056, prefetch=False),
    SplitKShape(64, 128, 4, 3, programs=2112),
    SplitKShape(64, 128, 4, 4, programs=2112),
    SplitKShape(128, 128, 4, 4, programs=1056),
    SplitKShape(64, 128, 4, 5, programs=384),  # qkv: 4 K-splits of 8 steps (3 per SM) instead of 6 of 6 (5 per SM)
    SplitKShape(64, 128, 2, 4, maxnreg=128),  # 128 registers, 28 KB: 7 per SM; 5.5 instructions per weight against 7.2
    SplitKShape(64, 128, 2, 4, programs=768, maxnreg=128),  # q/o 704 programs of 3 steps, qkv 768 of 4
    SplitKShape(64, 128, 4, 4, programs=768, maxnreg=72),  # 72 registers, no spills: 7 per SM (24 warps)
    SplitKShape(32, 128, 2, 5, programs=1056),  # 107 registers, 16 KB: 9 per SM
    SplitKShape(128, 128, 4, 3),  # 127 registers, 48 KB: 4 per SM; 5.6 per weight; q/o 512 programs of 2 steps
    SplitKShape(128, 128, 4, 3, programs=384),  # q/o 352 programs of 3 steps, qkv 384 of 4
    SplitKShape(128, 128, 4, 5, programs=384),  # 64 KB: 3 per SM
    # sum_dot: each K-step's sum of x as a ones-tile tl.dot (no shuffles, 9 instead of 16 barriers per program)
    SplitKShape(64, 128, 4, 5, sum_dot=True),  # 64 registers, 36 KB: 6 per SM; 332 instructions per step (373)
    SplitKShape(64, 128, 4, 5, programs=384, sum_dot=True),
    SplitKShape(64, 128, 4, 3, programs=768, sum_dot=True),  # 28 KB: 8 per SM
    SplitKShape(64, 128, 2, 4, sum_dot=True),  # 104 registers, 32 KB: 6 per SM; 5.0 per weight
    SplitKShape(128, 128, 4, 3, sum_dot=True),  # 87 registers, 52 KB: 4 per SM
]
if bench.SMOKE:
    CORE, MMA, SPLITK = CORE[:2] + CORE[5:6], MMA[:2], [SplitKShape(64, 64, 4, 2, programs=8)]
    CORE_BATCHED = CORE_BATCHED[:1] + CORE_BATCHED[-1:]
    DENSE, HEADS = DENSE[:2], {"tiny": (512, 256)}
BATCHES = (1, 2, 4, 8, 16)
SPARSITIES = (0, 50)
FAMILIES = ("core", "mma", "splitk")
CHECK_FUSED = False  # the correctness check also runs a fused two-part call (set when fused layers are swept)
FORM = "step"  # time the calls the decode step makes in another form in that form (main: --form)
CLASSES = {1: (1, 1), 2: (2, 2), 4: (3, 4), 8: (5, 8), 16: (9, 16)}


def candidates(m: int) -> list:
    """Batch 1: CORE; batch 2-4: CORE_BATCHED (since round 9; the batch-1 shapes, made for M = 1, were 1.16-1.77x
    slower than split-K at M = 2-4 in round 6); every batch: MMA; batch >= 2: SPLITK."""
    core = (CORE if m == 1 else CORE_BATCHED if m <= dispatch.CORE_MAX_M else []) if "core" in FAMILIES else []
    return core + (MMA if "mma" in FAMILIES else []) + (SPLITK if "splitk" in FAMILIES and m > 1 else [])


check_layer = bench.check_layer


def truth(x, q, scales, zeros, thr):
    x64 = x.double()
    xm = torch.where(x64.abs() > thr, x64, torch.zeros((), dtype=torch.float64, device=x.device))
    s = scales.double().repeat_interleave(GROUP, 0)
    z = zeros.double().repeat_interleave(GROUP, 0)
    return xm @ ((q.double() - z) * s)


def worst_error(run, want, what: str, log) -> float:
    """Max error / tolerance of two calls of `run` in a row against the float64 `want`; inf when a call raises (a
    candidate that does not compile or run is dropped)."""
    worst = 0.0
    for _ in range(2):
        try:
            y = run()
        except Exception as e:  # noqa: BLE001
            log(f"FAILED to run: {what}: {e!r}"[:500])
            return float("inf")
        err = (y.double() - want).abs().max().item()
        tol = 4 * 2**-7 * max(want.abs().max().item(), 1e-3)
        worst = max(worst, err / tol if math.isfinite(err) else float("inf"))
    return worst


def check_all(log) -> dict:
    """{(shape, m): max error / tolerance} for every candidate; > 1 fails."""
    out = {}
    for m in BATCHES:
        layers = [check_layer(m, seed) for seed in (1, 2)]
        packed = [bench.pack_int4_gpu(q) for q, *_ in layers]
        for shape in candidates(m):
            worst = 0.0
            for (q, scales, zeros, x), qw, sp in zip(layers, packed, (0.5, 0.0)):
                thr = threshold_for(x, int(sp * 100))
                want = truth(x, q, scales, zeros, thr)

                def run():
                    return kernel.sparse_gemv(x, qw, scales, zeros, torch.tensor(thr, device=bench.DEV), bits=4,
                                              group_size=GROUP, shape=shape)

                worst = max(worst, worst_error(run, want, f"{shape} M={m}", log))
            if CHECK_FUSED:  # two parts with thresholds of their own (s50, s70), as the fused gate/up is timed
                q, scales, zeros, x = layers[0]
                n = q.shape[1]
                ths = [threshold_for(x, 50), threshold_for(x, 70)]
                want = torch.cat([truth(x, q[:, i * n // 2:(i + 1) * n // 2], scales[:, i * n // 2:(i + 1) * n // 2],
                                        zeros[:, i * n // 2:(i + 1) * n // 2], th) for i, th in enumerate(ths)], 1)

                def run_fused():
                    return kernel.sparse_gemv_fused(x, packed[0], scales, zeros, torch.tensor(ths, device=bench.DEV),
                                                    [n // 2, n // 2], bits=4, group_size=GROUP, shape=shape)

                worst = max(worst, worst_error(run_fused, want, f"{shape} M={m} fused", log))
            out[(dispatch.shape_to_dict(shape).__repr__(), m)] = worst
            if worst > 1:
                log(f"FAILED correctness: {shape} M={m}: error {worst:.2f} x tolerance")
    return out


def check_dense(log) -> dict:
    """{(shape, bits): max error / tolerance} of every DENSE candidate at batch 1 with a python-float threshold 0.0
    (int4 and int8, two calls in a row); > 1 fails."""
    out = {}
    n, k = (4096, 2048) if not bench.SMOKE else (512, 256)
    for bits in (4, 8):
        q, qw, scales, zeros = bench.make_weights(n, k, bits, seed=3)
        x = activations(1, k, 5)
        want = truth(x, q, scales, zeros, 0.0)
        for shape in DENSE:
            worst = worst_error(
                lambda: kernel.sparse_gemv(x, qw, scales, zeros, 0.0, bits=bits, group_size=GROUP, shape=shape),
                want, f"{shape} bits={bits}", log)
            out[(repr(dispatch.shape_to_dict(shape)), bits)] = worst
            if worst > 1:
                log(f"FAILED correctness: {shape} bits={bits} (dense threshold): error {worst:.2f} x tolerance")
    return out


def dense_sweep(models, log, bad) -> list:
    """Time every DENSE candidate at batch 1 with a python-float threshold 0.0 on every layer (int4) and on the
    lm_head shapes (int4 and int8)."""
    rows = []
    layers = [(model, proj, n, k, 4) for model in models for proj, (n, k) in SHAPES[model].items()]
    layers += [(model, "lm_head", *HEADS[model], bits) for model in HEADS if model in models or bench.SMOKE
               for bits in (4, 8)]
    for model, proj, n, k, bits in layers:
        q, qweight, scales, zeros = bench.make_weights(n, k, bits)
        del q
        w_bytes = k * n * bits // 8 + 2 * (k // GROUP) * n * 2
        copies = [(qweight, scales, zeros)] + [(qweight.clone(), scales.clone(), zeros.clone()) for _ in range(n_copies(w_bytes) - 1)]
        x = activations(1, k, 1)
        nbytes = w_bytes + 2 * k + 2 * n
        for shape in DENSE:
            if (repr(dispatch.shape_to_dict(shape)), bits) in bad or not dispatch.fits(shape, 1, k, bits, GROUP):
                continue
            us = time_graph([lambda c=c, s=shape: kernel.sparse_gemv(x, c[0], c[1], c[2], 0.0, bits=bits, group_size=GROUP, shape=s)
                             for c in copies])
            rows.append(dict(model=model, proj=proj, N=n, K=k, batch=1, bits=bits, threshold="float 0.0",
                             shape=dispatch.shape_to_dict(shape), us=us, tbps=nbytes / us / 1e6))
        best = min((r for r in rows if r["model"] == model and r["proj"] == proj and r["bits"] == bits), key=lambda r: r["us"])
        log(f"{model:4s} {proj:8s} int{bits} M= 1 t=0.0 best {best['us']:7.2f} us {best['tbps']:5.2f} TB/s {best['shape']}")
        del copies, qweight, scales, zeros
        if not bench.SMOKE:
            torch.cuda.empty_cache()
    return rows


def dense_rules(rows) -> list:
    """``dense_threshold`` rules (batch 1): per measured (bits, N, K) the fastest DENSE candidate, then per bits the
    best overall (geometric mean over that bits' layers)."""
    rules, by_bits = [], {}
    for (bits, n, k) in sorted({(r["bits"], r["N"], r["K"]) for r in rows}):
        mine = [r for r in rows if (r["bits"], r["N"], r["K"]) == (bits, n, k)]
        best = min(mine, key=lambda r: r["us"])["shape"]
        shape = dispatch.shape_to_dict(dispatch.shape_from_dict(best), defaults=False)
        rules.append({"m": [1, 1], "dense_threshold": True, "bits": bits, "weight": [n * k, n * k], "n": [n, n], "shape": shape})
        for r in mine:
            by_bits.setdefault(bits, {}).setdefault(json.dumps(r["shape"], sort_keys=True), []).append(math.log(r["us"]))
    for bits, per_shape in sorted(by_bits.items()):
        need = max(len(v) for v in per_shape.values())
        overall = min((sum(v) / len(v), s) for s, v in per_shape.items() if len(v) == need)[1]
        rules.append({"m": [1, 1], "dense_threshold": True, "bits": bits,
                      "shape": dispatch.shape_to_dict(dispatch.shape_from_dict(json.loads(overall)), defaults=False)})
    return rules


def sweep(models, log, bad, save=None, layers=None) -> list:
    """Time every candidate on every layer (``layers``: only these projections); ``save(rows)`` after each layer (a
    run cut short keeps its timings). Fused projections (benchmarks/gemv.py PARTS) are timed as one fused call; with
    FORM "step" the calls the decode step makes in another form (benchmarks/gemv.py STEP_FORM: q/k/v in three parts,
    o_proj and down adding into float32 buffers, down in its SiLU form; batch <= 4) are timed in that form."""
    rows = []
    for model in models:
        for proj, (n, k) in SHAPES[model].items():
            if layers and proj not in layers:
                continue
            q, qweight, scales, zeros = make_layer(n, k)
            del q
            w_bytes = k * n // 2 + 2 * (k // GROUP) * n * 2
            copies = [(qweight, scales, zeros)] + [(qweight.clone(), scales.clone(), zeros.clone()) for _ in range(n_copies(w_bytes) - 1)]
            for m in BATCHES:
                x = activations(m, k, m)
                for sp in SPARSITIES:
                    thr = threshold_for(x, sp)
                    t = torch.tensor(thr, device=bench.DEV)
                    touched, union = touched_bytes(x, thr, n)
                    union_block = bench.union_block_sparsity(x, thr)
                    for shape in candidates(m):
                        key = (repr(dispatch.shape_to_dict(shape)), m)
                        if key in bad or not dispatch.fits(shape, m, k, 4, GROUP):
                            continue
                        fns = bench.step_form_fns(model, proj, x, t, copies, shape) if FORM == "step" else None
                        us = time_graph(fns or [lambda c=c, s=shape: bench.ours_call(x, t, c, proj, shape=s)
                                                for c in copies])
                        rows.append(dict(model=model, proj=proj, N=n, K=k, batch=m, sparsity=sp, form="step" if fns else "plain",
                                         union_sparsity=round(union, 4),
                                         union_block_sparsity=round(union_block, 4),
                                         shape=dispatch.shape_to_dict(shape), us=us, tbps=touched / us / 1e6))
                    best = min((r for r in rows if r["model"] == model and r["proj"] == proj and r["batch"] == m and r["sparsity"] == sp),
                               key=lambda r: r["us"])
                    log(f"{model:4s} {proj:8s} M={m:2d} s={sp:2d} best {best['us']:7.2f} us {best['tbps']:5.2f} TB/s {best['shape']}")
            del copies
            if save:
                save(rows)
            if not bench.SMOKE:
                torch.cuda.empty_cache()
    return rows


def choose(rows) -> dict:
    """{(batch, N, K): best shape dict} by the geometric mean time over the sparsities."""
    scores: dict = {}
    for r in rows:
        key = (r["batch"], r["N"], r["K"], json.dumps(r["shape"], sort_keys=True))
        scores.setdefault(key, []).append(math.log(r["us"]))
    best: dict = {}
    for (m, n, k, shape), logs in scores.items():
        if len(logs) != len(SPARSITIES):
            continue
        score = sum(logs) / len(logs)
        if (m, n, k) not in best or score < best[(m, n, k)][0]:
            best[(m, n, k)] = (score, json.loads(shape))
    return {key: dispatch.shape_to_dict(dispatch.shape_from_dict(shape), defaults=False) for key, (score, shape) in best.items()}


def canonical(shape: dict) -> str:
    """A launch shape as one comparable string: every field, defaults filled in (a table rule names only non-defaults)."""
    return json.dumps(dispatch.shape_to_dict(dispatch.shape_from_dict(shape)), sort_keys=True)


def previous_pick(rules, m: int, n: int, k: int) -> dict | None:
    """The shape the previous table gave batch m on layer (N, K): its exact rule's, else (a layer it had no exact rule
    for, e.g. a fused one) the first rule that matches by batch, weight size and N, as the dispatch picks (not the
    ``dense_threshold`` ones)."""
    matching = [rule for rule in rules or [] if not rule.get("dense_threshold")
                and rule.get("m", [1, 16])[0] <= m <= rule.get("m", [1, 16])[1]
                and rule.get("weight", [0, n * k])[0] <= n * k <= rule.get("weight", [0, n * k])[1]
                and rule.get("n", [0, n])[0] <= n <= rule.get("n", [0, n])[1]]
    exact = [rule for rule in matching if rule.get("weight") == [n * k, n * k] and rule.get("n") == [n, n]]
    for rule in exact + matching[:1]:
        return dispatch.shape_to_dict(dispatch.shape_from_dict(rule["shape"]), defaults=False)
    return None


def keep_unless_faster(best: dict, rows, rules) -> list:
    """Round 11: a layer keeps its previous exact pick unless the new one was faster at every swept sparsity (the
    geometric mean alone moved 8B gate/up to a shape slower at s50 in round 10). Changes ``best``; -> the layers
    kept this way."""
    at = {(r["batch"], r["N"], r["K"], r["sparsity"], canonical(r["shape"])): r["us"] for r in rows}
    kept = []
    for (m, n, k), shape in best.items():
        old = previous_pick(rules, m, n, k)
        if old is None or old == shape:
            continue
        times = [(at.get((m, n, k, sp, canonical(old))), at.get((m, n, k, sp, canonical(shape)))) for sp in SPARSITIES]
        if all(a is not None and b is not None for a, b in times) and not all(b < a for a, b in times):
            best[(m, n, k)] = old
            kept.append((m, n, k))
    return kept


def replace_exact_rules(rules: list, best: dict) -> list:
    """``--layers``: the previous table's rules with the exact rule of each swept (batch, N, K) given its new shape, or,
    where it had none (a layer swept for the first time), one added in front of its batch class's first rule by
    weight size; every other rule kept as it was."""
    out = [dict(r) for r in rules]
    for (m, n, k), shape in sorted(best.items()):
        lo, hi = CLASSES[m]
        ours = [i for i, r in enumerate(out) if not r.get("dense_threshold") and r.get("m") == [lo, hi]]
        exact = next((i for i in ours if out[i].get("weight") == [n * k, n * k] and out[i].get("n") == [n, n]), None)
        if exact is not None:
            out[exact]["shape"] = shape
        else:
            at = next((i for i in ours if "n" not in out[i]), ours[-1] + 1 if ours else len(out))
            out.insert(at, {"m": [lo, hi], "weight": [n * k, n * k], "n": [n, n], "shape": shape})
    return out


def table(rows, gpu: str, meta: dict, keep: list | None = None, dense_rows: list | None = None,
          keep_picks: bool = False, layers_only: bool = False) -> dict:
    """The rules of every batch class measured in ``rows``; ``keep`` (the previous table's rules, when --merge is
    given) keeps its rules whose batch range holds no measured class. ``dense_rows``: the ``dense_threshold`` rules
    come first (without them, kept ones of unswept classes stay). ``keep_picks``: ``keep_unless_faster``."""
    best = choose(rows)
    kept_picks = keep_unless_faster(best, rows, keep) if keep_picks else []
    if layers_only:  # --layers: only the swept layers' exact rules change
        swept = sorted({(r["model"], r["proj"]) for r in rows})
        about = meta["previous_about"].rstrip(".") + (
            f". Then the exact rules of {', '.join(f'{mo} {p}' for mo, p in swept)} at batch "
            f"{', '.join(map(str, sorted({m for m, _, _ in best})))} set (replaced, or added where the layer had none) from the sweep of those layers "
            f"({meta['date']}, commit {meta['commit']})")
        if keep_picks:
            about += (", each keeping its previous pick unless the new one was faster at every swept sparsity (--keep-"
                      f"unless-faster; kept so: {', '.join(f'M={m} N={n} K={k}' for m, n, k in kept_picks) or 'none'})")
        return {"about": about + ".", "rules": replace_exact_rules(keep or [], best)}
    measured = {r["batch"] for r in rows}
    swept = [CLASSES[m] for m in measured]
    # kept: the rules of classes not swept, and the dense_threshold rules unless the dense phase ran (--no-dense)
    kept = [r for r in keep or [] if (r.get("dense_threshold") and not dense_rows)
            or not any(r.get("m", [1, 16])[0] <= hi and lo <= r.get("m", [1, 16])[1] for lo, hi in swept)]
    rules = dense_rules(dense_rows) if dense_rows else []
    rules += [r for r in kept if r.get("dense_threshold")] + [r for r in kept if not r.get("dense_threshold")]
    for m, (lo, hi) in CLASSES.items():
        if m not in measured:
            continue
        mine = sorted(((n * k, n, shape) for (mm, n, k), shape in best.items() if mm == m))
        for w, n, shape in mine:
            rules.append({"m": [lo, hi], "weight": [w, w], "n": [n, n], "shape": shape})  # a measured shape
        sizes = sorted({w for w, _, _ in mine})
        for i, w in enumerate(sizes):
            shape = next(s for ww, _, s in mine if ww == w)
            low = 0 if i == 0 else int(math.sqrt(sizes[i - 1] * w))
            high = int(1e15) if i == len(sizes) - 1 else int(math.sqrt(w * sizes[i + 1]))
            rules.append({"m": [lo, hi], "weight": [low, high], "shape": shape})
        # catch-all: the best candidate overall by geometric mean over this class's shapes
        per_shape: dict = {}
        for r in rows:
            if r["batch"] == m:
                per_shape.setdefault(json.dumps(r["shape"], sort_keys=True), []).append(math.log(r["us"]))
        n_needed = max(len(v) for v in per_shape.values())
        overall = min((sum(v) / len(v), s) for s, v in per_shape.items() if len(v) == n_needed)[1]
        rules.append({"m": [lo, hi], "shape": dispatch.shape_to_dict(dispatch.shape_from_dict(json.loads(overall)), defaults=False)})
    about = (f"{gpu} launch shapes, measured by benchmarks/gemv_sweep.py ({meta['date']}, commit {meta['commit']}): "
             "exact rules for the measured Llama-3 8B/70B shapes, then the nearest measured weight size, then the "
             "best shape overall. Rule format: kernels/dispatch.py.")
    if keep is not None and measured != set(CLASSES):
        about += f" Batch sizes {sorted(measured)} from that sweep; the other batch classes kept from: {meta['kept_from']}"
    if keep_picks:
        about = about.rstrip(".") + "."
        about += (" Exact rules keep the previous pick unless the new one was faster at every swept sparsity (--keep-"
                  f"unless-faster); kept so: {', '.join(f'M={m} N={n} K={k}' for m, n, k in kept_picks) or 'none'}.")
    return {"about": about, "rules": rules}


def table_text(tab: dict) -> str:
    """A launch-shape table as kernels/configs/*.json keeps it: one rule per line, the other entries on one line each."""
    head = "".join(f'\n "{k}": {json.dumps(v)},' for k, v in tab.items() if k != "rules")
    rules = ",\n  ".join(json.dumps(r) for r in tab["rules"])
    return f'{{{head}\n "rules": [\n  {rules}\n ]\n}}\n'


def short(shape: dict) -> str:
    """A launch shape in a few words (the md report)."""
    sh = dispatch.shape_from_dict(shape)
    if isinstance(sh, SplitKShape):
        words = [f"splitk n{sh.block_n} k{sh.block_k} w{sh.warps} S{sh.stages} p{sh.programs}"]
        words += ["no-swap"] * (not sh.swap) + ["skip"] * sh.skip + ["no-prefetch"] * (not sh.prefetch)
        return " ".join(words + [f"maxnreg{sh.maxnreg}"] * bool(sh.maxnreg) + ["sum-dot"] * sh.sum_dot)
    if not isinstance(sh, CoreShape):
        return json.dumps(shape, sort_keys=True)
    words = [f"v{sh.vec} w{sh.warps} r{sh.rows} kr{sh.k_range}"]
    words += ["fp32-unpack"] * (not sh.f16) + ["pipe"] * sh.pipe + ["evict"] * sh.evict_first
    words += [f"maxnreg{sh.maxnreg}"] * bool(sh.maxnreg) + [f"stages{sh.stages}"] * (sh.stages > 1)
    words += [f"groups{sh.groups}"] * (sh.groups > 1) + [f"dense{sh.dense}"] * bool(sh.dense) + ["h2"] * sh.h2
    words += [f"preload{sh.preload}"] * bool(sh.preload) + [f"lookahead{sh.lookahead}"] * bool(sh.lookahead)
    words += ["loads-first"] * sh.loads_first + ["shfl"] * sh.shfl
    return " ".join(words)


def report(result: dict, old_rules: list | None, new_rules: list | None, note: str = "") -> str:
    """The markdown twin of a sweep's json (batch-1 rows): every timing, the best shape per layer and sparsity, and
    the shape each table (previous, new) picks for the layer at batch 1."""
    meta, rows = result["meta"], [r for r in result["timings"] if r.get("threshold") is None]
    corr = result.get("correctness", [])
    ok = [c for c in corr if c["error_over_tolerance"] <= 1]
    shapes = []
    for r in rows:
        key = json.dumps(r["shape"], sort_keys=True)
        if key not in shapes:
            shapes.append(key)
    layers = []
    for r in rows:
        key = (r["model"], r["proj"], r["N"], r["K"], r["batch"])
        if key not in layers:
            layers.append(key)
    sps = sorted({r["sparsity"] for r in rows})
    at = {(r["model"], r["proj"], r["batch"], r["sparsity"], json.dumps(r["shape"], sort_keys=True)): r for r in rows}

    def pick(rules, n, k, m):
        for rule in rules or []:
            if rule.get("dense_threshold") or not rule["m"][0] <= m <= rule["m"][1]:
                continue
            if "weight" in rule and not rule["weight"][0] <= n * k <= rule["weight"][1]:
                continue
            if "n" in rule and not rule["n"][0] <= n <= rule["n"][1]:
                continue
            return canonical(rule["shape"])
        return None

    out = [f"# Launch-shape sweep of the sparse GEMV ({meta['gpu']})", "",
           f"- command: `{meta['command']}` (device, repository root)",
           f"- date: {meta['date']}; git commit {meta['commit']}" + (f"; {note}" if note else ""),
           "- int4, group 128, bf16 x; CUDA-graph timing over weight copies that defeat the L2 (benchmarks/gemv.py's "
           "method); TB/s over the bytes touched (active rows' weights, their scales / zeros, x, y)",
           f"- every candidate checked first against float64 (two calls in a row): {len(ok)} of {len(corr)} pass; worst "
           f"passing {max((c['error_over_tolerance'] for c in ok), default=0):.2f} x tolerance",
           "- raw timings: the json of the same name; this file is written from it (benchmarks/gemv_sweep.py `report`)", "",
           "## Previous table's pick against the new table's pick, µs (TB/s)", "",
           "| layer | M | previous pick | new pick | " + " | ".join(f"s{sp} before -> after" for sp in sps) + " |",
           "|---|---:|---|---|" + "---|" * len(sps)]
    for model, proj, n, k, m in layers:
        old, new = pick(old_rules, n, k, m), pick(new_rules, n, k, m)
        cells = []
        for sp in sps:
            a, b = at.get((model, proj, m, sp, old)), at.get((model, proj, m, sp, new))
            cells.append(" -> ".join(f"{r['us']:.1f} ({r['tbps']:.2f})" if r else "not timed" for r in (a, b)))
        out.append(f"| {model} {proj} | {m} | {short(json.loads(old)) if old else '-'} | "
                   f"{short(json.loads(new)) if new else '-'} | " + " | ".join(cells) + " |")
    out += ["", "## Best candidate per layer and sparsity, µs (TB/s)", "", "| layer | M | sparsity | best | µs (TB/s) |",
            "|---|---:|---:|---|---|"]
    for model, proj, n, k, m in layers:
        for sp in sps:
            mine = [r for r in rows if (r["model"], r["proj"], r["batch"], r["sparsity"]) == (model, proj, m, sp)]
            if mine:
                b = min(mine, key=lambda r: r["us"])
                out.append(f"| {model} {proj} | {m} | {sp} | {short(b['shape'])} | {b['us']:.1f} ({b['tbps']:.2f}) |")
    out += ["", "## Every timing, µs (candidate numbers below)", "",
            "| layer | M | s | " + " | ".join(f"c{i}" for i in range(len(shapes))) + " |",
            "|---|---:|---:|" + "---:|" * len(shapes)]
    for model, proj, n, k, m in layers:
        for sp in sps:
            cells = [at.get((model, proj, m, sp, key)) for key in shapes]
            out.append(f"| {model} {proj} | {m} | {sp} | " + " | ".join(f"{r['us']:.1f}" if r else "-" for r in cells) + " |")
    out += ["", "Candidates:", ""] + [f"- c{i}: {short(json.loads(key))}" for i, key in enumerate(shapes)]
    dense = [r for r in result["timings"] if r.get("threshold") is not None]
    if dense:
        out += ["", "## Dense-threshold phase (python-float threshold 0.0), µs (TB/s)", "",
                "| layer | bits | shape | µs (TB/s) |", "|---|---:|---|---|"]
        out += [f"| {r['model']} {r['proj']} | {r['bits']} | {short(r['shape'])} | {r['us']:.1f} ({r['tbps']:.2f}) |" for r in dense]
    return "\n".join(out) + "\n"


def main(argv=None):
    global BATCHES, SPARSITIES, FAMILIES, SPLITK, CHECK_FUSED, FORM
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--table", default=None, help="write the launch-shape table here (default: DIR/<gpu>.json)")
    ap.add_argument("--models", default="70B,8B")
    ap.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="of 1, 2, 4, 8, 16 (one per batch class)")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    ap.add_argument("--families", default=",".join(FAMILIES), help="kernel families to sweep: core, mma, splitk")
    ap.add_argument("--merge", default=None, help="a previous table: batch classes not swept keep its rules")
    ap.add_argument("--keep-unless-faster", action="store_true", help="with --merge: an exact rule keeps the previous "
                    "table's pick unless the new one is faster at every swept sparsity")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense-threshold (python float 0.0) sweep")
    ap.add_argument("--layers", default=None, help="with --merge: sweep only these projections (e.g. gate_up,down,"
                    "gate_up_fused) and replace only their exact rules in the merged table (no dense-threshold phase)")
    ap.add_argument("--form", choices=("step", "plain"), default="step", help="step (default): time q/k/v, o_proj and "
                    "down at batch <= 4 in the form the decode step calls them (docs/kernels.md round 17); plain: "
                    "every call as benchmarks/gemv.py times it")
    ap.add_argument("--splitk-in-table", action="store_true", help="split-K candidates: only the shapes the current "
                    "table (kernels/configs/<gpu>.json) names for the swept batch classes (a focused re-sweep)")
    args = ap.parse_args(argv)
    BATCHES = tuple(int(b) for b in args.batches.split(","))
    SPARSITIES = tuple(int(v) for v in args.sparsities.split(","))
    FAMILIES = tuple(args.families.split(","))
    FORM = args.form
    if args.keep_unless_faster and not args.merge:
        ap.error("--keep-unless-faster needs --merge (the previous table)")
    if args.layers and not args.merge:
        ap.error("--layers needs --merge (the table whose other rules are kept)")
    layers = args.layers.split(",") if args.layers else None
    if not set(BATCHES) <= set(CLASSES) or not set(FAMILIES) <= {"core", "mma", "splitk"}:
        ap.error(f"--batches must be among {sorted(CLASSES)} and --families among core, mma, splitk")
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name() if not bench.SMOKE else "cpu (smoke)"
    name = dispatch.table_name(torch.device(bench.DEV))
    if args.splitk_in_table:
        swept = [CLASSES[m] for m in BATCHES]
        named = [r["shape"] for r in dispatch.load_table(name) if isinstance(r["shape"], SplitKShape)
                 and any(r.get("m", [1, 16])[0] <= hi and lo <= r.get("m", [1, 16])[1] for lo, hi in swept)]
        SPLITK = list(dict.fromkeys(named))
    meta = dict(gpu=gpu, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), commit=git_commit(),
                command="PYTHONPATH=. python " + " ".join(sys.argv), form=FORM)
    log_file = open(os.path.join(args.out, f"gemv_sweep_{name}.log"), "w")

    def log(line):
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    t0 = time.time()
    fused = any(bench.PARTS.get(proj, 1) > 1 for model in args.models.split(",") for proj in SHAPES[model]
                if not layers or proj in layers)
    CHECK_FUSED = fused
    jobs = [(dispatch.shape_to_dict(s), m, False, 2 if fused else 1) for m in BATCHES for s in candidates(m)]
    errors = bench.precompile(jobs, args.workers)
    for e in errors:
        log(f"compile/run error: {e}")
    log(f"precompiled {len(jobs)} (shape, batch) pairs in {time.time() - t0:.0f} s")
    t0 = time.time()
    errs = check_all(log)
    bad = {key for key, v in errs.items() if v > 1}
    log(f"correctness: {len(errs) - len(bad)} of {len(errs)} pass ({time.time() - t0:.0f} s); worst passing "
        f"{max((v for v in errs.values() if v <= 1), default=0):.2f} x tolerance")
    t0 = time.time()
    def save(rows):
        with open(os.path.join(args.out, f"gemv_sweep_{name}.json"), "w") as f:
            json.dump({"meta": meta, "correctness": [{"shape": k[0], "batch": k[1], "error_over_tolerance": v} for k, v in errs.items()],
                       "timings": rows}, f, indent=1)

    rows = sweep(args.models.split(","), log, bad, save, layers)
    log(f"sweep: {len(rows)} timings in {time.time() - t0:.0f} s")
    dense_rows = []
    if 1 in BATCHES and not args.no_dense and not layers:
        t0 = time.time()
        derrs = check_dense(log)
        dbad = {key for key, v in derrs.items() if v > 1}
        errs.update({(k[0], f"dense int{k[1]}"): v for k, v in derrs.items()})
        log(f"dense-threshold correctness: {len(derrs) - len(dbad)} of {len(derrs)} pass")
        dense_rows = dense_sweep(args.models.split(","), log, dbad)
        log(f"dense-threshold sweep: {len(dense_rows)} timings in {time.time() - t0:.0f} s")
        rows_all = rows + dense_rows
    else:
        rows_all = rows
    keep = None
    if args.merge:
        with open(args.merge) as f:
            old = json.load(f)
        when = re.search(r"\(([^()]*commit [^()]*)\)", old["about"])
        keep, meta["kept_from"] = old["rules"], f"the sweep of {when.group(1) if when else args.merge}"
        meta["previous_about"] = old["about"]
    tab = table(rows, gpu, meta, keep, dense_rows, args.keep_unless_faster, layers_only=bool(layers))
    # entries measured by other benchmarks (decode_pdl.py, decode_attention.py): kept
    tab = {"about": tab["about"], **{k: old[k] for k in ("pdl", "attention") if args.merge and k in old}, **tab}
    path = args.table or os.path.join(args.out, f"{name}.json")
    with open(path, "w") as f:
        f.write(table_text(tab))
    save(rows_all)
    dispatch.load_table.cache_clear()
    log(f"table written to {path}")
    with open(os.path.join(args.out, f"gemv_sweep_{name}.json")) as f:
        result = json.load(f)
    with open(os.path.join(args.out, f"gemv_sweep_{name}.md"), "w") as f:
        f.write(report(result, keep, tab["rules"]))


if __name__ == "__main__":
    main()
