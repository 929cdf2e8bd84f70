"""Greedy sparsity allocation against the analytic optimum of a separable quadratic error."""

import math

import pytest

from teal_quant.compression.calibrate.allocation import (
    effective_sparsity,
    greedy_allocation,
    uniform_allocation,
)

# Llama-like proportions (GQA: k/v 4x smaller than q/o; MLP 2.75x hidden), in units of 2^20 parameters.
SIZES = {"q": 16, "k": 4, "v": 4, "o": 16, "gate": 44, "up": 44, "down": 44}
TOTAL = sum(SIZES.values())
# Distinct error coefficients, spread narrow enough that the optimum stays below max_sparsity up to 0.7.
COEF = {"q": 1.0, "k": 1.8, "v": 1.2, "o": 1.5, "gate": 1.3, "up": 2.2, "down": 1.1}
LEVELS = [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.7]
STEP = 0.01


class CountingError:
    """E = sum c_p * s_p^2 * size_p, counting calls."""

    def __init__(self, coef):
        self.coef = coef
        self.calls = 0

    def __call__(self, sparsities):
        self.calls += 1
        assert set(sparsities) == set(SIZES), "block_error must get a full dict"
        return sum(self.coef[p] * sparsities[p] ** 2 * SIZES[p] for p in SIZES)


def _lagrange_optimum(level: float) -> dict[str, float]:
    """argmin sum c_p s_p^2 size_p s.t. sum s_p size_p = level * total: s_p = lam / c_p."""
    lam = level * TOTAL / sum(SIZES[p] / COEF[p] for p in SIZES)
    return {p: lam / COEF[p] for p in SIZES}


@pytest.fixture(scope="module")
def greedy_run():
    error = CountingError(COEF)
    seen = []
    result = greedy_allocation(error, SIZES, LEVELS, step=STEP, progress=seen.append)
    return result, error, seen


def test_greedy_matches_lagrange_optimum(greedy_run):
    result, error, _ = greedy_run
    for level, alloc in zip(LEVELS, result):
        optimum = _lagrange_optimum(level)
        assert max(optimum.values()) < 0.99  # the constraint s_p <= max_sparsity is inactive
        for p in SIZES:
            assert alloc[p] == pytest.approx(optimum[p], abs=STEP), (level, p, alloc[p], optimum[p])
        e_opt = error(optimum)
        assert error(alloc) <= e_opt * 1.01 + 1e-12, (level, error(alloc), e_opt)


def test_every_level_is_hit_exactly(greedy_run):
    result, _, _ = greedy_run
    assert len(result) == len(LEVELS)
    assert result[0] == {p: 0.0 for p in SIZES}
    for level, alloc in zip(LEVELS, result):
        assert abs(effective_sparsity(alloc, SIZES) - level) <= 1e-9
        assert all(0.0 <= s <= 0.99 for s in alloc.values())


def test_allocations_monotone_across_levels(greedy_run):
    result, _, _ = greedy_run
    for lower, higher in zip(result, result[1:]):
        assert all(higher[p] >= lower[p] for p in SIZES)


def test_greedy_beats_uniform(greedy_run):
    result, error, _ = greedy_run
    for level, greedy, uniform in zip(LEVELS, result, uniform_allocation(SIZES, LEVELS)):
        assert uniform == {p: level for p in SIZES}
        if level > 0:
            assert error(greedy) < error(uniform), level


def test_block_error_calls_bounded(greedy_run):
    _, _, seen = greedy_run
    # Fresh run so the other tests' extra error() calls are not counted.
    error = CountingError(COEF)
    progress = []
    greedy_allocation(error, SIZES, LEVELS, step=STEP, progress=progress.append)
    n_steps = len(progress)
    assert progress == seen
    assert error.calls <= 7 * n_steps + 1
    # Each full step gains >= step * min(size) / total; at most one shrunk step per level.
    assert n_steps <= math.ceil(max(LEVELS) * TOTAL / (STEP * min(SIZES.values()))) + len(LEVELS)
    assert all(b > a for a, b in zip(progress, progress[1:]))
    assert progress[-1] == pytest.approx(LEVELS[-1], abs=1e-9)


def test_gain_is_normalized_by_projection_size():
    # Linear error: cost per unit of effective sparsity is a_p, so "down" (a=1) must be raised first, although the
    # small "k" (a=2, size 4) has the smaller raw error increase per equal step (2*4 < 1*44).
    a = {p: 3.0 for p in SIZES} | {"k": 2.0, "down": 1.0}

    def linear(s):
        return sum(a[p] * s[p] * SIZES[p] for p in SIZES)

    (alloc,) = greedy_allocation(linear, SIZES, [0.2], step=0.05)
    assert alloc["down"] == pytest.approx(0.2 * TOTAL / SIZES["down"], abs=1e-12)
    assert all(alloc[p] == 0.0 for p in SIZES if p != "down")


def test_max_sparsity_caps_projections_and_unreachable_levels_raise():
    error = CountingError(COEF)
    result = greedy_allocation(error, SIZES, [0.3, 0.5], step=0.1, max_sparsity=0.5)
    assert all(s <= 0.5 for s in result[0].values())
    assert result[1] == pytest.approx({p: 0.5 for p in SIZES}, abs=1e-9)
    with pytest.raises(ValueError, match="not reachable"):
        greedy_allocation(error, SIZES, [0.3, 0.6], step=0.1, max_sparsity=0.5)


def test_invalid_arguments_raise():
    error = CountingError(COEF)
    with pytest.raises(ValueError, match="sorted"):
        greedy_allocation(error, SIZES, [0.5, 0.3], step=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        uniform_allocation(SIZES, [1.0])
    with pytest.raises(ValueError, match="step"):
        greedy_allocation(error, SIZES, [0.5], step=0.0)
    with pytest.raises(ValueError, match="positive"):
        uniform_allocation({"q": 0}, [0.5])


def test_only_zero_levels_need_no_block_evaluation():
    error = CountingError(COEF)
    assert greedy_allocation(error, SIZES, [0.0, 0.0], step=0.1) == [{p: 0.0 for p in SIZES}] * 2
    assert error.calls == 0


def test_effective_sparsity_is_size_weighted():
    s = {p: 0.0 for p in SIZES} | {"k": 1.0, "down": 0.5}
    assert effective_sparsity(s, SIZES) == pytest.approx((4 + 22) / TOTAL, abs=1e-15)
