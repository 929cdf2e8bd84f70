"""Importing GPTQ checkpoints: a tiny random Llama packed the GPTQ way (by an independent packer written here) ->
artifact -> teal_quant.load gives exactly the GPTQ dequantization, and calibrated thresholds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from _support import CALIBRATION_DIR
from safetensors.torch import load_file, save_file
from test_cli import ENV, assert_one_line_error

import teal_quant
from teal_quant.architecture import PROJECTIONS
from teal_quant.artifact.format import read_artifact
from teal_quant.compression.recipe import Recipe
from teal_quant.compression.sources import open_model
from teal_quant.compression.sources.gptq import weight_format
from teal_quant.errors import RecipeError
from teal_quant.runtime.modules import set_prefill_mode, teal_linears

SHAKESPEARE = CALIBRATION_DIR / "tinyshakespeare.txt"


# --- an independent GPTQ packer (the AutoGPTQ layout, written from the format description) -----------------------

def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> the int32 bit pattern (what numpy's uint32 -> int32 view gives)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] codes -> int32 [K*bits/32, N]: value k goes to word k // (32/bits), bit offset (k % (32/bits)) * bits."""
    per_word = 32 // bits
    words = torch.zeros(values.shape[0] // per_word, values.shape[1], dtype=torch.int64)
    for i in range(per_word):
        words |= values[i::per_word].to(torch.int64) << (bits * i)
    return _to_int32(words)


def gptq_pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[G, N] zeros -> int32 [G, N*bits/32], packed along N the same way."""
    return gptq_pack_rows(values.t(), bits).t().contiguous()


def write_gptq_checkpoint(llama_dir, out, *, bits=4, group_size=32, checkpoint_format="gptq", act_order=False,
                          separate_config=False, seed=0):
    """The tiny Llama with its seven projections per layer GPTQ-packed; returns {linear: float64 W [N, K]} (the GPTQ
    dequantization scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n]) of what was written)."""
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    state = load_file(str(llama_dir / "model.safetensors"))
    tensors, reference = {}, {}
    for name, t in state.items():
        module = name[: -len(".weight")]
        if not (name.endswith(".weight") and any(module.endswith(p) for p in PROJECTIONS.values())):
            tensors[name] = t.half()
            continue
        N, K = t.shape
        G = K if group_size == -1 else group_size
        groups = K // G
        if act_order:  # groups of equal size, scattered over K (what desc_act produces)
            g_idx = torch.empty(K, dtype=torch.int64)
            g_idx[torch.randperm(K, generator=gen)] = torch.arange(K) // G
        else:
            g_idx = torch.arange(K) // G
        low = 1 if checkpoint_format == "gptq" else 0  # v1 stores zero - 1, so zero >= 1
        zero = torch.randint(low, maxq + 1, (groups, N), generator=gen)
        scales = (t.abs().amax() / maxq * (0.5 + torch.rand(groups, N, generator=gen))).half()
        w_t = t.t().double()
        q = torch.round(w_t / scales.double()[g_idx] + zero[g_idx]).clamp(0, maxq).long()  # [K, N]
        stored_zero = zero - 1 if checkpoint_format == "gptq" else zero
        tensors[f"{module}.qweight"] = gptq_pack_rows(q, bits)
        tensors[f"{module}.qzeros"] = gptq_pack_cols(stored_zero, bits)
        tensors[f"{module}.scales"] = scales
        tensors[f"{module}.g_idx"] = g_idx.to(torch.int32)
        reference[module] = (scales.double()[g_idx] * (q - zero[g_idx]).double()).t()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, out / f.name)
    config = json.loads((llama_dir / "config.json").read_text())
    config["dtype"] = "float16"
    settings = {"bits": bits, "group_size": group_size, "desc_act": act_order, "sym": False,
                "checkpoint_format": checkpoint_format, "quant_method": "gptq"}
    if separate_config:
        (out / "quantize_config.json").write_text(json.dumps(settings))
    else:
        config["quantization_config"] = settings
    (out / "config.json").write_text(json.dumps(config))
    return reference


def from_checkpoint_recipe(src, out, levels="[0.25, 0.5]", default=0.5, **quantization) -> Recipe:
    q = {"method": "from_checkpoint", **quantization}
    return Recipe.from_dict({
        "model": {"source": str(src)},
        "calibration": {"source": {"kind": "text_files", "paths": [str(SHAKESPEARE)]}, "samples": 8, "seq_len": 64},
        "quantization": q,
        "sparsity": {"levels": json.loads(levels), "default": default, "allocation": "uniform"},
        "output": {"dir": str(out), "max_shard_size": "100KB"},
    })


CASES = {  # (bits, group_size, checkpoint_format, act_order, separate quantize_config.json)
    "w4-v1-trivial-quantize_config": (4, 32, "gptq", False, True),
    "w4-v2-act_order": (4, 32, "gptq_v2", True, False),
    "w8-v1-act_order": (8, 32, "gptq", True, False),
    "w8-v2-per_channel": (8, -1, "gptq_v2", False, False),
}


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tiny_llama, tmp_path_factory):
    bits, group_size, fmt, act_order, separate = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    reference = write_gptq_checkpoint(tiny_llama, root / "gptq", bits=bits, group_size=group_size,
                                      checkpoint_format=fmt, act_order=act_order, separate_config=separate)
    artifact = teal_quant.compress(from_checkpoint_recipe(root / "gptq", root / "artifact"))
    return CASES[request.param], root / "gptq", artifact, reference


def test_dequantized_weights_equal_the_gptq_dequantization_bit_for_bit(converted):
    (bits, group_size, fmt, act_order, _), gptq_dir, artifact, reference = converted
    art = read_artifact(artifact)
    assert (art.quant.bits, art.quant.group_size, art.quant.sym, art.quant.quantizer) == (bits, group_size, False, "gptq")
    assert art.quant.act_order == act_order
    tensors, source = art.tensors(), load_file(str(gptq_dir / "model.safetensors"))
    for name in reference:
        assert torch.equal(tensors[f"{name}.scales"], source[f"{name}.scales"])  # fp16 scales kept as they are
        assert (f"{name}.perm" in tensors) == act_order
    model = teal_quant.load(artifact, sparsity=0.0, device="cpu")
    linears = dict(teal_linears(model))
    assert set(linears) == set(reference) and len(linears) == 2 * 7
    for name, module in linears.items():
        got = module.dequantized_weight()
        assert got.dtype == torch.float32
        assert torch.equal(got.double(), reference[name]), name  # float32 holds fp16 scale x small int exactly
        # and AutoGPTQ's fp16 dequantization (one rounding of the same exact product) is reproduced too
        assert torch.equal(got.half(), reference[name].half())


def test_level_zero_logits_match_a_float64_reference(converted, tiny_llama):
    from transformers import AutoModelForCausalLM

    _, gptq_dir, artifact, reference = converted
    model = teal_quant.load(artifact, sparsity=0.0, device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64)
    source = load_file(str(gptq_dir / "model.safetensors"))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            module = name[: -len(".weight")]
            p.copy_(reference[module] if module in reference else source[name].double())
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    got, want = model(ids).logits.double(), ref(ids).logits
    assert (got - want).norm() / want.norm() < 1e-5


def test_thresholds_are_calibrated(converted):
    _, _, artifact, _ = converted
    art = read_artifact(artifact)
    tensors = art.tensors()
    for name in art.quantized_modules():
        th = tensors[f"{name}.thresholds"]
        assert th[0] == 0 and bool((th[1:] >= th[:-1]).all()) and float(th[-1]) > 0
    report = art.report()
    for layer in report["layers"]:
        for j, level in enumerate(report["levels"]):
            assert layer["calibration_sparsity"][j] == pytest.approx(level, abs=0.03)
    # measured on calibration text, every token thresholded: near the level
    from transformers import AutoTokenizer

    model = teal_quant.load(artifact, sparsity=0.5, device="cpu")
    set_prefill_mode(model, "sparse")
    ids = AutoTokenizer.from_pretrained(artifact)(SHAKESPEARE.read_text()[:3000], return_tensors="pt").input_ids[:, :256]
    model(ids)
    assert 0.4 < teal_quant.realized_sparsity(model) < 0.6


def test_permuted_layer_thresholds_before_the_product(converted):
    """An act-order TealLinear computes (x * (|x| > t)) @ W^T in the input's own channel order, decode and prefill."""
    (_, _, _, act_order, _), _, artifact, reference = converted
    if not act_order:
        pytest.skip("trivial g_idx: no perm")
    model = teal_quant.load(artifact, sparsity=0.5, device="cpu")
    set_prefill_mode(model, "sparse")
    gen = torch.Generator().manual_seed(2)
    for name, module in teal_linears(model):
        assert module.perm is not None and not torch.equal(module.perm.long(), torch.arange(module.in_features))
        t = float(module.threshold)
        for shape in ((1, module.in_features), (1, 5, module.in_features)):  # decode (sparse_gemv), prefill
            x = torch.randn(*shape, generator=gen) * 2 * t
            want = (x.double() * (x.double().abs() > t)) @ reference[name].t()
            got = module(x).double()
            assert (got - want).norm() / want.norm() < 1e-5, name


