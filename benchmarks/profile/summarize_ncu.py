"""Summarize a round of benchmarks/gemv_profile.py under Nsight Compute: the raw page (``ncu -i R --page raw --csv``),
the SASS source page (``--page source --csv --print-source sass``) and the case list -> one markdown table (per case:
duration, DRAM TB/s, issue-active %, achieved occupancy, top stall reasons with their share of the warp-state
samples) and the top SASS stall locations per case.

    python3 benchmarks/profile/summarize_ncu.py raw.csv source.csv timing.jsonl [--top 5] [--json OUT.json]

``--json`` also writes the same numbers per case (the benchmark's result file; the raw exports are not kept).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter


def num(v: str) -> float:
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return float("nan")


def raw_rows(path: str) -> list[dict]:
    rows = list(csv.reader(open(path)))
    hdr, units = rows[0], rows[1]
    out = []
    for r in rows[2:]:
        d = dict(zip(hdr, r))
        d["_units"] = dict(zip(hdr, units))
        out.append(d)
    return out


def source_blocks(path: str) -> list[tuple[str, list[dict]]]:
    """[(kernel name, [instruction row])] in profile order."""
    blocks, hdr, name = [], None, None
    for r in csv.reader(open(path)):
        if r and r[0] == "Kernel Name":
            name, hdr = r[1], None
            blocks.append((name, []))
        elif r and r[0] == "Address":
            hdr = r
        elif hdr and r:
            blocks[-1][1].append(dict(zip(hdr, r)))
    return blocks


STALLS = ("barrier", "branch_resolving", "dispatch", "drain", "imc", "lg", "long_sb", "math", "membar", "mio", "misc",
          "no_inst", "not_selected", "selected", "short_sb", "sleep", "tex", "wait")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("source")
    ap.add_argument("cases", help="timing.jsonl of the same cases (names, un-profiled µs)")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--json", help="also write the per-case summary here")
    a = ap.parse_args()
    cases = [json.loads(line) for line in open(a.cases)]
    raws = raw_rows(a.raw)
    blocks = source_blocks(a.source)
    print("| case | µs (ncu) | µs (graph) | DRAM TB/s | issue active % | warps/scheduler (occupancy %) | regs | waves | "
          "warp instr. (M) | top stalls (share of samples) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    details, records = [], []
    for case, r, (kname, insts) in zip(cases, raws, blocks):
        dur = num(r["gpu__time_duration.sum"])
        bw = num(r["dram__bytes_read.sum.per_second"])
        if r["_units"]["dram__bytes_read.sum.per_second"].startswith("G"):
            bw /= 1000
        tot = Counter()
        for i in insts:
            for s in STALLS:
                tot[s] += num(i.get(f"stall_{s}", "0"))
        n = sum(tot.values()) or 1
        top = ", ".join(f"{s} {v / n * 100:.0f} %" for s, v in tot.most_common(3))
        print(f"| {case['name']} | {dur:.1f} | {case.get('us', float('nan')):.1f} | {bw:.2f} | "
              f"{num(r['smsp__issue_active.avg.pct_of_peak_sustained_active']):.0f} | "
              f"{num(r['smsp__warps_active.avg.per_cycle_active']):.1f} "
              f"({num(r['sm__warps_active.avg.pct_of_peak_sustained_active']):.0f}) | "
              f"{r['launch__registers_per_thread']} | {r['launch__waves_per_multiprocessor']} | "
              f"{num(r['smsp__inst_executed.sum']) / 1e6:.1f} | {top} |")
        ranked = sorted(insts, key=lambda i: -num(i["Warp Stall Sampling (All Samples)"]))[: a.top]
        lines = []
        for i in ranked:
            s = num(i["Warp Stall Sampling (All Samples)"])
            why = max(STALLS, key=lambda k: num(i.get(f"stall_{k}", "0")))
            lines.append(f"{s / n * 100:.1f} % `{i['Source'].strip()}` ({why})")
        details.append((case["name"], kname, lines))
        records.append({
            "case": case["name"], "spec": {k: v for k, v in case.items() if k not in ("name", "us")}, "kernel": kname, "us_ncu": dur, "us_graph": case.get("us"), "dram_tb_s": bw,
            "issue_active_pct": num(r["smsp__issue_active.avg.pct_of_peak_sustained_active"]),
            "warps_per_scheduler": num(r["smsp__warps_active.avg.per_cycle_active"]),
            "occupancy_pct": num(r["sm__warps_active.avg.pct_of_peak_sustained_active"]),
            "registers": int(num(r["launch__registers_per_thread"])), "waves": num(r["launch__waves_per_multiprocessor"]),
            "warp_instructions": num(r["smsp__inst_executed.sum"]),
            "stall_share": {k: v / n for k, v in tot.most_common() if v},
            "top_sass": [{"share": num(i["Warp Stall Sampling (All Samples)"]) / n, "sass": i["Source"].strip(),
                          "stall": max(STALLS, key=lambda k: num(i.get(f"stall_{k}", "0")))} for i in ranked],
        })
    print()
    for name, kname, lines in details:
        print(f"- {name} ({kname}): " + "; ".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cases": records}, f, indent=1)


if __name__ == "__main__":
    main()
