"""SiLU-and-mul inside the down-projection GEMV (issue 13, issue 12 item 3), side by side on one GPU; with
``--option accumulate`` the same A/B for the GEMVs that add into float32 buffers without the split-K tail.

    python benchmarks/decode_silu_down.py [--out DIR] [--steps 64] [--rounds 6] [--models llama3-8b,llama3-70b]
                                          [--down 8B,70B] [--max-batch 16] [--stem decode_silu_down_h200]
                                          [--option silu_down|accumulate]

``fused``: FusedDecodeStep(silu_down=True), the down projection reads gate and up and computes silu(gate) * up where it
loads its input (kernels.sparse_gemv_silu); ``separate``: silu_down=False, the silu_mul launch then the GEMV. On the
synthetic Llama-3-8B (w4 g128, level 0.5, counters off; batch 1, 4, 16) and Llama-3-70B (level 0.4; batch 1), with
the device table's PDL modes:
1. correctness: with deterministic reductions (torch.use_deterministic_algorithms), 32 greedy tokens and the last
   logits of the two must be bit-equal (8B batch 4, 70B batch 1); without them, the tokens are compared and the logits'
   largest difference reported (fp32 atomics: the last bits may differ from run to run anyway);
2. ms per step: one CUDA graph per variant and batch, rounds of CUDA-event timings over ``--steps`` steps (decode_glue's
   replay_ms) in alternating order, medians with the spread over rounds; kernels per step at 8B batch 1 from the eager
   profile (decode_glue's breakdown);
3. the down GEMV alone (8B: N 4096, K 14336 at batch 1, 4, 16; 70B: N 8192, K 28672 at batch 1): µs per call in CUDA
   graphs of 40 calls cycling through enough weight copies to defeat the L2 (benchmarks/gemv.py's method), gate and up
   ~ N(0, 1) as the halves of one [M, 2K] tensor, a 0-dim threshold at the 0.5 quantile of |silu(gate) * up|:
   fused (one launch), silu_mul + GEMV (two), the GEMV alone on the ready product, silu_mul alone; bit-equality of
   fused and silu_mul + GEMV under deterministic reductions.
``--option accumulate``: ``fused`` is FusedDecodeStep(accumulate=True) (the q/k/v, o_proj and down GEMVs add into
per-layer float32 buffers, no split-K tail; the readers round the sums), ``separate`` accumulate=False; the down GEMV
section is skipped (``--down ''``). Writes decode_silu_down_<gpu>.{json,md} (decode_sums_<gpu> with accumulate); exit 1
when a bit-equality check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from teal_quant import kernels
from teal_quant.bench import build_synthetic_model
from teal_quant.compression.synthetic import SyntheticSpec
from teal_quant.runtime.decoding import Decoder
from teal_quant.runtime.modules import track_sparsity

sys.path.insert(0, os.path.dirname(__file__))
from decode_glue import breakdown, graph_us, replay_ms  # noqa: E402  (CUDA events / graphs; eager kernel profile)
from decode_pdl import commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"fused": True, "separate": False}  # name: FusedDecodeStep(<OPTION>=...)
OPTIONS = {  # the FusedDecodeStep option compared: (title, what fused / separate are)
    "silu_down": ("SiLU-and-mul inside the down GEMV",
                  "fused: FusedDecodeStep(silu_down=True) (kernels.sparse_gemv_silu, one launch per layer); separate: "
                  "silu_down=False (silu_mul, then the GEMV)"),
    "accumulate": ("GEMV sums without the split-K tail",
                   "fused: FusedDecodeStep(accumulate=True) (q/k/v, o_proj and down add into per-layer float32 "
                   "buffers: no counter, no last-program tail; attention and add_rms_norm round the sums); separate: "
                   "accumulate=False (every GEMV ends with the split-K tail and writes bf16)"),
}
OPTION = "silu_down"
MODELS = {"llama3-8b": (0.5, (1, 4, 16), 4), "llama3-70b": (0.4, (1,), 1)}  # level, batches, batch of the check
DOWN = {"8B": ((4096, 14336), (1, 4, 16)), "70B": ((8192, 28672), (1,))}  # (N, K), batches
GROUP = 128
L2_BYTES = 60 * 2**20


def decoder(model, on: bool, prompt, length) -> Decoder:
    dec = Decoder(model, batch_size=prompt.shape[0], max_length=length, cuda_graph=True, fused_step=True,
                  fused_step_options={OPTION: on})
    tok = dec.prefill(prompt)
    for _ in range(4):  # the first steps capture the graph
        tok = dec.step(tok)
    if dec._graph is None:
        raise RuntimeError(f"no CUDA graph: {dec.graph_error}")
    return dec


def greedy(model, on: bool, prompt, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    dec = Decoder(model, batch_size=prompt.shape[0], max_length=prompt.shape[1] + tokens + 8, cuda_graph=True,
                  fused_step=True, fused_step_options={OPTION: on})
    out = dec.generate(prompt, tokens)[:, prompt.shape[1]:]
    return out, dec.logits.clone()


def check_model(model, prompt) -> dict:
    """Bit-equality with deterministic reductions; token agreement and the largest logit difference without."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        (ta, la), (tb, lb) = greedy(model, True, prompt, 32), greedy(model, False, prompt, 32)
    finally:
        torch.use_deterministic_algorithms(False)
    (tc, lc), (td, ld) = greedy(model, True, prompt, 32), greedy(model, False, prompt, 32)
    return {"deterministic_bit_equal": bool(torch.equal(ta, tb) and torch.equal(la, lb)),
            "atomic_token_agreement": float((tc == td).float().mean()),
            "atomic_logits_max_abs_diff": float((lc.float() - ld.float()).abs().max()),
            "logits_max_abs": float(ld.float().abs().max())}


