"""The fused decode step with the Triton kernels (CUDA, or the CPU's Triton interpreter) gives transformers' greedy
tokens and logits on a tiny float32 Llama, batch 1 and 2, with and without a CUDA graph."""

import pytest
import torch

from teal_quant.runtime.decoding import Decoder

pytest.importorskip("triton")

PROMPT = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2], [1, 77, 8, 300, 64, 21, 99, 13]])


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_step_with_triton_kernels_matches_transformers(tiny_llama, device, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval().to(device)
    ids = PROMPT[:batch].to(device)
    n = 10
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones_like(ids))
        full = model(ref).logits[:, 8:].float()
    for graph in ([False, True] if device == "cuda" else [False]):
        dec = Decoder(model, batch_size=batch, max_length=8 + n + 1, fused_step=True, cuda_graph=graph)
        dec.prefill(ids)
        logits = []
        for i in range(n):
            dec.step(ref[:, 8 + i])
            logits.append(dec.logits.float().clone())
        got = torch.stack(logits, 1)
        assert float((got - full).norm() / full.norm()) < 1e-4
        assert torch.equal(dec.generate(ids, n), ref)


def _teal_llama(path, layers: int):
    """A Llama of TealLinear projections (synthetic weights, thresholds calibrated on its own activations, level
    0.5), bf16, q/k/v and gate/up fused as on CUDA (gate and up are then the halves of one product)."""
    from transformers import LlamaConfig

    from teal_quant.compression.synthetic import SyntheticLayers, SyntheticSpec, resolve_arch
    from teal_quant.runtime.assemble import assemble
    from teal_quant.runtime.fusion import fuse_projections

    LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64).to_json_file(path / "config.json")
    config = resolve_arch(path)
    spec = SyntheticSpec(group_size=32, levels=(0.25, 0.5), default=0.5, samples=2, seq_len=32)
    model = assemble(config, spec.quant_config(), SyntheticLayers(config, spec, torch.device("cpu")).stream(),
                     device="cpu", dtype=torch.bfloat16, level=0.5, where="test")
    assert fuse_projections(model) == 2 * layers
    return model


@pytest.fixture(scope="module")
def teal_llama(tmp_path_factory):
    """`_teal_llama` of 2 layers."""
    return _teal_llama(tmp_path_factory.mktemp("arch"), 2)


def test_silu_in_the_down_gemv_changes_no_bit(teal_llama, device, monkeypatch):
    """FusedDecodeStep with the down projection reading gate / up itself (`silu_down`, kernels.sparse_gemv_silu: no
    silu_mul launch) gives the same greedy tokens and the same logits, bit for bit (deterministic reductions), as with
    silu_mul then the GEMV; with the realized-sparsity counters on it takes the separate launch, so the counters count
    the same inputs."""
    from teal_quant import kernels
    from teal_quant.runtime.modules import reset_stats, teal_linears

    model = teal_llama.to(device)
    calls = {"silu_mul": 0, "sparse_gemv_silu": 0}
    for name in calls:
        def counted(*a, _real=getattr(kernels, name), _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(kernels, name, counted)
    ids = torch.tensor([[1, 5, 9, 42, 7, 3], [1, 77, 8, 200, 64, 21]], device=device)  # vocab 256
    runs = {}
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for silu_down in (True, False):
            for track in (False, True):
                reset_stats(model)
                calls.update(silu_mul=0, sparse_gemv_silu=0)
                dec = Decoder(model, batch_size=2, max_length=6 + 3, fused_step=True, track_sparsity=track,
                              fused_step_options={"silu_down": silu_down})
                tokens = [dec.prefill(ids)]  # (the transformers forward: on CUDA its MLP calls silu_mul itself)
                calls.update(silu_mul=0, sparse_gemv_silu=0)
                for _ in range(2):  # the second step decodes from a token the first step chose
                    tokens.append(dec.step(tokens[-1]))
                tokens = torch.stack(tokens)
                counters = torch.stack([m.zero_count for name, m in teal_linears(model) if "down_proj" in name])
                runs[silu_down, track] = (tokens, dec.logits.clone(), counters.clone(), dict(calls))
    finally:
        torch.use_deterministic_algorithms(False)
    # (calls in python during the steps: every eager step, or the capture of a CUDA graph, 2 layers each)
    assert runs[True, False][3]["silu_mul"] == 0 and runs[True, False][3]["sparse_gemv_silu"] > 0
    assert runs[False, False][3]["silu_mul"] > 0 and runs[False, False][3]["sparse_gemv_silu"] == 0
    assert runs[True, True][3]["sparse_gemv_silu"] == 0  # counters on: the separate launch
    for track in (False, True):
        fused, separate = runs[True, track], runs[False, track]
        assert torch.equal(fused[0], separate[0]) and torch.equal(fused[1], separate[1])
        assert torch.equal(fused[2], separate[2])
    assert (runs[True, True][2] > 0).all()  # the counters counted


@pytest.mark.parametrize("layers,deterministic", [(4, False)] + ([(3, True)] if torch.cuda.is_available() else []))
def test_gemv_sums_without_the_split_k_tail_change_no_bit(tmp_path, device, layers, deterministic):
    """FusedDecodeStep with the q/k/v, o_proj and down GEMVs adding into float32 buffers (`accumulate`: no split-K
    tail; attention and add_rms_norm round the sums) gives the same tokens and logits as with bf16 outputs: bit for
    bit under deterministic reductions, and with atomics on the interpreter (its programs run one after another, so
    the fp32 additions come in the same order); on CUDA with atomics within the reduction-order noise. With the
    counters on, each GEMV takes the module path and zeroes the buffer it would have cleared, so a later step that
    accumulates again is still right. 4 layers: two slots, used in turn; on the GPU also 3 layers (one slot per
    layer) under deterministic reductions (the ordered call's y added into the slot; on the CPU
    tests/kernels/test_gemv_out.py checks that form)."""
    from teal_quant.runtime.fusion import fuse_projections
    from teal_quant.runtime.modules import reset_stats

    model = _teal_llama(tmp_path, layers).to(device)
    fuse_projections(model)  # (`.to` unfuses: q/k/v as one GEMV again)
    ids = torch.tensor([[1, 5, 9, 42, 7, 3], [1, 77, 8, 200, 64, 21]], device=device)
    runs = {}
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        for accumulate in (True, False):
            reset_stats(model)
            dec = Decoder(model, batch_size=2, max_length=6 + 5, fused_step=True,
                          fused_step_options={"accumulate": accumulate})
            tokens = [dec.prefill(ids)]
            for i in range(4):
                dec.track_sparsity = i == 2  # steps 0-1: the kernels clear; 2: the module path (counters); 3: after
                tokens.append(dec.step(tokens[-1]))
            runs[accumulate] = (torch.stack(tokens), dec.logits.clone(), dec)
    finally:
        torch.use_deterministic_algorithms(False)
    sums = runs[True][2]._fused.sums
    assert set(sums) == {"qkv", "o_proj", "down"} and not runs[False][2]._fused.sums
    assert all(len(buf) == (2 if layers % 2 == 0 else layers) for buf in sums.values())
    if deterministic or device == "cpu":
        assert torch.equal(runs[True][0], runs[False][0]) and torch.equal(runs[True][1], runs[False][1])
    else:
        a, b = runs[True][1].float(), runs[False][1].float()
        assert float((a - b).norm() / b.norm()) < 2e-2
