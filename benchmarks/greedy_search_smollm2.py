"""Lazy vs exact greedy search (and uniform allocation) on the default recipe, SmolLM2-135M, CPU.

Issue 14 asks that the cheaper allocation search keep quality: block error and WikiText-2 perplexity at s40/s50
within 2 % of the exact greedy search. Each variant compresses recipes/smollm2_135m_w4_s40.yaml as shipped (w4 RTN
g64, greedy step 0.05 over 1,024 tokens, levels 0.25/0.4/0.5) with only `sparsity.greedy.search` (or the allocation)
changed, then evaluates every level on the same WikiText-2 tokens with every token thresholded (prefill "sparse").
Writes benchmarks/results/greedy_search_smollm2_cpu.{json,md}.

    PYTHONPATH=. python benchmarks/greedy_search_smollm2.py [--tokens 8192] [--variants exact,lazy,lazy_512,uniform]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2_135m_w4_s40.yaml"
VARIANTS = {  # name -> sparsity section override
    "exact": {"allocation": "greedy", "greedy": {"search": "exact"}},
    "lazy": {"allocation": "greedy", "greedy": {"search": "lazy"}},
    "lazy_512": {"allocation": "greedy", "greedy": {"search": "lazy", "tokens": 512}},  # half the greedy tokens
    "uniform": {"allocation": "uniform"},
}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, tokens: int, out: Path) -> dict:
    import teal_quant

    wall, cpu = time.perf_counter(), cpu_seconds()
    summary = teal_quant.compress(str(RECIPE), output={"dir": str(out / name), "overwrite": True},
                                  sparsity=VARIANTS[name], eval={"tokens": tokens}, runtime={"device": "cpu"})
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    report = json.loads((out / name / "calibration_report.json").read_text())
    levels = report["levels"]
    kind = VARIANTS[name]["allocation"]
    errors = [[layer["block_error"][kind][j] for layer in report["layers"]] for j in range(len(levels))]
    return {
        "variant": name, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
        "compress_seconds": round(sum(summary.layer_seconds), 1),
        "greedy_evaluations": sum(layer.get("greedy_evaluations", 0) for layer in report["layers"]),
        "levels": levels,
        "block_error_mean": [sum(e) / len(e) for e in errors],
        "block_error_per_layer": errors,
        "eval": [{k: row[k] for k in ("model", "level", "perplexity", "realized_sparsity", "tokens")}
                 for row in summary.eval_rows],
    }


def render(result: dict) -> str:
    rows = {r["variant"]: r for r in result["rows"]}
    exact = rows["exact"]
    ppl = {name: {e["level"]: e["perplexity"] for e in r["eval"] if e["level"] is not None} for name, r in rows.items()}
    dense = [e["perplexity"] for e in exact["eval"] if e["level"] is None]  # the float base model
    lines = [
        "# Greedy search: lazy vs exact (and uniform), SmolLM2-135M default recipe, CPU",
        "",
        f"- date: {result['date']}; git commit: {result['commit']}; machine: {result['machine']}",
        f"- command: `{result['command']}`",
        "- recipe: recipes/smollm2_135m_w4_s40.yaml as shipped (w4 RTN g64, greedy step 0.05 over 1,024 calibration "
        "tokens), only the search / allocation changed",
        f"- evaluation: first {result['tokens']:,} WikiText-2 test tokens, 1,024-token windows, every token "
        "thresholded (prefill sparse)" + (f"; dense float model {dense[0]:.3f}" if dense else ""),
        "",
        "| variant | level | WikiText-2 ppl | vs exact | realized sparsity | block error (mean of 30 layers) | vs exact |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        for j, level in enumerate(r["levels"]):
            if level == 0:
                continue
            real = next(e["realized_sparsity"] for e in r["eval"] if e["level"] == level)
            p, pe = ppl[name][level], ppl["exact"][level]
            b, be = r["block_error_mean"][j], exact["block_error_mean"][j]
            lines.append(f"| {name} | {level:g} | {p:.3f} | {100 * (p / pe - 1):+.2f} % | {real:.3f} | {b:.5f} | "
                         f"{100 * (b / be - 1):+.2f} % |")
    lines += ["", "| variant | greedy block evaluations | compress s (30 layers) | wall s (compress + eval) | CPU s |",
              "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['greedy_evaluations']:,} | {r['compress_seconds']:.0f} | {r['wall_seconds']:.0f} | "
                     f"{r['cpu_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (default 8192)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "greedy_search_smollm2_cpu",
                        help="output path without suffix")
    parser.add_argument("--render", type=Path, metavar="OUT.json", help="print the markdown of a saved result")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())), end="")
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            rows.append(measure(name, args.tokens, Path(tmp)))
            print(name, f"{rows[-1]['wall_seconds']:.0f} s", flush=True)
    result = {"command": "PYTHONPATH=. python benchmarks/greedy_search_smollm2.py" +
              (f" --tokens {args.tokens}" if args.tokens != 8192 else ""),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": commit,
              "machine": f"{platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores, no GPU",
              "tokens": args.tokens, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(result))
    print(render(result), end="")


if __name__ == "__main__":
    main()
