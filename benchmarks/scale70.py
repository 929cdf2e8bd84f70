"""The shipped 70B recipe at full Llama-3-70B width, on N decoder layers: seconds per layer, peak host RSS, peak GPU
memory, the projected 80-layer time, --plan's predictions beside the measured values, and a --resume byte check.

    python benchmarks/scale70.py --layers 4 --workdir /tmp/scale70 [--budget-s 330] [--result benchmarks/results/scale70_h200]

1. Writes a Llama-3-70B-width checkpoint with N layers (random bf16 weights, `save_pretrained` in 5 GB shards, a
   byte-level BPE tokenizer trained on data/calibration) under --workdir.
2. Runs recipes/llama3_70b_w4_s40.yaml exactly as shipped except two swaps: model.source is that checkpoint and the
   calibration text is data/calibration/*.txt (text_files) instead of the wikitext-103 Hub dataset; same 128 x 2048
   calibration tokens, same greedy settings. First `teal-quant run --plan` (predictions), then the run itself as a
   subprocess (its log has one plain line per layer); if --budget-s runs out it is stopped with SIGTERM and the
   finished layers are what is measured.
3. Resume check, on the same checkpoint with a smaller calibration (--resume-samples sequences, greedy over 4096
   tokens: the mechanism is under test, not the speed): an uninterrupted run, then a run SIGKILLed once its second
   layer is checkpointed, then `--resume`; every file compared byte for byte (calibration_report.json without its
   measured seconds and peaks).
Writes RESULT.md and RESULT.json. --hidden/--intermediate/--heads shrink the width for a CPU dry run of this script.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "llama3_70b_w4_s40.yaml"
CALIBRATION = sorted(glob.glob(str(ROOT / "data" / "calibration" / "*.txt")))
TIMING_KEYS = ("seconds", "stage_seconds", "peaks")


def build_checkpoint(folder: Path, layers: int, hidden: int | None, intermediate: int | None, heads: int | None,
                     device: str) -> dict:
    """A Llama-3-70B-width checkpoint with `layers` decoder layers: random bf16 weights (std 0.02, norms 1), written by
    save_pretrained in 5 GB shards; the tokenizer is a byte-level BPE trained on the calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from teal_quant.compression.synthetic import resolve_arch

    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return {"reused": True}
    t0 = time.time()
    config = resolve_arch("llama3-70b")
    config.num_hidden_layers = layers
    if hidden:
        config.hidden_size, config.intermediate_size = hidden, intermediate
        config.num_attention_heads, config.num_key_value_heads = heads, max(1, heads // 8)
        config.head_dim = hidden // heads
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([Path(p).read_text() for p in CALIBRATION], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(folder)
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(folder, max_shard_size="5GB")
    shards = sorted(folder.glob("*.safetensors"))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"reused": False, "seconds": time.time() - t0, "shards": len(shards),
            "bytes": sum(f.stat().st_size for f in shards)}


def shipped_recipe(model: Path, out: Path, **override) -> dict:
    """The shipped 70B recipe with the two swaps (model.source, text_files calibration) and the output folder."""
    data = yaml.safe_load(RECIPE.read_text())
    data["model"]["source"] = str(model)
    data["calibration"]["source"] = {"kind": "text_files", "paths": CALIBRATION}
    data["output"]["dir"] = str(out)
    for section, values in override.items():
        data[section] = {**data.get(section, {}), **values}
    return data


def config_only_model(folder: Path, layers: int, config=None) -> Path:
    """A folder --plan can read: config.json with `layers` layers and an index naming every tensor, no weights."""
    from transformers import AutoModelForCausalLM

    from teal_quant.compression.synthetic import resolve_arch

    folder.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = resolve_arch("llama3-70b")
        config.dtype = torch.bfloat16
    config.num_hidden_layers = layers
    config.save_pretrained(folder)
    with torch.device("meta"):
        names = list(AutoModelForCausalLM.from_config(config).state_dict())
    weight_map = {n: f"model-{i // 40 + 1:05d}-of-00030.safetensors" for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def plan_full_model(model: Path, work: Path, recipe_data: dict, machine):
    """--plan of the same recipe on all 80 layers (no weights: --plan reads none), on the machine as probed."""
    from transformers import AutoConfig

    from teal_quant.compression.plan import plan_run
    from teal_quant.compression.recipe import Recipe

    folder = config_only_model(work / "model-80-config-only", 80, AutoConfig.from_pretrained(model))
    data = json.loads(json.dumps(recipe_data))
    data["model"]["source"] = str(folder)
    return plan_run(Recipe.from_dict(data), machine=machine)


def replan(results: dict, work: Path) -> dict:
    """--render: the plan of the measured run and of 80 layers again, with this checkout's constants and the machine
    the run probed (no GPU needed), for comparing refitted predictions with what was measured."""
    from teal_quant.compression.plan import Machine, plan_run
    from teal_quant.compression.recipe import Recipe

    machine = Machine(**{**results["plan"]["machine"], "disk_path": Path(results["plan"]["machine"]["disk_path"])})
    out = {}
    for name, layers in (("plan_refit", results["layers"]), ("plan_80_layers_refit", 80)):
        data = json.loads(json.dumps(results["recipe"]))
        data["model"]["source"] = str(config_only_model(work / f"config-{layers}", layers))
        out[name] = plan_run(Recipe.from_dict(data), data["output"]["dir"], machine=machine,
                             device=torch.device("cuda")).as_dict()
    return out


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "teal_quant.cli", *args]


def run_measured(recipe_file: Path, log: Path, deadline: float) -> dict:
    """`teal-quant run RECIPE` as a subprocess, stdout (one plain line per layer) to `log`; SIGTERM at `deadline`."""
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cli("run", str(recipe_file)), stdout=f, stderr=subprocess.PIPE, text=True)
        stopped = False
        while proc.poll() is None:
            if time.time() > deadline and not stopped:
                proc.send_signal(signal.SIGTERM)
                stopped = True
            time.sleep(0.5)
        err = proc.stderr.read()
    import resource

    return {"returncode": proc.returncode, "seconds": time.time() - t0, "stopped_at_budget": stopped,
            "stderr": err[-1500:], "log_tail": log.read_text()[-3000:],
            # the whole process's high-water mark (the end of the run included: the last shard, lm_head, metadata)
            "process_peak_host_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def layer_rows(out: Path) -> list[dict]:
    """The per-layer report rows: from the finished artifact, else from the kept staging folder's resume state."""
    report = out / "calibration_report.json"
    if report.is_file():
        return json.loads(report.read_text())["layers"]
    for state in sorted(out.parent.glob(f".{out.name}.partial-*/.resume/state.json")):
        return json.loads(state.read_text())["progress"]["report"]
    return []


def files_of(folder: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        if f.name == "calibration_report.json":
            report = json.loads(data)
            for layer in report["layers"]:
                for key in TIMING_KEYS:
                    layer.pop(key, None)
            data = json.dumps(report, sort_keys=True).encode()
        out[f.name] = data
    return out


def resume_check(base: dict, work: Path, samples: int, deadline: float) -> dict:
    """Uninterrupted vs SIGKILL after layer 2 + --resume, same output path, every file compared."""
    out = work / "resume-art"
    recipe = work / "resume.yaml"
    data = json.loads(json.dumps(base))
    data["output"]["dir"] = str(out)
    data["calibration"]["samples"] = samples
    data["sparsity"]["greedy"] = {"step": 0.05, "tokens": min(4096, samples * data["calibration"]["seq_len"])}
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    env = dict(os.environ, TEAL_QUANT_QUIET="1")
    t = time.time()
    first = subprocess.run(cli("run", str(recipe)), capture_output=True, text=True, env=env)
    if first.returncode != 0:
        return {"error": f"uninterrupted run failed: {first.stderr[-800:]}"}
    reference = work / "resume-reference"
    out.rename(reference)
    uninterrupted = time.time() - t
    proc = subprocess.Popen(cli("run", str(recipe)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    done = 0
    while done < 2:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            return {"error": f"the run to kill ended or ran out of time first ({proc.stderr.read()[-500:]})"}
        for state in out.parent.glob(f".{out.name}.partial-*/.resume/state.json"):
            try:
                done = json.loads(state.read_text())["progress"]["layers_done"]
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    killed_at = done
    t = time.time()
    resumed = subprocess.run(cli("run", str(recipe), "--resume"), capture_output=True, text=True, env=env)
    if resumed.returncode != 0:
        return {"error": f"--resume failed: {resumed.stderr[-800:]}"}
    a, b = files_of(out), files_of(reference)
    differ = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
    detail = first_difference(json.loads(a["calibration_report.json"]), json.loads(b["calibration_report.json"])) \
        if "calibration_report.json" in differ else None
    result = {"samples": samples, "seq_len": data["calibration"]["seq_len"], "greedy": data["sparsity"]["greedy"],
              "killed_after_layers": killed_at, "uninterrupted_seconds": uninterrupted,
              "resume_seconds": time.time() - t, "files": len(a), "differing_files": differ,
              "weight_bytes": sum(len(v) for k, v in a.items() if k.endswith(".safetensors")),
              "identical": not differ, "report_difference": detail}
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(reference, ignore_errors=True)
    return result


def first_difference(a, b, path: str = "") -> str | None:
    """The first JSON path where two reports differ, with both values (short)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: {str(a)[:80]} vs {str(b)[:80]}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scale70"))
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop the measured run after this many seconds")
    parser.add_argument("--resume-samples", type=int, default=16)
    parser.add_argument("--resume-budget-s", type=float, default=150.0)
    parser.add_argument("--result", type=Path, default=ROOT / "benchmarks" / "results" / "scale70_h200")
    parser.add_argument("--commit", default=None, help="the branch commit measured (the device's .git may be stale)")
    parser.add_argument("--calibration-code", default="", help="which calibration code was measured (for the md)")
    parser.add_argument("--hidden", type=int, default=None, help="CPU dry run: a smaller width")
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run-calibration", type=int, nargs=3, metavar=("SAMPLES", "SEQ_LEN", "GREEDY_TOKENS"),
                        help="CPU dry run of this script: a smaller calibration than the recipe's (and greedy step 0.1)")
    parser.add_argument("--render", type=Path, help="re-render RESULT.md from this JSON (plans refitted, no run)")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.render.read_text())
        results.update(replan(results, args.workdir))
        results["rendered"] = "python benchmarks/scale70.py " + " ".join(sys.argv[1:])
        write_results(results, args.result)
        return 0
    start = time.time()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    results: dict = {
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": args.commit or git_commit(),
        "calibration_code": args.calibration_code, "host": platform.node(), "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch": torch.__version__,
        "layers": args.layers,
    }
    results["checkpoint"] = build_checkpoint(model, args.layers, args.hidden, args.intermediate, args.heads, args.device)
    print("checkpoint:", results["checkpoint"], flush=True)

    out = work / "art"
    shutil.rmtree(out, ignore_errors=True)
    for p in work.glob(".art.*"):
        shutil.rmtree(p, ignore_errors=True)
    recipe_data = shipped_recipe(model, out)
    if args.device == "cpu":
        recipe_data["runtime"]["device"] = "cpu"
    if args.dry_run_calibration:
        samples, seq_len, tokens = args.dry_run_calibration
        recipe_data["calibration"].update(samples=samples, seq_len=seq_len)
        recipe_data["sparsity"]["greedy"].update(tokens=tokens, step=0.1)
    recipe_file = work / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_data, sort_keys=False))
    results["recipe"] = recipe_data

    from teal_quant.compression.recipe import Recipe
    from teal_quant.workflow import plan

    t = time.time()
    predicted = plan(Recipe.from_yaml(recipe_file))
    results["plan"] = predicted.as_dict()
    results["plan"]["seconds_to_plan"] = time.time() - t
    print(f"plan: {predicted.seconds_per_layer:.1f}s/layer, host {predicted.host_bytes / 1e9:.1f} GB, "
          f"GPU {predicted.gpu_bytes / 1e9:.1f} GB, disk {predicted.disk_bytes / 1e9:.1f} GB", flush=True)
    full = plan_full_model(model, work, recipe_data, predicted.machine)
    results["plan_80_layers"] = full.as_dict()
    print(f"plan, 80 layers: host {full.host_bytes / 1e9:.1f} GB, GPU {full.gpu_bytes / 1e9:.1f} GB, "
          f"disk {full.disk_bytes / 1e9:.1f} GB, {full.total_seconds / 60:.0f} min", flush=True)

    deadline = start + args.budget_s
    run = run_measured(recipe_file, work / "run.log", deadline)
    rows = layer_rows(out)
    results["run"] = {k: v for k, v in run.items()}
    results["run"]["layers_done"] = len(rows)
    results["run"]["layer_seconds"] = [r["seconds"] for r in rows]
    results["run"]["stage_seconds"] = [r["stage_seconds"] for r in rows]
    results["run"]["peaks"] = [r["peaks"] for r in rows]
    results["run"]["block_error"] = [r["block_error"] for r in rows]
    results["run"]["greedy_evaluations"] = [r.get("greedy_evaluations") for r in rows]
    print("run:", {k: results["run"][k] for k in ("returncode", "seconds", "layers_done", "layer_seconds")}, flush=True)
    shutil.rmtree(out, ignore_errors=True)
    for p in work.glob(".art.*"):
        shutil.rmtree(p, ignore_errors=True)

    results["resume"] = {"error": "not finished in this call"}
    results["total_seconds"] = time.time() - start
    write_results(results, args.result)  # what the main run measured, in case the resume check runs out of time
    if time.time() - start < args.budget_s + args.resume_budget_s - 30:
        results["resume"] = resume_check(recipe_data, work, args.resume_samples, time.time() + args.resume_budget_s)
    else:
        results["resume"] = {"error": "not run: no time left in this call"}
    print("resume:", results["resume"], flush=True)
    results["total_seconds"] = time.time() - start
    write_results(results, args.result)
    return 0


def write_results(r: dict, result: Path) -> None:
    result.parent.mkdir(parents=True, exist_ok=True)
    result.with_suffix(".json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    run, plan = r["run"], r["plan"]
    refit = r.get("plan_refit") or plan  # --render: the same run planned with this checkout's constants
    secs = run["layer_seconds"]
    steady = secs[1:] if len(secs) > 1 else secs  # layer 0 also pays CUDA/kernel warm-up
    mean = sum(steady) / len(steady) if steady else float("nan")
    layer_host = max((p["host_rss_bytes"] for p in run["peaks"]), default=0)
    host = max(layer_host, run.get("process_peak_host_bytes", 0))
    gpu = max((p.get("gpu_allocated_bytes", 0) for p in run["peaks"]), default=0)
    gpu_reserved = max((p.get("gpu_reserved_bytes", 0) for p in run["peaks"]), default=0)
    projected = mean * 80
    lines = [
        "# The 70B recipe at full width on one H200 (benchmarks/scale70.py)",
        "",
        f"- command: `{r['command']}`",
        f"- date {r['date']}, GPU {r['gpu']}, {r['cpus']} CPU cores, torch {r['torch']}; branch commit `{r['commit']}`",
        f"- calibration code measured: {r.get('calibration_code') or 'this commit'}",
        *([f"- this page re-rendered from the JSON by `{r['rendered']}` (the '--plan refitted' column: the same run "
           "planned with the constants plan.py now has, fitted to this measurement, on the machine this run probed)"]
          if r.get("rendered") else []),
        f"- checkpoint: Llama-3-70B width, {r['layers']} decoder layers, random bf16 weights, save_pretrained in 5 GB "
        f"shards ({r['checkpoint']})",
        "- recipe: recipes/llama3_70b_w4_s40.yaml as shipped, two swaps: that checkpoint as model.source, "
        "data/calibration/*.txt as text_files calibration (128 x 2048 tokens, greedy step 0.02 over 16,384 tokens, "
        "levels 0.25-0.6)",
        "",
        "## Measured vs --plan",
        "",
        "| | --plan in this run | --plan refitted | measured | target |",
        "|---|---:|---:|---:|---:|",
        f"| seconds per layer (layers 1.., writing and checkpoint included) | {plan['seconds_per_layer']:.1f} | "
        f"{refit['seconds_per_layer']:.1f} | {mean:.1f} (all: {', '.join(f'{s:.1f}' for s in secs)}) | <= 45 |",
        f"| projected 80-layer run | {plan['seconds_per_layer'] * 80 / 60:.0f} min | "
        f"{refit['seconds_per_layer'] * 80 / 60:.0f} min | {projected / 60:.0f} min | <= 60 min |",
        f"| peak host RSS (whole process; at the end of the last layer) | {plan['host_bytes'] / 1e9:.1f} GB | "
        f"{refit['host_bytes'] / 1e9:.1f} GB | {host / 1e9:.1f} GB; {layer_host / 1e9:.1f} GB | <= 48 GB |",
        f"| peak GPU memory (torch allocated; reserved) | {plan['gpu_bytes'] / 1e9:.1f} GB | "
        f"{refit['gpu_bytes'] / 1e9:.1f} GB | {gpu / 1e9:.1f} GB; {gpu_reserved / 1e9:.1f} GB | <= 40 GB |",
        f"| disk for this {r['layers']}-layer run | {plan['disk_bytes'] / 1e9:.1f} GB | {refit['disk_bytes'] / 1e9:.1f} GB | | |",
        "",
        f"The run: exit {run['returncode']}, {run['seconds']:.0f} s wall, {run['layers_done']} layers finished"
        + (" (stopped at the time budget with SIGTERM; finished layers kept)" if run["stopped_at_budget"] else "") + ".",
        "",
        "Per layer, seconds by stage:",
        "",
        "| layer | " + " | ".join(run["stage_seconds"][0]) + " | total |" if run["stage_seconds"] else "",
        "|---|" + "---:|" * (len(run["stage_seconds"][0]) + 1) if run["stage_seconds"] else "",
    ]
    for i, st in enumerate(run["stage_seconds"]):
        lines.append(f"| {i} | " + " | ".join(f"{v:.1f}" for v in st.values()) + f" | {secs[i]:.1f} |")
    plan_parts = ", ".join(f"{k} {v:.1f}s" for k, v in refit["layer_seconds"].items())
    measured_evals = ", ".join(str(n) for n in run.get("greedy_evaluations", []))
    lines += ["", f"--plan's time per layer{' (refitted)' if refit is not plan else ''}: {plan_parts} "
              f"({refit['greedy_evaluations']} greedy block evaluations "
              f"predicted, measured per layer: {measured_evals}; "
              f"matmul probe {plan['machine']['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s, histogram probe "
              f"{plan['machine']['histogram_elements_per_s'] / 1e9:.1f} G elements/s, disk write "
              f"{plan['machine']['disk_write_bytes_per_s'] / 1e9:.1f} GB/s).", ""]
    full = r.get("plan_80_layers_refit") or r.get("plan_80_layers")
    if full:
        lines += ["## --plan for the whole 80-layer model (this recipe, this machine"
                  + (", refitted constants)" if "plan_80_layers_refit" in r else ")"), "",
                  f"disk {full['disk_bytes'] / 1e9:.1f} GB (artifact {full['artifact_bytes'] / 1e9:.1f} GB, two "
                  f"hidden-state checkpoints {2 * full['hidden_bytes'] / 1e9:.1f} GB, the writer's pending shard; from "
                  f"the Hub with keep_download: false add about two 5 GB shards), host {full['host_bytes'] / 1e9:.1f} "
                  f"GB, GPU {full['gpu_bytes'] / 1e9:.1f} GB, {full['seconds_per_layer']:.1f} s per layer, "
                  f"{full['total_seconds'] / 60:.0f} min in all.", ""]
    res = r["resume"]
    lines += ["## Resume", ""]
    if "error" in res:
        lines.append(f"Not measured: {res['error']}")
    else:
        lines.append(f"Same checkpoint, {res['samples']} x {res['seq_len']} calibration tokens and greedy "
                     f"{res['greedy']} (fewer than the recipe's 128 sequences, to fit this call: the resume mechanism "
                     f"is under test here). Uninterrupted run {res['uninterrupted_seconds']:.0f} s; a second run "
                     f"SIGKILLed after {res['killed_after_layers']} checkpointed layers, then `--resume` "
                     f"({res['resume_seconds']:.0f} s). {res['files']} files compared byte for byte "
                     f"({res['weight_bytes'] / 1e9:.2f} GB of weights; calibration_report.json without its measured "
                     f"seconds and peaks): **{'identical' if res['identical'] else 'DIFFERENT: ' + ', '.join(res['differing_files'])}**"
                     + (f" (first difference: {res['report_difference']})" if res.get("report_difference") else "")
                     + ".")
    result.with_suffix(".md").write_text("\n".join(line for line in lines if line is not None) + "\n")


if __name__ == "__main__":
    sys.exit(main())
