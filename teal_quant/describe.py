"""`teal-quant inspect`: what an artifact holds, without loading the model."""

from __future__ import annotations

from rich.table import Table

from teal_quant.artifact.format import REPORT_FILE
from teal_quant.errors import ArtifactError, first_line
from teal_quant.progress import console
from teal_quant.report import human_bytes
from teal_quant.runtime.loading import resolve_artifact

_PROJ_ORDER = ("q", "k", "v", "o", "gate", "up", "down")


def inspect_artifact(path_or_repo_id: str) -> dict:
    artifact = resolve_artifact(path_or_repo_id)
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
    report = artifact.report()
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
    return {"path": str(artifact.path), "quantization": q.to_dict(), "layers": rows, "bytes": size}
