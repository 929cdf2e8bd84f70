"""Decode attention (kernels/attention_triton.py) on one GPU: launch variants (kernels/dispatch.py AttentionShape) side
by side at the Llama-3-8B and 70B head shapes, alone and (``--step``) in the synthetic decode step.

    python benchmarks/decode_attention.py [--out DIR] [--variants old,new,...] [--batches 1,4]
        [--step "llama3-8b:1,4;llama3-70b:1"] [--step-variants NAME,...]

Alone: for each batch size, cache length (the grid is sized for it, as a CUDA graph captures it) and position, the
output of every variant is first checked against the float64 reference (kernels.attention.decode_attention_ref, rel
err <= 2e-2 in bf16), then timed as µs per call in CUDA graphs of 40 calls (median of 15 replays, 3 rounds with the
variants in rotating order, median). Bytes: the K and V rows read (positions 0..pos of every KV head), reported as
GB/s next to each time.

``--step``: on a synthetic teal-quant model per listed architecture (w4 g128, thresholds calibrated on its own
activations, level 0.5, counters off), the decode step as the Decoder's CUDA graph (ms per step, CUDA events over
``--steps`` steps, ``--rounds`` rounds in rotating order, median) with the attention of ``old`` and of the step
variants (``--step-variants``; default: those with the least geometric mean of their time over ``old``'s across
every row alone and across the rows of pos < 1000), each also launched with PDL (mode 2: the cached keys loaded
before the wait); the other kernel families keep the GPU table's PDL modes. Checked first: the logits of the first
decode step after the same prefill, with deterministic reductions at the first architecture's first batch size: the
PDL launch's must equal the plain launch's bit for bit (old's are reported: they differ by rounding, which the random
model amplifies). Writes decode_attention_<gpu>.{json,md}.
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
from dataclasses import asdict, replace
from pathlib import Path

import torch

from teal_quant.kernels import attention_triton, dispatch  # the product's modules (overrides reach the step)
from teal_quant.kernels.attention import decode_attention_ref
from teal_quant.kernels.dispatch import AttentionShape

sys.path.insert(0, os.path.dirname(__file__))
from gemv import time_graph  # noqa: E402  (benchmarks/gemv.py: µs per call in a CUDA graph, median of replays)

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"  # (a CPU logic check under TRITON_INTERPRET=1 sets "cpu" and small SHAPES / CASES)
SHAPES = {"llama3-8b": (32, 8, 128), "llama3-70b": (64, 8, 128)}  # (q heads, kv heads, head dim)
CASES = [  # (cache length the grid is sized for, positions)
    (197, (130, 196)),  # benchmarks/e2e.py's decode: prompt 128 + 64 tokens
    (4096, (130, 1000, 4000)),
]
OLD = AttentionShape(registers=False, wide=False)  # the kernel before the short-context round
NEW = AttentionShape(registers=True, wide=True)  # the defaults since this round
VARIANTS = {  # name: launch shape (docs/kernels.md "Decode attention at short context")
    "old": OLD,
    "regs": replace(OLD, registers=True),  # the new token from registers, cached keys loaded first
    "new": NEW,  # and the wide combination
    "new_f1": replace(NEW, split_factor=1.0),
    "new_f05": replace(NEW, split_factor=0.5),
    "new_b128": replace(NEW, block_n=128, warps=8),
}


def alone(args, names: list[str]) -> tuple[list[dict], float]:
    dev, dtype = torch.device(DEVICE), torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    rows, worst = [], 0.0
    for model, (hq, hkv, d) in SHAPES.items():
        for b in (int(v) for v in args.batches.split(",")):
            for length, positions in CASES:
                keys = torch.randn(b, hkv, length, d, generator=gen).to(dev, dtype)
                values = torch.randn(b, hkv, length, d, generator=gen).to(dev, dtype)
                x = lambda n: torch.randn(b, n * d, generator=gen).to(dev, dtype)  # noqa: E731
                q, k, v = x(hq), x(hkv), x(hkv)
                pos_ids = torch.arange(length, device=dev, dtype=torch.float32)
                inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
                freqs = torch.outer(pos_ids, inv)
                emb = torch.cat((freqs, freqs), -1)
                cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
                ws_n = max(attention_triton.workspace_size(b, hq, hkv, length, d, dev, VARIANTS[n]) for n in names)
                workspace = torch.zeros(ws_n, device=dev)
                counter = torch.zeros(b * hkv, dtype=torch.int32, device=dev)
                for p in positions:
                    pos = torch.tensor([p], device=dev)
                    ref = decode_attention_ref(q.double(), k.double(), v.double(), cos.double(), sin.double(), pos,
                                               keys.double().clone(), values.double().clone(), d ** -0.5)
                    calls = {}
                    for name in names:
                        def call(shape=VARIANTS[name]):
                            return attention_triton.decode_attention(q, k, v, cos, sin, pos, keys, values, workspace,
                                                                     counter, d ** -0.5, shape=shape)
                        got = call()
                        err = float((got.double() - ref).norm() / ref.norm())
                        worst = max(worst, err)
                        if err > 2e-2:
                            raise SystemExit(f"{model} b{b} L{length} pos {p} variant {name}: rel err {err:.3g}")
                        calls[name] = call
                    times = {name: [] for name in names}
                    for r in range(3):
                        for name in names[r % len(names):] + names[: r % len(names)]:
                            times[name].append(time_graph([calls[name]]))
                    kv_bytes = 2 * b * hkv * (p + 1) * d * 2
                    row = {"model": model, "batch": b, "cache_length": length, "pos": p,
                           "splits_in_grid": {n: attention_triton.launch_shape(b, hkv, length, d, dev, VARIANTS[n])[1]
                                              for n in names},
                           "us": {n: statistics.median(t) for n, t in times.items()}}
                    row["gb_per_s"] = {n: kv_bytes / (us * 1e-6) / 1e9 for n, us in row["us"].items()}
                    rows.append(row)
                    print(f"[decode_attention] {model} b{b} L{length} pos {p}: " + ", ".join(
                        f"{n} {us:.2f}us" for n, us in row["us"].items()), flush=True)
    return rows, worst


def best_variant(rows: list[dict], names: list[str]) -> tuple[str, dict]:
    """The variant other than old with the least geometric mean of time / old's time over the rows."""
    ratios = {n: math.exp(statistics.fmean(math.log(r["us"][n] / r["us"]["old"]) for r in rows))
              for n in names if n != "old"}
    return min(ratios, key=ratios.get), ratios


