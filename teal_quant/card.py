"""The artifact's model card (README.md): Hub metadata, what was done, measured numbers, how to load it."""

from __future__ import annotations

import yaml

from .artifact import TealQuantConfig
from .recipe import Recipe


def model_card(recipe: Recipe, quant: TealQuantConfig, report_layers: list[dict]) -> str:
    base = recipe.model.source
    metadata = {
        "base_model": base,
        "base_model_relation": "quantized",
        "library_name": "teal-quant",
        "tags": ["teal-quant", "teal", "activation-sparsity", f"int{quant.bits}", quant.quantizer],
    }
    n = len(report_layers)
    rows = []
    for j, level in enumerate(quant.levels):
        cal = sum(r["calibration_sparsity"][j] for r in report_layers) / n
        rows.append(f"| {level:g}{' (default)' if level == quant.default else ''} | {cal:.3f} |")
    group = "per-channel" if quant.group_size == -1 else f"group size {quant.group_size}"
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# {recipe.name or base} — teal-quant int{quant.bits} + TEAL sparsity

`{base}` compressed by [teal-quant](https://pypi.org/project/teal-quant/): {quant.quantizer.upper()} int{quant.bits}
weights ({group}, {'symmetric' if quant.sym else 'asymmetric'}), and TEAL activation-sparsity thresholds for
every linear layer at the levels below ({quant.allocation} allocation across the projections of each block).
Decoding skips the weight rows whose input activation is below the threshold.

| sparsity level | size-weighted sparsity on the calibration text |
|---|---|
{chr(10).join(rows)}

## Usage

```python
import teal_quant
model = teal_quant.load("path/or/repo-id", sparsity={quant.default:g})
teal_quant.set_sparsity(model, {quant.levels[-1]:g})   # any level above; 0 keeps activations dense
```

The recipe that produced this artifact is in `recipe.yaml`; per-layer allocations and thresholds are in
`calibration_report.json`.
"""
