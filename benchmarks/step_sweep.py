"""Launch-shape sweep inside the decode step: each GEMV of the step timed by the step it runs in (issue 12 round 16).

    PYTHONPATH=. python benchmarks/step_sweep.py --out DIR [--arch llama3-70b] [--level 0.4] [--batch 1]
                                                [--kinds gate_up,down,qkv,o_proj] [--steps 48] [--rounds 3]
                                                [--min-gain 0.005]

Round 15 found the batch-1 picks of benchmarks/gemv_sweep.py (one call at a time on N(0, 1) activations, plain
form, PDL off) faster per call yet slower in the 70B decode step: the step calls q/k/v and o_proj with ``out=``
(no split-K tail), the down projection in its SiLU form, with programmatic dependent launch after a norm or the
attention, on the model's own activations. Here the measure is the step itself: a synthetic model (real TEAL
thresholds, uniform level), one Decoder with its CUDA graph per variant, where a variant gives ONE kind of the
step's GEMVs (every layer's) another launch shape through an exact rule put in front of the table. Per kind, in
order: the table's pick and every candidate of benchmarks/gemv_sweep.py for that batch size are timed, ``--rounds``
rounds of ``--steps`` steps in rotating order; the fastest (median ms per step) becomes the kind's rule when it
beats the table's pick by more than ``--min-gain`` (a fraction), and the next kind is swept with it in place
(coordinate descent). Writes the table with the changed exact rules to
DIR/<gpu>.json (``--table`` to put it elsewhere); results: DIR/step_sweep_<gpu>.{json,md}, one entry per
(arch, batch), earlier entries kept.
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from decode_glue import replay_ms  # noqa: E402  (CUDA events around graph replays)
from decode_pdl import commit  # noqa: E402
from gemv_sweep import CLASSES, CORE, canonical, replace_exact_rules, table_text  # noqa: E402
from gemv_sweep import candidates as sweep_candidates  # noqa: E402
from gemv_sweep import dispatch as sweep_dispatch  # noqa: E402
from teal_quant.kernels import dispatch  # noqa: E402  (the model's dispatch: `kernels` imported as such is another module)

from teal_quant.architecture import ACTIVATION_POINTS, projection_shapes  # noqa: E402
from teal_quant.bench import build_synthetic_model  # noqa: E402
from teal_quant.compression.synthetic import SyntheticSpec  # noqa: E402
from teal_quant.errors import TealQuantError  # noqa: E402
from teal_quant.runtime.decoding import Decoder  # noqa: E402
from teal_quant.runtime.modules import track_sparsity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GROUP, BITS = 128, 4
KINDS = ("gate_up", "down", "qkv", "o_proj")  # the largest first: their picks move the step the most
POINT_OF_KIND = {"qkv": "qkv", "o_proj": "o", "gate_up": "gateup", "down": "down"}  # teal_quant.architecture's names


def candidates(m: int) -> list:
    """gemv_sweep.py's candidates for batch m (batch 1: its CUDA-core list CORE, without the tensor-core shapes that
    never win there) as the model's dispatch spells them (benchmarks/gemv*.py import kernels/ as `kernels`)."""
    return [dispatch.shape_from_dict(sweep_dispatch.shape_to_dict(shape))
            for shape in (CORE if m == 1 else sweep_candidates(m))]


def step_layers(config) -> dict[str, tuple[int, int]]:
    """(N, K) of each kind of GEMV the fused decode step launches per layer: one call per activation point, the
    projections reading it concatenated along N (q/k/v, gate/up)."""
    shapes = projection_shapes(config)
    return {kind: (sum(shapes[p][1] for p in ACTIVATION_POINTS[point]), shapes[ACTIVATION_POINTS[point][0]][0])
            for kind, point in POINT_OF_KIND.items()}


def use_rules(rules: list) -> None:
    """Make the dispatch read ``rules`` (the device table's other entries unchanged) from now on."""
    parsed = tuple({**r, "shape": dispatch.shape_from_dict(r["shape"])} for r in rules)
    dispatch.load_table = lambda name: parsed  # pick_gemv looks the function up at every call


def with_shape(rules: list, m: int, n: int, k: int, shape: dict | None) -> list:
    """``rules`` with (batch class of m, N, K)'s exact rule set to ``shape`` as the written table would have it
    (None: unchanged)."""
    return rules if shape is None else replace_exact_rules(rules, {(m, n, k): shape})


def build_decoder(model, prompt: torch.Tensor, length: int) -> Decoder:
    dec = Decoder(model, batch_size=prompt.shape[0], max_length=length, cuda_graph=True, fused_step=True)
    tok = dec.prefill(prompt)
    for _ in range(4):
        tok = dec.step(tok)
    if dec._graph is None:
        raise RuntimeError(f"no CUDA graph: {dec.graph_error}")
    return dec