def time_model(model, prompt_all, batches, args, log) -> dict:
    out = {}
    for b in batches:
        length = prompt_all.shape[1] + 16 + args.steps * (args.rounds + 3)
        decs = {name: decoder(model, v, prompt_all[:b], length) for name, v in VARIANTS.items()}
        per = {n: [] for n in decs}
        for _ in range(2):  # warm-up
            for n in decs:
                replay_ms(decs[n], 8)
        names = list(decs)
        for r in range(args.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                per[n].append(replay_ms(decs[n], args.steps))
        row = {n: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for n, v in per.items()}
        row["speedup"] = row["separate"]["median_ms"] / row["fused"]["median_ms"]
        row["saved_ms"] = row["separate"]["median_ms"] - row["fused"]["median_ms"]
        out[b] = row
        log(f"batch {b}: fused {row['fused']['median_ms']:.4f} ms ({row['fused']['min_ms']:.4f}-"
            f"{row['fused']['max_ms']:.4f}), separate {row['separate']['median_ms']:.4f} ms "
            f"({row['separate']['min_ms']:.4f}-{row['separate']['max_ms']:.4f}), {row['speedup']:.4f}x")
        del decs
        torch.cuda.empty_cache()
    return out


# -- the down GEMV alone ----------------------------------------------------------------------------------------------
def down_layer(n: int, k: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, device="cuda", dtype=torch.int32).reshape(k, n // 8, 8)
    qweight = (q << torch.arange(0, 32, 4, device="cuda", dtype=torch.int32)).sum(-1, dtype=torch.int32)
    scales = (torch.rand(k // GROUP, n, generator=gen, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // GROUP, n), generator=gen, device="cuda").to(torch.bfloat16)
    return qweight, scales, zeros


def time_down(log, models, max_batch: int) -> dict:
    out = {}
    for model in models:
        (n, k), batches = DOWN[model]
        batches = [m for m in batches if m <= max_batch]
        first = down_layer(n, k, 0)
        bytes_one = k * n // 2 + 2 * (k // GROUP) * n * 2
        copies = [first] + [tuple(t.clone() for t in first) for _ in range(max(2, math.ceil(3 * L2_BYTES / bytes_one)) - 1)]
        for m in batches:
            gu = torch.randn(m, 2 * k, generator=torch.Generator(device="cuda").manual_seed(m), device="cuda")
            gu = gu.to(torch.bfloat16)
            gate, up = gu[:, :k], gu[:, k:]
            a = kernels.silu_mul(gate, up)
            t = torch.quantile(a.float().abs().flatten(), 0.5).reshape(())
            kw = dict(bits=4, group_size=GROUP)
            torch.use_deterministic_algorithms(True, warn_only=True)
            try:
                equal = all(torch.equal(kernels.sparse_gemv_silu(gate, up, *c, t, **kw),
                                        kernels.sparse_gemv(kernels.silu_mul(gate, up), *c, t, **kw)) for c in copies[:2])
            finally:
                torch.use_deterministic_algorithms(False)
            row = {
                "fused_us": graph_us([lambda c=c: kernels.sparse_gemv_silu(gate, up, *c, t, **kw) for c in copies]),
                "silu_mul_then_gemv_us": graph_us(
                    [lambda c=c: kernels.sparse_gemv(kernels.silu_mul(gate, up), *c, t, **kw) for c in copies]),
                "gemv_alone_us": graph_us([lambda c=c: kernels.sparse_gemv(a, *c, t, **kw) for c in copies]),
                "silu_mul_alone_us": graph_us([lambda: kernels.silu_mul(gate, up)]),
                "deterministic_bit_equal": equal,
                "union_sparsity": float(1 - (a.float().abs() > t).any(0).float().mean()),
            }
            out[f"{model} down, batch {m}"] = row
            log(f"down {model} batch {m}: " + ", ".join(f"{key} {v:.2f}" if isinstance(v, float) else f"{key} {v}"
                                                       for key, v in row.items()))
        del copies, first
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--down", default=",".join(DOWN), help="down-projection shapes timed alone ('' for none)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--stem", help="output file name stem (default decode_silu_down_<gpu>, decode_sums_<gpu>)")
    ap.add_argument("--option", choices=sorted(OPTIONS), default="silu_down", help="the FusedDecodeStep option compared")
    args = ap.parse_args()
    global OPTION
    OPTION = args.option
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[decode_silu_down {time.time() - t0:5.0f}s] {msg}", flush=True)

    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": commit(),
              "command": "python3 " + " ".join(["benchmarks/decode_silu_down.py", *sys.argv[1:]]),
              "pdl": {f: kernels.dispatch.programmatic_launch(torch.device("cuda"), f)
                      for f in kernels.dispatch.PDL_FAMILIES},
              "steps": args.steps, "rounds": args.rounds, "models": {}, "down_gemv": {}, "option": OPTION}
    stem = args.stem or {"silu_down": "decode_silu_down_", "accumulate": "decode_sums_"}[OPTION] + (
        "h200" if "H200" in report["gpu"] else "gpu")
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> bool:  # after every stage: a run cut short by its time limit still leaves what it measured
        report["seconds"] = round(time.time() - t0, 1)
        ok = (all(e["check"]["deterministic_bit_equal"] for e in report["models"].values())
              and all(r["deterministic_bit_equal"] for r in report["down_gemv"].values()))
        report["all_bit_equal"] = ok
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(report))
        return ok

    report["down_gemv"] = time_down(log, [d for d in args.down.split(",") if d], args.max_batch)
    save()
    g = torch.Generator().manual_seed(0)
    for arch in args.models.split(","):
        level, batches, check_batch = MODELS[arch]
        batches = tuple(b for b in batches if b <= args.max_batch)
        check_batch = min(check_batch, args.max_batch)
        model = build_synthetic_model(arch, SyntheticSpec(levels=(0.25, 0.4, 0.5), default=level), device="cuda",
                                      sparsity=level)
        track_sparsity(model, False)
        log(f"{arch} built")
        prompt = torch.randint(0, model.config.vocab_size, (max(batches + (check_batch,)), args.prompt_len),
                               generator=g).cuda()
        entry = {"level": level, "check": check_model(model, prompt[:check_batch])}
        log(f"{arch} check at batch {check_batch}: {entry['check']}")
        if arch == "llama3-8b":
            entry["kernels_per_step_b1"] = {
                name: breakdown(model, prompt[:1], {"fused_step": True, "fused_step_options": {OPTION: v}})[
                    "launches_per_step"] for name, v in VARIANTS.items()}
            log(f"{arch} kernels per step at batch 1: {entry['kernels_per_step_b1']}")
        entry["timings"] = {}
        report["models"][arch] = entry
        save()
        entry["timings"] = time_model(model, prompt, batches, args, lambda msg: log(f"{arch} {msg}"))
        save()
        del model
        torch.cuda.empty_cache()
    ok = save()
    log(f"wrote {args.out / stem}.json and .md; all bit-equal: {ok}")
    return 0 if ok else 1


def markdown(r: dict) -> str:
    title, variants = OPTIONS[r.get("option", "silu_down")]
    lines = [f"# {title} ({r['gpu']})", "",
             f"- command: `{r['command']}`; date {r['date']}; commit {r['commit']}; torch {r['torch']}; PDL modes "
             + ", ".join(f"{f} {m}" for f, m in r["pdl"].items()),
             f"- {variants}",
             f"- decode step: synthetic models, w4 g128, counters off, one CUDA graph per variant and batch, {r['rounds']} "
             f"rounds of {r['steps']} steps in alternating order; median (min-max) ms/step", "",
             "| model | batch | fused ms | separate ms | speedup | saved ms/step |", "|---|---|---|---|---|---|"]
    for arch, e in r["models"].items():
        for b, row in e["timings"].items():
            f, s = row["fused"], row["separate"]
            lines.append(f"| {arch} s{int(e['level'] * 100)} | {b} | {f['median_ms']:.4f} ({f['min_ms']:.4f}-{f['max_ms']:.4f}) "
                         f"| {s['median_ms']:.4f} ({s['min_ms']:.4f}-{s['max_ms']:.4f}) | {row['speedup']:.4f}x "
                         f"| {row['saved_ms']:.4f} |")
    lines += ["", "Correctness (32 greedy tokens, last logits):", ""]
    for arch, e in r["models"].items():
        c = e["check"]
        lines.append(f"- {arch}: deterministic reductions: tokens and logits bit-equal {c['deterministic_bit_equal']}; "
                     f"fp32 atomics: token agreement {c['atomic_token_agreement']:.3f}, largest logit difference "
                     f"{c['atomic_logits_max_abs_diff']:.4g} (max |logit| {c['logits_max_abs']:.4g})")
        if "kernels_per_step_b1" in e:
            lines.append(f"  kernels per step at batch 1 (eager profile): {e['kernels_per_step_b1']}")
    if not r["down_gemv"]:
        return "\n".join(lines) + "\n"
    lines += ["", "Down GEMV alone (CUDA graphs of 40 calls over weight copies, µs per call, median of 15 replays; "
              "threshold at the 0.5 quantile of |silu(gate) * up|):", "",
              "| layer | fused | silu_mul + GEMV | GEMV alone | silu_mul alone | union sparsity | bit-equal (det.) |",
              "|---|---|---|---|---|---|---|"]
    for name, row in r["down_gemv"].items():
        lines.append(f"| {name} | {row['fused_us']:.2f} | {row['silu_mul_then_gemv_us']:.2f} | {row['gemv_alone_us']:.2f} "
                     f"| {row['silu_mul_alone_us']:.2f} | {row['union_sparsity']:.3f} | {row['deterministic_bit_equal']} |")
    lines += ["", f"All bit-equality checks pass: {r['all_bit_equal']}. Run time {r['seconds']} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
