"""lm-evaluation-harness: the `teal` model type and `teal-quant eval --tasks`, offline, on tasks read from
tests/data/lm_eval (a local JSON dataset, no Hub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"
NAMES = ["teal_tiny_lastword", "teal_tiny_text"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def values(rows, level):
    return {(r["task"], r["metric"]): r["value"] for r in rows if r["level"] == level}


def test_sparse_prefill_measures_teal_and_level_0_equals_plain_hflm(tiny_artifact, monkeypatch):
    import lm_eval
    import lm_eval.api.metrics as lm_metrics
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from teal_quant.harness import BOOTSTRAP_ITERS, evaluate_tasks

    monkeypatch.chdir(ROOT)  # the task YAMLs name their data file relative to the repository root
    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    bootstraps = []  # (DISABLE_MULTIPROC, iters) of every bootstrapped stderr: no process pool forked after torch
    real_bootstrap = lm_metrics.bootstrap_stderr

    def recorded(f, xs, iters):
        bootstraps.append((os.environ.get("DISABLE_MULTIPROC"), iters))
        return real_bootstrap(f, xs, iters)

    monkeypatch.setattr(lm_metrics, "bootstrap_stderr", recorded)
    rows = evaluate_tasks(tiny_artifact, NAMES, levels=[0.0, 0.5], include_path=[str(TASKS)], device="cpu")
    assert bootstraps and set(bootstraps) == {("1", BOOTSTRAP_ITERS)} and "DISABLE_MULTIPROC" not in os.environ
    assert all(r["stderr"] is not None for r in rows if r["metric"] == "perplexity")
    assert {r["metric"] for r in rows} == {"perplexity", "acc", "word_perplexity", "byte_perplexity", "bits_per_byte"}
    sparsity = {r["level"]: r["realized_sparsity"] for r in rows}
    assert sparsity[0.0] == 0.0 and sparsity[0.5] > 0.35  # sparse prefill: every scored token is thresholded
    dense, sparse = values(rows, 0.0), values(rows, 0.5)
    # the tiny random model predicts almost uniformly, so thresholding moves its perplexity only slightly (measured
    # 4e-5 relative), either way; float32 noise on the same forward is below 1e-6
    key = ("teal_tiny_text", "word_perplexity")
    assert abs(sparse[key] / dense[key] - 1) > 1e-5

    # level 0 is the plain quantized model: lm-eval's own HFLM on the artifact (transformers load) gives the same numbers
    hflm = HFLM(pretrained=str(tiny_artifact), device="cpu", dtype="float32")
    out = lm_eval.simple_evaluate(model=hflm, tasks=NAMES, task_manager=TaskManager(include_path=str(TASKS)),
                                  bootstrap_iters=0)  # (values only: no stderr, no process pool in this worker)
    reference = {(task, key.split(",")[0]): v for task, m in out["results"].items() for key, v in m.items()
                 if key.split(",")[0] in {"perplexity", "acc", "word_perplexity", "byte_perplexity", "bits_per_byte"}}
    assert reference.keys() == dense.keys()
    for key, value in reference.items():
        assert dense[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key

    # dense prefill at level 0.5: lm-eval's requests are one forward each, so nothing is thresholded and the numbers
    # are level 0's (why evaluation defaults to sparse prefill)
    rows = evaluate_tasks(tiny_artifact, NAMES, levels=[0.5], prefill="dense", include_path=[str(TASKS)], device="cpu")
    assert {r["realized_sparsity"] for r in rows} == {0.0}
    for key, value in values(rows, 0.5).items():
        assert value == pytest.approx(dense[key], rel=1e-4, abs=1e-6), key


def cli(*args, cwd=ROOT):
    env = {**os.environ, **OFFLINE, "TEAL_QUANT_QUIET": "1"}
    return subprocess.run([sys.executable, "-m", "teal_quant.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_cli_eval_tasks_offline(tiny_artifact, tmp_path):
    out = tmp_path / "rows.json"
    result = cli("eval", tiny_artifact, "--tasks", ",".join(NAMES), "--include-path", TASKS, "--sparsity", "0,0.5",
                 "--device", "cpu", "--json", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teal_tiny_text" in result.stdout and "word_perplexity" in result.stdout
    rows = json.loads(out.read_text())
    assert {r["prefill"] for r in rows} == {"sparse"} and {r["level"] for r in rows} == {0.0, 0.5}
    assert min(r["realized_sparsity"] for r in rows if r["level"] == 0.5) > 0.35

    bad = cli("eval", tiny_artifact, "--tasks", "teal_tiny_nope", "--include-path", TASKS)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("teal-quant: error: unknown lm-eval task")
    bad = cli("eval", tiny_artifact, "--tasks", NAMES[0], "--include-path", TASKS, "--sparsity", "0.33")
    assert bad.returncode == 2 and "not in this artifact" in bad.stderr and "Traceback" not in bad.stderr


def test_lm_eval_command_line_runs_the_teal_model(tiny_artifact, tmp_path):
    result = cli("lm-eval", "run", "--model", "teal", "--model_args", f"pretrained={tiny_artifact},sparsity=0.5",
                 "--tasks", NAMES[1], "--include_path", TASKS, "--device", "cpu", "--output_path", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teal_tiny_text" in result.stdout and "word_perplexity" in result.stdout
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert len(results) == 1
    saved = json.loads(results[0].read_text())
    assert saved["config"]["model"] == "teal"
    assert saved["config"]["model_args"] == {"pretrained": str(tiny_artifact), "sparsity": 0.5}
