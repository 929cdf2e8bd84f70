"""Several GPUs (issue 17): distributed calibration and tensor-parallel decoding against one GPU, side by side.

    python benchmarks/multi_gpu.py --part calibration --nproc 2 --layers 4 --workdir /tmp/mgpu [--samples 128]
    python benchmarks/multi_gpu.py --part decode --nproc 2 [--arch llama3-70b] [--batch 1,4]

Each part updates its section of RESULT.json and rewrites RESULT.md (--result, default
benchmarks/results/multi_gpu_h200), so the two parts can run as two commands.

calibration: the Llama-3-70B-width checkpoint of benchmarks/scale70.py (N layers, random bf16 weights), the shipped
  70B recipe with scale70's two swaps (and --samples/--greedy-tokens to shrink it into a command's time), run once on
  one GPU (`teal-quant run`) and once as `torchrun --nproc-per-node N -m teal_quant.cli run`: seconds per layer of
  each, peak memory per rank (calibration_report.json `ranks`), and the artifacts compared tensor by tensor (packed
  weights, scales, zeros, norms byte-identical for RTN; thresholds' largest relative difference).
decode: `teal-quant bench ARCH --batch B` on one GPU and under torchrun with `--tp N`: tok/s per batch, the all-reduce
  time in the breakdown, and whether the greedy tokens of the timed decode equal one GPU's.
A CPU dry run: --device cpu (gloo) with --hidden/--intermediate/--heads (calibration) or --arch CONFIG.json (decode).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale70  # noqa: E402  (the checkpoint and the recipe swaps, shared with the one-GPU benchmark)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "teal_quant.cli", *args]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "teal_quant.cli", *args]


def timed(cmd: list[str], log: Path, timeout: float) -> dict:
    env = dict(os.environ, TEAL_QUANT_QUIET="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace")
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}\n")
    return {"command": " ".join(cmd[1:]), "returncode": rc, "seconds": round(time.time() - t0, 1),
            "stderr_tail": err[-1500:]}


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def compare(one: Path, many: Path) -> dict:
    a, b = tensors(one), tensors(many)
    if a.keys() != b.keys():
        return {"same_keys": False, "only_one": sorted(set(a) - set(b))[:5], "only_many": sorted(set(b) - set(a))[:5]}
    worst, differing = 0.0, []
    for key, t in a.items():
        if key.endswith(".thresholds"):
            rel = ((b[key] - t).abs() / t.abs().clamp(min=1e-12)).max().item()
            worst = max(worst, rel)
        elif t.dtype != b[key].dtype or not bool((t == b[key]).all()):
            differing.append(key)
    return {"same_keys": True, "tensors": len(a), "non_threshold_tensors_differing": differing[:20],
            "non_threshold_identical": not differing, "thresholds_max_rel_diff": worst}


def calibration(args) -> dict:
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    built = scale70.build_checkpoint(model, args.layers, args.hidden, args.intermediate, args.heads, args.device)
    runs = {}
    for name, nproc in (("one", 1), (f"tp{args.nproc}", args.nproc)):
        out = work / f"art-{name}"
        data = scale70.shipped_recipe(model, out, calibration={"samples": args.samples},
                                      runtime={"device": args.device}, output={"overwrite": True})
        if args.greedy_tokens:
            data["sparsity"]["greedy"] = {**data["sparsity"].get("greedy", {}), "tokens": args.greedy_tokens}
        recipe = work / f"recipe-{name}.yaml"
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))
        cmd = cli("run", str(recipe)) if nproc == 1 else torchrun(nproc, "run", str(recipe))
        run = timed(cmd, work / f"run-{name}.log", args.timeout)
        report = out / "calibration_report.json"
        if report.is_file():
            r = json.loads(report.read_text())
            run["world_size"] = r.get("world_size")
            run["layer_seconds"] = [layer.get("seconds") for layer in r["layers"]]
            run["ranks"] = [{k: v for k, v in rank.items() if k != "sequences"} for rank in r.get("ranks", [])]
            run["layer_peaks_rank0"] = r["layers"][-1].get("peaks")
        runs[name] = run
    result = {"checkpoint": built, "layers": args.layers, "samples": args.samples, "runs": runs}
    one, many = work / "art-one", work / f"art-tp{args.nproc}"
    if (one / "config.json").is_file() and (many / "config.json").is_file():
        result["comparison"] = compare(one, many)
    return result


def decode(args) -> dict:
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    common = ["bench", args.arch, "--batch", args.batch, "--device", args.device, "--prompt-len", str(args.prompt_len),
              "--new-tokens", str(args.new_tokens)] + (["--baselines", args.baselines] if args.baselines else [])
    if args.group_size:
        common += ["--group-size", str(args.group_size)]
    runs = {}
    for name, nproc in (("one", 1), (f"tp{args.nproc}", args.nproc)):
        out = work / f"bench-{name}.json"
        out.unlink(missing_ok=True)
        cmd = cli(*common, "--json", str(out)) if nproc == 1 else torchrun(nproc, *common, "--tp", str(nproc),
                                                                          "--json", str(out))
        run = timed(cmd, work / f"bench-{name}.log", args.timeout)
        if out.is_file():
            run["result"] = json.loads(out.read_text())
        runs[name] = run
    rows = []
    one = (runs["one"].get("result") or {}).get("variants", [])
    many = (runs[f"tp{args.nproc}"].get("result") or {}).get("variants", [])
    for v in many:
        ref = next((o for o in one if o["variant"] == v["variant"] and o.get("batch") == v.get("batch")), None)
        if v.get("status") != "ok" or ref is None or ref.get("status") != "ok":
            rows.append({"variant": v["variant"], "batch": v.get("batch"), "status": v.get("status"),
                         "error": v.get("error")})
            continue
        rows.append({
            "variant": v["variant"], "batch": v.get("batch"), "level": v.get("level"),
            "one_tokens_per_s": ref["tokens_per_s"], "tp_tokens_per_s": v["tokens_per_s"],
            "speedup": v["tokens_per_s"] / ref["tokens_per_s"],
            "one_ms": ref["decode_ms_per_token"], "tp_ms": v["decode_ms_per_token"],
            "tp_allreduce_ms_eager": v["breakdown"].get("allreduce_ms"),
            "tp_breakdown": {k: v["breakdown"].get(k) for k in ("linear_ms", "attention_ms", "norm_rotary_ms",
                                                                  "allreduce_ms", "other_ms")},
            "tp_peak_memory_bytes_per_rank": v.get("peak_memory_bytes"),
            "tokens_equal": v.get("tokens") == ref.get("tokens"),
            "first_token_difference": next((i for i, (x, y) in enumerate(zip(v.get("tokens", []), ref.get("tokens", [])))
                                            if x != y), None),
            "tp_cuda_graph_error": v.get("cuda_graph_error"),
        })
    return {"arch": args.arch, "batch": args.batch, "runs": {k: {kk: vv for kk, vv in r.items() if kk != "result"}
                                                             for k, r in runs.items()}, "rows": rows}


def markdown(part: str, args, result: dict) -> str:
    lines = [f"# Several GPUs: {part} (`benchmarks/multi_gpu.py`)", "",
             f"- command: `python benchmarks/multi_gpu.py {' '.join(sys.argv[1:])}`",
             f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}; commit: {args.commit or 'unknown'}",
             f"- device: {args.device}; processes: 1 vs {args.nproc}; NCCL_NVLS_ENABLE=0, "
             "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", ""]
    for name, run in result["runs"].items():
        lines.append(f"- {name}: `{run['command']}` -> rc {run['returncode']} in {run['seconds']} s"
                     + (f"; stderr: `{run['stderr_tail'][-300:]}`" if run["returncode"] not in (0,) else ""))
    lines.append("")
    if part == "calibration":
        lines += ["| run | world size | seconds per layer | per-rank peak host RSS (GB) | per-rank peak GPU (GB) |",
                  "|---|---|---|---|---|"]
        for name, run in result["runs"].items():
            ranks = [r for r in run.get("ranks") or [] if r.get("peaks")] or [{"peaks": run.get("layer_peaks_rank0")}]
            host = ", ".join(f"{(r.get('peaks') or {}).get('host_rss_bytes', 0) / 1e9:.1f}" for r in ranks) or "-"
            gpu = ", ".join(f"{(r.get('peaks') or {}).get('gpu_allocated_bytes', 0) / 1e9:.1f}" for r in ranks) or "-"
            secs = ", ".join(f"{s:.1f}" for s in run.get("layer_seconds") or [])
            lines.append(f"| {name} | {run.get('world_size', '-')} | {secs} | {host} | {gpu} |")
        c = result.get("comparison")
        lines += ["", f"artifact comparison: {json.dumps(c) if c else 'not made (a run did not finish)'}"]
    else:
        lines += ["| variant | batch | one GPU tok/s | TP tok/s | speedup | all-reduce ms (eager, per step) | "
                  "peak memory per rank (GB) | greedy tokens equal |", "|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            if "tp_tokens_per_s" not in r:
                lines.append(f"| {r['variant']} | {r['batch']} | failed: {r.get('error')} | | | | | |")
                continue
            mem = r["tp_peak_memory_bytes_per_rank"]
            lines.append(f"| {r['variant']} | {r['batch']} | {r['one_tokens_per_s']:.1f} | {r['tp_tokens_per_s']:.1f} | "
                         f"{r['speedup']:.2f}x | {r['tp_allreduce_ms_eager'] or 0:.3f} | "
                         f"{'-' if mem is None else f'{mem / 1e9:.1f}'} | {r['tokens_equal']}"
                         + ("" if r["tokens_equal"] else f" (first difference at {r['first_token_difference']})") + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("calibration", "decode"), required=True)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/multi_gpu"))
    parser.add_argument("--result", type=Path, default=ROOT / "benchmarks" / "results" / "multi_gpu_h200")
    parser.add_argument("--timeout", type=float, default=270.0, help="seconds for each of the two runs")
    parser.add_argument("--commit", default=None)
    # calibration
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--greedy-tokens", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None, help="CPU dry run: a smaller width")
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    # decode
    parser.add_argument("--arch", default="llama3-70b")
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--baselines", default=None)
    parser.add_argument("--group-size", type=int, default=None)
    args = parser.parse_args()
    result = calibration(args) if args.part == "calibration" else decode(args)
    result["markdown"] = markdown(args.part, args, result)
    json_file, md_file = Path(f"{args.result}.json"), Path(f"{args.result}.md")
    json_file.parent.mkdir(parents=True, exist_ok=True)
    both = json.loads(json_file.read_text()) if json_file.is_file() else {}
    both[args.part] = result
    json_file.write_text(json.dumps(both, indent=2, default=str) + "\n")
    md_file.write_text("\n".join(both[part]["markdown"] for part in ("calibration", "decode") if part in both))
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
