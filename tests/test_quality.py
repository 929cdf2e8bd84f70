"""The quality report (benchmarks/quality.py, run as a script like a user runs it), CI-sized: real SmolLM2-135M, a
short WikiText-2 evaluation, few calibration windows. Asserts the orderings the full report is about, each with a
stated bound:

- RTN w8 per-channel within 1 % of dense perplexity;
- TEAL uniform on RTN w4: perplexity and realized sparsity rise with the level (s25 < s40 < s50), s50 at least 10 %
  worse than s25; realized sparsity within 0.03 of each level;
- the paper's prefill protocol (first half of each window dense) costs less than thresholding every token;
- GPTQ w4 at least 2 % below RTN w4 (same group size);
- the default `sparsity.criterion` no more than 2 % worse than the other criterion at s50 (uniform, w8 weights): the
  CI size (8 calibration windows of 256 tokens, 2,048 evaluated) resolves a broken criterion, not a 1 % ranking
  (2026-12-02, torch 2.13.0, transformers 5.23-5.24, tokenizers 0.23.3: magnitude 32.55 against weight_aware 32.04,
  1.6 % worse, where the full report, benchmarks/results/quality_cpu.md, has magnitude 0.2 % better: 40.06 / 40.15).
  The same rows with ATEN_CPU_CAPABILITY=avx2 on that AVX-512 machine: magnitude 31.88, weight_aware 32.60 (2.2 %
  the other way) and GPTQ / RTN w4 0.942 instead of 0.929: the CPU's kernels alone move this ranking by ~2 %.

The GPTQ and criterion tests fail (with the RecipeError line of the row) until those recipe keys exist. The report's
own machinery (row selection, failed builds, the markdown of failed rows and unmet goals, the cache) is checked
through the script's options too.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _support import ROOT

TOKENS = 2048  # two windows of 1,024 (2,046 predicted tokens)
SCRIPT = ROOT / "benchmarks" / "quality.py"
# the report's CI size: calibration windows and the w4 group
SMALL = ["--tokens", str(TOKENS), "--samples", "8", "--seq-len", "256", "--group-size", "64", "--device", "cpu"]

CI_ROWS = ",".join([
    "dense", "rtn_w8", "rtn_w4", "gptq_w4", "rtn_w4_u_s25", "rtn_w4_u_s40", "rtn_w4_u_s50", "rtn_w4_u_s40_last_half",
    "w8_uniform_magnitude_s50", "w8_uniform_weight_aware_s50",
])


def quality(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=3600)


def listed(*args) -> list[str]:
    """Row ids `--list` prints (with the given options)."""
    result = quality("--list", *args)
    assert result.returncode == 0, result.stderr
    return [line.split()[0] for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    result = quality("--rows", CI_ROWS, *SMALL, "--cache", tmp / "cache", "--out", tmp / "quality")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp / "quality.json").read_text())
    report["_out"] = tmp / "quality"
    return report


def ppl(report: dict, row_id: str) -> float:
    row = next(r for r in report["rows"] if r["id"] == row_id)
    assert "error" not in row, f"row {row_id} failed: {row['error']}"
    return row["perplexity"]


def row(report: dict, row_id: str) -> dict:
    return next(r for r in report["rows"] if r["id"] == row_id)


@pytest.mark.slow
def test_report_files_name_the_run_and_every_row(report):
    data = json.loads(report["_out"].with_suffix(".json").read_text())
    md = report["_out"].with_suffix(".md").read_text()
    assert "quality.py --rows " + CI_ROWS in data["command"] and f"--tokens {TOKENS}" in data["command"]
    assert f"- command: `{data['command']}`" in md
    assert data["git_commit"] and data["machine"] and data["date"]
    assert [r["id"] for r in data["rows"]] == listed("--rows", CI_ROWS)
    assert f"first {TOKENS} tokens" in data["protocol"]["evaluation"]
    for r in data["rows"]:
        assert f"| {r['id']} |" in md
        if r["build"] is not None:
            assert r["recipe"]["quantization"]["method"] in ("rtn", "gptq") and "levels" in r["recipe"]["sparsity"]
    w8 = row(data, "rtn_w8")
    assert w8["recipe"]["quantization"]["group_size"] == -1 and w8["compress_seconds"] > 0
    assert w8["eval_tokens"] == 2 * 1023
    goal_names = {g["goal"] for g in data["goals"]}
    assert {"RTN w8 <= +0.5 %", "GPTQ w4 g64 <= +12 %"} <= goal_names


@pytest.mark.slow
def test_rerun_reuses_the_cached_artifacts(report, tmp_path):
    cache = report["_out"].parent / "cache"
    artifacts = sorted(p.name for p in cache.iterdir())
    result = quality("--rows", "rtn_w8", *SMALL, "--cache", cache, "--out", tmp_path / "again")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "build rtn_w8: ok (cached)" in result.stdout
    again = row(json.loads((tmp_path / "again.json").read_text()), "rtn_w8")
    assert again["compress_cached"] is True and "(cached)" in (tmp_path / "again.md").read_text()
    assert again["compress_seconds"] == row(report, "rtn_w8")["compress_seconds"]
    assert again["perplexity"] == row(report, "rtn_w8")["perplexity"]
    assert sorted(p.name for p in cache.iterdir()) == artifacts  # nothing compressed or evaluated anew


@pytest.mark.slow
def test_rtn_w8_within_one_percent_of_dense(report):
    assert abs(ppl(report, "rtn_w8") / ppl(report, "dense") - 1) < 0.01


@pytest.mark.slow
def test_sparsity_is_monotone_and_realized(report):
    levels = (0.25, 0.4, 0.5)
    ppls = [ppl(report, f"rtn_w4_u_s{round(lv * 100)}") for lv in levels]
    realized = [row(report, f"rtn_w4_u_s{round(lv * 100)}")["realized_sparsity"] for lv in levels]
    assert ppls[0] < ppls[1] < ppls[2], ppls
    assert realized[0] < realized[1] < realized[2], realized
    for level, r in zip(levels, realized):
        assert r == pytest.approx(level, abs=0.03)
    assert row(report, "rtn_w4")["realized_sparsity"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow
def test_uniform_s50_is_worse_than_s25(report):
    assert ppl(report, "rtn_w4_u_s50") > 1.10 * ppl(report, "rtn_w4_u_s25")


@pytest.mark.slow
def test_last_half_prefill_costs_less_than_every_token(report):
    last_half, every = row(report, "rtn_w4_u_s40_last_half"), row(report, "rtn_w4_u_s40")
    assert ppl(report, "rtn_w4") <= last_half["perplexity"] < every["perplexity"]
    # the first 512 of 1,024 positions stay dense: realized sparsity over every token is half the level
    assert last_half["realized_sparsity"] == pytest.approx(every["realized_sparsity"] / 2, abs=0.02)


@pytest.mark.slow
def test_gptq_w4_beats_rtn_w4(report):
    assert ppl(report, "gptq_w4") < 0.98 * ppl(report, "rtn_w4")


@pytest.mark.slow
def test_default_criterion_no_worse_than_the_other_at_s50(report):
    from teal_quant.architecture import CRITERIA
    from teal_quant.compression.recipe import SparsitySpec

    field = SparsitySpec.model_fields.get("criterion")
    assert field is not None, "sparsity.criterion is not a recipe key in this version"
    default = field.default
    other = next(c for c in CRITERIA if c != default)
    assert ppl(report, f"w8_uniform_{default}_s50") <= 1.02 * ppl(report, f"w8_uniform_{other}_s50")


# --- cheap checks of the report's own machinery (no model) ---------------------------------------------------------


def test_unaccepted_recipe_fails_its_rows_with_the_recipe_line(tmp_path):
    """A build whose recipe teal-quant refuses fails its rows (and the dense row that needs it) with the recipe's
    line; the report still comes out, and nothing half-written stays in the cache."""
    result = quality("--rows", "rtn_w4_u_s40", "--samples", "0", "--cache", tmp_path / "cache", "--out", tmp_path / "q")
    assert result.returncode == 0, result.stderr
    line = "build rtn_w4: calibration.samples: Input should be greater than or equal to 1"
    assert f"build rtn_w4: FAILED: {line}" in result.stdout
    data = json.loads((tmp_path / "q.json").read_text())
    assert row(data, "rtn_w4_u_s40")["error"] == line
    # the dense row is the float baseline of the run's first build (here the failing one)
    assert row(data, "dense")["error"] == "dense baseline needs build rtn_w4: " + line
    assert f"| rtn_w4_u_s40 | RTN w4 g64 + uniform s40 | 0.4 | FAILED: {line} |" in (tmp_path / "q.md").read_text()
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written in the cache


def test_rows_selection_by_id_and_pattern():
    assert listed("--rows", "dense,w8_greedy_*_s60") == [
        "dense", "w8_greedy_magnitude_s60", "w8_greedy_weight_aware_s60"]
    result = quality("--list", "--rows", "dense,nope")
    assert result.returncode != 0 and "'nope' matches no row" in result.stderr
    ids = listed()  # --list checks that every row's build is defined before it prints
    assert len(ids) == len(set(ids)) and {"dense", "rtn_w4", "gptq_w4_sa_u_s50", "rtn_w4_u_s50_last_half"} <= set(ids)


def test_markdown_marks_failed_rows_and_unmet_goals(tmp_path):
    report = {"title": "t", "command": "c", "machine": "m", "date": "d", "git_commit": "g", "wall_seconds": 1.0,
              "protocol": {"evaluation": "e"},
              "rows": [{"id": "dense", "label": "dense", "build": None, "level": None, "perplexity": 20.0,
                        "realized_sparsity": None, "compress_seconds": None, "goals": []},
                       {"id": "gptq_w4", "label": "GPTQ", "build": "gptq_w4", "level": 0.0,
                        "error": "build gptq_w4: quantization.method: gptq is not available", "goals": [
                            {"goal": "GPTQ w4 g64 <= +12 %", "met": None}]}],
              "goals": [{"goal": "GPTQ w4 g64 <= +12 %", "rows": ["gptq_w4"], "target": 12.0, "unit": "%",
                         "value": None, "met": None},
                        {"goal": "RTN w8 <= +0.5 %", "rows": ["rtn_w8"], "target": 0.5, "unit": "%", "value": 0.7,
                         "met": False},
                        {"goal": "sparsity-aware GPTQ <= plain GPTQ at s40", "rows": ["gptq_w4_sa_u_s40", "gptq_w4_u_s40"],
                         "target": 1.0, "unit": "ratio", "value": None, "met": None, "not_run": ["gptq_w4_sa_u_s40"]}]}
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(report))
    result = quality("--render", saved)
    assert result.returncode == 0, result.stderr
    md = result.stdout
    assert "| gptq_w4 | GPTQ | 0 | FAILED: build gptq_w4: quantization.method: gptq is not available |" in md
    assert "| RTN w8 <= +0.5 % | rtn_w8 | 0.5 % | +0.7 % | NO |" in md
    assert "| GPTQ w4 g64 <= +12 % | gptq_w4 | 12 % | - | n/a (rows failed) |" in md
    assert "| - | n/a (not run: gptq_w4_sa_u_s40) |" in md  # a row left out by --rows is not a failure
