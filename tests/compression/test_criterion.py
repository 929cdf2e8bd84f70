"""The weight-aware sparsity criterion (WINA): keep x_k when |x_k| * ||W[:, k]||_2 > t.

Checked against float64 references of (x * (|x| * c > t)) @ W^T: SimulatedLinear (calibration), TealLinear (every
runtime path: decode kernel, sparse prefill, stats), the calibration bookkeeping (per-projection histograms; the
realized sparsity of each level on the calibration activations), the artifact (P.channel_scale written, validated,
loaded; level switching rewrites the [K] thresholds in place) and the recipe key.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from _support import CALIBRATION_DIR, tiny_recipe_text
from safetensors.torch import load_file, save_file
from teal_quant.kernels import pack

import teal_quant
from teal_quant import Recipe, RecipeError
from teal_quant.architecture import PROJECTIONS, build_skeleton, materialize_non_persistent_buffers
from teal_quant.artifact.format import read_artifact
from teal_quant.compression.calibrate.allocation import effective_sparsity
from teal_quant.compression.calibrate.layer import (
    LayerRunner,
    SimulatedLinear,
    allocate,
    attach_simulated,
    capture_histograms,
    channel_scale,
    predicted_sparsity,
    set_thresholds,
)
from teal_quant.compression.quantize import QuantSpec, rtn_quantize
from teal_quant.compression.quantize.rtn import dequantize_codes
from teal_quant.compression.sources import open_model
from teal_quant.errors import ArtifactError
from teal_quant.runtime.modules import TealLinear, channel_thresholds, set_prefill_mode, teal_linears


def reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, t: float, bias=None) -> torch.Tensor:
    """float64 (x * (|x| * c > t)) @ W^T + b; t = 0 keeps every input (the dense level)."""
    x64 = x.double()
    kept = x64.abs() * scale.double() > t if t > 0 else torch.ones_like(x64, dtype=torch.bool)
    y = (x64 * kept) @ weight.double().t()
    return y + bias.double() if bias is not None else y


def _linear_with_dead_column(k=96, n=48, seed=0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=True)
    with torch.no_grad():
        linear.weight.mul_(torch.exp(torch.randn(k)))  # column norms spread over ~a decade
        linear.weight[:, 5] = 0.0  # a zero-norm input column
    return linear


# ---------------------------------------------------------------------------------------------- calibration module
def test_simulated_linear_equals_the_float64_reference():
    linear = _linear_with_dead_column()
    scale = channel_scale(linear.weight)
    assert scale.dtype == torch.float32 and scale.shape == (96,) and scale[5] == 0.0
    torch.testing.assert_close(scale.double(), linear.weight.double().norm(dim=0), rtol=1e-6, atol=0)
    sim = SimulatedLinear(linear, scale)
    x = torch.randn(3, 10, 96, generator=torch.Generator().manual_seed(1))
    x[..., 5] = 50.0  # huge inputs on the dead column: never kept
    for t in (0.0, 0.3, 1.5):
        sim.threshold = t
        out = sim(x)
        torch.testing.assert_close(out.double(), reference(x, linear.weight, scale, t, linear.bias), rtol=1e-5, atol=1e-5)
        if t > 0:
            assert (sim.sparsify(x)[..., 5] == 0).all()
            assert torch.isfinite(out).all()
    # the criterion is not the magnitude one: the kept sets differ at equal sparsity
    sim.threshold = 1.5
    kept_wa = sim.sparsify(x) != 0
    magnitude = SimulatedLinear(linear)
    magnitude.threshold = torch.quantile(x.abs().flatten(), 1 - kept_wa.float().mean()).item()
    assert (kept_wa != (magnitude.sparsify(x) != 0)).float().mean() > 0.1


# ---------------------------------------------------------------------------------------------- runtime module
def _teal_linear(linear: torch.nn.Linear, thresholds: list[float], *, weight_aware: bool = True, group_size: int = 32):
    spec = QuantSpec(bits=4, group_size=group_size, sym=False)
    q, scales, zeros = rtn_quantize(linear.weight.float(), spec)
    module = TealLinear(linear.in_features, linear.out_features, bits=4, group_size=group_size, n_levels=len(thresholds),
                        bias=True, dtype=torch.float32, channel_scale=weight_aware)
    module.qweight.copy_(pack(q, 4))
    module.scales.copy_(scales)
    module.zeros.copy_(zeros)
    module.bias.copy_(linear.bias.detach())
    module.thresholds.copy_(torch.tensor(thresholds))
    if weight_aware:
        module.channel_scale.copy_(channel_scale(linear.weight))
    module.set_level(0)
    w_deq = dequantize_codes(q, scales, zeros, spec).t()
    return module, w_deq


def test_channel_thresholds_zero_norm_and_dense_level():
    scale = torch.tensor([2.0, 0.5, 0.0])
    assert channel_thresholds(torch.tensor(1.0), scale).tolist() == [0.5, 2.0, math.inf]
    assert channel_thresholds(torch.tensor(0.0), scale).tolist() == [0.0, 0.0, 0.0]  # no 0/0 NaN


def test_teal_linear_equals_the_float64_reference_on_every_path():
    linear = _linear_with_dead_column()
    scale = channel_scale(linear.weight)
    module, w_deq = _teal_linear(linear, [0.0, 0.4, 1.2])
    storage = module.threshold.data_ptr()
    gen = torch.Generator().manual_seed(2)
    for level, t in enumerate((0.0, 0.4, 1.2)):
        module.set_level(level)
        assert module.threshold.shape == (96,) and module.threshold.data_ptr() == storage
        assert not torch.isnan(module.threshold).any()
        for shape, prefill in (((1, 1, 96), "dense"), ((4, 96), "dense"), ((2, 7, 96), "sparse")):
            module.prefill = prefill
            x = torch.randn(*shape, generator=gen)
            x[..., 5] = 50.0
            y = module(x)
            want = reference(x, w_deq, scale, t, linear.bias)
            torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
            kept = (x.abs() * scale > t) if t > 0 else torch.ones_like(x, dtype=torch.bool)
            assert float(module.last_sparsity) == pytest.approx(1 - kept.float().mean().item(), abs=1e-6)
        module.prefill = "dense"  # dense prefill of several tokens per sequence: every input kept
        x = torch.randn(2, 7, 96, generator=gen)
        torch.testing.assert_close(module(x).double(), reference(x, w_deq, scale, 0.0, linear.bias), rtol=1e-4, atol=1e-4)


def test_magnitude_teal_linear_keeps_a_scalar_threshold():
    linear = _linear_with_dead_column()
    module, w_deq = _teal_linear(linear, [0.0, 0.7], weight_aware=False)
    assert module.channel_scale is None
    module.set_level(1)
    assert module.threshold.shape == ()
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(module(x).double(), reference(x, w_deq, torch.ones(96), 0.7, linear.bias), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- calibration bookkeeping
def _tiny_layer(model_dir: Path):
    src = open_model(str(model_dir))
    config = src.config
    config._attn_implementation = "sdpa"
    skeleton = build_skeleton(config, torch.float32)
    materialize_non_persistent_buffers(skeleton, "cpu")
    layer = skeleton.model.layers[0]
    layer.to_empty(device="cpu")
    layer.load_state_dict(src.layer_tensors(0))
    embed = src.tensors(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    return skeleton, layer, embed


def _calibration_hidden(model_dir: Path, embed: torch.Tensor) -> torch.Tensor:
    from transformers import AutoTokenizer

    from teal_quant.compression.data import random_windows, tokenize_stream

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stream = tokenize_stream(tok, (CALIBRATION_DIR / "tinyshakespeare.txt").read_text()[:60_000])
    tokens = random_windows(stream, 6, 64, 0, tok.bos_token_id)
    return torch.nn.functional.embedding(tokens, embed.float())


def _dense_inputs(runner, sims, hidden) -> dict[str, torch.Tensor]:
    """Each projection's inputs over a dense run of the layer: the activations the histograms were built on."""
    inputs = {p: [] for p in sims}
    for p, sim in sims.items():
        sim.observer = inputs[p].append
    runner(hidden, torch.device("cpu"))
    for sim in sims.values():
        sim.observer = None
    return {p: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for p, xs in inputs.items()}