def step_variants(rows: list[dict], names: list[str]) -> tuple[list[str], dict]:
    """The variants the step times: the best over every row and the best over the short-context rows (pos < 1000,
    the step's), each with and without PDL; and the geometric means they were chosen by."""
    best, ratios = best_variant(rows, names)
    best_short, short = best_variant([r for r in rows if r["pos"] < 1000], names)
    return list(dict.fromkeys([best, best_short])), {"all_rows": ratios, "pos_below_1000": short}


def _decoder(model, batch: int, length: int, prompt, shape: AttentionShape, pdl: dict):
    """A Decoder whose workspace, kernels and captured graph take this attention shape and these PDL modes; with the
    logits of its first decode step."""
    from teal_quant.runtime.decoding import Decoder

    dispatch.set_programmatic_launch(pdl)
    dispatch.set_attention_shape(shape)
    try:
        dec = Decoder(model, batch_size=batch, max_length=length, cuda_graph=True, fused_step=True)
        tok = dec.step(dec.prefill(prompt[:batch]))
        logits = dec.logits.float().clone()
        for _ in range(3):
            tok = dec.step(tok)
        if dec._graph is None:
            raise RuntimeError(f"no CUDA graph: {dec.graph_error}")
    finally:
        dispatch.set_programmatic_launch(None)
        dispatch.set_attention_shape(None)
    return dec, logits


