"""Perplexity and realized sparsity of an artifact, level by level (and of its float base model)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from teal_quant.compression.data import evaluation_windows, read_text
from teal_quant.devices import select_device
from teal_quant.errors import ArtifactError, first_line
from teal_quant.progress import Progress
from teal_quant.runtime.modules import realized_sparsity, reset_stats, set_prefill_mode

if TYPE_CHECKING:
    from teal_quant.compression.sources import ModelSource


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, device: torch.device, batch_size: int = 4, description: str = "perplexity",
               progress: Progress | None = None) -> float:
    """exp(mean next-token NLL) over every predicted position of every window."""
    nll, count = 0.0, 0
    task = progress.add_task(description, total=windows.shape[0], plain="steps") if progress else None
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += ids[:, 1:].numel()
        if progress:
            progress.advance(task, ids.shape[0])
    return math.exp(nll / count)


def evaluate_artifact(
    artifact: str | Path,
    source,
    *,
    tokens: int,
    window: int,
    levels: list[float] | None = None,
    device: torch.device | str | None = None,
    baseline: bool = False,
    base_source: ModelSource | None = None,
    batch_size: int = 4,
    prefill: str = "sparse",
) -> list[dict]:
    """Rows {model, level, perplexity, realized_sparsity, tokens, seconds}.

    prefill "sparse" (the default) thresholds every token, as in decode; "sparse_last_half" keeps the first half of
    each window dense (the TEAL paper's protocol; perplexity still over every predicted token, realized sparsity over
    every token, so about half of the level). `baseline` adds the float base model's row: `base_source` when given
    (a run passes the model it has open), else the model the artifact's recipe names, opened here."""
    from transformers import AutoTokenizer

    from teal_quant.runtime.loading import load, resolve_artifact, set_sparsity

    artifact = resolve_artifact(artifact).path
    device = select_device(device)
    try:  # before the model: a missing tokenizer is found in a second, not after loading the weights
        tokenizer = AutoTokenizer.from_pretrained(str(artifact))
    except Exception as e:  # noqa: BLE001 - missing or corrupt tokenizer files: the artifact's problem, one line
        raise ArtifactError(f"artifact '{artifact}': cannot load its tokenizer ({first_line(e)}); evaluation "
                            "needs the tokenizer files the artifact was written with") from None
    windows = evaluation_windows(tokenizer, read_text(source), tokens, window)
    model = load(artifact, device=device)
    n_tokens = windows[:, 1:].numel()
    set_prefill_mode(model, prefill)
    rows = []
    with Progress() as progress:
        if baseline:
            rows.append(_baseline_row(artifact, base_source, windows, device, batch_size, progress, n_tokens))
        for level in levels if levels is not None else model.teal_quant_config.levels:
            set_sparsity(model, level)
            reset_stats(model)
            t = time.time()
            ppl = perplexity(model, windows, device=device, batch_size=batch_size, description=f"level {level:g}", progress=progress)
            rows.append({"model": "teal-quant", "level": float(level), "perplexity": ppl,
                         "realized_sparsity": realized_sparsity(model, cumulative=True), "tokens": n_tokens,
                         "seconds": time.time() - t})
    return rows


def _baseline_row(artifact, src, windows, device, batch_size, progress, n_tokens) -> dict:
    """The float base model (`src`, or the one named in the artifact's recipe), on the same windows."""
    from teal_quant.artifact.format import read_artifact
    from teal_quant.compression.recipe import Recipe
    from teal_quant.compression.sources import open_model
    from teal_quant.errors import ArtifactError

    text = read_artifact(artifact).recipe_text()
    if text is None:
        raise ArtifactError(f"artifact '{artifact}': no recipe.yaml, so its base model is unknown")
    spec = Recipe.from_yaml_text(text, origin=f"{artifact}/recipe.yaml").model
    if src is None:
        src = open_model(spec.source, gguf_file=spec.gguf_file, revision=spec.revision)
    model = src.load_full_model(torch.float32, device)
    t = time.time()
    ppl = perplexity(model, windows, device=device, batch_size=batch_size, description="dense baseline", progress=progress)
    return {"model": f"dense {spec.source}", "level": None, "perplexity": ppl, "realized_sparsity": None,
            "tokens": n_tokens, "seconds": time.time() - t}
