"""AbsHistogram: inverse CDF of |x| against analytic quantiles and against fresh samples."""

import math

import pytest
import torch

import teal_quant.compression.calibrate.histogram as histogram_module
from teal_quant.compression.calibrate.histogram import AbsHistogram

LEVELS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
N = 1_000_000
LAPLACE_SCALE = 0.3


def _gaussian(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _laplace(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    magnitude = -LAPLACE_SCALE * torch.log1p(-torch.rand(n, generator=g, dtype=torch.float64))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (magnitude * sign).float()


def _analytic(dist: str, s: float) -> float:
    if dist == "gaussian":  # |x| ~ half-normal: P(|x| <= t) = erf(t / sqrt 2)
        return math.sqrt(2.0) * torch.special.erfinv(torch.tensor(s, dtype=torch.float64)).item()
    return -LAPLACE_SCALE * math.log(1.0 - s)  # |x| ~ Exponential(1/b)


SAMPLERS = {"gaussian": _gaussian, "laplace": _laplace}


def _fed(x: torch.Tensor, n_batches: int = 7) -> AbsHistogram:
    hist = AbsHistogram()
    for batch in torch.tensor_split(x, n_batches):
        hist.update(batch.reshape(-1, 4) if batch.numel() % 4 == 0 else batch)
    return hist


@pytest.fixture(scope="module", params=["gaussian", "laplace"])
def dist_hist(request):
    dist = request.param
    return dist, _fed(SAMPLERS[dist](N, seed=0))


def test_threshold_matches_analytic_inverse_cdf(dist_hist):
    dist, hist = dist_hist
    assert hist.count == N
    for s, t in zip(LEVELS, hist.thresholds(LEVELS)):
        expected = _analytic(dist, s)
        assert abs(t - expected) <= 0.01 * expected, (dist, s, t, expected)


def test_threshold_zeroes_requested_fraction_of_fresh_samples(dist_hist):
    dist, hist = dist_hist
    fresh = SAMPLERS[dist](N, seed=123).abs()
    for s in LEVELS:
        realized = (fresh <= hist.threshold(s)).double().mean().item()
        assert abs(realized - s) <= 0.005, (dist, s, realized)  # sampling sd ~0.0005


def test_sparsity_at_inverts_threshold(dist_hist):
    _, hist = dist_hist
    for s in LEVELS + [0.013, 0.5551, 0.987]:
        assert hist.sparsity_at(hist.threshold(s)) == pytest.approx(s, abs=1e-9)
    assert hist.sparsity_at(-1.0) == 0.0
    assert hist.sparsity_at(math.inf) == 1.0


def test_thresholds_monotonic_in_sparsity(dist_hist):
    _, hist = dist_hist
    grid = [i / 200 for i in range(200)]
    ts = hist.thresholds(grid)
    assert ts[0] == 0.0
    assert all(b > a for a, b in zip(ts, ts[1:])), "thresholds must increase strictly with sparsity"


def test_batch_order_does_not_matter():
    x = _laplace(200_000, seed=1)
    batches = list(torch.tensor_split(x, 10))
    a, b = AbsHistogram(), AbsHistogram()
    for batch in batches:
        a.update(batch)
    for i in [3, 9, 0, 7, 1, 8, 2, 6, 4, 5]:
        b.update(batches[i])
    assert torch.equal(a.counts, b.counts)
    assert a.thresholds(LEVELS) == b.thresholds(LEVELS)


def test_chunked_update_equals_single_pass(monkeypatch):
    x = _gaussian(100_000, seed=2)
    whole = AbsHistogram()
    whole.update(x)
    monkeypatch.setattr(histogram_module, "_CHUNK", 4096)
    chunked = AbsHistogram()
    chunked.update(x)
    assert torch.equal(whole.counts, chunked.counts)


def test_nan_ignored_and_inf_overflows():
    x = _gaussian(100_000, seed=3)
    clean = AbsHistogram()
    clean.update(x)
    dirty = AbsHistogram()
    dirty.update(torch.cat([x, torch.full((50,), float("nan"))]))
    assert torch.equal(dirty.counts, clean.counts)
    assert dirty.count == 100_000
    assert all(math.isfinite(t) for t in dirty.thresholds(LEVELS))

    with_inf = AbsHistogram()
    with_inf.update(torch.cat([x, torch.tensor([float("inf"), -float("inf"), 1e9])]))
    assert with_inf.count == 100_003
    assert with_inf.counts[-1].item() == 3.0  # overflow bin: +inf, -inf and 1e9 > high
    assert with_inf.sparsity_at(with_inf.high) == pytest.approx(100_000 / 100_003, abs=1e-12)


def test_scale_equivariance():
    x = _laplace(N, seed=4)
    h1, h10 = AbsHistogram(), AbsHistogram()
    h1.update(x)
    h10.update(10 * x)
    for t1, t10 in zip(h1.thresholds(LEVELS), h10.thresholds(LEVELS)):
        assert t10 == pytest.approx(10 * t1, rel=0.01)


def test_exact_zeros_have_their_own_bin():
    x = _gaussian(100_000, seed=5)
    x[:30_000] = 0.0
    hist = AbsHistogram()
    hist.update(x)
    assert hist.threshold(0.2) == 0.0  # 30 % exact zeros: a 20 % level needs no threshold
    assert hist.sparsity_at(0.0) == pytest.approx(0.3, abs=1e-12)
    assert hist.threshold(0.3 + 0.7 * 0.5) == pytest.approx(_analytic("gaussian", 0.5), rel=0.02)


def test_half_precision_inputs_match_fp32():
    x = _gaussian(100_000, seed=6).to(torch.bfloat16)
    h_bf16, h_fp32 = AbsHistogram(), AbsHistogram()
    h_bf16.update(x)
    h_fp32.update(x.float())
    assert torch.equal(h_bf16.counts, h_fp32.counts)


def test_invalid_sparsity_and_empty_raise():
    hist = AbsHistogram()
    with pytest.raises(ValueError, match="empty"):
        hist.threshold(0.5)
    hist.update(_gaussian(1000, seed=7))
    assert hist.threshold(0.0) == 0.0
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            hist.threshold(bad)


def test_state_dict_round_trip():
    hist = _fed(_gaussian(100_000, seed=8))
    state = hist.state_dict()
    assert set(state) == {"bins", "low", "high", "counts"}
    restored = AbsHistogram.from_state_dict(state)
    assert restored.thresholds(LEVELS) == hist.thresholds(LEVELS)
    restored.update(_gaussian(10, seed=9))
    assert restored.count == 100_010
    bad = dict(state, bins=100)
    with pytest.raises(ValueError, match="shape"):
        AbsHistogram.from_state_dict(bad)
