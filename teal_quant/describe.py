"""`teal-quant inspect`: what an artifact holds, without loading the model."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from teal_quant.artifact import plots
from teal_quant.artifact.format import REPORT_FILE
from teal_quant.errors import ArtifactError, first_line
from teal_quant.progress import console
from teal_quant.report import human_bytes
from teal_quant.runtime.loading import resolve_artifact

_PROJ_ORDER = ("q", "k", "v", "o", "gate", "up", "down")
_CONFIG_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")


def inspect_artifact(path_or_repo_id: str, *, as_json: bool = False, plot_dir: str | Path | None = None,
                     plot_layers: list[int] = (0,)) -> dict:
    """Describe an artifact (tables on the console, or JSON on stdout with `as_json`) and return the data;
    `plot_dir`: also write PNG plots there (extra `[plots]`), their paths under "plots" in the data."""
    artifact = resolve_artifact(path_or_repo_id)
    report = artifact.report()
    if plot_dir is not None:
        plots._pyplot()  # the missing extra is reported before anything is printed or written
        for layer in plot_layers:
            if not any(r["layer"] == layer for r in (report or {}).get("layers", [])):
                raise ArtifactError(f"--layers: layer {layer} is not in the artifact's calibration report")
    if as_json:
        data = _data(artifact, report)
        if plot_dir is not None:
            data["plots"] = [str(p) for p in write_plots(report, plot_dir, plot_layers)]
        print(json.dumps(data, indent=2))
        return data
    return _print(artifact, report, plot_dir, plot_layers)


def _data(artifact, report: dict | None) -> dict:
    q = artifact.quant
    default_index = q.level_index(q.default)
    rows = [{"layer": layer["layer"], **layer["sparsity"][default_index],
             "effective": layer["calibration_sparsity"][default_index]} for layer in (report or {}).get("layers", [])]
    return {"path": str(artifact.path), "config": {k: artifact.config.get(k) for k in _CONFIG_KEYS},
            "quantization": q.to_dict(), "layers": rows, "eval": (report or {}).get("eval"),
            "quantized_modules": len(artifact.quantized_modules()), "bytes": artifact.size_on_disk()}


def write_plots(report: dict | None, plot_dir: str | Path, layers: list[int]) -> list[Path]:
    """allocation.png, histograms_layer{N}.png per layer, perplexity.png when the report has eval rows."""
    if not report or not report.get("layers"):
        raise ArtifactError("the artifact has no calibration_report.json: nothing to plot")
    plot_dir = Path(plot_dir)
    if plot_dir.exists() and not plot_dir.is_dir():
        raise ArtifactError(f"--plot: '{plot_dir}' exists and is not a directory")
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = [plots.allocation_heatmap(report, plot_dir / "allocation.png")]
    written += [plots.histogram_plot(report, layer, plot_dir / f"histograms_layer{layer}.png") for layer in layers]
    rows = (report.get("eval") or {}).get("rows") or []
    if any(r.get("level") is not None for r in rows):
        written.append(plots.perplexity_plot(rows, plot_dir / "perplexity.png"))
    return written


def _print(artifact, report: dict | None, plot_dir, plot_layers) -> dict:
    q = artifact.quant
    cfg = artifact.config
    default_index = q.level_index(q.default)
    group = "per-channel" if q.group_size == -1 else str(q.group_size)
    console.print(f"[bold]{artifact.path}[/bold]")
    console.print(
        f"model {cfg.get('model_type')} · {cfg.get('num_hidden_layers')} layers · hidden {cfg.get('hidden_size')} · dtype {cfg.get('dtype') or cfg.get('torch_dtype')}\n"
        f"format_version {q.format_version} · {q.quantizer} int{q.bits} ({q.packing}) · group size {group} · "
        f"{'sym' if q.sym else 'asym'} · not converted: {', '.join(q.modules_to_not_convert) or '-'}\n"
        f"sparsity levels {', '.join(f'{lv:g}' for lv in q.levels)} · default {q.default:g} · allocation {q.allocation} · "
        f"prefill {q.prefill} · criterion {q.criterion}"
    )
    table = Table(title=f"per-layer allocation at level {q.default:g} (sparsity of each projection's input)")
    table.add_column("layer", justify="right")
    for p in _PROJ_ORDER:
        table.add_column(p, justify="right")
    table.add_column("layer (size-weighted)", justify="right")
    rows = []
    try:
        for layer in (report or {}).get("layers", []):
            sp = layer["sparsity"][default_index]
            eff = float(layer["calibration_sparsity"][default_index])
            cells = [f"{float(sp.get(p, 0)):.2f}" for p in _PROJ_ORDER]
            rows.append({"layer": layer["layer"], **sp, "effective": eff})
            table.add_row(str(layer["layer"]), *cells, f"{eff:.3f}")
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"artifact '{artifact.path}': {REPORT_FILE} is malformed ({type(e).__name__}: "
                            f"{first_line(e)})") from None
    if rows:
        console.print(table)
    else:
        console.print("(no calibration report in this artifact: per-layer allocation unknown)")
    quantized = sum(1 for _ in artifact.quantized_modules())
    size = artifact.size_on_disk()
    console.print(f"{quantized} quantized linear layers · {human_bytes(size)} on disk")
    data = _data(artifact, report)
    if plot_dir is not None:
        data["plots"] = [str(p) for p in write_plots(report, plot_dir, plot_layers)]
        for p in data["plots"]:
            console.print(f"wrote {p}")
    return data
