"""Broken base-model checkpoints through `teal-quant run` (subprocess): one line naming the file or tensor, exit 2,
and nothing written. Each case is the tiny random Llama with one thing broken."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _support import tiny_recipe_text
from safetensors.torch import load_file, save_file

from teal_quant.artifact.format import RESUME_DIR

ENV = {**os.environ, "TEAL_QUANT_QUIET": "1"}
LAYER1_Q = "model.layers.1.self_attn.q_proj.weight"
LAYER0_DOWN = "model.layers.0.mlp.down_proj.weight"


def _tensors(model):
    return load_file(model / "model.safetensors")


def _save(model, tensors):
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def _inf_weight(model):
    t = _tensors(model)
    t[LAYER1_Q][3, 5] = float("inf")
    _save(model, t)
    return f"'{LAYER1_Q}' has 1 non-finite value(s)"


def _nan_embedding(model):
    t = _tensors(model)
    t["model.embed_tokens.weight"][7] = float("nan")
    _save(model, t)
    return "'model.embed_tokens.weight' has 64 non-finite value(s)"


def _truncated(model):
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    return "model.safetensors is not a readable safetensors file"


def _corrupt_header(model):
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00garbage, not a JSON header\xff\xfe\x00\x00\x00"
    f.write_bytes(bytes(data))
    return "model.safetensors is not a readable safetensors file"


def _malformed_index(model):
    (model / "model.safetensors.index.json").write_text('{"weight_map": {"model.embed_tokens.weight": ')
    return "model.safetensors.index.json: not valid JSON"


def _index_without_weight_map(model):
    (model / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return "model.safetensors.index.json: no 'weight_map'"


def _missing_tensor(model):
    t = _tensors(model)
    del t[LAYER0_DOWN]
    _save(model, t)
    return f"'{LAYER0_DOWN}' is missing"


def _index_names_a_missing_tensor(model):
    names = list(_tensors(model)) + ["model.layers.0.mlp.extra.weight"]
    index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return "'model.layers.0.mlp.extra.weight' is missing from model.safetensors"


def _wrong_shape(model):
    t = _tensors(model)
    t[LAYER0_DOWN] = torch.zeros(64, 96)
    _save(model, t)
    return f"'{LAYER0_DOWN}' has shape (64, 96), the config gives (64, 128)"


def _fewer_layers(model):
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (model / "config.json").write_text(json.dumps(config))
    return "no tensors for decoder layer 2"


CASES = [_inf_weight, _nan_embedding, _truncated, _corrupt_header, _malformed_index, _index_without_weight_map,
         _missing_tensor, _index_names_a_missing_tensor, _wrong_shape, _fewer_layers]


@pytest.mark.parametrize("break_it", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_broken_base_model_is_one_line_and_exit_2(break_it, tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    expected = break_it(model)
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(model, out))
    result = subprocess.run([sys.executable, "-m", "teal_quant.cli", "run", str(recipe)], capture_output=True,
                            text=True, env=ENV, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("teal-quant: error: ") and expected in lines[0], lines
    # Nothing half-written where the artifact goes; a staging folder stays only when it holds finished layers that
    # `run --resume` continues from (a failure after layer 0, as in inf_weight)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out") and not (p / RESUME_DIR).is_dir()]


def test_a_failing_run_with_progress_bars_leaves_one_line_on_a_non_terminal_stderr(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    expected = _inf_weight(model)  # found at layer 1, after layer 0's bars were drawn
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(model, tmp_path / "out"))
    env = {k: v for k, v in ENV.items() if k not in ("TEAL_QUANT_QUIET", "CI")}
    result = subprocess.run([sys.executable, "-m", "teal_quant.cli", "run", str(recipe)], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
