"""benchmarks/union_sparsity.py: the union of M sequences' masks at one position, weighted by weight size."""

import torch
from _support import load_benchmark


def test_union_sparsity_of_known_masks():
    us = load_benchmark("union_sparsity")
    # two layers; 4 sequences x 3 positions x 4 channels. Position 0 (BOS) is left out of the average.
    a = torch.zeros(4, 3, 4, dtype=torch.bool)
    a[:, 0] = True  # BOS: every channel active, ignored
    a[0, 1:, 0] = True  # sequence 0 needs channel 0, sequence 1 channel 1, at positions 1-2
    a[1, 1:, 1] = True
    b = torch.ones(4, 3, 4, dtype=torch.bool)  # dense layer: nothing to skip at any batch
    masks = {"model.layers.0.self_attn.q_proj": (a, 300), "model.layers.0.mlp.down_proj": (b, 100)}
    # M = 4 takes every sequence: channels 0 and 1 are needed, 2 and 3 are not -> 0.5 for q_proj, 0 for down_proj
    union, per_kind = us.union_sparsity(masks, batch=4, draws=3)
    assert per_kind == {"down_proj": 0.0, "q_proj": 0.5}
    assert abs(union - 0.5 * 300 / 400) < 1e-9
    # M = 1: each sequence alone; the mean over draws lies between 3/4 (sequence 0 or 1) and 1 (sequence 2 or 3)
    _, per_kind1 = us.union_sparsity(masks, batch=1, draws=50)
    assert 0.75 < per_kind1["q_proj"] < 1.0
    assert us.independent(0.5, 4) == 0.0625


def test_markdown_lists_every_kind():
    us = load_benchmark("union_sparsity")
    meta = dict(command="c", date="d", commit="x", artifact="a", levels=[0.0, 0.5], sequences=4, tokens=8, draws=2)
    rows = [dict(level=0.5, batch=4, union=0.11, independent=0.0625, per_kind={"down_proj": 0.2, "q_proj": 0.1})]
    text = us.markdown({"meta": meta, "kinds": ["down_proj", "q_proj"], "rows": rows})
    assert "| 0.5 | 4 | 0.110 | 0.062 | 0.200 | 0.100 |" in text
