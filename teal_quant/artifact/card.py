"""The artifact's model card (README.md): Hub metadata, what was done, measured numbers, how to load it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from teal_quant import gguf_files
from teal_quant.artifact.format import TealQuantConfig

PACKAGE_PREFIX = "package:"  # a model shipped inside a Python package (compression.sources): never a Hub id

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
            field = gguf_files.read(model_dir / gguf_file).fields.get("general.license")
            value = field.contents() if field is not None else None
        except Exception:  # an unreadable header only means "license unknown"
            value = None
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


@dataclass(frozen=True)
class CardFacts:
    """Everything the model card states, as plain data built by the caller (the pipeline)."""

    source: str  # the recipe's model.source, as written (a Hub id, `package:NAME` or a local path)
    quant: TealQuantConfig  # the artifact's quantization_config
    quantization: dict  # method and options, as in calibration_report.json ("quantization")
    calibration_sparsity: list[float]  # per level of quant.levels: size-weighted, mean over layers
    base_model: str | None = None  # the base model's Hub repo id (metadata `base_model`); None when not on the Hub
    name: str | None = None  # the recipe's name (the title; default: the base model)
    license: str | None = None  # the base model's (base_model_license)
    repo_id: str | None = None  # where it will be pushed: goes into the usage snippet
    eval_rows: list[dict] = field(default_factory=list)  # teal_quant.evaluate rows: measured perplexity per level
    eval_window: int | None = None  # the evaluation's window length, when there are eval rows
    eval_dataset: dict | None = None  # {type, name, config?, split?}: what the eval text is (model-index `dataset`)
    allocation_plot: str | None = None  # file name of the allocation heatmap inside the artifact, when one was drawn


def is_repo_id(value: str) -> bool:
    """True for a Hub model id (`name` or `namespace/name`), as huggingface_hub validates it offline."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if value.startswith(PACKAGE_PREFIX) or value.startswith((".", "/", "~")) or "\\" in value:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def card_metadata(facts: CardFacts):
    """The card's YAML metadata as huggingface_hub's ModelCardData (eval results become the `model-index`)."""
    from huggingface_hub import EvalResult, ModelCardData

    quant = facts.quant
    title = facts.name or facts.repo_id or f"{facts.base_model or Path(facts.source).name} (teal-quant)"
    eval_results = None
    rows = [r for r in facts.eval_rows if r.get("level") is not None]
    if rows and facts.eval_dataset:
        ds = facts.eval_dataset
        eval_results = [
            EvalResult(task_type="text-generation", task_name="Language modeling", dataset_type=ds["type"],
                       dataset_name=ds["name"], dataset_config=ds.get("config"), dataset_split=ds.get("split"),
                       metric_type="perplexity", metric_value=round(float(r["perplexity"]), 4),
                       metric_name=f"perplexity at sparsity {r['level']:g}",
                       metric_config=f"sparsity={r['level']:g}")
            for r in rows
        ]
    return ModelCardData(
        license=facts.license,
        base_model=facts.base_model,
        base_model_relation="quantized" if facts.base_model else None,
        library_name="teal-quant",
        pipeline_tag="text-generation",
        tags=["teal-quant", "teal", "activation-sparsity", f"int{quant.bits}", quant.quantizer],
        model_name=title if eval_results else None,
        eval_results=eval_results,
    )


def model_card(facts: CardFacts) -> str:
    """README.md of an artifact, built with huggingface_hub's ModelCard (metadata checked as it builds)."""
    from huggingface_hub import ModelCard

    quant, base = facts.quant, facts.base_model or facts.source
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
        baseline = next((r for r in facts.eval_rows if r.get("level") is None), None)
        base_note = f" The unquantized base model: perplexity {baseline['perplexity']:.2f}." if baseline else ""
        eval_note = (f"\nPerplexity: {first['tokens']} tokens of the recipe's `eval` text, windows of {facts.eval_window}, "
                     f"every token sparsified (as in decode).{base_note}\n")
    plot = ""
    if facts.allocation_plot:
        plot = (f"\n![Sparsity per layer and projection at each level]({facts.allocation_plot})\n\n"
                "Sparsity chosen for each projection of each decoder layer, per level.\n")
    group = "per-channel" if quant.group_size == -1 else f"group size {quant.group_size}"
    method_note = _quantizer_note(facts.quantization)
    location = facts.repo_id or "path/or/repo-id"
    source_note = "" if facts.source == base else f" (read from `{facts.source}`)"
    body = f"""
# {facts.name or base} — teal-quant int{quant.bits} + TEAL sparsity

`{base}`{source_note} compressed by [teal-quant](https://pypi.org/project/teal-quant/): {quant.quantizer.upper()} int{quant.bits}
weights ({group}, {'symmetric' if quant.sym else 'asymmetric'}), and TEAL activation-sparsity thresholds for
every linear layer at the levels below ({quant.allocation} allocation across the projections of each block,
{quant.criterion.replace("_", "-")} criterion). Decoding skips the weight rows whose input activation is below the threshold.{method_note}

{header}
{rule}
{chr(10).join(rows)}
{eval_note}{plot}
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
    metadata = card_metadata(facts)
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}", ignore_metadata_errors=False))


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
