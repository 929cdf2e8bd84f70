"""Small fixtures for tests and checks that exercise teal-quant end to end (like torch.testing or transformers'
testing_utils): a tiny random Llama checkpoint with a real BPE tokenizer, and a recipe for it.

Nothing here reads data of its own: the caller passes the text the tokenizer is trained on and the calibration
file, so the package never depends on where a checkout keeps its data.
"""

from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_llama(path: str | Path, text: str, *, vocab_size: int = 512, hidden: int = 64, intermediate: int = 128,
                     layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0,
                     tie_word_embeddings: bool = False) -> Path:
    """A random Llama-architecture checkpoint (safetensors, float32) with a byte-level BPE tokenizer trained on
    `text`, saved to `path`; returns `path`. Same arguments, same files. tie_word_embeddings: no lm_head.weight
    (the head is the embedding, as in SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([text], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def tiny_recipe_text(model_dir: str | Path, output_dir: str | Path, calibration_file: str | Path,
                     **overrides: str) -> str:
    """YAML of a small recipe for `model_dir`: 8 calibration windows of 64 tokens from `calibration_file`, int4
    group 32, levels 0.25 / 0.4 / 0.5 (default 0.4) with a short greedy search, output to `output_dir` in 100 KB
    shards. Each keyword is one section's text: it replaces that section (model, calibration, quantization,
    sparsity, output) or adds one (eval, hub, ...); an empty string drops it."""
    parts = {
        "model": f"model: {{source: '{model_dir}', dtype: float32}}",
        "calibration": "calibration:\n  source: {kind: text_files, paths: ['" + str(calibration_file)
        + "']}\n  samples: 8\n  seq_len: 64",
        "quantization": "quantization: {bits: 4, group_size: 32}",
        "sparsity": "sparsity: {levels: [0.25, 0.4, 0.5], default: 0.4, greedy: {step: 0.1, tokens: 128}}",
        "output": f"output: {{dir: '{output_dir}', max_shard_size: 100KB}}",
    }
    parts.update(overrides)
    return "\n".join(v for v in parts.values() if v) + "\n"


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """Run `fn(*args)` in `world_size` fresh processes started the way torchrun starts them (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment; `teal_quant.distributed.init` or
    `teal_quant.load(..., tp=True)` joins the group) and return each rank's result, in rank order.

    `fn` must be importable by name (a module-level function). A rank that raises fails the whole call with its
    traceback; a rank still running after `timeout` seconds is killed with the others, so a test never hangs."""
    import multiprocessing
    import queue as queue_module
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, fn, args, results), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) + len(errors) < world_size:
            try:
                rank, ok, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_module.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(out))} did not finish in {timeout:g} s")
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()) if not errors else 5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [out[r] for r in range(world_size)]


def _rank_main(rank: int, world_size: int, port: int, fn, args, results) -> None:
    import os
    import traceback

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - handed to the parent, which raises it
        results.put((rank, False, traceback.format_exc()))
    finally:
        from teal_quant import distributed

        distributed.shutdown()
