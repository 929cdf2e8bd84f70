"""The command line as a user runs it (subprocess): exit 0 on success; exit 2 and ONE line on bad input."""

import json
import os
import subprocess
import sys

import pytest
from _support import WIKITEXT, tiny_recipe_text

# the product's CPU path (tests/kernels/conftest.py sets TRITON_INTERPRET for the kernel tests of the same session:
# a CLI subprocess under the interpreter would run every GEMV in it, minutes for a tiny bench)
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "TEAL_QUANT_QUIET": "1"}


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


def _stderr_is_short(result, limit: int = 1000):
    assert len(result.stderr) < limit, f"{len(result.stderr)} characters on stderr: {result.stderr[:300]}"


@pytest.mark.parametrize("content, expected", [
    (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "a binary file, not a YAML recipe"),
    (b"model: {source: '\xff\xfe caf\xe9'}\n", "not UTF-8 text"),
])
def test_a_recipe_that_is_not_utf8_text_is_one_line(content, expected, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    assert_one_line_error(teal_quant("run", recipe), expected)


def test_names_longer_than_the_file_system_allows_are_one_short_line(tiny_llama, tmp_path):
    long_recipe = tmp_path / ("r" * 300 + ".yaml")
    result = teal_quant("run", long_recipe)
    assert_one_line_error(result, "cannot read recipe")
    _stderr_is_short(result)

    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(tiny_llama, out, model="model: {source: '" + "m" * 100_000 + "'}"))
    result = teal_quant("run", recipe)
    assert_one_line_error(result, "model 'mmm")
    _stderr_is_short(result)

    recipe.write_text(tiny_recipe_text(tiny_llama, out))
    for name in ("o" * 250, "o" * 100_000):
        result = teal_quant("run", recipe, "--output", tmp_path / name)
        assert_one_line_error(result, "output '")
        _stderr_is_short(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_eval_rejects_bad_options_before_evaluating(tiny_artifact, tmp_path):
    import torch

    cases = [
        (["--levels", ""], "--levels: no level given"),
        (["--json", tmp_path / "no-such-folder" / "rows.json"], "--json: folder"),
        (["--device", "foo"], "--device: 'foo' is not a device"),
        (["--device", "meta"], "--device: 'meta' is not supported"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device: cuda requested but no CUDA device is available"))
    for extra, expected in cases:
        assert_one_line_error(teal_quant("eval", tiny_artifact, "--text", WIKITEXT, *extra), expected)
    assert not (tmp_path / "no-such-folder").exists()


def test_inspect_and_eval_on_a_damaged_artifact_are_one_line(tiny_artifact, tmp_path):
    import shutil

    def damaged(name):
        path = tmp_path / name
        shutil.copytree(tiny_artifact, path)
        return path

    art = damaged("report-not-json")
    (art / "calibration_report.json").write_text("{\"layers\": [")
    assert_one_line_error(teal_quant("inspect", art), "calibration_report.json is not valid JSON")
    art = damaged("report-wrong-shape")
    (art / "calibration_report.json").write_text(json.dumps({"layers": [{"layer": 0, "sparsity": 3}]}))
    assert_one_line_error(teal_quant("inspect", art), "calibration_report.json is malformed")

    for field, value, expected in [("bits", 4.0, "bits must be an integer"),
                                   ("format_version", "1", "format_version '1' is not supported")]:
        art = damaged(f"config-{field}")
        config = json.loads((art / "config.json").read_text())
        config["quantization_config"][field] = value
        (art / "config.json").write_text(json.dumps(config))
        assert_one_line_error(teal_quant("inspect", art), expected)
    art = damaged("config-list")
    (art / "config.json").write_text("[1, 2]")
    assert_one_line_error(teal_quant("inspect", art), "config.json is not a JSON object")

    art = damaged("no-tokenizer")
    for f in art.glob("tokenizer*"):
        f.unlink()
    for f in ("special_tokens_map.json", "vocab.json", "merges.txt"):
        (art / f).unlink(missing_ok=True)
    assert_one_line_error(teal_quant("eval", art, "--text", WIKITEXT), "cannot load its tokenizer")
    art = damaged("bad-generation-config")
    (art / "generation_config.json").write_text("{\"max_length\": ")
    assert_one_line_error(teal_quant("eval", art, "--text", WIKITEXT, "--tokens", 64, "--window", 32),
                          "generation_config.json cannot be read")


@pytest.fixture
def artifact_with_eval(tiny_artifact, tmp_path):
    """tiny_artifact with eval rows in its report, as `teal-quant run` with an `eval` section leaves them."""
    import shutil

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    report = json.loads((art / "calibration_report.json").read_text())
    report["eval"] = {"window": 64, "dataset": {"type": "text", "name": "wiki.test.raw"}, "rows": [
        {"model": "dense base", "level": None, "perplexity": 400.0, "realized_sparsity": None, "tokens": 252}] + [
        {"model": "teal-quant", "level": lv, "perplexity": 410.0 + 10 * i, "realized_sparsity": lv, "tokens": 252}
        for i, lv in enumerate(report["levels"])]}
    (art / "calibration_report.json").write_text(json.dumps(report))
    return art


def test_inspect_json_and_plots(artifact_with_eval, tmp_path):
    import matplotlib.image

    art = artifact_with_eval
    report = json.loads((art / "calibration_report.json").read_text())
    result = teal_quant("inspect", art, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # nothing but the JSON on stdout
    default = report["levels"].index(data["quantization"]["sparsity"]["default"])
    assert [r["layer"] for r in data["layers"]] == [0, 1]
    assert data["layers"][1]["down"] == report["layers"][1]["sparsity"][default]["down"]
    assert data["eval"]["rows"] == report["eval"]["rows"] and data["config"]["num_hidden_layers"] == 2
    assert data["bytes"] == sum(f.stat().st_size for f in art.iterdir())

    plots = tmp_path / "plots"
    result = teal_quant("inspect", art, "--plot", plots, "--layers", "0,1", "--json")
    assert result.returncode == 0, result.stderr
    names = ["allocation.png", "histograms_layer0.png", "histograms_layer1.png", "perplexity.png"]
    assert json.loads(result.stdout)["plots"] == [str(plots / n) for n in names]
    assert sorted(p.name for p in plots.iterdir()) == sorted(names)
    for name in names:
        image = matplotlib.image.imread(plots / name)
        assert image.shape[0] > 200 and image.shape[1] > 400 and image[..., :3].std() > 0.05, name  # drawn, not blank
    # one panel per distinct histogram (q/k/v, o, gate/up, down): the histogram figure is taller than it is wide
    hist = matplotlib.image.imread(plots / "histograms_layer0.png")
    assert hist.shape[0] > hist.shape[1]

    result = teal_quant("inspect", art, "--plot", plots)  # no --layers: layer 0; no --json: the tables and the paths
    assert result.returncode == 0 and f"wrote {plots / 'perplexity.png'}" in result.stdout

    assert_one_line_error(teal_quant("inspect", art, "--plot", plots, "--layers", "7"), "--layers: layer 7 is not in")
    assert_one_line_error(teal_quant("inspect", art, "--plot", plots, "--layers", "a"), "is not a list of layer numbers")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(teal_quant("inspect", art, "--plot", tmp_path / "file"), "exists and is not a directory")


def test_plot_without_matplotlib_names_the_extra(tiny_artifact, tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from teal_quant.cli import main; "
            f"sys.exit(main(['inspect', {str(tiny_artifact)!r}, '--plot', {str(tmp_path / 'p')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert_one_line_error(result, "plots need matplotlib, which is not installed: pip install 'teal-quant[plots]'")
    assert result.stdout == "" and not (tmp_path / "p").exists()