def step(args, arch: str, batches: list[int], variants: list[str], check: bool) -> dict:
    """ms per decode step of the synthetic model with each attention variant (CUDA graphs); with ``check``, first the
    first-step logits of every variant with deterministic reductions at the first batch size: the PDL launch must
    give the same bits as the plain one (old's differ by rounding, amplified by the random model: reported)."""
    from decode_glue import replay_ms  # benchmarks/decode_glue.py: CUDA events around decode steps

    from teal_quant.bench import build_synthetic_model
    from teal_quant.compression.synthetic import SyntheticSpec
    from teal_quant.runtime.modules import track_sparsity

    t0 = time.time()
    model = build_synthetic_model(arch, SyntheticSpec(levels=(0.25, 0.4, 0.5), default=0.5), device="cuda",
                                  sparsity=0.5)
    track_sparsity(model, False)
    dev = torch.device("cuda")
    table_pdl = {f: dispatch.programmatic_launch(dev, f) for f in dispatch.PDL_FAMILIES}
    base_pdl = {f: m for f, m in table_pdl.items() if m and f != "attention"}
    setups = {"old": (VARIANTS["old"], base_pdl)}
    for v in variants:
        setups[v] = VARIANTS[v], base_pdl
        setups[f"{v}+pdl"] = VARIANTS[v], {**base_pdl, "attention": 2}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (max(batches), args.prompt_len), generator=g).cuda()
    out = {"arch": arch, "build_s": round(time.time() - t0, 1), "pdl_modes": {n: s[1] for n, s in setups.items()},
           "batches": {}}
    print(f"[decode_attention] {arch} built in {out['build_s']}s", flush=True)
    length = args.prompt_len + 8 + args.steps * (args.rounds + 3)
    if check:
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            logits = {n: _decoder(model, batches[0], length, prompt, *s)[1] for n, s in setups.items()}
        finally:
            torch.use_deterministic_algorithms(False)
        ref = logits["old"]
        out["check"] = {"batch": batches[0],
                        "pdl_bit_equal": {v: bool(torch.equal(logits[v], logits[f"{v}+pdl"])) for v in variants},
                        "rel_err_vs_old": {n: float((lg - ref).norm() / ref.norm()) for n, lg in logits.items()},
                        "top1_agreement_vs_old": {n: float((lg.argmax(-1) == ref.argmax(-1)).float().mean())
                                                  for n, lg in logits.items()}}
        print(f"[decode_attention] step check {arch}: {json.dumps(out['check'])}", flush=True)
        if not all(out["check"]["pdl_bit_equal"].values()):
            raise SystemExit(f"{arch}: a PDL launch changed the logits (deterministic reductions): {out['check']}")
    for b in batches:
        decs = {n: _decoder(model, b, length, prompt, *s)[0] for n, s in setups.items()}
        names = list(decs)
        per = {n: [] for n in names}
        for n in names:  # warm-up
            replay_ms(decs[n], 8)
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                per[n].append(replay_ms(decs[n], args.steps))
        base = statistics.median(per["old"])
        res = {n: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
                   "speedup_over_old": base / statistics.median(v)} for n, v in per.items()}
        out["batches"][b] = {"positions": [args.prompt_len, args.prompt_len + 12 + args.steps * args.rounds],
                             "variants": res}
        for n in names:
            t = res[n]
            print(f"[decode_attention] step {arch} b{b} {n}: {t['median_ms']:.4f} ms ({t['min_ms']:.4f}-"
                  f"{t['max_ms']:.4f}), {t['speedup_over_old']:.4f}x old", flush=True)
        del decs
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="names of VARIANTS (old always included)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--step", default="", help='decode step timings: "arch:batches;...", e.g. "llama3-8b:1,4"')
    ap.add_argument("--step-variants", default="", help="variants timed in the step (default: the best alone)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=128)
    args = ap.parse_args()
    names = ["old"] + [n for n in args.variants.split(",") if n and n != "old"]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    t0 = time.time()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": os.environ.get("TEAL_QUANT_GIT_COMMIT", "unknown"),
            "command": "python3 benchmarks/decode_attention.py " + " ".join(sys.argv[1:]),
            "variants": {n: asdict(VARIANTS[n]) for n in names}}
    rows, worst = alone(args, names)
    meta["worst_rel_err_vs_float64"] = worst
    print(f"[decode_attention] alone done in {time.time() - t0:.0f}s", flush=True)
    chosen, ratios = step_variants(rows, names) if len(names) > 1 else (["old"], {"all_rows": {}})
    chosen = args.step_variants.split(",") if args.step_variants else chosen
    meta["geomean_time_over_old"] = ratios
    report = {**meta, "rows": rows, "step_variants": chosen, "step": []}
    stem = "decode_attention_h200" if "H200" in meta["gpu"] else "decode_attention"
    args.out.mkdir(parents=True, exist_ok=True)
    write(args, stem, report)
    for i, spec in enumerate(filter(None, args.step.split(";"))):
        arch, batches = spec.split(":")
        report["step"].append(step(args, arch, [int(v) for v in batches.split(",")], chosen, check=i == 0))
        write(args, stem, report)
    report["seconds"] = round(time.time() - t0, 1)
    write(args, stem, report)
    print(f"[decode_attention] wrote {args.out / stem}.json and .md ({report['seconds']}s)", flush=True)
    return 0


