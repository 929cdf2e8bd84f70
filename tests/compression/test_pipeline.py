"""End to end on a tiny random Llama: recipe -> artifact (per the contract) -> load -> generate."""

import json

import pytest
import torch
import yaml
from safetensors import safe_open

import teal_quant
from teal_quant.architecture import (
    PROJECTIONS,
    build_skeleton,
    materialize_non_persistent_buffers,
)
from teal_quant.artifact.format import read_artifact
from teal_quant.compression.calibrate.layer import LayerRunner
from teal_quant.compression.sources import open_model
from teal_quant.runtime.modules import TealLinear, set_prefill_mode, teal_linears


def test_artifact_follows_the_contract(tiny_artifact):
    config = json.loads((tiny_artifact / "config.json").read_text())
    q = config["quantization_config"]
    assert q == {
        "quant_method": "teal_quant", "format_version": 1, "bits": 4, "group_size": 32, "sym": False,
        "packing": "int4-n8", "quantizer": "rtn", "modules_to_not_convert": ["lm_head"],
        "sparsity": {"method": "teal", "allocation": "greedy", "levels": [0.0, 0.25, 0.4, 0.5], "default": 0.4,
                     "prefill": "dense", "criterion": "magnitude"},
        "teal_quant_version": teal_quant.__version__,
    }
    for name in ("generation_config.json", "tokenizer.json", "recipe.yaml", "calibration_report.json", "README.md"):
        assert (tiny_artifact / name).is_file(), name
    assert not list(tiny_artifact.glob("*.bin")) and not list(tiny_artifact.glob("*.pt"))
    index = json.loads((tiny_artifact / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1  # max_shard_size 100KB forces several shards
    tensors = {}
    for file in set(index.values()):
        with safe_open(str(tiny_artifact / file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    assert "lm_head.weight" in tensors and "model.embed_tokens.weight" in tensors
    shapes = {"q": (64, 64), "k": (64, 32), "v": (64, 32), "o": (64, 64), "gate": (64, 128), "up": (64, 128), "down": (128, 64)}
    for layer in range(2):
        for proj, path in PROJECTIONS.items():
            K, N = shapes[proj]
            p = f"model.layers.{layer}.{path}"
            assert f"{p}.weight" not in tensors
            assert tensors[f"{p}.qweight"].dtype == torch.int32 and tensors[f"{p}.qweight"].shape == (K, N // 8)
            for t in ("scales", "zeros"):
                assert tensors[f"{p}.{t}"].dtype == torch.float32 and tensors[f"{p}.{t}"].shape == (K // 32, N)
            th = tensors[f"{p}.thresholds"]
            assert th.dtype == torch.float32 and th.shape == (4,)
            assert th[0] == 0 and bool((th[1:] >= th[:-1]).all()) and float(th[-1]) > 0
    card = (tiny_artifact / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "teal-quant" and "teal-quant" in meta["tags"]
    assert "base_model" not in meta  # the source is a local directory and the recipe names no model.base_model
    assert "![Sparsity per layer and projection at each level](allocation.png)" in card
    assert (tiny_artifact / "allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tiny_artifact / "calibration_report.json").read_text())
    for layer in report["layers"]:
        for j, level in enumerate(report["levels"]):
            assert layer["calibration_sparsity"][j] == pytest.approx(level, abs=0.02)
        # compact histograms: q/k/v share one (magnitude criterion), gate/up another; each holds every token's score
        groups = layer["histograms"]
        assert [g["projections"] for g in groups] == [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
        for g in groups:
            assert 1 <= len(g["counts"]) <= 256 and g["log10_step"] > 0
            assert sum(g["counts"]) + g["zeros"] + g["below"] + g["above"] == 8 * 64 * (128 if g["projections"] == ["down"] else 64)
            # the stored thresholds lie inside the histogram's range: the inverse CDF of the same counts
            edges = (10 ** g["log10_low"], 10 ** (g["log10_low"] + len(g["counts"]) * g["log10_step"]))
            for t in [t for t in layer["thresholds"][g["projections"][0]] if t > 0]:  # 0: sparsity 0 at that level
                assert edges[0] <= t <= edges[1]


def test_base_model_from_the_recipe_names_a_local_source(tiny_llama, tmp_path):
    from _support import tiny_recipe_text

    import teal_quant

    text = tiny_recipe_text(tiny_llama, tmp_path / "a", model=f"model: {{source: '{tiny_llama}', dtype: float32, "
                            "base_model: HuggingFaceTB/SmolLM2-135M-Instruct}", sparsity="sparsity: {levels: [0.5], "
                            "default: 0.5, allocation: uniform}")
    card = (teal_quant.compress(teal_quant.Recipe.from_yaml_text(text)) / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "quantized"


def test_level_zero_equals_the_dequantized_float_model(tiny_artifact, tiny_llama):
    from transformers import AutoModelForCausalLM

    model = teal_quant.load(tiny_artifact, sparsity=0.0, device="cpu")
    linears = teal_linears(model)
    assert len(linears) == 2 * 7 and all(not hasattr(m, "weight") for _, m in linears)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64)
    for name, module in linears:
        reference.get_submodule(name).weight.data = module.dequantized_weight().double()
    ids = torch.randint(3, 512, (2, 24))
    got = model(ids).logits.double()
    want = reference(ids).logits
    assert (got - want).norm() / want.norm() < 1e-5


def test_decode_steps_match_a_full_sparse_forward(tiny_artifact):
    """Prefill + one-token decode steps (the sparse_gemv path) equal a forward that thresholds every token."""
    model = teal_quant.load(tiny_artifact, sparsity=0.5, device="cpu")
    set_prefill_mode(model, "sparse")
    ids = torch.randint(3, 512, (1, 20))
    full = model(ids).logits
    out = model(ids[:, :16], use_cache=True)
    cache, steps = out.past_key_values, []
    for t in range(16, 20):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits[:, -1])
    decoded = torch.stack(steps, dim=1)
    torch.testing.assert_close(decoded, full[:, 16:20], rtol=1e-4, atol=1e-4)


def test_generate_and_switch_levels(tiny_artifact):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_artifact)
    model = teal_quant.load(tiny_artifact, device="cpu")
    assert model.teal_sparsity == 0.4
    ids = tok("ROMEO: thou art", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 12)
    realized = {}
    for level in (0.0, 0.25, 0.5):
        teal_quant.set_sparsity(model, level)
        model.generate(ids, max_new_tokens=4, do_sample=False)  # last forward is a decode step
        realized[level] = teal_quant.realized_sparsity(model)
        assert all(float(m.threshold) == float(m.thresholds[model.teal_quant_config.level_index(level)])
                   for _, m in teal_linears(model))
    assert realized[0.0] == 0.0 and 0 < realized[0.25] < realized[0.5]
    with pytest.raises(ValueError, match="not in this artifact"):
        teal_quant.set_sparsity(model, 0.33)


def test_uniform_allocation_and_int8_per_channel(tiny_llama, tmp_path):
    from _support import tiny_recipe_text

    recipe = teal_quant.Recipe.from_yaml_text(tiny_recipe_text(
        tiny_llama, tmp_path / "a", quantization="quantization: {bits: 8, group_size: -1, sym: true}",
        sparsity="sparsity: {levels: [0.5], default: 0.5, allocation: uniform}",
    ))
    art = read_artifact(teal_quant.compress(recipe))
    assert (art.quant.bits, art.quant.group_size, art.quant.sym, art.quant.allocation) == (8, -1, True, "uniform")
    t = art.tensors()
    assert t["model.layers.0.mlp.down_proj.qweight"].dtype == torch.uint8
    assert t["model.layers.0.mlp.down_proj.scales"].shape == (1, 64)
    model = teal_quant.load(art.path, device="cpu")
    assert isinstance(model.model.layers[1].mlp.down_proj, TealLinear)
    report = art.report()
    for layer in report["layers"]:  # uniform: every projection at the level
        assert set(layer["sparsity"][1].values()) == {0.5}


def test_layer_streaming_reproduces_the_full_model(tiny_llama):
    """The pipeline's per-layer forward (meta skeleton, one layer materialized at a time) equals the model's."""
    from transformers import AutoModelForCausalLM

    src = open_model(str(tiny_llama))
    full = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = torch.randint(3, 512, (2, 32))
    want = full(ids, output_hidden_states=True).hidden_states
    config = src.config
    config._attn_implementation = "sdpa"
    skeleton = build_skeleton(config, torch.float32)
    materialize_non_persistent_buffers(skeleton, "cpu")
    h = torch.nn.functional.embedding(ids, src.tensors(["model.embed_tokens.weight"])["model.embed_tokens.weight"])
    pe = skeleton.model.rotary_emb(h[:1], torch.arange(32)[None])
    for i in range(src.num_layers):
        layer = skeleton.model.layers[i]
        layer.to_empty(device="cpu")
        layer.load_state_dict(src.layer_tensors(i))
        h = LayerRunner(layer, pe)(h, torch.device("cpu"))
        if i + 1 < src.num_layers:
            torch.testing.assert_close(h, want[i + 1], rtol=1e-5, atol=1e-5)


def test_evaluate_hook_sees_the_complete_artifact_before_it_is_in_place(tiny_llama, tmp_path):
    """compress_recipe(evaluate=...) runs the hook on the staged directory (loadable, destination not there yet) with
    the run's open base model; the
    card is written once, after it, with its rows; a failing hook still leaves the complete artifact in place."""
    from _support import WIKITEXT, tiny_recipe_text

    from teal_quant.compression.pipeline import compress_recipe

    recipe = teal_quant.Recipe.from_yaml_text(tiny_recipe_text(
        tiny_llama, tmp_path / "a", eval=f"eval: {{source: {{kind: text_files, paths: ['{WIKITEXT}']}}, window: 32}}"))
    seen = {}

    def evaluate(staged, base):
        assert base.path == tiny_llama and base.num_layers == read_artifact(staged).config["num_hidden_layers"]
        seen["staged"], seen["in_place"] = staged, (tmp_path / "a").exists()
        seen["levels"] = read_artifact(staged).quant.levels
        assert not (staged / "README.md").exists()
        return [{"model": "teal-quant", "level": lv, "perplexity": 100.0 + i, "realized_sparsity": lv, "tokens": 64,
                 "seconds": 0.0} for i, lv in enumerate(seen["levels"])]

    result = compress_recipe(recipe, evaluate=evaluate)
    assert seen["staged"] != result.artifact and not seen["in_place"] and not seen["staged"].exists()
    assert result.eval_rows[-1]["perplexity"] == 103.0 and seen["levels"] == result.levels
    card = (result.artifact / "README.md").read_text()
    assert "| 0.5 | " in card and " 103.00 | 0.500 |" in card
    meta = yaml.safe_load(card.split("---")[1])  # perplexity per level as the model-index's eval results
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in metrics] == [100.0, 101.0, 102.0, 103.0]
    assert meta["model-index"][0]["results"][0]["dataset"] == {"name": "wiki.test.raw", "type": "text"}
    report = json.loads((result.artifact / "calibration_report.json").read_text())
    assert report["eval"]["rows"] == result.eval_rows and report["eval"]["window"] == recipe.eval.window

    def broken(staged, base):
        raise teal_quant.DataError("eval text: no such file")

    with pytest.raises(teal_quant.DataError, match="no such file"):
        compress_recipe(recipe, tmp_path / "b", evaluate=broken)
    assert read_artifact(tmp_path / "b").quant.levels == result.levels
    assert "eval perplexity" not in (tmp_path / "b" / "README.md").read_text()


# --- inputs checked before the model is opened (issue 15) ---

def _recipe(tmp_path, **overrides):
    from teal_quant import Recipe
    from tests._support import tiny_recipe_text

    return Recipe.from_yaml_text(tiny_recipe_text(tmp_path / "no-such-model", tmp_path / "out", **overrides))


def test_missing_eval_file_is_found_before_the_model_is_opened(tmp_path):
    from teal_quant.compression.pipeline import compress_recipe
    from teal_quant.errors import DataError

    # the model does not exist either: the eval file must be the error, so nothing was opened
    recipe = _recipe(tmp_path, eval=f"eval: {{source: {{kind: text_files, paths: ['{tmp_path}/missing.raw']}}, tokens: 64, window: 32}}")
    with pytest.raises(DataError, match="eval text file .*missing.raw.*no such file"):
        compress_recipe(recipe)
    assert not (tmp_path / "out").exists()


def test_binary_calibration_file_and_taken_output_are_rejected_before_the_model_is_opened(tmp_path):
    from teal_quant.compression.pipeline import compress_recipe
    from teal_quant.errors import ArtifactError, DataError

    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    recipe = _recipe(tmp_path, calibration=f"calibration: {{source: {{kind: text_files, paths: ['{binary}']}}}}")
    with pytest.raises(DataError, match="calibration text file .*weights.bin"):
        compress_recipe(recipe)
    (tmp_path / "out").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        compress_recipe(_recipe(tmp_path))


def test_artifact_size_estimate_is_close_to_the_real_size(tiny_artifact):
    from transformers import AutoConfig

    from teal_quant.compression.plan import estimated_artifact_bytes

    config = AutoConfig.from_pretrained(str(tiny_artifact))
    real = sum(f.stat().st_size for f in tiny_artifact.glob("*.safetensors"))
    estimate = estimated_artifact_bytes(config, 4, 32, 4) - 16 * 2**20  # without the fixed metadata allowance
    assert 0.8 * real <= estimate <= 1.5 * real, (estimate, real)


def test_disk_space_check_names_what_is_needed(tmp_path):
    from teal_quant.compression.pipeline import check_disk_space
    from teal_quant.errors import ArtifactError

    check_disk_space(tmp_path / "out", 1)
    with pytest.raises(ArtifactError, match="GB needed .* GB free"):
        check_disk_space(tmp_path / "out", 2**62)


def test_hidden_states_on_disk_give_the_same_artifact(tiny_llama, tiny_artifact, tmp_path):
    """runtime.hidden_storage: disk (two files, a batch at a time) stores float32 exactly: the same tensors as the
    in-memory run; runtime.hidden_dtype: bfloat16 still lands every level (the greedy search may pick other steps on
    the rounded activations, so thresholds are not compared one by one) with a block error close to float32's."""
    from _support import tiny_recipe_text

    on_disk = teal_quant.compress(teal_quant.Recipe.from_yaml_text(tiny_recipe_text(
        tiny_llama, tmp_path / "disk", runtime="runtime: {hidden_storage: disk}")))
    a, b = read_artifact(on_disk.artifact).tensors(), read_artifact(tiny_artifact).tensors()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((on_disk.artifact / "calibration_report.json").read_text())
    for row in report["layers"]:  # per-layer seconds by stage and peaks
        assert row["seconds"] >= sum(v for k, v in row["stage_seconds"].items()) - 1e-3 > 0
        assert set(row["stage_seconds"]) == {"load", "capture", "allocate", "quantize", "propagate", "write"}
        assert row["peaks"]["host_rss_bytes"] > 0
    assert len(on_disk.layer_seconds) == 2 and on_disk.peak_host_bytes > 0

    bf16 = teal_quant.compress(teal_quant.Recipe.from_yaml_text(tiny_recipe_text(
        tiny_llama, tmp_path / "bf16", runtime="runtime: {hidden_dtype: bfloat16}")))
    fp32 = json.loads((tiny_artifact / "calibration_report.json").read_text())["layers"]
    for row, ref in zip(json.loads((bf16.artifact / "calibration_report.json").read_text())["layers"], fp32):
        assert row["calibration_sparsity"] == pytest.approx(row["levels"], abs=0.02)
        for got, want in zip(row["block_error"]["greedy"], ref["block_error"]["greedy"]):
            assert got <= 1.5 * want + 1e-3, (got, want)
