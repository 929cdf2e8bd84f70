"""What reading a GEMV's bytes costs with nothing else to do: the ceiling gemv.py's method puts on each shape.

    PYTHONPATH=. python benchmarks/read_ceiling.py [--out benchmarks/results --tag read_ceiling_h200]

Issue 12 asks for touched-bytes bandwidths (3.3 TB/s at s0, 3.0 at s50 on the 70B shapes) that were set from the
copy ceiling of large buffers (4.25 TB/s). A decode GEMV reads 5-120 MB in one launch, timed back to back in a CUDA
graph without programmatic dependent launch (benchmarks/gemv.py), so every call also pays the grid's ramp-up and
drain. This benchmark times Triton kernels that only read: for every (shape, sparsity) of the summary, the same
bytes ours must touch (the active rows of W^T [K, N/8] int32 and the scales / zeros of every group with an active row,
one int32 per column and group), on the same input x (benchmarks/gemv.py's activations and thresholds), with the
same timing (graph replays over weight copies that defeat the L2). Two read kernels, each over a grid of launch
shapes, the best reported:

- ``list``: one program per (column tile, 128-row K-range) loads the K-range's active-row list (compacted on the
  host, as the GEMV compacts it on the GPU) and then the listed rows, ``rows`` at a time;
- ``mask``: the same programs load all 128 rows of the K-range with the row's activity as the load mask (inactive
  rows issue no memory transaction), ``rows`` at a time: no list, no dependent load.

Each program sums what it read into one int32 it stores (so nothing is dead code). ``ours`` is gemv.py's call of
teal_quant's sparse GEMV on the same x, threshold and weights, in the same run. The report gives µs and TB/s of the
best read kernel and of ours, ours / ceiling, and the issue's target next to them.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import gemv as bench  # noqa: E402  (its shapes, weights, activations, thresholds and timing)

GROUP = bench.GROUP
TARGETS = {("70B", 0): 3.3, ("70B", 50): 3.0}  # issue 12's touched-bytes targets (TB/s) at batch 1
# launch shapes: (int32 columns per program, rows per load, warps, programs per 128-row K-range)
CONFIGS = [(c, r, 4, ks) for c, r, ks in itertools.product((32, 64, 128, 256), (16, 32), (1, 2, 4))
           if c * r <= 4096 and r <= GROUP // ks]


@triton.jit
def _group_words(sz_ptr, cnt_ptr, pid_k, pid_c, part, n_out, BLOCK_C: tl.constexpr):
    """(the sum over each int32 column's 8 scale/zero words of the K-range's group, read by part 0 only and only when
    the K-range has an active row, else 0; the K-range's active-row count)."""
    cnt = tl.load(cnt_ptr + pid_k)
    ocols = pid_c * BLOCK_C * 8 + tl.arange(0, BLOCK_C * 8)
    sz = tl.load(sz_ptr + pid_k * n_out + ocols, mask=ocols < tl.where((cnt > 0) & (part == 0), n_out, 0), other=0)
    return tl.sum(tl.reshape(sz, [BLOCK_C, 8]), axis=1), cnt


@triton.jit
def _program_tile(n8, BLOCK_C: tl.constexpr, SPLIT: tl.constexpr):
    """This program's column tile (int32 columns and their mask) and its K-range and part of it (both read kernels)."""
    pid_c = tl.program_id(0)
    pid = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid_c, pid, pid // SPLIT, pid % SPLIT, cols, cols < n8


@triton.jit
def _read_list_kernel(w_ptr, sz_ptr, idx_ptr, cnt_ptr, out_ptr, n8, n_out,
                      BLOCK_C: tl.constexpr, ROWS: tl.constexpr, GROUP_K: tl.constexpr, SPLIT: tl.constexpr):
    """Sum of the listed rows of W^T [K, n8] (int32) in this program's column tile and its part (1 / SPLIT of the
    list) of a K-range, plus, in part 0, the group's scale/zero words [K / GROUP_K, n_out] (one int32 per output
    column) when any row of the K-range is listed."""
    pid_c, pid, pid_k, part, cols, cmask = _program_tile(n8, BLOCK_C, SPLIT)
    acc, cnt = _group_words(sz_ptr, cnt_ptr, pid_k, pid_c, part, n_out, BLOCK_C)
    lo = part * (GROUP_K // SPLIT)
    hi = tl.minimum(cnt, lo + GROUP_K // SPLIT)
    for r in range(lo, hi, ROWS):
        ri = r + tl.arange(0, ROWS)
        rmask = ri < hi
        rows = tl.load(idx_ptr + pid_k * GROUP_K + ri, mask=rmask, other=0)
        tile = tl.load(w_ptr + rows[:, None].to(tl.int64) * n8 + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                       other=0)
        acc += tl.sum(tile, axis=0)
    tl.store(out_ptr + pid * n8 + cols, acc, mask=cmask)


@triton.jit
def _read_mask_kernel(w_ptr, sz_ptr, act_ptr, cnt_ptr, out_ptr, n8, n_out,
                      BLOCK_C: tl.constexpr, ROWS: tl.constexpr, GROUP_K: tl.constexpr, SPLIT: tl.constexpr):
    """As _read_list_kernel, with the part's rows (1 / SPLIT of the K-range) selected by a 0/1 mask (act [K] int8)
    instead of a list: no dependent load."""
    pid_c, pid, pid_k, part, cols, cmask = _program_tile(n8, BLOCK_C, SPLIT)
    acc = tl.zeros([BLOCK_C], dtype=tl.int32)
    for r in tl.static_range(0, GROUP_K // SPLIT, ROWS):
        ri = pid_k * GROUP_K + part * (GROUP_K // SPLIT) + r + tl.arange(0, ROWS)
        active = tl.load(act_ptr + ri) != 0
        tile = tl.load(w_ptr + ri[:, None].to(tl.int64) * n8 + cols[None, :], mask=active[:, None] & cmask[None, :],
                       other=0)
        acc += tl.sum(tile, axis=0)
    acc += _group_words(sz_ptr, cnt_ptr, pid_k, pid_c, part, n_out, BLOCK_C)[0]
    tl.store(out_ptr + pid * n8 + cols, acc, mask=cmask)


def read_words(k: int, n: int, seed: int = 0):
    """Random contents of the words a batch-1 call reads: W^T [K, N/8] int32 and scale/zero words [K/G, N] int32."""
    gen = torch.Generator(device=bench.DEV).manual_seed(seed)
    w = torch.randint(-2**31, 2**31 - 1, (k, n // 8), generator=gen, device=bench.DEV, dtype=torch.int32)
    sz = torch.randint(-2**31, 2**31 - 1, (k // GROUP, n), generator=gen, device=bench.DEV, dtype=torch.int32)
    return w, sz


def row_lists(active: torch.Tensor):
    """The K-ranges' active rows as the read kernels take them: (idx [K] int32, each K-range's active rows first in
    ascending order; counts [K/G] int32; act [K] int8)."""
    k = active.numel()
    act = active.view(-1, GROUP)
    order = torch.argsort((~act).to(torch.int8), dim=1, stable=True)
    idx = (order + torch.arange(0, k, GROUP, device=active.device)[:, None]).to(torch.int32).flatten()
    return idx.contiguous(), act.sum(1).to(torch.int32), active.to(torch.int8)


def read_reference(w, sz, active) -> torch.Tensor:
    """What both read kernels store, in torch: per K-range and int32 column, the wrapped int32 sum of the active rows
    and (if any row is active) of the 8 scale/zero words of its output columns."""
    k, n8 = w.shape
    rows = (w.long() * active.long()[:, None]).view(k // GROUP, GROUP, n8).sum(1)
    groups = sz.long().view(k // GROUP, n8, 8).sum(2) * active.view(-1, GROUP).any(1).long()[:, None]
    total = (rows + groups) & 0xFFFFFFFF
    return torch.where(total >= 2**31, total - 2**32, total).to(torch.int32)


def read_fns(kind: str, config, copies, lists, n: int, k: int):
    """One call per weight copy of the ``kind`` read kernel with launch shape ``config``; each returns the sums of
    every K-range (its parts' sums folded: read_reference's layout)."""
    block_c, rows, warps, split = config
    n8 = n // 8
    out = torch.empty(k // GROUP * split, n8, device=bench.DEV, dtype=torch.int32)
    grid = (triton.cdiv(n8, block_c), k // GROUP * split)
    idx, cnt, act = lists
    kernel, rows_arg = (_read_list_kernel, idx) if kind == "list" else (_read_mask_kernel, act)

    def call(w, sz):
        kernel[grid](w, sz, rows_arg, cnt, out, n8, n, BLOCK_C=block_c, ROWS=rows, GROUP_K=GROUP, SPLIT=split,
                     num_warps=warps)
        return out

    return [lambda c=c: call(*c) for c in copies]


def folded(out: torch.Tensor, split: int) -> torch.Tensor:
    """A read kernel's output [K/G * split, n8] as read_reference's [K/G, n8]: the parts' int32 sums, wrapped."""
    total = out.view(-1, split, out.shape[1]).long().sum(1) & 0xFFFFFFFF
    return torch.where(total >= 2**31, total - 2**32, total).to(torch.int32)


def time_baselines(x, q, scales, zeros) -> dict:
    """tinygemm int4 and cuBLAS bf16 on the same weights and x (gemv.py's calls and timing), µs."""
    n, k = q.shape[1], q.shape[0]
    w_bf16 = bench.dequantized(q, scales, zeros)
    tg = bench.make_tinygemm(q, scales, zeros)
    tg_copies = [tg] + [(tg[0].clone(), tg[1].clone()) for _ in range(bench.n_copies(k * n // 2) - 1)]
    bf16_copies = [w_bf16] + [w_bf16.clone() for _ in range(bench.n_copies(k * n * 2) - 1)]
    out = dict(tinygemm_us=bench.time_graph([lambda c=c: torch._weight_int4pack_mm(x, c[0], GROUP, c[1])
                                             for c in tg_copies]),
               cublas_us=bench.time_graph([lambda w=w: torch.nn.functional.linear(x, w) for w in bf16_copies]))
    del tg_copies, bf16_copies, w_bf16
    torch.cuda.empty_cache()
    return out


def bench_ceiling(model: str, proj: str, sparsities, log) -> list[dict]:
    """Rows of (read kernel's best, ours) for one shape at batch 1 and each sparsity."""
    n, k = bench.SHAPES[model][proj]
    q, qweight, scales, zeros = bench.make_layer(n, k)
    w_bytes = k * n // 2 + 2 * (k // GROUP) * n * 2
    ours_copies = [(qweight, scales, zeros)] + [(qweight.clone(), scales.clone(), zeros.clone())
                                                 for _ in range(bench.n_copies(w_bytes) - 1)]
    x = bench.activations(1, k, 1)
    baselines = {} if bench.SMOKE else time_baselines(x, q, scales, zeros)
    del q
    rows = []
    w, sz = read_words(k, n)
    read_copies = [(w, sz)] + [(w.clone(), sz.clone()) for _ in range(bench.n_copies(w_bytes) - 1)]
    del w, sz
    for sp in sparsities:
        thr = bench.threshold_for(x, sp)
        active = (x.float().abs() > thr).any(0)
        touched, _ = bench.touched_bytes(x, thr, n)
        lists = row_lists(active)
        want = read_reference(*read_copies[0], active)
        best = None
        for kind, config in itertools.product(("list", "mask"), CONFIGS):
            fns = read_fns(kind, config, read_copies, lists, n, k)
            if not torch.equal(folded(fns[0](), config[3]), want):
                raise SystemExit(f"{model} {proj} s{sp}: the {kind} read kernel {config} read the wrong bytes")
            if bench.SMOKE:
                continue
            us = bench.time_graph(fns)
            if best is None or us < best[0]:
                best = (us, kind, config)
        t = torch.tensor(thr, device=bench.DEV)
        ours_us = bench.time_graph(bench.ours_fns(x, t, ours_copies, proj))
        row = dict(model=model, proj=proj, N=n, K=k, batch=1, sparsity=sp, touched_bytes=touched,
                   ours_us=ours_us, ours_tbps=touched / ours_us / 1e6, target_tbps=TARGETS.get((model, sp)), **baselines)
        if best is not None:
            us, kind, config = best
            row.update(read_us=us, read_tbps=touched / us / 1e6, read_kernel=kind,
                       read_config=dict(zip(("block_c", "rows", "warps", "split"), config)), read_over_ours=us / ours_us)
            log(f"{model:4s} {proj:13s} s{sp:2d} {touched / 1e6:7.1f} MB  read {us:6.2f} us "
                f"{row['read_tbps']:4.2f} TB/s ({kind} {config})  ours {ours_us:6.2f} us {row['ours_tbps']:4.2f} TB/s")
        rows.append(row)
    del ours_copies, read_copies
    if not bench.SMOKE:
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Read ceiling of the batch-1 GEMV shapes ({meta['gpu']})", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}", f"- git commit: {meta['commit']}",
             f"- torch {meta['torch']}, triton {meta['triton']}; int4, group 128, batch 1; launch shapes of ours: "
             f"{meta['table']}",
             "- read: the best of Triton kernels that only read the bytes ours must touch (active rows of W^T, the "
             "scales / zeros of touched groups), over launch shapes "
             f"(columns, rows per load, warps, programs per K-range) in {len(CONFIGS)} x 2 kernels (`list`, `mask`; benchmarks/read_ceiling.py)",
             "- time: CUDA-graph replays over weight copies that defeat the L2, back to back without programmatic "
             "dependent launch (benchmarks/gemv.py's method), median µs per call; TB/s over ours' touched bytes "
             "(the read kernels touch the same bytes but x and y)",
             "- s 100: no active row (the read kernels load their lists / masks and store zeros): the launch's floor",
             "- x tinygemm: tinygemm int4's µs (same run, same x) over the read kernel's (the most any kernel reading "
             "these bytes this way could gain over it) and over ours; the same for cuBLAS bf16", "",
             "| shape | s | touched MB | read µs (TB/s) | read kernel | ours µs (TB/s) | read µs / ours µs | "
             "tinygemm µs | read / ours x tinygemm | cuBLAS µs | read / ours x cuBLAS | issue 12 target |",
             "|---|---:|---:|---|---|---|---:|---:|---|---:|---|---|"]
    for r in rows:
        target = f">= {r['target_tbps']} TB/s" if r.get("target_tbps") else ""
        if "read_us" in r:
            cfg = r["read_config"]
            read = f"{r['read_us']:.1f} ({r['read_tbps']:.2f})"
            kernel = f"{r['read_kernel']} c{cfg['block_c']} r{cfg['rows']} w{cfg['warps']} ks{cfg['split']}"
            ratio = f"{r['read_us'] / r['ours_us']:.2f}"
        else:
            read, kernel, ratio = "-", "-", "-"
        vs = {}
        for base in ("tinygemm", "cublas"):
            b = r.get(f"{base}_us")
            vs[base] = (f"{b:.1f}", f"{b / r['read_us']:.2f}x / {b / r['ours_us']:.2f}x" if b and "read_us" in r
                        else "-") if b else ("-", "-")
        lines.append(f"| {r['model']} {r['proj']} | {r['sparsity']} | {r['touched_bytes'] / 1e6:.1f} | {read} | "
                     f"{kernel} | {r['ours_us']:.1f} ({r['ours_tbps']:.2f}) | {ratio} | {vs['tinygemm'][0]} | "
                     f"{vs['tinygemm'][1]} | {vs['cublas'][0]} | {vs['cublas'][1]} | {target} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="read_ceiling_h200")
    ap.add_argument("--models", default="70B,8B")
    ap.add_argument("--layers", default="q_o,k_v,qkv,gate_up,down,gate_up_fused")
    ap.add_argument("--sparsities", default="0,50,70,100")
    args = ap.parse_args(argv)
    meta = dict(gpu=torch.cuda.get_device_name() if not bench.SMOKE else "cpu (smoke)",
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=bench.git_commit(), command="PYTHONPATH=. python " + " ".join(sys.argv), torch=torch.__version__,
                triton=triton.__version__, table=bench.dispatch.table_name(torch.device(bench.DEV)))
    rows: list[dict] = []
    sparsities = [int(s) for s in args.sparsities.split(",")]
    for model in args.models.split(","):
        for proj in args.layers.split(","):
            if proj in bench.SHAPES[model]:
                rows += bench_ceiling(model, proj, sparsities, print)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
        f.write(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
