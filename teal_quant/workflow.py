"""Run a recipe: compress, evaluate, card, push, summary (what `teal-quant run` and `convert-gptq` do).

The pipeline (teal_quant.compression.pipeline) only compresses. When the recipe has `eval`, this module hands it an
evaluation of the complete artifact directory, which runs before the artifact is moved into place, so the model
card is written once with the measured perplexity. Then, with a `hub` section, the artifact is pushed. A failed
push leaves the artifact in place; its error is raised after the summary was handed to `report`.

Nothing here prints: `compress()` (the Python API, `teal_quant.compress`) returns a RunSummary, the CLI prints it
(teal_quant.report), and what the library has to say goes to the standard `logging` logger "teal_quant.workflow".
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from teal_quant import distributed
from teal_quant.compression.pipeline import Compression, compress_recipe
from teal_quant.compression.plan import RunPlan
from teal_quant.compression.recipe import Recipe
from teal_quant.compression.sources import ModelSource
from teal_quant.devices import select_device
from teal_quant.errors import HubError, RecipeError, TealQuantError, quote

logger = logging.getLogger(__name__)


@dataclass
class RunSummary(Compression):
    """The pipeline's numbers, plus the whole run's wall time and the push.

    Usable where a path was expected (compress() returned a pathlib.Path before): `os.fspath(summary)`, `str(summary)`,
    `Path(summary)`, `summary / "config.json"` and Path's methods (`summary.iterdir()`) all mean the artifact directory
    (`summary.artifact`)."""

    seconds: float = 0.0
    push: str | None = None  # the commit URL when the recipe has a `hub` section and the push succeeded

    def __fspath__(self) -> str:
        return os.fspath(self.artifact)

    def __str__(self) -> str:
        return str(self.artifact)

    def __truediv__(self, other: str | os.PathLike) -> Path:
        return Path(self.artifact) / other

    def __getattr__(self, name: str):
        # compress() returned a pathlib.Path before: Path's public methods and properties (glob, iterdir, exists,
        # name, ...) still work on the result and mean the artifact directory's
        if not name.startswith("_") and hasattr(Path, name) and "artifact" in self.__dict__:
            return getattr(Path(self.artifact), name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def rows(self) -> list[dict]:
        """One dict per level: level, default, calibration_sparsity, block_error_<kind>, and perplexity /
        realized_sparsity when the recipe has `eval`."""
        evals = {round(r["level"], 6): r for r in self.eval_rows if r.get("level") is not None}
        out = []
        for j, level in enumerate(self.levels):
            row = {"level": level, "default": abs(level - self.default_level) < 1e-9,
                   "calibration_sparsity": self.calibration_sparsity[j]}
            row.update({f"block_error_{k}": v[j] for k, v in self.block_error.items()})
            r = evals.get(round(level, 6))
            if r is not None:
                row.update(perplexity=r["perplexity"], realized_sparsity=r["realized_sparsity"])
            out.append(row)
        return out


def compress(recipe: Recipe | dict | str | os.PathLike, output_dir: str | os.PathLike | None = None, /, *,
             overwrite: bool | None = None, progress: bool = False, resume: bool = False,
             **overrides: Any) -> RunSummary:
    """Run a recipe as `teal-quant run` does (compress; evaluate when it has `eval`; push when it has `hub`), print
    nothing, and return the RunSummary (artifact path, levels, per-level rows, eval rows).

    `recipe` is a YAML path, a dict, or a Recipe. Each keyword override names a top-level recipe section and is
    merged into it before validation: a dict is merged key by key (nested dicts recursively), anything else, None
    included, replaces the value: `compress("r.yaml", output={"dir": "out", "overwrite": True}, eval=None)`.
    `output_dir` and `overwrite` (the documented contract `compress(recipe, output_dir=None)`) take precedence over
    the recipe's `output` section, as `teal-quant run --output DIR --overwrite` does.
    Bad input raises a TealQuantError subclass (RecipeError for the recipe). `progress=True` draws progress.
    `resume=True` continues an interrupted run of the same recipe from its last finished layer (`teal-quant run
    --resume`)."""
    from teal_quant.progress import show_progress

    resolved = resolve_recipe(recipe, overrides)
    with show_progress(progress):
        return run(resolved, output_dir, overwrite=overwrite, resume=resume)


def resolve_recipe(recipe: Recipe | dict | str | os.PathLike, overrides: dict[str, Any] | None = None) -> Recipe:
    """A Recipe from a path, dict or Recipe, with `overrides` (section -> dict or value) merged before validation."""
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        import yaml

        data, origin = yaml.safe_load(recipe.to_yaml()), "<recipe>"
    elif isinstance(recipe, dict):
        data, origin = copy.deepcopy(recipe), "<recipe dict>"
    elif isinstance(recipe, (str, os.PathLike)):
        data, origin = Recipe.read_yaml_data(recipe), os.fspath(recipe)
    else:
        raise RecipeError(f"a recipe is a YAML path, a dict or a Recipe, got {type(recipe).__name__}")
    for key, value in (overrides or {}).items():
        data[key] = _merge(data.get(key), value)
    return Recipe.from_dict(data, origin=origin + (" with overrides" if overrides else ""))


def _merge(base: Any, value: Any) -> Any:
    if isinstance(base, dict) and isinstance(value, dict):
        out = dict(base)
        for k, v in value.items():
            out[k] = _merge(base.get(k), v)
        return out
    return copy.deepcopy(value)


def plan(recipe: Recipe, output_dir: str | Path | None = None) -> RunPlan:
    """What `teal-quant run RECIPE --plan` prints: the run's predicted disk, host and GPU memory and time per layer on
    this machine, from the config alone (no weight is loaded; a Hub model's metadata is downloaded)."""
    from teal_quant.compression.plan import plan_run

    out = Path(output_dir) if output_dir is not None else Path(recipe.output.dir)
    check_output_name(out)
    return plan_run(recipe, out)


def run(recipe: Recipe, output_dir: str | Path | None = None, *, overwrite: bool | None = None,
        report: Callable[[RunSummary], None] | None = None, resume: bool = False) -> RunSummary:
    """Compress `recipe` (evaluating the artifact when it has `eval`), push it when it has `hub`; `report` (the CLI's
    printer) receives the summary before a failed push's error is raised. `resume`: continue an interrupted run."""
    t0 = time.time()
    eval_seconds: dict[str, float] = {}
    evaluate = None
    if recipe.eval is not None:
        def evaluate(staged: Path, base: ModelSource) -> list[dict]:
            from teal_quant.evaluate import evaluate_artifact

            t = time.time()
            rows = evaluate_artifact(staged, recipe.eval.source, tokens=recipe.eval.tokens, window=recipe.eval.window,
                                     levels=recipe.sparsity.all_levels, baseline=True, base_source=base,
                                     device=select_device(recipe.runtime.device, option="runtime.device"))
            eval_seconds["eval"] = time.time() - t
            return rows

    check_output_name(Path(output_dir) if output_dir is not None else Path(recipe.output.dir))
    compression = compress_recipe(recipe, output_dir, overwrite=overwrite, evaluate=evaluate, resume=resume)
    summary = RunSummary(**{f.name: getattr(compression, f.name) for f in fields(Compression)})
    summary.stage_seconds.update(eval_seconds)
    push_error = None
    if recipe.hub is not None:  # torchrun: rank 0 pushes, every rank learns the outcome (rank 0 reports a failure)
        world = distributed.current()
        push_error = _push(summary, recipe, summary.stage_seconds) if world.is_main else None
        summary.push, message = distributed.broadcast_object(
            (summary.push, None if push_error is None else str(push_error)), world)
        if message is not None and not world.is_main:
            push_error = distributed.mark_agreed(HubError(message))
    summary.seconds = time.time() - t0
    logger.info("artifact written to %s in %.0fs", summary.artifact, summary.seconds)
    if summary.push:
        logger.info("pushed to %s: %s", recipe.hub.repo_id, summary.push)
    if report is not None:
        report(summary)
    if push_error is not None:
        raise push_error
    return summary


STAGING_SUFFIX_BYTES = 32  # the staging folder is ".NAME.partial-XXXXXXXX" beside the destination


def check_output_name(out: Path) -> None:
    """An output folder name the file system can hold (with room for the staging folder's prefix and suffix), checked
    before any work; the error quotes at most 200 characters of it."""
    import os

    name_bytes = len(out.name.encode("utf-8", "surrogateescape"))
    parent = out.parent
    try:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in out.parts[:-1]:
        if len(part.encode("utf-8", "surrogateescape")) > limit:
            raise TealQuantError(f"output '{quote(out)}': a folder name in the path is longer than the file system "
                                 f"allows ({limit} bytes)")
    if name_bytes + STAGING_SUFFIX_BYTES > limit:
        raise TealQuantError(f"output '{quote(out)}': the folder name is {name_bytes} bytes; this file system allows "
                             f"{limit - STAGING_SUFFIX_BYTES} here (names are limited to {limit} bytes and the staging "
                             "folder adds a prefix and a suffix)")


def _push(summary: RunSummary, recipe: Recipe, stages: dict[str, float]) -> HubError | None:
    """Push after a successful run; a failure leaves the artifact in place and is returned (raised after the summary)."""
    from teal_quant.artifact.hub import push

    hub = recipe.hub
    t = time.time()
    try:
        result = push(summary.artifact, hub.repo_id, private=hub.private, revision=hub.revision, endpoint=hub.endpoint,
                      delete_extra=hub.delete_extra)
    except HubError as e:
        return HubError(f"{e} [the artifact is complete at '{summary.artifact}'; push it again with "
                        f"`teal-quant push {summary.artifact} {hub.repo_id}`]")
    finally:
        stages["push"] = time.time() - t
    summary.push = str(result) if result.changed else f"{result} (unchanged: no new commit)"
    return None