def sweep_kind(model, prompt, rules: list, n: int, k: int, steps: int, rounds: int, log) -> tuple:
    """(the table's pick, median ms per step of the step with every candidate shape on the GEMVs of (N, K) at the
    prompt's batch size, key None = the table's pick)."""
    m = prompt.shape[0]
    use_rules(rules)
    base = dispatch.pick_gemv(m, n, k, BITS, GROUP, torch.device("cuda"))
    base_key = canonical(dispatch.shape_to_dict(base)) if base is not None else None
    shapes = {None: None}
    for cand in candidates(m):
        d = dispatch.shape_to_dict(cand, defaults=False)
        if canonical(d) != base_key and dispatch.fits(cand, m, k, BITS, GROUP):
            shapes[canonical(d)] = d
    length = prompt.shape[1] + 8 + steps * (rounds + 2)
    decs = {}
    for key, shape in shapes.items():
        use_rules(with_shape(rules, m, n, k, shape))
        t = time.time()
        try:
            decs[key] = build_decoder(model, prompt, length)
        except Exception as e:  # noqa: BLE001 - a shape that fails is reported and left out, the sweep goes on
            log(f"  {short(shape)}: failed to build ({str(e).splitlines()[0][:200]})")
            continue
        replay_ms(decs[key], 4)
        log(f"  built {short(shape)} in {time.time() - t:.1f}s")
    use_rules(rules)
    per = {key: [] for key in decs}
    names = list(decs)
    for r in range(rounds):
        for key in names[r % len(names):] + names[: r % len(names)]:
            per[key].append(replay_ms(decs[key], steps))
    del decs
    torch.cuda.empty_cache()
    return base, {key: {"shape": shapes[key], "median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
                  for key, v in per.items()}


def short(shape: dict | None) -> str:
    if shape is None:
        return "table's pick"
    return " ".join(f"{k}={v}" if not isinstance(v, bool) else k for k, v in shape.items() if k != "kernel")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--table", type=Path, default=None, help="where to write the new table (default: OUT/<gpu>.json)")
    ap.add_argument("--arch", default="llama3-70b")
    ap.add_argument("--batch", type=int, default=1, help=f"decode batch size, one per batch class: {sorted(CLASSES)}")
    ap.add_argument("--level", type=float, default=0.4)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--min-gain", type=float, default=0.005, help="fraction of the step a new pick must save (ten "
                    "decoders of one launch shape spread 0.35 %% on the 70B step: results/step_sweep_h200.md)")
    args = ap.parse_args(argv)
    kinds = [s for s in args.kinds.split(",") if s]
    if any(s not in KINDS for s in kinds):
        print(f"error: --kinds must be of {', '.join(KINDS)}, got {args.kinds}", file=sys.stderr)
        return 2
    if args.batch not in CLASSES:
        print(f"error: --batch must be one of {sorted(CLASSES)} (one per batch class of the table), got {args.batch}",
              file=sys.stderr)
        return 2
    if not 0.0 < args.level < 1.0:
        print(f"error: --level must be in (0, 1), got {args.level}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: step_sweep.py times CUDA graphs of the decode step: it needs a GPU", file=sys.stderr)
        return 2
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[step_sweep {time.time() - t0:5.0f}s] {msg}", flush=True)

    device = torch.device("cuda")
    name = dispatch.table_name(device)
    table = json.loads((dispatch.CONFIG_DIR / f"{name}.json").read_text())
    rules = table["rules"]
    gpu = torch.cuda.get_device_name()
    levels = tuple(sorted({0.25, 0.4, 0.5, args.level}))  # benchmarks/e2e.py's levels, and the one decoded
    try:
        model = build_synthetic_model(args.arch, SyntheticSpec(levels=levels, default=args.level), device="cuda",
                                      sparsity=args.level)
    except TealQuantError as e:  # an unknown --arch, a config.json that is not a Llama
        print(f"error: {e}", file=sys.stderr)
        return 2
    track_sparsity(model, False)
    layers = step_layers(model.config)
    log(f"{args.arch} built; GEMVs per layer (N, K): {layers}")
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(0)).cuda()
    report = {"gpu": gpu, "torch": torch.__version__, "commit": commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "command": "python3 " + " ".join(["benchmarks/step_sweep.py",
                                                *(argv if argv is not None else sys.argv[1:])]),
              "arch": args.arch, "level": args.level, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
              "min_gain": args.min_gain, "kinds": {}}
    changed = {}
    for kind in kinds:
        n, k = layers[kind]
        log(f"{kind} (N={n}, K={k})")
        table_pick, times = sweep_kind(model, prompt, rules, n, k, args.steps, args.rounds, log)
        if not times:
            log("  no launch shape built: the table stays")
            continue
        base = times.get(None)
        best_key = min(times, key=lambda key: times[key]["median_ms"])
        gain = 1 - times[best_key]["median_ms"] / base["median_ms"] if base else 0.0
        pick = best_key if best_key is not None and gain > args.min_gain else None
        if pick is not None:
            changed[(args.batch, n, k)] = times[pick]["shape"]
            rules = replace_exact_rules(rules, {(args.batch, n, k): times[pick]["shape"]})
        for key, row in sorted(times.items(), key=lambda kv: kv[1]["median_ms"]):
            log(f"  {row['median_ms']:.4f} ms ({row['min_ms']:.4f}-{row['max_ms']:.4f}) {short(row['shape'])}")
        verdict = short(times[pick]["shape"]) if pick else "the table pick stays"
        log(f"  -> {verdict} (best saves {100 * gain:.2f} %)")
        report["kinds"][kind] = {
            "N": n, "K": k, "kept": pick is None, "gain": gain,
            "table_pick": dispatch.shape_to_dict(table_pick, defaults=False) if table_pick else None,
            "rows": sorted(times.values(), key=lambda row: row["median_ms"])}
        report["seconds"] = round(time.time() - t0, 1)
        write(args, report, table, rules, changed, name)
    log(f"done in {time.time() - t0:.0f}s; changed: {[short(s) for s in changed.values()] or 'none'}")
    return 0


