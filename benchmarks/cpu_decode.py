"""Decode and prefill speed on the CPU, variants measured side by side in one process (issue 13, part 7).

`teal-quant bench --device cpu` measures its variants one after the other (each ~20-60 s); on a small shared CPU box
the machine's speed drifts by 10-20 % over that time, more than the differences being measured. Here every variant
(the artifact at its level, the same artifact at level 0, and the dense float32 twin that bench's `bf16` variant
builds on the CPU: every projection dequantized into nn.Linear, q/k/v and gate/up one nn.Linear each) lives in its own
Decoder at once, and the rounds interleave them (rotating the order), so drift hits them alike; the medians over
rounds are compared. Wall time and process CPU time (all threads) are reported per step.

    PYTHONPATH=. python benchmarks/cpu_decode.py outputs/smollm2-135m-teal-w4-s40 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import teal_quant
from teal_quant.bench import to_dense_twin
from teal_quant.runtime.decoding import Decoder

DEFAULT_ARTIFACT = "outputs/smollm2-135m-teal-w4-s40"


def build_variants(artifact: str, level: float | None) -> dict[str, torch.nn.Module]:
    ours = teal_quant.load(artifact, device="cpu", sparsity=level)
    int4 = teal_quant.load(artifact, device="cpu", sparsity=0.0)
    dense = teal_quant.load(artifact, device="cpu")
    to_dense_twin(dense, torch.float32)  # what bench's dense variant is on the CPU
    return {"ours": ours, "int4": int4, "dense": dense}


def measure(models: dict[str, torch.nn.Module], prompt: torch.Tensor, rounds: int, steps: int) -> dict[str, dict]:
    """Interleaved rounds: each round, every variant (order rotated) prefills once on a fresh cache and decodes
    `steps` tokens on its long-lived cache."""
    names = list(models)
    plen = prompt.shape[1]
    decoders = {n: Decoder(m, batch_size=1, max_length=plen + 4 + rounds * steps + 1, cuda_graph=False)
                for n, m in models.items()}
    tokens = {}
    for n, d in decoders.items():
        tokens[n] = d.prefill(prompt)
        for _ in range(4):  # warm-up: first-call allocations and the CPU copies of W^T
            tokens[n] = d.step(tokens[n])
    rows = {n: {"decode_wall_ms": [], "decode_cpu_ms": [], "prefill_ms": []} for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            fresh = Decoder(models[n], batch_size=1, max_length=plen + 2, cuda_graph=False)
            t0 = time.perf_counter()
            fresh.prefill(prompt)
            rows[n]["prefill_ms"].append((time.perf_counter() - t0) * 1e3)
            del fresh
            d = decoders[n]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                tokens[n] = d.step(tokens[n])
            rows[n]["decode_wall_ms"].append((time.perf_counter() - t0) / steps * 1e3)
            rows[n]["decode_cpu_ms"].append((time.process_time() - c0) / steps * 1e3)
    out = {}
    for n, v in rows.items():
        med = {k: statistics.median(x) for k, x in v.items()}
        out[n] = {"decode_ms_per_token": med["decode_wall_ms"], "decode_ms_min": min(v["decode_wall_ms"]),
                  "decode_cpu_ms_per_token": med["decode_cpu_ms"], "tokens_per_s": 1000.0 / med["decode_wall_ms"],
                  "prefill_ms": med["prefill_ms"], "rounds": v}
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(result: dict) -> str:
    r, v = result, result["variants"]
    lines = [
        "# CPU decode, variants interleaved in one process (issue 13, part 7)",
        "",
        f"- command: `{r['command']}`",
        f"- artifact: `{r['artifact']}` at level {r['level']} (`ours`), level 0 (`int4`), dense float32 twin (`dense`:"
        " every projection dequantized into nn.Linear, q/k/v and gate/up one nn.Linear each, as bench's dense variant)",
        f"- machine: {r['machine']}; torch {r['torch']} ({r['threads']} threads); load average at start / end "
        f"{r['load_start']} / {r['load_end']}",
        f"- date {r['date']}, git commit {r['commit']}",
        f"- method: prompt {r['prompt_len']} random tokens (seed 0); {r['rounds']} rounds, each variant (order rotated)"
        f" prefills the prompt on a fresh cache and decodes {r['steps']} tokens on its own long-lived cache; medians",
        "",
        "| variant | decode ms/token (median) | min | CPU ms/token (all threads) | tok/s | prefill ms (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n, x in v.items():
        lines.append(f"| {n} | {x['decode_ms_per_token']:.1f} | {x['decode_ms_min']:.1f} | "
                     f"{x['decode_cpu_ms_per_token']:.1f} | {x['tokens_per_s']:.2f} | {x['prefill_ms']:.1f} |")
    lines += ["", "Ratios (tok/s, medians of one run): " + ", ".join(f"{k} {val:.3f}x" for k, val in r["ratios"].items()),
              ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", nargs="?", default=DEFAULT_ARTIFACT)
    ap.add_argument("--level", type=float, default=None, help="ours' level (default: the artifact's default)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per variant per round")
    ap.add_argument("--out", type=Path, default=None, help="folder for cpu_decode_cpu.{md,json}")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    models = build_variants(args.artifact, args.level)
    vocab = models["ours"].config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    variants = measure(models, prompt, args.rounds, args.steps)
    tps = {n: v["tokens_per_s"] for n, v in variants.items()}
    result = {
        "command": "PYTHONPATH=. python benchmarks/cpu_decode.py " + " ".join(
            [args.artifact, "--prompt-len", str(args.prompt_len), "--rounds", str(args.rounds), "--steps",
             str(args.steps)] + (["--level", str(args.level)] if args.level is not None else [])),
        "artifact": args.artifact, "level": float(models["ours"].teal_sparsity), "prompt_len": args.prompt_len,
        "rounds": args.rounds, "steps": args.steps, "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "load_start": load_start,
        "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
        "variants": variants,
        "ratios": {"ours / dense": tps["ours"] / tps["dense"], "ours / int4": tps["ours"] / tps["int4"],
                   "int4 / dense": tps["int4"] / tps["dense"],
                   "prefill dense / ours": variants["dense"]["prefill_ms"] / variants["ours"]["prefill_ms"]},
    }
    text = markdown(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu_decode_cpu.md").write_text(text)
        (args.out / "cpu_decode_cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
