"""Decode attention (kernels/attention_triton.py) alone on one GPU: how many splits should work at a position
(SPLIT_FACTOR * sqrt(key blocks)), side by side, at the Llama-3-8B and 70B head shapes.

    python benchmarks/decode_attention.py [--out DIR] [--factors 1,2,3,1000]

For each batch size, cache length (the grid is sized for it, as a CUDA graph captures it) and position: the output
of every setting is first checked against the float64 reference (kernels.attention.decode_attention_ref, rel err
<= 2e-2 in bf16), then timed as µs per call in CUDA graphs of 40 calls (median of 15 replays, the settings in
rotating order). Bytes: the K and V rows read (positions 0..pos of every KV head), reported as GB/s next to each time.
Writes decode_attention_<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gemv import time_graph  # noqa: E402  (benchmarks/gemv.py: µs per call in a CUDA graph, median of replays)

from kernels import attention_triton  # noqa: E402
from kernels.attention import decode_attention_ref  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"llama3-8b": (32, 8, 128), "llama3-70b": (64, 8, 128)}  # (q heads, kv heads, head dim)
CASES = [  # (cache length the grid is sized for, positions)
    (197, (130, 196)),  # benchmarks/e2e.py's decode: prompt 128 + 64 tokens
    (4096, (130, 1000, 4000)),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--factors", default="1,2,3,1000", help="split factors; 1000: every key block its own split")
    ap.add_argument("--batches", default="1,4,16")
    args = ap.parse_args()
    settings = [float(v) for v in args.factors.split(",")]
    dev, dtype = torch.device("cuda"), torch.bfloat16
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
                ws_n = attention_triton.workspace_size(b, hq, hkv, length, d, dev)
                workspace = torch.zeros(ws_n, device=dev)
                counter = torch.zeros(b * hkv, dtype=torch.int32, device=dev)
                for p in positions:
                    pos = torch.tensor([p], device=dev)
                    ref = decode_attention_ref(q.double(), k.double(), v.double(), cos.double(), sin.double(), pos,
                                               keys.double().clone(), values.double().clone(), d ** -0.5)
                    calls = {}
                    for mb in settings:
                        def call(mb=mb):
                            return attention_triton.decode_attention(q, k, v, cos, sin, pos, keys, values, workspace,
                                                                     counter, d ** -0.5, split_factor=mb)
                        got = call()
                        err = float((got.double() - ref).norm() / ref.norm())
                        worst = max(worst, err)
                        if err > 2e-2:
                            raise SystemExit(f"{model} b{b} L{length} pos {p} split factor {mb}: rel err {err:.3g}")
                        calls[mb] = call
                    times = {mb: [] for mb in settings}
                    for r in range(3):
                        order = settings[r % len(settings):] + settings[: r % len(settings)]
                        for mb in order:
                            times[mb].append(time_graph([calls[mb]]))
                    kv_bytes = 2 * b * hkv * (p + 1) * d * 2
                    row = {"model": model, "batch": b, "cache_length": length, "pos": p,
                           "splits_in_grid": attention_triton.launch_shape(b, hkv, length, d, dev)[1],
                           "us": {mb: statistics.median(t) for mb, t in times.items()}}
                    row["gb_per_s"] = {mb: kv_bytes / (us * 1e-6) / 1e9 for mb, us in row["us"].items()}
                    rows.append(row)
                    print(f"[decode_attention] {model} b{b} L{length} pos {p}: " + ", ".join(
                        f"f{mb:g} {us:.2f}us" for mb, us in row["us"].items()), flush=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": os.environ.get("TEAL_QUANT_GIT_COMMIT", "unknown"),
            "command": "python3 benchmarks/decode_attention.py " + " ".join(sys.argv[1:]),
            "worst_rel_err_vs_float64": worst}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "decode_attention_h200" if "H200" in meta["gpu"] else "decode_attention"
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Decode attention: working splits per sqrt(key blocks) ({meta['gpu']})", "",
             f"- command: `{meta['command']}`; date {meta['date']}; commit {meta['commit']}; torch {meta['torch']}",
             "- µs per call (CUDA graphs of 40 calls, median of 15 replays, 3 rounds in rotating order, median); "
             "GB/s over the K and V rows read; block 64 positions; every setting checked against float64 first "
             f"(worst rel err {worst:.2e})", "",
             "| model | batch | cache length (grid splits) | pos | " + " | ".join(f"factor {mb:g}" for mb in settings) + " |",
             "|---|---|---|---|" + "---|" * len(settings)]
    for r in rows:
        best = min(r["us"].values())
        cells = [("**" if us == best else "") + f"{us:.2f} ({r['gb_per_s'][mb]:.0f})" + ("**" if us == best else "")
                 for mb, us in r["us"].items()]
        lines.append(f"| {r['model']} | {r['batch']} | {r['cache_length']} ({r['splits_in_grid']}) | {r['pos']} | "
                     + " | ".join(cells) + " |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"[decode_attention] wrote {args.out / stem}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
