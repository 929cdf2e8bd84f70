"""benchmarks/gemv.py's step form (what gemv_sweep.py --form step times): each call adds the product into one
float32 buffer and clears the other, as the decode step's q/k/v (three parts), o_proj and SiLU-form down calls do."""

import pytest
import torch
from _kernel_helpers import ON_GPU
from _support import load_benchmark

from kernels import reference

DEVICE = "cuda" if ON_GPU else "cpu"  # on a CPU-only machine: TRITON_INTERPRET=1 (tests/kernels/conftest.py)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("gemv")


def layer(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(k // 128, n, generator=gen) * 0.02 + 0.002).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // 128, n), generator=gen).to(torch.bfloat16)
    return q, tuple(t.to(DEVICE) for t in (reference.pack_int4(q), scales, zeros))


@pytest.mark.parametrize("proj, m", [("qkv", 1), ("q_o", 4), ("down", 1), ("down", 4)])
def test_step_form_calls_add_the_product_into_alternating_buffers(bench, proj, m):
    n, k = 512, 256
    q, c = layer(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    x = torch.where((x.abs() - 0.5).abs() < 0.1, x * 2, x).to(torch.bfloat16)  # no entry near the threshold 0.5
    fns = bench.step_form_fns("tiny", proj, x.to(DEVICE), torch.tensor(0.5, device=DEVICE), [c])
    assert len(fns) == 2  # one call per (copy, buffer): consecutive calls use the two buffers in turn
    w = ((q.float() - zeros_full(c[2].cpu())) * zeros_full(c[1].cpu())).double()  # W^T [K, N]
    xs = x.double() if proj != "down" else (x.float() / torch.nn.functional.silu(torch.tensor(2.0))).to(
        torch.bfloat16).double() * torch.nn.functional.silu(torch.tensor(2.0, dtype=torch.float64))
    want = torch.where(xs.abs() > 0.5, xs, 0) @ w
    first = fns[0]()
    assert first.dtype == torch.float32 and first.shape == (m, n)
    torch.testing.assert_close(first.double().cpu(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    second = fns[1]()  # adds into the buffer the first call cleared
    assert second.data_ptr() != first.data_ptr()
    torch.testing.assert_close(second.double().cpu(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert first.abs().max() == 0  # cleared by the second call


def zeros_full(g):
    return g.float().repeat_interleave(128, 0)


def test_no_step_form_for_other_calls_or_batches(bench):
    _, c = layer(512, 256)
    x = torch.randn(8, 256).to(torch.bfloat16)
    assert bench.step_form_fns("tiny", "q_o", x, torch.tensor(0.5), [c]) is None  # batch 8: plain in the step
    assert bench.step_form_fns("tiny", "gate_up_fused", x[:1], torch.tensor(0.5), [c]) is None
