"""The layer loop (compression.stream.compress_layers): every per-layer statistic goes through the Reducer hook, so
two identical processes (a reducer that doubles every sum) give exactly the numbers of one; the loop starts at any
layer from the hidden states that enter it; the quantizer decides what is packed and what the next layer sees."""

import torch

from teal_quant.compression.hidden import HiddenStates
from teal_quant.compression.quantize import QUANTIZERS, QuantSpec
from teal_quant.compression.quantize.layer import MethodQuantizer
from teal_quant.compression.sources import open_model
from teal_quant.compression.stream import SINGLE_PROCESS, StreamSettings, compress_layers


class TwoIdenticalProcesses:
    """Rank 0 of two whose shares of the sequences (strided: 0, 2, 4... and 1, 3, 5...) are the same tokens: every sum
    doubled. The global sequences are then h0, h0, h1, h1, ...: the same histograms' quantiles, Hessians and relative
    errors as h0, h1, ... in one process, when the greedy subset covers the same local sequences."""

    rank, world_size = 0, 2

    def __init__(self):
        self.calls = 0

    def all_reduce(self, tensor):
        self.calls += 1
        tensor.mul_(2)


def _run(tiny_llama, reducer, first_layer=0, hidden=None, greedy_tokens=32):
    src = open_model(str(tiny_llama))
    spec = QuantSpec(bits=4, group_size=32, sym=False)
    quantizer = MethodQuantizer(QUANTIZERS["gptq"], spec, torch.float32, options={"block_size": 32, "damp": 0.01,
                                                                                   "act_order": False})
    if hidden is None:
        embed = src.tensors(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
        tokens = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
        hidden = HiddenStates.in_memory((4, 32, 64), torch.float32)
        hidden.write_input(0, embed[tokens])
    settings = StreamSettings(levels=[0.0, 0.3, 0.5], default_level=0.5, allocation="greedy", step=0.1,
                              greedy_tokens=greedy_tokens, last_fraction=0.5, compute_dtype=torch.float32,
                              storage_dtype=torch.float32, device=torch.device("cpu"))
    results = []
    for r in compress_layers(src.config, src, quantizer, hidden, settings, first_layer=first_layer, reducer=reducer):
        results.append((r.tensors, r.report, hidden.tensor.clone()))
    return results, hidden


def test_sums_go_through_the_reducer_and_two_identical_processes_equal_one(tiny_llama):
    one, _ = _run(tiny_llama, SINGLE_PROCESS)
    reducer = TwoIdenticalProcesses()
    two, _ = _run(tiny_llama, reducer, greedy_tokens=64)  # 2 global sequences of 32 tokens: 1 on each rank
    # per layer: 4 histograms (magnitude criterion), the greedy error sums, 4 Hessians with their token counts
    assert reducer.calls >= 2 * (4 + 8 + 2)
    for (a, ra, ha), (b, rb, hb) in zip(one, two):
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert ra["block_error"] == rb["block_error"] and torch.equal(ha, hb)
        assert ra["quantizer"].keys() == rb["quantizer"].keys()


def test_the_loop_continues_from_any_layer(tiny_llama):
    """Layer 1 from the hidden states layer 0 left: the same tensors as the uninterrupted loop (what --resume does)."""
    full, _ = _run(tiny_llama, SINGLE_PROCESS)
    after_first = full[0][2]
    hidden = HiddenStates.in_memory(tuple(after_first.shape), torch.float32)
    hidden.write_input(0, after_first)
    rest, _ = _run(tiny_llama, SINGLE_PROCESS, first_layer=1, hidden=hidden)
    assert len(rest) == 1 and rest[0][1]["layer"] == 1
    a, b = full[1][0], rest[0][0]
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("model.layers.1.") for k in b)
