"""Union sparsity of a batch on real activations: what a batched sparse GEMV can skip at batch 2-16.

    python benchmarks/union_sparsity.py ARTIFACT [--batches 1,2,4,8,16 --levels 0.25,0.4,0.5 --tokens 64]

At batch M a decode step's GEMV reads every weight row some row of the batch needs, so what sparsity can save at
batch M is the fraction of W^T's rows inactive for all M rows (the union's sparsity). benchmarks/gemv.py draws the
rows as independent N(0, 1) vectors (s50 -> 6 % at batch 4: 0.5^4); issue 12 asks for it on real activations. This
script feeds real text (WikiText-2 test, shipped in data/) to a trained model's artifact (the SmolLM2-135M one
`teal-quant run recipes/smollm2_135m_w4_s40.yaml` writes) with every token thresholded as in decode (prefill mode
'sparse'), records each TealLinear's input mask |x| > t, and forms batches as a decode step does: the tokens at one
position of M different sequences. Per level and batch size: the weight-size-weighted union sparsity over every
TealLinear (and per projection kind), averaged over positions and batch draws. CPU is enough (one forward per level).
Output: OUT.json and OUT.md (--out, default benchmarks/results/union_sparsity_smollm2_cpu).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT / "data" / "wikitext-2-raw" / "wiki.test.raw"


def sequences(tokenizer, count: int, length: int) -> torch.Tensor:
    """count non-overlapping windows of `length` tokens of WikiText-2 test, BOS first: [count, length]."""
    ids = tokenizer(WIKITEXT.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    need = count * (length - 1)
    if ids.numel() < need:
        raise SystemExit(f"WikiText-2 test has {ids.numel()} tokens, fewer than {need}")
    body = ids[:need].view(count, length - 1)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else body[0, 0].item()
    return torch.cat([torch.full((count, 1), bos, dtype=body.dtype), body], 1)


def record_masks(model, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """One forward of ids [S, T]: each TealLinear's input mask [S, T, K] (|x| > t, in stored order) and its
    weight size."""
    from teal_quant.runtime.modules import teal_linears

    masks: dict[str, tuple[torch.Tensor, int]] = {}
    hooks = []
    for name, module in teal_linears(model):
        def hook(m, args, name=name):
            x = args[0].detach().float()
            if m.perm is not None:
                x = x.index_select(-1, m.perm.long())
            masks[name] = (x.abs() > m.threshold, m.weight_size)
        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return masks


def kind_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def union_sparsity(masks, batch: int, draws: int, seed: int = 0) -> tuple[float, dict[str, float]]:
    """Weight-size-weighted fraction of rows inactive for all `batch` sequences at one position, over positions
    1..T-1 (the BOS position is left out) and `draws` random choices of the sequences: (all layers, per kind)."""
    gen = torch.Generator().manual_seed(seed)
    num, den = 0.0, 0.0
    per_kind_num: dict[str, float] = defaultdict(float)
    per_kind_den: dict[str, float] = defaultdict(float)
    for name, (mask, size) in masks.items():
        s = mask.shape[0]
        fracs = []
        for _ in range(draws):
            rows = torch.randperm(s, generator=gen)[:batch]
            union = mask[rows, 1:].any(0)  # [T - 1, K]
            fracs.append(1 - union.float().mean().item())
        frac = sum(fracs) / len(fracs)
        num += frac * size
        den += size
        per_kind_num[kind_of(name)] += frac * size
        per_kind_den[kind_of(name)] += size
    return num / den, {k: per_kind_num[k] / per_kind_den[k] for k in sorted(per_kind_num)}


def independent(level: float, batch: int) -> float:
    """The union's sparsity if the rows' masks were independent with sparsity `level` (gemv.py's model)."""
    return level ** batch


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# Union sparsity of a decode batch on real activations (SmolLM2-135M artifact, CPU)", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}", f"- git commit: {meta['commit']}",
             f"- artifact: {meta['artifact']} (levels {meta['levels']}); text: WikiText-2 raw test, "
             f"{meta['sequences']} windows of {meta['tokens']} tokens (BOS first), every token thresholded "
             "(prefill 'sparse')",
             "- union: fraction of W^T's rows inactive for all M sequences at one position (what a batch-M GEMV can "
             f"skip), weighted by weight size over every TealLinear, mean over positions 1..T-1 and {meta['draws']} "
             "random choices of the M sequences; independent: level^M (benchmarks/gemv.py's N(0, 1) rows)", "",
             "| level | M | union (all layers) | independent | " + " | ".join(result["kinds"]) + " |",
             "|---:|---:|---:|---:|" + "---:|" * len(result["kinds"])]
    for r in result["rows"]:
        lines.append(f"| {r['level']} | {r['batch']} | {r['union']:.3f} | {r['independent']:.3f} | "
                     + " | ".join(f"{r['per_kind'][k]:.3f}" for k in result["kinds"]) + " |")
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--levels", default=None, help="levels of the artifact (default: every level above 0)")
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "union_sparsity_smollm2_cpu")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    import teal_quant
    from teal_quant.runtime.modules import set_prefill_mode, set_sparsity

    batches = [int(b) for b in args.batches.split(",")]
    if max(batches) > args.sequences:
        raise SystemExit(f"--batches up to {max(batches)} needs --sequences >= {max(batches)}")
    model = teal_quant.load(args.artifact, device="cpu")
    levels = ([float(v) for v in args.levels.split(",")] if args.levels
              else [v for v in model.teal_quant_config.levels if v > 0])
    set_prefill_mode(model, "sparse")
    ids = sequences(AutoTokenizer.from_pretrained(args.artifact), args.sequences, args.tokens)
    rows = []
    kinds: list[str] = []
    for level in levels:
        set_sparsity(model, level)
        masks = record_masks(model, ids)
        for m in batches:
            union, per_kind = union_sparsity(masks, m, args.draws if m < args.sequences else 1)
            kinds = list(per_kind)
            rows.append(dict(level=level, batch=m, union=union, independent=independent(level, m), per_kind=per_kind))
            print(f"level {level} M={m:2d} union {union:.3f} (independent {independent(level, m):.3f}) {per_kind}",
                  flush=True)
    meta = dict(command="python " + " ".join(sys.argv), date=datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"), commit=git_commit(), artifact=args.artifact.name,
                levels=list(model.teal_quant_config.levels), sequences=args.sequences, tokens=args.tokens,
                draws=args.draws)
    result = {"meta": meta, "kinds": kinds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
