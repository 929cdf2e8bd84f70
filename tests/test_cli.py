"""The command line as a user runs it (subprocess): exit 0 on success; exit 2 and ONE line on bad input."""

import json
import os
import subprocess
import sys

import pytest
from _support import WIKITEXT, tiny_recipe_text

ENV = {**os.environ, "TEAL_QUANT_QUIET": "1"}


def teal_quant(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "teal_quant.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=600)


def assert_one_line_error(result, expected: str):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("teal-quant: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("gpt2")
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("malformed", "malformed YAML at line"),
        ("unknown_key", "sparsity.levls: unknown key"),
        ("missing_model", "no such directory"),
        ("unsupported_arch", "unsupported architecture 'gpt2'"),
        ("bits3", "quantization.bits: must be 4 or 8, got 3"),
        ("group_not_dividing", "quantization.group_size: 128 does not divide in_features 64"),
        ("level_ge_1", "sparsity.levels[1]: must be in [0, 1)"),
        ("missing_text", "no such file"),
        ("no_recipe", "recipe file not found"),
    ],
)
def test_run_rejects_bad_input(case, expected, tiny_llama, gpt2_dir, tmp_path):
    out = tmp_path / "out"
    overrides = {
        "malformed": None,
        "unknown_key": {"sparsity": "sparsity: {levls: [0.5]}"},
        "missing_model": {"model": f"model: {{source: '{tmp_path / 'no-such-model'}'}}"},
        "unsupported_arch": {"model": f"model: {{source: '{gpt2_dir}'}}"},
        "bits3": {"quantization": "quantization: {bits: 3}"},
        "group_not_dividing": {"quantization": "quantization: {bits: 4, group_size: 128}"},
        "level_ge_1": {"sparsity": "sparsity: {levels: [0.5, 1.0], default: 0.5}"},
        "missing_text": {"calibration": "calibration: {source: {kind: text_files, paths: ['/nonexistent/*.txt']}}"},
        "no_recipe": None,
    }[case]
    recipe = tmp_path / "recipe.yaml"
    if case == "malformed":
        recipe.write_text("model: {source: x\ncalibration: [")
    elif case != "no_recipe":
        recipe.write_text(tiny_recipe_text(tiny_llama, out, **overrides))
    result = teal_quant("run", recipe)
    assert_one_line_error(result, expected)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_arguments_are_one_line():
    result = teal_quant("run")
    assert_one_line_error(result, "the following arguments are required: recipe")
    result = teal_quant("frobnicate")
    assert_one_line_error(result, "invalid choice")


def test_run_inspect_eval(tiny_llama, tmp_path):
    out = tmp_path / "art"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(tiny_llama, out))
    result = teal_quant("run", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "calibration sparsity" in result.stdout and (out / "config.json").is_file()

    result = teal_quant("run", recipe)  # exists, overwrite not set
    assert_one_line_error(result, "already exists")
    assert teal_quant("run", recipe, "--overwrite").returncode == 0

    result = teal_quant("inspect", out)
    assert result.returncode == 0, result.stderr
    assert "levels 0, 0.25, 0.4, 0.5" in result.stdout and "int4" in result.stdout and "per-layer allocation" in result.stdout

    rows_file = tmp_path / "rows.json"
    result = teal_quant("eval", out, "--text", WIKITEXT, "--tokens", 512, "--window", 128, "--levels", "0,0.5",
                        "--json", rows_file)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    assert [r["level"] for r in rows] == [0.0, 0.5]
    assert rows[0]["realized_sparsity"] == pytest.approx(0.0, abs=1e-6)
    assert 0.3 < rows[1]["realized_sparsity"] < 0.7 and all(r["perplexity"] > 1 for r in rows)

    result = teal_quant("eval", out, "--text", WIKITEXT, "--levels", "0.3")
    assert_one_line_error(result, "sparsity level 0.3 is not in this artifact")


def test_corrupt_and_truncated_artifacts(tiny_artifact, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifact, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    for command in (["inspect", broken], ["eval", broken, "--text", WIKITEXT]):
        assert_one_line_error(teal_quant(*command), "corrupt or truncated")

    (broken / "config.json").write_text("{\"model_type\": \"llama\"")
    assert_one_line_error(teal_quant("inspect", broken), "config.json is not valid JSON")
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_one_line_error(teal_quant("inspect", broken), "not a teal-quant artifact")
    assert_one_line_error(teal_quant("inspect", tmp_path / "nope"), "no such directory")