@pytest.mark.parametrize("criterion", ["magnitude", "weight_aware"])
@pytest.mark.parametrize("method", ["uniform", "greedy"])
def test_calibration_realizes_each_level_on_the_calibration_activations(tiny_llama, criterion, method):
    """Per projection and size-weighted, the thresholds zero the allocated fraction of the calibration inputs.

    (The inputs of the dense layer, which the histograms describe; in the sparsified layer o and down see inputs
    changed by the upstream thresholds, as in TEAL.)

    Bound 0.01: the histogram's bins are 0.45 % wide in value and interpolated linearly, so the quantile error is
    far smaller; 0.01 leaves room for exact ties (activations of an RMS-normed input repeat across tokens).
    """
    skeleton, layer, embed = _tiny_layer(tiny_llama)
    hidden = _calibration_hidden(tiny_llama, embed)
    pe = skeleton.model.rotary_emb(hidden[:1], torch.arange(hidden.shape[1])[None])
    sims = attach_simulated(layer, criterion)
    runner = LayerRunner(layer, pe)
    hists = capture_histograms(runner, sims, hidden, "cpu")
    shared = hists["q"] is hists["k"] and hists["gate"] is hists["up"]
    assert shared == (criterion == "magnitude")  # weight-aware: one histogram per projection
    levels = [0.0, 0.25, 0.5]
    result = allocate(layer, sims, hists, hidden[:2], pe, levels, method=method, step=0.1, last_fraction=0.5)
    sizes = {p: s.weight.numel() for p, s in sims.items()}
    assert predicted_sparsity(result, hists, sizes) == pytest.approx(levels, abs=0.01)
    inputs = _dense_inputs(runner, sims, hidden)
    for j, level in enumerate(levels):
        set_thresholds(sims, result.thresholds[j])
        realized = {p: float((sim.sparsify(inputs[p]) == 0).float().mean()) for p, sim in sims.items()}
        if level == 0:
            assert all(r == 0 for r in realized.values())  # up to exact zeros, which there are none of
            continue
        for p in sims:
            assert realized[p] == pytest.approx(result.sparsities[j][p], abs=0.01), (p, level)
        assert effective_sparsity(realized, sizes) == pytest.approx(level, abs=0.01)
    set_thresholds(sims, {p: 0.0 for p in sims})