def write(args, report: dict, table: dict, rules: list, changed: dict, name: str) -> None:
    """The results so far (a run cut short keeps them) and the table with the changed rules. One results file per
    GPU, step_sweep_<gpu>.{json,md}: this run replaces its (arch, batch) entry, the other entries are kept."""
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "step_sweep_" + ("h200" if "H200" in report["gpu"] else "gpu")
    path = args.out / f"{stem}.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else {}
    runs[run_key(report)] = report
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(results_text(runs))
    if changed:
        what = ", ".join(f"N={n} K={k}" for (_, n, k) in changed)
        about = (f"{table.get('about', '')} Then the batch-{report['batch']} exact rules of {what} set from the "
                 f"decode-step sweep "
                 f"(benchmarks/step_sweep.py, {report['arch']} level {report['level']}, {report['date']}, commit "
                 f"{report['commit']}).")
        path = args.table or args.out / f"{name}.json"
        path.write_text(table_text({**table, "about": about, "rules": rules}))


def run_key(r: dict) -> str:
    return f"{Path(r['arch']).name} batch {r.get('batch', 1)}" + (f" ({r['label']})" if r.get("label") else "")


def results_text(runs: dict) -> str:
    gpu = next(iter(runs.values()))["gpu"]
    return "\n".join([f"# Launch shapes timed inside the decode step ({gpu})", "", *map(markdown, runs.values())])


def markdown(r: dict) -> str:
    """One run's section of the results file."""
    lines = [f"## {run_key(r)}", "", *([f"- {r['note']}"] if r.get("note") else []),
             f"- command: `{r['command']}`; date {r['date']}; commit {r['commit']}; torch {r['torch']}",
             f"- synthetic {r['arch']}, w4 g128, level {r['level']} (uniform), batch {r.get('batch', 1)}, counters "
             f"off; one Decoder with its CUDA graph per variant; {r['rounds']} rounds of {r['steps']} steps in "
             "rotating order; median (min-max) ms per step; a variant changes the launch shape of one kind of GEMV "
             "in every layer",
             f"- a new pick must save more than {100 * r['min_gain']:.1f} % of the step; kinds swept in order, each "
             "with the earlier kinds' picks in place", ""]
    for kind, row in r["kinds"].items():
        base = next((x["median_ms"] for x in row["rows"] if x["shape"] is None), None)  # None: it failed to build
        lines += [f"### {kind} (N={row['N']}, K={row['K']}): "
                  + ("the table's pick stays" if row["kept"] else f"new pick, {100 * row['gain']:.2f} % faster step"),
                  "", f"table's pick: `{json.dumps(row['table_pick'])}`", "",
                  "| launch shape | ms per step | vs table's pick |", "|---|---|---|"]
        for x in row["rows"]:
            lines.append(f"| {short(x['shape'])} | {x['median_ms']:.4f} ({x['min_ms']:.4f}-{x['max_ms']:.4f}) | "
                         + (f"{x['median_ms'] / base:.4f} |" if base else "- |"))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