def test_recipe_checks_against_the_checkpoint(tiny_llama, tmp_path):
    gptq = tmp_path / "gptq"
    write_gptq_checkpoint(tiny_llama, gptq, bits=4, group_size=32)
    cases = [
        (from_checkpoint_recipe(gptq, tmp_path / "a", bits=8), "quantization.bits: 8 differs from the checkpoint's 4"),
        (from_checkpoint_recipe(gptq, tmp_path / "a", group_size=64), "quantization.group_size: 64 differs"),
        (from_checkpoint_recipe(gptq, tmp_path / "a", sym=True), "quantization.sym: True differs"),
        (from_checkpoint_recipe(tiny_llama, tmp_path / "a"), "from_checkpoint needs a GPTQ checkpoint"),
    ]
    rtn = from_checkpoint_recipe(gptq, tmp_path / "a")
    cases.append((rtn.model_copy(update={"quantization": rtn.quantization.model_copy(update={"method": "rtn"})}),
                  "rtn would quantize it again: use from_checkpoint"))
    bf16 = rtn.model_copy(update={"model": rtn.model.model_copy(update={"dtype": "bfloat16"})})
    cases.append((bf16, "model.dtype: bfloat16 would round the checkpoint's torch.float16 scales"))
    for recipe, expected in cases:
        with pytest.raises(RecipeError, match=expected.replace("(", r"\(")):
            teal_quant.compress(recipe)
    # the checkpoint's own values, spelled out, are accepted
    art = read_artifact(teal_quant.compress(from_checkpoint_recipe(gptq, tmp_path / "b", bits=4, group_size=32, sym=False)))
    assert art.quant.bits == 4 and "method: from_checkpoint" in art.recipe_text()


