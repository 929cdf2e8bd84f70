"""benchmarks/read_ceiling.py's read kernels read exactly the bytes a batch-1 sparse GEMV touches (on the GPU when
there is one, else the interpreter)."""

import pytest
import torch
from _kernel_helpers import ON_GPU
from _support import load_benchmark

DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(scope="module")
def rc():
    module = load_benchmark("read_ceiling")
    module.bench.DEV = DEVICE  # on a CPU-only machine: TRITON_INTERPRET=1 (tests/kernels/conftest.py)
    return module


@pytest.mark.parametrize("kind", ["list", "mask"])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
def test_read_kernels_sum_the_active_rows_and_touched_groups(rc, kind, sparsity):
    """Each program's int32 sum over its K-range's active rows and (if any is active) its group's scale/zero
    words equals the torch reference; a K-range with no active row contributes nothing (sparsity 1.0)."""
    n, k = 512, 384
    gen = torch.Generator().manual_seed(3)
    active = torch.rand(k, generator=gen) >= sparsity
    active[:128] = False  # one K-range with no active row at every sparsity
    active = active.to(DEVICE)
    w, sz = rc.read_words(k, n)
    want = rc.read_reference(w, sz, active)
    for config in [(64, 8, 4, 1), (32, 16, 4, 2), (32, 32, 4, 4)]:
        got = rc.folded(rc.read_fns(kind, config, [(w, sz)], rc.row_lists(active), n, k)[0](), config[3])
        assert torch.equal(got, want), (kind, config)
    assert torch.equal(want[0], torch.zeros_like(want[0]))


def test_row_lists_put_each_k_ranges_active_rows_first(rc):
    active = torch.zeros(256, dtype=torch.bool)
    active[[3, 1, 200, 130]] = True
    idx, cnt, act = rc.row_lists(active)
    assert cnt.tolist() == [2, 2]
    assert idx[:2].tolist() == [1, 3] and idx[128:130].tolist() == [130, 200]
    assert sorted(idx.tolist()) == list(range(256)) and act.sum() == 4
