"""Run a recipe: compress, evaluate, card, push, summary (what `teal-quant run` and `convert-gptq` do).

The pipeline (teal_quant.compression.pipeline) only compresses. When the recipe has `eval`, this module hands it an
evaluation of the complete artifact directory, which runs before the artifact is moved into place, so the model
card is written once with the measured perplexity. Then, with a `hub` section, the artifact is pushed, and the run
summary is printed. A failed push leaves the artifact in place; its error is raised after the summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path

from teal_quant.compression.pipeline import Compression, compress_recipe
from teal_quant.compression.recipe import Recipe
from teal_quant.devices import select_device
from teal_quant.errors import HubError


@dataclass
class RunSummary(Compression):
    """The pipeline's numbers, plus the whole run's wall time and the push."""

    seconds: float = 0.0
    push: str | None = None  # the commit URL when the recipe has a `hub` section and the push succeeded


def run(recipe: Recipe, output_dir: str | Path | None = None, *, overwrite: bool | None = None) -> RunSummary:
    """Compress `recipe` (evaluating the artifact when it has `eval`), push it when it has `hub`, print the summary."""
    from teal_quant.progress import console
    from teal_quant.report import print_run_summary

    t0 = time.time()
    eval_seconds: dict[str, float] = {}
    evaluate = None
    if recipe.eval is not None:
        def evaluate(staged: Path) -> list[dict]:
            from teal_quant.evaluate import evaluate_artifact

            t = time.time()
            rows = evaluate_artifact(staged, recipe.eval.source, tokens=recipe.eval.tokens, window=recipe.eval.window,
                                     levels=recipe.sparsity.all_levels, baseline=True,
                                     device=select_device(recipe.runtime.device, option="runtime.device"))
            eval_seconds["eval"] = time.time() - t
            return rows

    compression = compress_recipe(recipe, output_dir, overwrite=overwrite, evaluate=evaluate)
    summary = RunSummary(**{f.name: getattr(compression, f.name) for f in fields(Compression)})
    summary.stage_seconds.update(eval_seconds)
    push_error = _push(summary, recipe, summary.stage_seconds) if recipe.hub is not None else None
    summary.seconds = time.time() - t0
    print_run_summary(summary)
    if summary.push:
        console.print(f"pushed to {recipe.hub.repo_id}: {summary.push}")
    if push_error is not None:
        raise push_error
    return summary


def _push(summary: RunSummary, recipe: Recipe, stages: dict[str, float]) -> HubError | None:
    """Push after a successful run; a failure leaves the artifact in place and is returned (raised after the summary)."""
    from teal_quant.artifact.hub import push

    hub = recipe.hub
    t = time.time()
    try:
        result = push(summary.artifact, hub.repo_id, private=hub.private, revision=hub.revision, endpoint=hub.endpoint)
    except HubError as e:
        return HubError(f"{e} [the artifact is complete at '{summary.artifact}'; push it again with "
                        f"`teal-quant push {summary.artifact} {hub.repo_id}`]")
    finally:
        stages["push"] = time.time() - t
    summary.push = str(result) if result.changed else f"{result} (unchanged: no new commit)"
    return None