def test_recipe_yaml_is_the_recipe_as_read(converted):
    """config.json holds the checkpoint's format; recipe.yaml the recipe as written, which reads back as itself (the
    format keys it left out stay out, so running it again takes the checkpoint's format again)."""
    (bits, group_size, *_), gptq_dir, artifact, _ = converted
    recipe = from_checkpoint_recipe(gptq_dir, artifact)
    text = read_artifact(artifact).recipe_text()
    again = Recipe.from_yaml_text(text)
    assert again == recipe and not {"bits", "group_size", "sym"} & again.quantization.model_fields_set
    assert not {"bits", "group_size", "sym"} & set(yaml.safe_load(text)["quantization"])
    fmt = weight_format(again, open_model(str(gptq_dir)))
    assert (fmt.bits, fmt.group_size, fmt.sym, fmt.dtype) == (bits, group_size, False, torch.float16)


def teal_quant_cli(*args):
    return subprocess.run([sys.executable, "-m", "teal_quant.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)


def _corrupt(gptq, case):
    config_file = gptq / "config.json"
    config = json.loads(config_file.read_text())
    qc = config["quantization_config"]
    tensors = load_file(str(gptq / "model.safetensors"))
    p = "model.layers.1.mlp.down_proj"
    if case == "bits3":
        qc["bits"] = 3
    elif case == "marlin":
        qc["checkpoint_format"] = "marlin"
    elif case == "awq":
        qc["quant_method"] = "awq"
    elif case == "missing":
        del tensors[f"{p}.qzeros"]
    elif case == "shape":
        tensors[f"{p}.scales"] = tensors[f"{p}.scales"][:, :-8].contiguous()
    elif case == "unequal_groups":
        g = tensors[f"{p}.g_idx"].clone()
        g[0] = (g[0] + 1) % (int(g.max()) + 1)  # one channel moves to another group
        tensors[f"{p}.g_idx"] = g
    elif case == "lm_head":
        tensors["lm_head.qweight"] = tensors["model.layers.0.mlp.up_proj.qweight"].clone()
    config_file.write_text(json.dumps(config))
    save_file(tensors, str(gptq / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("case, expected", [
    ("bits3", "bits 3 is not supported"),
    ("marlin", "checkpoint_format 'marlin' is a repacked kernel layout"),
    ("awq", "is already quantized (awq)"),
    ("missing", "model.layers.1.mlp.down_proj.qzeros: tensor is missing from the checkpoint"),
    ("shape", "model.layers.1.mlp.down_proj.scales: shape (4, 56) does not match"),
    ("unequal_groups", "model.layers.1.mlp.down_proj.g_idx: groups of unequal size"),
    ("lm_head", "lm_head.qweight: only decoder-layer projections can be quantized"),
])
def test_convert_rejects_corrupt_checkpoints_in_one_line(case, expected, tiny_llama, tmp_path):
    gptq = tmp_path / "gptq"
    write_gptq_checkpoint(tiny_llama, gptq, bits=4, group_size=32, act_order=case == "unequal_groups")
    _corrupt(gptq, case)
    result = teal_quant_cli("convert-gptq", gptq, tmp_path / "out", "--calibration", SHAKESPEARE, "--device", "cpu")
    assert_one_line_error(result, expected)
    assert not (tmp_path / "out").exists()


def test_convert_gptq_cli(tiny_llama, tmp_path):
    gptq = tmp_path / "gptq"
    reference = write_gptq_checkpoint(tiny_llama, gptq, bits=4, group_size=32, act_order=True)
    out = tmp_path / "out"
    args = ["convert-gptq", gptq, out, "--calibration", SHAKESPEARE, "--levels", "0.4,0.6", "--default", "0.6",
            "--allocation", "uniform", "--device", "cpu"]
    result = teal_quant_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    art = read_artifact(out)
    assert art.quant.levels == [0.0, 0.4, 0.6] and art.quant.default == 0.6 and art.quant.allocation == "uniform"
    model = teal_quant.load(out, device="cpu")
    for name, module in teal_linears(model):
        assert torch.equal(module.dequantized_weight().double(), reference[name])
    assert_one_line_error(teal_quant_cli(*args), "already exists")
    assert teal_quant_cli(*args, "--overwrite").returncode == 0
    assert_one_line_error(teal_quant_cli("convert-gptq", gptq, tmp_path / "o2", "--default", "0.3"),
                          "sparsity.default: 0.3 is not one of levels")
    assert_one_line_error(teal_quant_cli("convert-gptq", tiny_llama, tmp_path / "o3", "--calibration", SHAKESPEARE),
                          "from_checkpoint needs a GPTQ checkpoint")
