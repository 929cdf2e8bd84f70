"""Summary tables the command line prints at the end of a run, an eval or an inspect (library calls print nothing:
they return the numbers, teal_quant.cli prints them with these functions)."""

from __future__ import annotations

from rich.table import Table

from teal_quant.progress import console


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def print_run_summary(summary) -> None:
    table = Table(title=f"teal-quant run: {summary.artifact}")
    table.add_column("level", justify="right")
    table.add_column("calibration sparsity", justify="right")
    for kind in summary.block_error:
        table.add_column(f"block rel. error ({kind})", justify="right")
    evals = {round(r["level"], 6): r for r in summary.eval_rows if r.get("level") is not None}
    # the float base model on the same eval tokens (teal_quant.evaluate's baseline row), for comparison
    dense = next((r for r in summary.eval_rows if r.get("level") is None), None)
    if evals:
        table.add_column("eval perplexity", justify="right")
        if dense is not None:
            table.add_column("vs dense", justify="right")
        table.add_column("eval realized sparsity", justify="right")
    if dense is not None:
        table.add_row(*(["dense float", "-"] + ["-" for _ in summary.block_error]
                        + [f"{dense['perplexity']:.2f}", "", "-"]))
    for j, level in enumerate(summary.levels):
        mark = " (default)" if abs(level - summary.default_level) < 1e-9 else ""
        row = [f"{level:g}{mark}", f"{summary.calibration_sparsity[j]:.3f}"]
        row += [f"{summary.block_error[k][j]:.4f}" for k in summary.block_error]
        if evals:
            r = evals.get(round(level, 6))
            ratio = [f"{(r['perplexity'] / dense['perplexity'] - 1) * 100:+.1f} %"] if r and dense is not None else [""] * (dense is not None)
            row += [f"{r['perplexity']:.2f}", *ratio, f"{r['realized_sparsity']:.3f}"] if r else [""] * (2 + len(ratio))
        table.add_row(*row)
    console.print(table)
    if dense is not None:
        console.print(f"eval: the same {dense['tokens']} predicted tokens for every row; dense float: the base model "
                      f"({dense['model'].removeprefix('dense ')}) in float32, unquantized, no sparsity")
    ratio = summary.artifact_bytes / summary.dense_bytes if summary.dense_bytes else float("nan")
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in summary.stage_seconds.items())
    console.print(
        f"artifact {human_bytes(summary.artifact_bytes)} on disk vs dense {human_bytes(summary.dense_bytes)} "
        f"({ratio:.2f}x); wall time {summary.seconds:.0f}s ({stages})"
    )
    if summary.layer_seconds:
        mean = sum(summary.layer_seconds) / len(summary.layer_seconds)
        resumed = f" ({summary.resumed_from_layer} before --resume)" if summary.resumed_from_layer else ""
        peaks = f"peak host memory {human_bytes(summary.peak_host_bytes)}" if summary.peak_host_bytes else ""
        if summary.peak_gpu_bytes:
            peaks += f", peak GPU memory {human_bytes(summary.peak_gpu_bytes)}"
        console.print(f"layers: {len(summary.layer_seconds)}{resumed}, {mean:.1f}s per layer; {peaks}")
    if getattr(summary, "push", None):
        console.print(f"pushed: {summary.push}")


def print_plan(plan) -> None:
    """`teal-quant run RECIPE --plan`: the predicted needs beside what this machine has."""
    from teal_quant.progress import duration

    m = plan.machine
    table = Table(title=f"teal-quant run --plan: {plan.model}, {plan.layers} layers, "
                        f"{plan.samples} x {plan.seq_len} calibration tokens")
    for col in ("", "predicted", "this machine"):
        table.add_column(col, justify="left" if not col else "right")
    gpu = "-" if m.gpu_total is None else f"{human_bytes(m.gpu_total)} ({m.gpu_name})"
    cache = f"; Hub cache: {human_bytes(m.cache_free)} free" if m.cache_free is not None else ""
    table.add_row("disk (artifact + checkpoints + downloads)", human_bytes(plan.disk_bytes),
                  f"{human_bytes(m.disk_free)} free{cache}")
    table.add_row("  artifact", human_bytes(plan.artifact_bytes), "")
    table.add_row("  hidden states (x2 for the checkpoint)", human_bytes(2 * plan.hidden_bytes), plan.hidden_storage)
    table.add_row("  Hub download (on disk at once)", f"{human_bytes(plan.download_bytes)} "
                  f"({human_bytes(plan.download_peak_bytes)})", "")
    table.add_row("peak host memory", human_bytes(plan.host_bytes),
                  f"{human_bytes(m.host_available)} available of {human_bytes(m.host_total)}")
    table.add_row("peak GPU memory", human_bytes(plan.gpu_bytes) if plan.gpu_bytes else "-", gpu)
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in plan.layer_seconds.items())
    table.add_row("time per layer", f"{plan.seconds_per_layer:.1f}s", f"{parts}; {plan.greedy_evaluations} greedy "
                  f"block evaluations; matmul {m.matmul_flops_per_s / 1e12:.1f} TFLOP/s measured")
    table.add_row("whole run", duration(plan.total_seconds), "")
    console.print(table)
    for problem in plan.problems:
        console.print(f"cannot run here: {problem}")


def print_eval_table(title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    for col in ("model", "level", "perplexity", "realized sparsity", "tokens", "seconds"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for r in rows:
        table.add_row(
            r.get("model", "teal-quant"), "-" if r["level"] is None else f"{r['level']:g}", f"{r['perplexity']:.3f}",
            "-" if r["realized_sparsity"] is None else f"{r['realized_sparsity']:.3f}", str(r["tokens"]), f"{r['seconds']:.0f}",
        )
    console.print(table)


def print_task_table(title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    for col in ("task", "metric", "level", "value", "stderr", "realized sparsity"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for r in rows:
        table.add_row(r["task"], r["metric"], f"{r['level']:g}", f"{r['value']:.4f}",
                      "" if r["stderr"] is None else f"{r['stderr']:.4f}", f"{r['realized_sparsity']:.3f}")
    console.print(table)
