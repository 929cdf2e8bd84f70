"""Where the fused decode step's time goes inside its CUDA graph: leave-out probes (issue 13).

    python benchmarks/decode_leaveout.py [--out DIR] [--arch llama3-8b] [--level 0.5] [--batches 1,4]
                                         [--steps 64] [--rounds 5]

The eager profile (teal-quant bench's breakdown) sums kernel times; inside the CUDA graph with programmatic dependent
launch the kernels overlap their neighbours' launch and prologue, so a kernel's share of the step is not its eager
time. Here each variant is the real FusedDecodeStep with one part left out: the part's launches are not made, and its
callers get the tensors that part produced on a recorded real step instead (same values, so every other kernel sees
the activations, thresholds and active-row counts it sees in the real step). ``full - without part`` is what that
part costs in the graph: the most any fusion that removes it could save. The probes compute wrong tokens on purpose
(the recorded outputs do not follow the new positions); only times are reported.

Parts: norms (every add + RMSNorm launch, the final one included), attention, qkv, o_proj, gate_up, down (with its
SiLU-and-mul), lm_head, and two sums: gemvs (qkv, o_proj, gate_up, down, lm_head) and glue (norms, attention).
Writes decode_leaveout_<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from teal_quant.bench import build_synthetic_model
from teal_quant.compression.synthetic import SyntheticSpec
from teal_quant.runtime.decoding import Decoder
from teal_quant.runtime.modules import track_sparsity

sys.path.insert(0, os.path.dirname(__file__))
from decode_glue import replay_ms  # noqa: E402  (CUDA events around graph replays)
from decode_pdl import commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GEMVS = ("qkv", "o_proj", "gate_up", "down", "lm_head")
GLUE = ("norms", "attention")
VARIANTS = {"full": (), **{f"without {p}": (p,) for p in GLUE + GEMVS},
            "without gemvs": GEMVS, "without glue": GLUE}


class Recorder:
    """Wraps one part of a FusedDecodeStep: the first step (the Decoder's warm-up before the capture) runs it and
    keeps clones of its outputs in call order; every later step returns those clones without launching anything."""

    def __init__(self, fn):
        self.fn, self.outputs, self.i, self.recording = fn, [], 0, True

    def __call__(self, *args, **kwargs):
        if self.recording:
            out = self.fn(*args, **kwargs)
            self.outputs.append(tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone())
            return out
        out = self.outputs[self.i % len(self.outputs)]
        self.i += 1
        return out


def leave_out(dec: Decoder, parts: tuple[str, ...]) -> None:
    """Replace ``parts`` of the decoder's FusedDecodeStep by Recorders (before its first step)."""
    step = dec._fused
    recorders = []

    def wrap(obj, name):
        r = Recorder(getattr(obj, name))
        setattr(obj, name, r)
        recorders.append(r)

    if "norms" in parts:
        norm, add_norm = Recorder(step._norm), Recorder(step._add_norm)
        step._norm = norm
        # (x, residual): the residual stream is updated in place by the real call; left out, it keeps its value
        step._add_norm = lambda x, residual, w, eps: (add_norm(x, residual, w, eps)[0], residual)
        recorders += [norm, add_norm]
    if "attention" in parts:
        wrap(step, "_attention")
    for p in ("qkv", "o_proj", "gate_up", "down"):
        if p in parts:
            for plan in step.layers:
                wrap(plan, p)
    if "lm_head" in parts:
        wrap(step, "lm_head")
    if not recorders:
        return
    call = step.__call__
    first = [True]

    class Stepped(type(step)):  # a per-instance __call__: after the first step every Recorder replays
        def __call__(self, tokens, pos):
            out = call(tokens, pos)
            if first[0]:
                first[0] = False
                for r in recorders:
                    r.recording = False
            for r in recorders:
                r.i = 0
            return out

    step.__class__ = Stepped


def decoder(model, parts, prompt, length) -> Decoder:
    dec = Decoder(model, batch_size=prompt.shape[0], max_length=length, cuda_graph=True, fused_step=True)
    tok = dec.prefill(prompt)
    leave_out(dec, parts)
    for _ in range(4):  # the first step records (the capture's warm-up), the capture then replays the recordings
        tok = dec.step(tok)
    if dec._graph is None:
        raise RuntimeError(f"no CUDA graph: {dec.graph_error}")
    return dec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--arch", default="llama3-8b")
    ap.add_argument("--level", type=float, default=0.5)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    args = ap.parse_args()
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[decode_leaveout {time.time() - t0:5.0f}s] {msg}", flush=True)

    gpu = torch.cuda.get_device_name()
    report = {"gpu": gpu, "torch": torch.__version__, "commit": commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "command": "python3 " + " ".join(["benchmarks/decode_leaveout.py", *sys.argv[1:]]),
              "arch": args.arch, "level": args.level, "steps": args.steps, "rounds": args.rounds, "batches": {}}
    stem = "decode_leaveout_" + ("h200" if "H200" in gpu else "gpu")
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_synthetic_model(args.arch, SyntheticSpec(levels=(0.25, 0.4, 0.5), default=args.level),
                                  device="cuda", sparsity=args.level)
    track_sparsity(model, False)
    log(f"{args.arch} built")
    batches = [int(b) for b in args.batches.split(",")]
    g = torch.Generator().manual_seed(0)
    prompt_all = torch.randint(0, model.config.vocab_size, (max(batches), args.prompt_len), generator=g).cuda()
    for b in batches:
        length = args.prompt_len + 16 + args.steps * (args.rounds + 3)
        decs = {name: decoder(model, parts, prompt_all[:b], length) for name, parts in VARIANTS.items()}
        per = {n: [] for n in decs}
        for n in decs:  # warm-up
            replay_ms(decs[n], 8)
        names = list(decs)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # rotating order
            for n in order:
                per[n].append(replay_ms(decs[n], args.steps))
        full = statistics.median(per["full"])
        rows = {}
        for n, v in per.items():
            med = statistics.median(v)
            rows[n] = {"median_ms": med, "min_ms": min(v), "max_ms": max(v), "parts": list(VARIANTS[n]),
                       "saved_ms": full - med}
            log(f"batch {b} {n}: {med:.4f} ms ({min(v):.4f}-{max(v):.4f}), part costs {full - med:.4f} ms")
        report["batches"][str(b)] = rows
        del decs
        torch.cuda.empty_cache()
        report["seconds"] = round(time.time() - t0, 1)
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(report, len(model.model.layers)))
    log(f"wrote {args.out / stem}.json and .md")
    return 0