def write(args, stem: str, r: dict) -> None:
    (args.out / f"{stem}.json").write_text(json.dumps(r, indent=1) + "\n")
    names = list(r["variants"])
    lines = [f"# Decode attention: launch variants ({r['gpu']})", "",
             f"- command: `{r['command']}`; date {r['date']}; commit {r['commit']}; torch {r['torch']}",
             "- µs per call (CUDA graphs of 40 calls, median of 15 replays, 3 rounds in rotating order, median); "
             "GB/s over the K and V rows read; every variant checked against float64 first "
             f"(worst rel err {r['worst_rel_err_vs_float64']:.2e}); grid splits of old in parentheses",
             "- variants (kernels/dispatch.py AttentionShape; differences from old): " + "; ".join(
                 f"{n}: " + (", ".join(f"{k} {v}" for k, v in r["variants"][n].items() if v != asdict(OLD)[k]) or "-")
                 for n in names),
             "- geometric mean of time / old's over the rows: " + ", ".join(
                 f"{n} {v:.3f}" for n, v in r["geomean_time_over_old"]["all_rows"].items()) + "; over pos < 1000: "
             + ", ".join(f"{n} {v:.3f}" for n, v in r["geomean_time_over_old"].get("pos_below_1000", {}).items()), "",
             "| model | batch | cache length (grid splits) | pos | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for row in r["rows"]:
        best = min(row["us"].values())
        cells = [("**" if us == best else "") + f"{us:.2f} ({row['gb_per_s'][n]:.0f})" + ("**" if us == best else "")
                 for n, us in row["us"].items()]
        lines.append(f"| {row['model']} | {row['batch']} | {row['cache_length']} ({row['splits_in_grid']['old']}) | "
                     f"{row['pos']} | " + " | ".join(cells) + " |")
    if r["step"]:
        lines += ["", f"## Decode step (synthetic model, w4 g128, level 0.5, counters off; CUDA graph; "
                  f"{args.rounds} rounds of {args.steps} steps, rotating order; median (min-max) ms/step)", "",
                  f"Step variants: {', '.join(r['step_variants'])} (the best alone over every row and over pos < "
                  "1000); +pdl: the attention launched with PDL mode 2 (every variant keeps the table's other PDL "
                  "families)."]
        for s in r["step"]:
            if "check" in s:
                c = s["check"]
                lines.append(f"Check ({s['arch']}, batch {c['batch']}, deterministic reductions, first decode step): "
                             f"PDL logits bit-equal to the plain launch's: {c['pdl_bit_equal']}; vs old (rounding, "
                             "amplified by the random model): rel err " + ", ".join(
                                 f"{n} {e:.1e}" for n, e in c["rel_err_vs_old"].items()) + "; top-1 agreement " +
                             ", ".join(f"{n} {a:.2f}" for n, a in c["top1_agreement_vs_old"].items()))
        lines += ["", "| model | batch | positions | variant | ms/step | x old |", "|---|---|---|---|---|---|"]
        for s in r["step"]:
            for b, res in s["batches"].items():
                for n, t in res["variants"].items():
                    lines.append(f"| {s['arch']} | {b} | {res['positions'][0]}-{res['positions'][1]} | {n} | "
                                 f"{t['median_ms']:.4f} ({t['min_ms']:.4f}-{t['max_ms']:.4f}) | "
                                 f"{t['speedup_over_old']:.3f} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
