"""Programmatic dependent launch (PDL) across the fused decode step, side by side on one GPU: which kernel families
should launch with it (the ``pdl`` list of kernels/configs/<gpu>.json).

    python benchmarks/decode_pdl.py [--out DIR] [--batches 1,4,16] [--steps 64] [--rounds 8]

On a synthetic Llama-3-8B-shaped teal-quant model (w4 g128, thresholds calibrated on its own activations, level 0.5,
counters off) one Decoder per variant and batch size is captured as a CUDA graph with that variant's PDL families
(kernels.dispatch.set_programmatic_launch; the graph keeps them). Correctness first: with deterministic reductions
(torch.use_deterministic_algorithms), each variant's 32 greedy tokens and last logits at batch 4 must equal, bit for
bit, those of the variant without PDL. Then rounds of CUDA-event timings over ``--steps`` steps, the
variants in a rotating order within each round; the medians are reported with the spread over rounds. Writes
decode_pdl_<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from teal_quant.kernels import dispatch  # (the product's module: `kernels` imported directly is another module object)

from teal_quant.bench import build_synthetic_model
from teal_quant.compression.synthetic import SyntheticSpec
from teal_quant.runtime.decoding import Decoder
from teal_quant.runtime.modules import track_sparsity

sys.path.insert(0, os.path.dirname(__file__))
from decode_glue import replay_ms  # noqa: E402  (benchmarks/decode_glue.py: CUDA events around decode steps)

ROOT = Path(__file__).resolve().parents[1]
ALL = ("gemv", "elementwise", "attention")  # the families in a decode step with the counters off
VARIANTS = {  # name: {family: PDL mode} (kernels/dispatch.py: 1 wait first, 2 parameters first)
    "none": {},
    "wait_first": {f: 1 for f in ALL},
    "params_first": {f: 2 for f in ALL},
    **{f"params_first_but_{f}": {x: 2 for x in ALL if x != f} for f in ALL},
}


def decoder(model, families, prompt, length) -> tuple[Decoder, torch.Tensor]:
    dispatch.set_programmatic_launch(families)
    try:
        dec = Decoder(model, batch_size=prompt.shape[0], max_length=length, cuda_graph=True, fused_step=True)
        tok = dec.prefill(prompt)
        for _ in range(4):  # the first steps capture the graph
            tok = dec.step(tok)
        if dec._graph is None:
            raise RuntimeError(f"no CUDA graph: {dec.graph_error}")
    finally:
        dispatch.set_programmatic_launch(None)
    return dec, tok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    args = ap.parse_args()
    t0 = time.time()
    model = build_synthetic_model("llama3-8b", SyntheticSpec(levels=(0.25, 0.4, 0.5), default=0.5), device="cuda",
                                  sparsity=0.5)
    track_sparsity(model, False)
    batches = [int(b) for b in args.batches.split(",")]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (max(batches + [4]), args.prompt_len), generator=g).cuda()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": datetime.datetime.now(
        datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": commit(), "command": "python3 " + " ".join(
        ["benchmarks/decode_pdl.py", *sys.argv[1:]]), "variants": VARIANTS}
    print(f"[decode_pdl] model built in {time.time() - t0:.0f}s", flush=True)

    # correctness: with deterministic reductions (no fp32 atomics) every variant must give the same bits as none
    checks = {}
    ref = None
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for name, families in VARIANTS.items():
            dec, _ = decoder(model, families, prompt[:4], args.prompt_len + 40)
            tokens = dec.generate(prompt[:4], 32)[:, args.prompt_len:]
            logits = dec.logits.clone()
            if ref is None:
                ref = tokens, logits
            checks[name] = bool(torch.equal(tokens, ref[0]) and torch.equal(logits, ref[1]))
            print(f"[decode_pdl] check {name}: tokens and last logits bit-equal to none: {checks[name]}", flush=True)
            del dec
    finally:
        torch.use_deterministic_algorithms(False)

    timings: dict = {}
    for b in batches:
        decs = {name: decoder(model, fam, prompt[:b], args.prompt_len + 16 + args.steps * (args.rounds + 1))[0]
                for name, fam in VARIANTS.items()}
        names = list(decs)
        per = {n: [] for n in names}
        for _ in range(2):  # warm-up
            for n in names:
                replay_ms(decs[n], 8)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                per[n].append(replay_ms(decs[n], args.steps))
        timings[b] = {n: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for n, v in per.items()}
        base = timings[b]["none"]["median_ms"]
        for n in names:
            t = timings[b][n]
            t["tokens_per_s"] = b * 1000.0 / t["median_ms"]
            t["speedup_over_none"] = base / t["median_ms"]
            print(f"[decode_pdl] batch {b} {n}: {t['median_ms']:.4f} ms/token ({t['min_ms']:.4f}-{t['max_ms']:.4f}), "
                  f"{t['speedup_over_none']:.4f}x none", flush=True)
        del decs
        torch.cuda.empty_cache()
    report = {**meta, "bit_equal_to_none": checks, "timings": timings, "seconds": round(time.time() - t0, 1)}
    stem = "decode_pdl_" + ("h200" if "H200" in meta["gpu"] else dispatch.table_name(torch.device("cuda")))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report, args))
    print(f"[decode_pdl] wrote {args.out / stem}.json and .md", flush=True)
    return 0 if all(checks.values()) else 1


def markdown(r: dict, args) -> str:
    lines = [f"# PDL across the fused decode step ({r['gpu']})", "",
             f"- command: `{r['command']}`; date {r['date']}; commit {r['commit']}; torch {r['torch']}",
             "- model: synthetic Llama-3-8B shape, w4 g128, level 0.5, counters off; one CUDA graph per variant and "
             f"batch; {args.rounds} rounds of {args.steps} steps, variants in rotating order; median (min-max) ms/token",
             "- variants: the kernel families launched with PDL and their mode (1 wait first, 2 parameters first): "
             + "; ".join(f"{k}: {', '.join(f'{f} {m}' for f, m in v.items()) or '-'}" for k, v in r["variants"].items()),
             "- deterministic reductions, 32 greedy steps at batch 4: tokens and last logits bit-equal to `none`: " + ", ".join(
                 f"{k} {v}" for k, v in r["bit_equal_to_none"].items()), "",
             "| batch | " + " | ".join(r["variants"]) + " |", "|---|" + "---|" * len(r["variants"])]
    for b, row in r["timings"].items():
        cells = [f"{t['median_ms']:.4f} ({t['min_ms']:.4f}-{t['max_ms']:.4f}); {t['speedup_over_none']:.3f}x"
                 for t in row.values()]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def commit() -> str:
    env = os.environ.get("TEAL_QUANT_GIT_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
