"""PNG plots of an artifact's calibration report (optional extra `[plots]`: matplotlib).

- `allocation_heatmap`: the sparsity of every projection of every decoder layer, one panel per level.
- `histogram_plot`: a layer's activation-score histograms (compact, as stored in calibration_report.json) with the
  threshold of each level drawn on them.
- `perplexity_plot`: perplexity against sparsity level, from the report's eval rows.

All of them read plain report data and write one PNG; nothing here loads the model.
"""

from __future__ import annotations

from pathlib import Path

from teal_quant.architecture import PROJECTIONS as ARCH_PROJECTIONS
from teal_quant.errors import ArtifactError, MissingExtraError

PROJECTIONS = tuple(ARCH_PROJECTIONS)  # q, k, v, o, gate, up, down
INSTALL_HINT = "pip install 'teal-quant[plots]'"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError(f"plots need matplotlib, which is not installed: {INSTALL_HINT}") from None
    matplotlib.use("Agg", force=True)  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def allocation_heatmap(report: dict, path: str | Path) -> Path:
    """Layers x projections sparsity, one panel per level above 0 (level 0 is dense everywhere)."""
    plt = _pyplot()
    layers = report["layers"]
    shown = [(j, lv) for j, lv in enumerate(report["levels"]) if lv > 0] or list(enumerate(report["levels"]))
    n = len(shown)
    fig, axes = plt.subplots(1, n, figsize=(2.2 + 2.4 * n, max(3.2, 1.6 + 0.22 * len(layers))), squeeze=False, sharey=True,
                             layout="constrained")
    image = None
    for first, ((j, level), ax) in enumerate(zip(shown, axes[0])):
        grid = [[layer["sparsity"][j].get(p, 0.0) for p in PROJECTIONS] for layer in layers]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"level {level:g}")
        ax.set_xticks(range(len(PROJECTIONS)), PROJECTIONS, rotation=90)
        ax.set_xlabel("projection")
        if first == 0:
            ax.set_ylabel("decoder layer")
            step = max(1, len(layers) // 16)
            ticks = list(range(0, len(layers), step))
            ax.set_yticks(ticks, [str(layers[i]["layer"]) for i in ticks])
    fig.colorbar(image, ax=axes[0].tolist(), label="sparsity of the input", shrink=0.9)
    fig.suptitle("TEAL sparsity allocation per layer and projection")
    return _save(fig, plt, path)


def histogram_plot(report: dict, layer_index: int, path: str | Path) -> Path:
    """One layer's activation-score histograms (density per log bin) with each level's threshold as a line."""
    plt = _pyplot()
    layer = _layer(report, layer_index)
    groups = layer.get("histograms")
    if not groups:
        raise ArtifactError("this artifact's calibration_report.json has no activation histograms (it was made by an "
                            "earlier teal-quant); compress it again to plot them")
    levels = report["levels"]
    fig, axes = plt.subplots(len(groups), 1, figsize=(7.5, 2.4 * len(groups)), squeeze=False, layout="constrained")
    colors = plt.get_cmap("plasma")
    for ax, group in zip(axes[:, 0], groups):
        counts = group["counts"]
        total = sum(counts) + group["zeros"] + group["below"] + group["above"]
        edges = [10 ** (group["log10_low"] + k * group["log10_step"]) for k in range(len(counts) + 1)]
        ax.stairs([c / max(total, 1) for c in counts], edges, fill=True, color="0.6")
        ax.set_xscale("log")
        proj = group["projections"][0]
        for j, level in enumerate(levels):
            t = layer["thresholds"][proj][j]
            if level > 0 and t > 0:
                ax.axvline(t, color=colors(j / max(len(levels) - 1, 1) * 0.85), lw=1.4,
                           label=f"threshold at level {level:g} ({layer['sparsity'][j].get(proj, 0):.2f} of {proj})")
        ax.set_title(f"layer {layer['layer']}: input of {', '.join(group['projections'])}", fontsize=10)
        ax.set_ylabel("fraction")
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("activation score |x| (log scale)")
    return _save(fig, plt, path)


def perplexity_plot(rows: list[dict], path: str | Path) -> Path:
    """Perplexity per sparsity level (eval rows), the dense base model as a dashed line when measured."""
    plt = _pyplot()
    points = sorted((r["level"], r["perplexity"]) for r in rows if r.get("level") is not None)
    if not points:
        raise ValueError("no evaluation rows with a sparsity level")
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="teal-quant artifact")
    for level, ppl in points:
        ax.annotate(f"{ppl:.2f}", (level, ppl), textcoords="offset points", xytext=(4, 6), fontsize=8)
    base = next((r for r in rows if r.get("level") is None), None)
    if base is not None:
        ax.axhline(base["perplexity"], ls="--", color="0.4", label=f"{base.get('model', 'dense base model')}")
    ax.set_xlabel("activation sparsity level")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity vs sparsity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def _layer(report: dict, index: int) -> dict:
    for layer in report["layers"]:
        if layer["layer"] == index:
            return layer
    raise ValueError(f"layer {index} is not in the calibration report (layers 0..{len(report['layers']) - 1})")


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
