"""End-to-end decode benchmark on one GPU: synthetic Llama-3 8B and 70B (random int4 weights, TEAL thresholds
calibrated on the model's own activations), ours vs dense int4 vs dense bf16, batch 1.

    python benchmarks/e2e.py                       # both models -> benchmarks/results/e2e_h200.{json,md}
    python benchmarks/e2e.py --only llama3-8b --out /tmp/e2e

Each model runs `teal-quant bench` in its own subprocess (a CUDA error or an OOM in one cannot poison the other;
a variant that fails is reported as failed and the others still run), with a wall-clock limit per model so the
whole run stays under ~8 minutes on an H200. Targets reported against (issue 6):
  llama3-8b  w4 s50: >= 3x bf16 tok/s and >= 1.8x dense int4 tok/s
  llama3-70b w4 s40: >= 100 tok/s (bf16 70B does not fit in one H200: extrapolated from 2 and 6 layers)
and llama3-8b once more with transformers' eager RMSNorm / SiLU-and-mul / rotary (`--eager-elementwise`), to show
what the one-launch elementwise kernels (teal_quant/elementwise.py) buy every variant.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_8B = ["--sparsity", "0.5", "--levels", "0.25,0.4,0.5", "--default", "0.5"]
RUNS = {
    # name: (bench target, bench arguments, wall-clock limit in seconds, targets)
    "llama3-8b": ("llama3-8b", _8B, 210, {"ours_over_bf16": 3.0, "ours_over_int4": 1.8}),
    # the same with transformers' eager RMSNorm / SiLU-and-mul / rotary: what the one-launch kernels buy
    "llama3-8b-eager-elementwise": ("llama3-8b", [*_8B, "--eager-elementwise"], 210, {}),
    "llama3-70b": ("llama3-70b", ["--sparsity", "0.4", "--levels", "0.25,0.4,0.5", "--default", "0.4"], 270,
                   {"ours_tokens_per_s": 100.0}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(RUNS), action="append", help="run only this model (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for e2e_h200.{json,md}")
    parser.add_argument("--name", default="e2e_h200", help="file name stem of the results")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)

    meta = environment()
    meta["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    runs = {}
    for name in args.only or list(RUNS):
        target, extra, limit, targets = RUNS[name]
        bench_args = [target, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                      "--batch", str(args.batch), "--baselines", "bf16,int4", *extra]
        print(f"[e2e] teal-quant bench {' '.join(bench_args)} (limit {limit}s)", flush=True)
        runs[name] = run_one(bench_args, limit)
        runs[name]["targets"] = check_targets(runs[name].get("result"), targets)
        print(f"[e2e] {name}: {runs[name]['status']} in {runs[name]['seconds']:.0f}s; targets {runs[name]['targets']}", flush=True)
    report = {**meta, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report))
    print(f"[e2e] wrote {args.out / args.name}.json and .md", flush=True)
    return 0 if all(r["status"] == "ok" for r in runs.values()) else 1


def run_one(bench_args: list[str], limit: int) -> dict:
    """`teal-quant bench` in a subprocess; its JSON if it wrote one, else the failure's last lines."""
    import time

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "teal_quant.cli", "bench", *bench_args, "--json", str(out)]
        env = {**os.environ, "TEAL_QUANT_QUIET": "1"}
        t = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env, cwd=ROOT)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, stdout, stderr = None, _text(e.stdout), _text(e.stderr) + f"\ntimed out after {limit}s"
        seconds = time.time() - t
        print(stdout, end="", flush=True)
        result = json.loads(out.read_text()) if out.is_file() else None
    tail = [line for line in stderr.splitlines() if line.strip() and not line.startswith("USDT")][-5:]
    status = "ok" if rc == 0 and result else ("partial" if result else "failed")
    return {"command": "teal-quant bench " + " ".join(bench_args), "status": status, "returncode": rc,
            "seconds": round(seconds, 1), "result": result, "stderr_tail": tail}


def check_targets(result: dict | None, targets: dict) -> dict:
    """{target: {want, got, met}}; got is None when the variants it needs failed."""
    out = {}
    ours = next((v for v in (result or {}).get("variants", []) if v["variant"] == "ours" and v["status"] == "ok"), None)
    for key, want in targets.items():
        got = ours["tokens_per_s"] if key == "ours_tokens_per_s" and ours else (result or {}).get("ratios", {}).get(key)
        out[key] = {"want": want, "got": got, "met": None if got is None else got >= want}
    return out