def test_zero_norm_column_in_calibration_is_never_kept(tiny_llama):
    skeleton, layer, embed = _tiny_layer(tiny_llama)
    with torch.no_grad():
        layer.self_attn.q_proj.weight[:, 3] = 0.0
    hidden = _calibration_hidden(tiny_llama, embed)[:2]
    pe = skeleton.model.rotary_emb(hidden[:1], torch.arange(hidden.shape[1])[None])
    sims = attach_simulated(layer, "weight_aware")
    assert sims["q"].channel_scale[3] == 0 and sims["k"].channel_scale[3] > 0
    hists = capture_histograms(LayerRunner(layer, pe), sims, hidden, "cpu")
    result = allocate(layer, sims, hists, hidden, pe, [0.0, 0.4], method="uniform", step=0.1, last_fraction=0.5)
    t = result.thresholds[1]["q"]
    assert math.isfinite(t) and t > 0
    sims["q"].threshold = t
    x = layer.input_layernorm(hidden)
    assert (sims["q"].sparsify(x)[..., 3] == 0).all()
    assert torch.isfinite(layer(hidden, attention_mask=None, position_embeddings=pe)[0]).all()


# ---------------------------------------------------------------------------------------------- artifact + pipeline
WEIGHT_AWARE = "sparsity: {levels: [0.25, 0.5], default: 0.5, criterion: weight_aware, greedy: {step: 0.1, tokens: 128}}"


