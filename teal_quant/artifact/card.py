"""The artifact's model card (README.md): Hub metadata, what was done, measured numbers, how to load it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from teal_quant.artifact.format import TealQuantConfig

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.DOTALL)


def front_matter(text: str) -> dict:
    """The YAML metadata block of a model card ({} when there is none or it does not parse)."""
    m = _FRONT_MATTER.match(text)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_model_license(model_dir: str | Path, gguf_file: str | None = None) -> str | None:
    """The base model's license when it says so: its card's `license:`, else a GGUF file's general.license."""
    model_dir = Path(model_dir)
    readme = model_dir / "README.md"
    if readme.is_file():
        license_ = front_matter(readme.read_text(errors="replace")).get("license")
        if isinstance(license_, str) and license_.strip():
            return license_.strip()
    if gguf_file and (model_dir / gguf_file).is_file():
        try:
            from gguf import GGUFReader

            field = GGUFReader(str(model_dir / gguf_file)).fields.get("general.license")
            value = field.contents() if field is not None else None
        except Exception:  # an unreadable header only means "license unknown"
            value = None
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


@dataclass(frozen=True)
class CardFacts:
    """Everything the model card states, as plain data built by the caller (the pipeline)."""

    base_model: str  # the recipe's model.source
    quant: TealQuantConfig  # the artifact's quantization_config
    quantization: dict  # method and options, as in calibration_report.json ("quantization")
    calibration_sparsity: list[float]  # per level of quant.levels: size-weighted, mean over layers
    name: str | None = None  # the recipe's name (the title; default: the base model)
    license: str | None = None  # the base model's (base_model_license)
    repo_id: str | None = None  # where it will be pushed: goes into the usage snippet
    eval_rows: list[dict] = field(default_factory=list)  # teal_quant.evaluate rows: measured perplexity per level
    eval_window: int | None = None  # the evaluation's window length, when there are eval rows


def model_card(facts: CardFacts) -> str:
    """README.md of an artifact."""
    quant, base = facts.quant, facts.base_model
    metadata = {}
    if facts.license:
        metadata["license"] = facts.license
    metadata.update({
        "base_model": base,
        "base_model_relation": "quantized",
        "library_name": "teal-quant",
        "tags": ["teal-quant", "teal", "activation-sparsity", f"int{quant.bits}", quant.quantizer],
    })
    evals = {round(r["level"], 6): r for r in facts.eval_rows if r.get("level") is not None}
    header = "| sparsity level | size-weighted sparsity on the calibration text |"
    rule = "|---|---|"
    if evals:
        header += " eval perplexity | eval realized sparsity |"
        rule += "---|---|"
    rows = []
    for level, cal in zip(quant.levels, facts.calibration_sparsity):
        row = f"| {level:g}{' (default)' if level == quant.default else ''} | {cal:.3f} |"
        if evals:
            r = evals.get(round(level, 6))
            row += f" {r['perplexity']:.2f} | {r['realized_sparsity']:.3f} |" if r else " | |"
        rows.append(row)
    eval_note = ""
    if evals and facts.eval_window is not None:
        first = next(iter(evals.values()))
        eval_note = (f"\nPerplexity: {first['tokens']} tokens of the recipe's `eval` text, windows of {facts.eval_window}, "
                     "every token sparsified (as in decode).\n")
    group = "per-channel" if quant.group_size == -1 else f"group size {quant.group_size}"
    method_note = _quantizer_note(facts.quantization)
    location = facts.repo_id or "path/or/repo-id"
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# {facts.name or base} — teal-quant int{quant.bits} + TEAL sparsity

`{base}` compressed by [teal-quant](https://pypi.org/project/teal-quant/): {quant.quantizer.upper()} int{quant.bits}
weights ({group}, {'symmetric' if quant.sym else 'asymmetric'}), and TEAL activation-sparsity thresholds for
every linear layer at the levels below ({quant.allocation} allocation across the projections of each block,
{quant.criterion.replace("_", "-")} criterion). Decoding skips the weight rows whose input activation is below the threshold.{method_note}

{header}
{rule}
{chr(10).join(rows)}
{eval_note}
## Usage

```python
import teal_quant
model = teal_quant.load("{location}", sparsity={quant.default:g})
teal_quant.set_sparsity(model, {quant.levels[-1]:g})   # any level above; 0 keeps activations dense
```

`import teal_quant` also registers the format with transformers, so
`AutoModelForCausalLM.from_pretrained("{location}")` loads it too (at the default level).

The recipe that produced this artifact is in `recipe.yaml`; per-layer allocations and thresholds are in
`calibration_report.json`.
"""


def _quantizer_note(quantization: dict) -> str:
    """One sentence on how GPTQ ran (empty otherwise): its options, as recorded in calibration_report.json too."""
    if quantization.get("method") != "gptq":
        return ""
    aware = quantization.get("sparsity_aware")
    aware = (f"; each projection's Hessian from its input thresholded as at sparsity level {aware:g} "
             "(sparsity-aware)" if aware is not None else "")
    act_order = "on (static groups)" if quantization["act_order"] else "off"
    return (f"\nGPTQ: block size {quantization['block_size']}, damp {quantization['damp']:g}, act-order {act_order}, "
            f"Hessians from {quantization['samples']} calibration samples{aware}.")
