"""The Python API: teal_quant.compress(recipe, **overrides) -> RunSummary, silent, logging, bad input as TealQuantError."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
import yaml
from _support import WIKITEXT, tiny_recipe_text

import teal_quant
from teal_quant.artifact.format import read_artifact
from teal_quant.compression.recipe import TextFilesSource
from teal_quant.errors import RecipeError
from teal_quant.evaluate import evaluate_artifact


def test_compress_a_path_with_overrides_is_silent_and_returns_a_summary(tiny_llama, tmp_path, capfd, caplog):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe_text(tiny_llama, tmp_path / "unused"))
    out = tmp_path / "art"
    with caplog.at_level(logging.INFO, logger="teal_quant"):
        result = teal_quant.compress(recipe, output={"dir": str(out)}, sparsity={"levels": [0.5], "default": 0.5},
                                     eval={"source": {"kind": "text_files", "paths": [str(WIKITEXT)]}, "tokens": 64,
                                           "window": 32})
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # no tables, no progress bars
    assert any("artifact written" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "unused").exists()  # output.dir was overridden, the rest of `output` kept
    assert isinstance(result, teal_quant.RunSummary) and result.artifact == out
    assert Path(result) == out and os.fspath(result) == str(out) == str(result) and (result / "config.json").is_file()
    art = read_artifact(result)
    assert art.quant.levels == [0.0, 0.5] and art.quant.group_size == 32  # override merged into `sparsity` only
    assert [r["level"] for r in result.rows] == [0.0, 0.5] and result.rows[1]["default"]
    assert sorted(r["level"] for r in result.eval_rows if r["level"] is not None) == [0.0, 0.5]
    dense = [r for r in result.eval_rows if r["level"] is None]  # the base model on the same tokens
    assert len(dense) == 1 and dense[0]["model"].startswith("dense") and dense[0]["perplexity"] > 1
    # the run evaluates its baseline on the model it has open; opened afresh from the recipe it measures the same
    fresh = evaluate_artifact(out, TextFilesSource(kind="text_files", paths=[str(WIKITEXT)]), tokens=64, window=32, levels=[], baseline=True,
                              device="cpu")
    assert [r["model"] for r in fresh] == [dense[0]["model"]]
    assert fresh[0]["perplexity"] == pytest.approx(dense[0]["perplexity"], rel=1e-6)
    for row in result.rows:
        assert row["perplexity"] > 1 and 0 <= row["calibration_sparsity"] < 1
    assert result.rows[0]["realized_sparsity"] == 0.0 and result.rows[1]["realized_sparsity"] > 0.3


def test_compress_a_dict_and_a_recipe(tiny_llama, tmp_path):
    data = yaml.safe_load(tiny_recipe_text(tiny_llama, tmp_path / "a", sparsity="sparsity: {levels: [0.5], default: 0.5, "
                                                                                 "allocation: uniform}"))
    first = teal_quant.compress(data)
    assert first.artifact == tmp_path / "a" and data["output"]["dir"] == str(tmp_path / "a")  # the dict is not changed
    recipe = teal_quant.Recipe.from_dict(data)
    second = teal_quant.compress(recipe, output={"dir": str(tmp_path / "b")})
    assert second.artifact == tmp_path / "b" and recipe.output.dir == str(tmp_path / "a")
    assert read_artifact(second).quant == read_artifact(first).quant
    with pytest.raises(teal_quant.ArtifactError, match="already exists"):
        teal_quant.compress(recipe)  # output.overwrite is false
    assert teal_quant.compress(recipe, output={"overwrite": True}).artifact == tmp_path / "a"


@pytest.mark.parametrize("call, message", [
    (lambda p: teal_quant.compress(p / "missing.yaml"), "recipe file not found"),
    (lambda p: teal_quant.compress(42), "a recipe is a YAML path, a dict or a Recipe"),
    (lambda p: teal_quant.compress(p / "r.yaml", outptu={"dir": "x"}), "outptu"),
    (lambda p: teal_quant.compress(p / "r.yaml", sparsity={"levels": "many"}), "sparsity.levels"),
    (lambda p: teal_quant.compress({"model": {"source": "x"}}), "calibration"),
])
def test_bad_input_raises_recipe_error_before_any_work(tiny_llama, tmp_path, call, message):
    (tmp_path / "r.yaml").write_text(tiny_recipe_text(tiny_llama, tmp_path / "out"))
    with pytest.raises(RecipeError, match=message):
        call(tmp_path)
    assert not (tmp_path / "out").exists()


def test_library_modules_do_not_print():
    """print() and the console are for teal_quant/cli.py, report.py (the CLI's tables), bench.py's printer and
    describe.py (inspect's output); every other module reports through logging."""
    root = Path(teal_quant.__file__).parent
    allowed = {"cli.py", "report.py", "bench.py", "describe.py", "progress.py"}
    offenders = []
    for file in root.rglob("*.py"):
        if file.name in allowed:
            continue
        text = file.read_text()
        if re.search(r"(?<![\w.])print\(|\bconsole\b", text):  # run_fingerprint( is not print(
            offenders.append(str(file.relative_to(root)))
    assert offenders == []


def test_the_result_still_works_as_the_path_compress_used_to_return(tiny_llama, tmp_path):
    from teal_quant.workflow import RunSummary

    summary = RunSummary(artifact=tmp_path, levels=[0.0], default_level=0.0, calibration_sparsity=[0.0], block_error={},
                         artifact_bytes=0, dense_bytes=0)
    (tmp_path / "x.json").write_text("{}")
    assert [p.name for p in summary.iterdir()] == ["x.json"] and summary.exists() and summary.name == tmp_path.name
    with pytest.raises(AttributeError):
        summary.no_such_thing
