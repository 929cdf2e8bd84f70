"""lm-evaluation-harness integration: the lm-eval model type `teal`, and `teal-quant eval ARTIFACT --tasks ...`.

`TealLM` is lm-eval's HFLM on a teal-quant artifact (loaded through transformers, so every HFLM option works),
with two options of its own: `sparsity` (one of the artifact's levels; default: its default level) and `prefill`
(default "sparse"). Evaluation defaults to sparse prefill because lm-eval scores loglikelihood and rolling-perplexity
requests with one forward pass over the whole context: with dense prefill (the runtime's default, right for chat
latency) no token of such a request is ever thresholded, realized sparsity is 0 and the numbers would be those of
the quantized dense model, measuring nothing of TEAL. Sparse prefill thresholds every token as decode does.

Registration is lazy, as for transformers (teal_quant/runtime/hf.py): `import teal_quant` calls `install()`, which
registers `teal` as a lazy placeholder in lm-eval's model registry right after `lm_eval.api.registry` is first
imported (at once if it already is). lm-eval 0.4 has no plugin entry points, so its own command line does not
import teal_quant: `teal-quant lm-eval ARGS...` runs that command line with the model registered.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from unittest import mock

_REGISTRY_MODULE = "lm_eval.api.registry"
MODEL_NAME = "teal"
DEFAULT_PREFILL = "sparse"
# stderr of lm-eval's bootstrapped metrics (perplexity, f1, bleu...): resamples, drawn in this process. lm-eval's
# default (100,000 in a multiprocessing pool) forks after torch has started its threads, which can deadlock: a
# `teal-quant eval` of a perplexity task hung at "bootstrapping for stddev: perplexity" (EleutherAI/lm-evaluation-
# harness#1485 reports the same pool deadlock); 1,000 in-process resamples take ~1 s for 5,000 documents.
BOOTSTRAP_ITERS = 1000


def install() -> None:
    from teal_quant.runtime.hf import after_import

    after_import(_REGISTRY_MODULE, register)


def register() -> None:
    """Register the model type `teal` (idempotent). lm-eval's get_model() imports its built-in models only while
    the registry is empty, so they are registered first."""
    import lm_eval.models  # noqa: F401  (registers the built-in placeholders)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=f"{__name__}:TealLM")


_TEAL_LM = None


def __getattr__(name: str):
    if name == "TealLM":
        return _define()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define():
    global _TEAL_LM
    if _TEAL_LM is not None:
        return _TEAL_LM
    import torch
    from lm_eval.models.huggingface import HFLM

    import teal_quant  # noqa: F401  (transformers' quantizer registration)
    from teal_quant.runtime.modules import PREFILL_MODES, realized_sparsity, reset_stats, set_prefill_mode, set_sparsity

    class TealLM(HFLM):
        """lm-eval's HFLM on a teal-quant artifact, at `sparsity` (default: the artifact's default level) with
        `prefill` "sparse" (default), "dense" or "sparse_last_half". Other keyword arguments go to HFLM; dtype
        defaults to float32 without CUDA (CPU half-precision matmuls are slow), as in teal_quant.load."""

        def __init__(self, pretrained, sparsity: float | str | None = None, prefill: str = DEFAULT_PREFILL, **kwargs):
            if prefill not in PREFILL_MODES:
                raise ValueError(f"teal model: prefill must be one of {', '.join(PREFILL_MODES)}, got {prefill!r}")
            if kwargs.get("dtype") in (None, "auto") and not torch.cuda.is_available():
                kwargs["dtype"] = "float32"
            super().__init__(pretrained=str(pretrained), **kwargs)
            if getattr(self._model, "teal_quant_config", None) is None:
                raise ValueError(f"teal model: '{pretrained}' is not a teal-quant artifact")
            self.set_level(self._model.teal_quant_config.default if sparsity in (None, "") else float(sparsity))
            set_prefill_mode(self._model, prefill)
            self.prefill = prefill

        def set_level(self, level: float) -> None:
            set_sparsity(self._model, level)
            reset_stats(self._model)

        @property
        def level(self) -> float:
            return self._model.teal_sparsity

        def realized_sparsity(self) -> float:
            """Fraction of activations zeroed since the level was set, over every token the model saw."""
            return realized_sparsity(self._model, cumulative=True)

    _TEAL_LM = TealLM
    return TealLM


def evaluate_tasks(artifact: str | Path, tasks: list[str], *, levels: list[float] | None = None,
                   prefill: str = DEFAULT_PREFILL, limit: int | float | None = None, batch_size: int | str = 1,
                   device: str | None = None, include_path: list[str] | None = None,
                   num_fewshot: int | None = None) -> list[dict]:
    """Run lm-eval `tasks` on the artifact at each of `levels` (default: its default level), the model loaded once.
    Rows {task, metric, level, prefill, value, stderr, realized_sparsity, seconds}; bad input raises TealQuantError."""
    from teal_quant.devices import select_device
    from teal_quant.errors import ArtifactError, TealQuantError
    from teal_quant.runtime.loading import resolve_artifact
    from teal_quant.runtime.modules import PREFILL_MODES

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TealQuantError("lm-evaluation-harness is not installed: pip install 'teal-quant[eval]'") from None
    if prefill not in PREFILL_MODES:
        raise TealQuantError(f"--prefill must be one of {', '.join(PREFILL_MODES)}, got {prefill!r}")
    resolved = resolve_artifact(artifact)
    levels = [resolved.quant.default] if not levels else levels
    for level in levels:
        try:
            resolved.quant.level_index(level)
        except ValueError as e:
            raise ArtifactError(f"--sparsity: {e}") from None
    for path in include_path or []:
        if not Path(path).is_dir():
            raise TealQuantError(f"--include-path '{path}': no such directory")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise TealQuantError(f"unknown lm-eval task(s): {', '.join(unknown)} (`teal-quant lm-eval ls tasks` lists them)")

    lm = _define()(str(resolved.path), prefill=prefill, device=str(select_device(device)), batch_size=batch_size)
    rows = []
    for level in levels:
        lm.set_level(level)
        t = time.time()
        with mock.patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"}):  # (lm-eval's switch; restored after)
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                          num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)
        seconds, sparsity = time.time() - t, lm.realized_sparsity()
        for task, metrics in out["results"].items():
            for key, value in metrics.items():
                metric, _, filter_name = key.partition(",")
                if metric.endswith("_stderr") or metric in ("alias", "sample_len") or not isinstance(value, (int, float)):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filter_name}")
                rows.append({"task": task, "metric": metric, "level": float(level), "prefill": prefill,
                             "value": float(value), "stderr": stderr if isinstance(stderr, (int, float)) else None,
                             "realized_sparsity": sparsity, "seconds": seconds})
    return rows


def run_cli(args: list[str]) -> int:
    """lm-eval's own command line (`lm-eval run --model teal --model_args pretrained=ARTIFACT,sparsity=0.4 ...`)."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        from teal_quant.errors import TealQuantError

        raise TealQuantError("lm-evaluation-harness is not installed: pip install 'teal-quant[eval]'") from None
    register()
    argv = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return 0
