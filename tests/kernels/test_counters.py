"""kernels.count_inactive: the realized-sparsity counters a decode step updates in one launch.

Checked against counts made here in float64 from the definition (an input is dropped when |x| > t is false,
compared in fp32), for every threshold form a TealLinear or a fused group holds: 0-dim, [K] per-channel (weight-
aware), [P] per part (fused q/k/v, gate/up) and [P, K]; bf16 and fp32 inputs; batch 1 and 3; counts accumulate
over calls while last_sparsity holds the last call only. Counts are integers, so the comparison is exact.
"""

import math

import pytest
import torch
from teal_quant.kernels import reference

from teal_quant import kernels

pytest.importorskip("triton")
from teal_quant.kernels import counters_triton  # noqa: E402


def expected_dropped(x: torch.Tensor, t: torch.Tensor) -> float:
    return float(x.numel() - (x.float().abs() > t.float()).sum().item())


def counters(n_parts: int, device, scalar: bool):
    shape = () if scalar else (n_parts,)
    return (torch.zeros(shape, dtype=torch.float64, device=device), torch.zeros(shape, dtype=torch.float64, device=device),
            torch.zeros(shape, dtype=torch.float32, device=device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("form", ["scalar", "channel", "parts", "parts_channel"])
def test_counts_match_the_definition(device, dtype, m, form):
    g = torch.Generator().manual_seed(m * 7 + len(form))
    k, n_parts = 1200, (1 if form in ("scalar", "channel") else 3)  # K not a multiple of the 1024 block
    x = torch.randn(m, k, generator=g).to(dtype)
    if form == "scalar":
        t = torch.tensor(0.7)
    elif form == "channel":
        t = torch.rand(k, generator=g) * 2
        t[:5] = math.inf  # zero-norm columns under the weight-aware criterion: never kept
    elif form == "parts":
        t = torch.tensor([0.0, 0.5, 1.5])
    else:
        t = torch.rand(n_parts, k, generator=g) * 2
    x[0, :3] = t.reshape(-1)[:3].to(dtype)  # ties: |x| == t is dropped
    zero, seen, last = counters(n_parts, device, scalar=form in ("scalar", "channel"))
    xd, td = x.to(device), t.to(device)
    for call in range(2):
        kernels.count_inactive(xd, td, zero, seen, last)
    rows = t.reshape(n_parts, -1)
    want = torch.tensor([expected_dropped(x, rows[p]) for p in range(n_parts)], dtype=torch.float64)
    assert torch.equal(zero.cpu().reshape(-1), 2 * want)
    assert torch.equal(seen.cpu().reshape(-1), torch.full((n_parts,), 2.0 * m * k, dtype=torch.float64))
    torch.testing.assert_close(last.cpu().reshape(-1), (want / (m * k)).float(), rtol=1e-6, atol=0)


def test_last_sparsity_is_the_last_call_only(device):
    zero, seen, last = counters(1, device, scalar=True)
    t = torch.tensor(1.0, device=device)
    kernels.count_inactive(torch.zeros(1, 64, device=device), t, zero, seen, last)  # all dropped
    kernels.count_inactive(torch.full((1, 64), 3.0, device=device), t, zero, seen, last)  # none dropped
    assert (zero.item(), seen.item(), last.item()) == (64.0, 128.0, 0.0)


def test_triton_and_reference_agree_on_a_fused_group_view(device):
    """A fused group's counters are a [P] stack whose elements members read as 0-dim views."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 576, generator=g).to(device)
    t = torch.tensor([0.2, 0.8], device=device)
    a, b = counters(2, device, scalar=False), counters(2, device, scalar=False)
    counters_triton.count_inactive(x, t, *a)
    reference.count_inactive_ref(x, t, *b)
    member_view = a[0][1]
    assert member_view.dim() == 0 and member_view.item() == b[0][1].item()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # counts: exact
    torch.testing.assert_close(a[2], b[2], rtol=1e-6, atol=0)  # fraction: fp32 vs float64 division, 1 ulp apart


def test_rejects_counters_of_the_wrong_size(device):
    with pytest.raises(ValueError, match="counters must be 2"):
        counters_triton.count_inactive(torch.zeros(1, 8, device=device), torch.tensor([0.1, 0.2], device=device),
                                   torch.zeros(2, dtype=torch.float64, device=device),
                                   torch.zeros(3, dtype=torch.float64, device=device),
                                   torch.zeros(2, device=device))