def markdown(r: dict, layers: int) -> str:
    lines = [f"# Leave-out probes of the fused decode step in its CUDA graph ({r['gpu']})", "",
             f"- command: `{r['command']}`; date {r['date']}; commit {r['commit']}; torch {r['torch']}",
             f"- synthetic {r['arch']}, w4 g128, level {r['level']}, counters off; one CUDA graph per variant "
             f"(Decoder with the fused step and the device table's PDL modes); {r['rounds']} rounds of {r['steps']} "
             "steps in rotating order; median (min-max) ms/step",
             "- a part left out: its launches are not made and its callers get the outputs it produced on a recorded "
             "real step (benchmarks/decode_leaveout.py); cost in the graph = full - without; per layer = cost / "
             f"{layers} (lm_head: per step)", "",
             "| variant | " + " | ".join(f"batch {b} ms" for b in r["batches"]) + " | "
             + " | ".join(f"batch {b} cost ms (per layer µs)" for b in r["batches"]) + " |",
             "|---|" + "---|" * (2 * len(r["batches"]))]
    for n in VARIANTS:
        cells, costs = [], []
        for rows in r["batches"].values():
            row = rows[n]
            cells.append(f"{row['median_ms']:.4f} ({row['min_ms']:.4f}-{row['max_ms']:.4f})")
            per = "" if n in ("full", "without lm_head") else f" ({1000 * row['saved_ms'] / layers:.2f})"
            costs.append("-" if n == "full" else f"{row['saved_ms']:.4f}{per}")
        lines.append(f"| {n} | " + " | ".join(cells) + " | " + " | ".join(costs) + " |")
    lines += ["", f"Run time {r.get('seconds')} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