def environment() -> dict:
    import torch

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": None, "transformers": None, "git_commit": None}
    for mod in ("triton", "transformers"):
        try:
            meta[mod] = __import__(mod).__version__
        except ImportError:
            pass
    # a copy of the tree whose .git is stale (a GPU machine) states the commit in TEAL_QUANT_GIT_COMMIT
    meta["git_commit"] = os.environ.get("TEAL_QUANT_GIT_COMMIT")
    if not meta["git_commit"]:
        try:
            meta["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                                timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return meta


def markdown(report: dict) -> str:
    lines = [
        "# End-to-end decode benchmark (synthetic Llama-3, batch 1)", "",
        f"- command: `{report['command']}`", f"- GPU: {report['gpu']}", f"- date: {report['date']}",
        f"- git commit: {report['git_commit']}",
        f"- torch {report['torch']} (CUDA {report['cuda']}), triton {report['triton']}, transformers {report['transformers']}",
        "- weights: random int4 codes (group 128), TEAL thresholds calibrated on the model's own activations "
        "(`teal_quant.compression.synthetic`); times: CUDA events around decode steps replayed as CUDA graphs; see docs/bench.md", "",
    ]
    for name, run in report["runs"].items():
        lines += [f"## {name}", "", f"`{run['command']}` — {run['status']} in {run['seconds']:.0f} s", ""]
        result = run.get("result")
        if result:
            lines += ["| variant | level | realized sparsity | prefill ms | decode ms/token | tok/s | weights read/step (GB) "
                      "| GB/s | peak memory (GB) | linear / attention / other (eager ms) |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for v in result["variants"]:
                label = v["variant"] + (" (extrapolated)" if v.get("extrapolated") else "")
                if v["status"] != "ok":
                    lines.append(f"| {label} | | failed: {v.get('error', '?')} | | | | | | | |")
                    continue
                b = v["breakdown"]
                lines.append(
                    f"| {label} | {_fmt(v['level'], 'g')} | {_fmt(v['realized_sparsity'], '.3f')} | {v['prefill_ms']:.1f} | "
                    f"{v['decode_ms_per_token']:.3f} | {v['tokens_per_s']:.1f} | {v['weight_bytes_per_step'] / 1e9:.2f} | "
                    f"{v['bandwidth_gb_s']:.0f} | {_fmt(v['peak_memory_bytes'] and v['peak_memory_bytes'] / 1e9, '.1f')} | "
                    f"{_breakdown(b)} |")
            for v in result["variants"]:
                if v.get("extrapolated"):
                    pts = ", ".join(f"{p['layers']} layers: {p['decode_ms_per_token']:.3f} ms/token" for p in v["extrapolated"]["points"])
                    lines += ["", f"{v['variant']} is extrapolated: {v['extrapolated']['method']} ({pts})."]
            lines += ["", "ratios (tok/s): " + ", ".join(f"{k} {val:.2f}x" for k, val in result.get("ratios", {}).items())]
            ours = next((v for v in result["variants"] if v["variant"] == "ours" and v["status"] == "ok"), None)
            top = (ours or {}).get("breakdown", {}).get("top_other") or []
            if top:
                lines += ["", "largest 'other' kernels of ours (eager profile, ms per step / calls per step): " + "; ".join(
                    f"`{t['name']}` {t['ms']:.3f} / {t['calls']:g}" for t in top)]
        if run["stderr_tail"] and run["status"] != "ok":
            lines += ["", "```", *run["stderr_tail"], "```"]
        lines += ["", "targets: " + ("none (a comparison run)" if not run["targets"] else "; ".join(
            f"{k} >= {t['want']:g}: got {_fmt(t['got'], '.2f')} -> {'met' if t['met'] else 'NOT met' if t['met'] is False else 'not measured'}"
            for k, t in run["targets"].items())), ""]
    return "\n".join(lines) + "\n"


def _breakdown(b: dict) -> str:
    if b.get("linear_ms") is None:
        return f"n/a ({b.get('error', '?')})"
    launches = b.get("launches_per_step")
    return (f"{b['linear_ms']:.2f} / {b['attention_ms']:.2f} / {b['other_ms']:.2f}"
            + (f" ({launches:.0f} kernels)" if launches is not None else ""))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


if __name__ == "__main__":
    raise SystemExit(main())
