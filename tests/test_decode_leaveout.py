"""benchmarks/decode_leaveout.py's probes: a part left out of the fused decode step runs for real on the first step
(the recording, which the Decoder's graph capture uses as its warm-up) and not at all afterwards, while its callers get
the recorded outputs; every other part keeps running. On the CPU with a tiny synthetic Llama (the kernels' references)."""

import json

import pytest
import torch
from _support import load_benchmark


@pytest.fixture(scope="module")
def leaveout():
    return load_benchmark("decode_leaveout")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from teal_quant.bench import build_synthetic_model
    from teal_quant.compression.synthetic import SyntheticSpec

    cfg = tmp_path_factory.mktemp("arch") / "config.json"
    cfg.write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))
    spec = SyntheticSpec(group_size=32, levels=(0.25, 0.5), default=0.5, samples=2, seq_len=32)
    return build_synthetic_model(cfg, spec, device="cpu", sparsity=0.5)


def _count_calls(dec, part: str) -> dict:
    """Wrap the callables of ``part`` in the decoder's fused step with a call counter (before leave_out)."""
    step, calls = dec._fused, {"n": 0}

    def counted(fn):
        def wrapper(*a, **k):
            calls["n"] += 1
            return fn(*a, **k)
        return wrapper

    if part == "norms":
        step._norm, step._add_norm = counted(step._norm), counted(step._add_norm)
    elif part == "attention":
        step._attention = counted(step._attention)
    elif part == "lm_head":
        step.lm_head = counted(step.lm_head)
    else:
        for plan in step.layers:
            setattr(plan, part, counted(getattr(plan, part)))
    return calls


@pytest.mark.parametrize("part", ["norms", "attention", "qkv", "o_proj", "gate_up", "down", "lm_head"])
def test_a_left_out_part_runs_once_then_replays_its_outputs(leaveout, model, part):
    from teal_quant.runtime.decoding import Decoder

    prompt = torch.tensor([[1, 5, 9, 42, 7, 3]])

    def run(parts):
        dec = Decoder(model, batch_size=1, max_length=12, cuda_graph=False, fused_step=True)
        first = dec.prefill(prompt)
        calls = _count_calls(dec, part)
        leaveout.leave_out(dec, parts)
        tokens, logits = [], []
        for i in range(3):
            tokens.append(dec.step())
            logits.append(dec.logits.clone())
            if i == 0:
                after_first = calls["n"]
        return first, tokens, logits, after_first, calls["n"]

    first, tokens, logits, n1, n = run(())
    first_lo, tokens_lo, logits_lo, n1_lo, n_lo = run((part,))
    assert torch.equal(first, first_lo)
    assert torch.equal(logits[0], logits_lo[0])  # the recorded step is the real one
    assert n1_lo == n1 > 0 and n == 3 * n1  # the full step calls the part every step
    assert n_lo == n1_lo  # left out: never again after the recording
    assert not torch.equal(logits[2], logits_lo[2])  # later steps get the first step's outputs of the part