@pytest.fixture(scope="module")
def wa_artifact(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wa") / "tiny-w4-wa"
    return teal_quant.compress(Recipe.from_yaml_text(tiny_recipe_text(tiny_llama, out, sparsity=WEIGHT_AWARE)))


def test_pipeline_writes_channel_scale_and_load_uses_it(wa_artifact, tiny_llama):
    art = read_artifact(wa_artifact)
    assert art.quant.criterion == "weight_aware"
    assert json.loads((wa_artifact / "config.json").read_text())["quantization_config"]["sparsity"]["criterion"] == "weight_aware"
    tensors = art.tensors()
    original = load_file(str(tiny_llama / "model.safetensors"))
    modules = art.quantized_modules()
    assert len(modules) == 2 * len(PROJECTIONS)
    for m in modules:
        scale = tensors[f"{m}.channel_scale"]
        assert scale.dtype == torch.float32
        torch.testing.assert_close(scale, original[f"{m}.weight"].float().norm(dim=0), rtol=1e-6, atol=0)

    model = teal_quant.load(wa_artifact, device="cpu")
    name, module = teal_linears(model)[0]
    storage = module.threshold.data_ptr()
    for index, level in enumerate(art.quant.levels):
        teal_quant.set_sparsity(model, level)
        for name, module in teal_linears(model):
            assert module.threshold.shape == (module.in_features,)
            want = channel_thresholds(tensors[f"{name}.thresholds"][index], tensors[f"{name}.channel_scale"])
            assert torch.equal(module.threshold, want)
        assert teal_linears(model)[0][1].threshold.data_ptr() == storage  # rewritten in place (CUDA-graph safe)

    # decode and sparse prefill run; realized sparsity on calibration-like text rises with the level
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    set_prefill_mode(model, "sparse")
    realized = {}
    with torch.no_grad():
        for level in art.quant.levels:
            teal_quant.set_sparsity(model, level)
            logits = model(ids).logits
            assert torch.isfinite(logits).all()
            realized[level] = teal_quant.realized_sparsity(model)
    assert realized[0.0] == 0.0 and 0.1 < realized[0.25] < realized[0.5]


def test_level_zero_of_a_weight_aware_artifact_is_the_dequantized_model(wa_artifact):
    """At level 0 every input is kept, whatever the channel scales (zero-norm columns too): no NaN, dense."""
    model = teal_quant.load(wa_artifact, device="cpu", sparsity=0.0)
    for _, module in teal_linears(model):
        assert torch.equal(module.threshold, torch.zeros_like(module.threshold))


def _copy_with(artifact: Path, dest: Path, edit) -> Path:
    """A copy of the artifact whose shard holding layer 0's q_proj is rewritten by edit(tensors)."""
    shutil.copytree(artifact, dest)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_proj.channel_scale"
    shard = dest / index["weight_map"][name]
    tensors = load_file(str(shard))
    edit(tensors, name)
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != shard.name or n in tensors}
    index["weight_map"].update({n: shard.name for n in tensors})
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize(
    "edit, message, at_read",
    [
        (lambda t, n: t.pop(n), "channel_scale is missing (sparsity.criterion is weight_aware)", True),
        (lambda t, n: t.__setitem__(n, t[n][:-1].clone()), "channel_scale must be float32 [64], got F32 [63]", True),
        (lambda t, n: t.__setitem__(n, t[n].half()), "channel_scale must be float32 [64], got F16 [64]", True),
        (lambda t, n: t[n].__setitem__(0, -1.0), "q_proj.channel_scale must be finite and >= 0", False),
        (lambda t, n: t[n].__setitem__(1, math.nan), "q_proj.channel_scale must be finite and >= 0", False),
    ],
    ids=["missing", "shape", "dtype", "negative", "nan"],
)
def test_corrupt_channel_scale_is_one_clear_error(wa_artifact, tmp_path, edit, message, at_read):
    bad = _copy_with(wa_artifact, tmp_path / "bad", edit)
    with pytest.raises(ArtifactError) as e:
        read_artifact(bad) if at_read else teal_quant.load(bad, device="cpu")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_channel_scale_in_a_magnitude_artifact_is_rejected(wa_artifact, tmp_path):
    bad = tmp_path / "mag"
    shutil.copytree(wa_artifact, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["sparsity"]["criterion"] = "magnitude"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="channel_scale present but sparsity.criterion is 'magnitude'"):
        read_artifact(bad)
    config["quantization_config"]["sparsity"]["criterion"] = "wina"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="sparsity.criterion 'wina' must be one of magnitude, weight_aware"):
        read_artifact(bad)


# ---------------------------------------------------------------------------------------------- recipe
BASE = "model: {source: x}\ncalibration: {source: {kind: generated}}\n"


def test_recipe_criterion_key():
    assert Recipe.from_yaml_text(BASE).sparsity.criterion == "magnitude"
    recipe = Recipe.from_yaml_text(BASE + "sparsity: {criterion: weight_aware}")
    assert recipe.sparsity.criterion == "weight_aware"
    assert Recipe.from_yaml_text(recipe.to_yaml()).sparsity.criterion == "weight_aware"
    with pytest.raises(RecipeError) as e:
        Recipe.from_yaml_text(BASE + "sparsity: {criterion: wina}", origin="r.yaml")
    assert str(e.value).startswith("r.yaml: sparsity.criterion: Input should be 'magnitude' or 'weight_aware'"), str(e.value)


def test_transformers_from_pretrained_loads_channel_scale(wa_artifact):
    """The transformers integration builds the same weight-aware modules as teal_quant.load (equal logits)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(wa_artifact)
    reference_model = teal_quant.load(wa_artifact, device="cpu")
    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(1))
    for level in (0.0, 0.5):
        teal_quant.set_sparsity(model, level)
        teal_quant.set_sparsity(reference_model, level)
        for (_, a), (_, b) in zip(teal_linears(model), teal_linears(reference_model)):
            assert a.channel_scale.dtype == torch.float32 and torch.equal(a.channel_scale, b.channel_scale)
            assert torch.equal(a.threshold, b.threshold)
        with torch.no_grad():
            assert torch.equal(model(ids[:, :1]).logits, reference_model(ids[:, :1]).logits)
