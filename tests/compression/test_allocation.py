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
    """E = sum c_p * s_p^2 * size_p (plus `cross` * s_q * s_down * size_q when given: not separable), as the batched
    block_errors of greedy_allocation, counting evaluations (`calls`) and batches and keeping what it measured."""

    def __init__(self, coef, cross: float = 0.0):
        self.coef, self.cross = coef, cross
        self.calls = self.batches = 0
        self.measured: list[dict[str, float]] = []

    def value(self, s):
        assert set(s) == set(SIZES), "block_errors must get full dicts"
        return sum(self.coef[p] * s[p] ** 2 * SIZES[p] for p in SIZES) + self.cross * s["q"] * s["down"] * SIZES["q"]

    def __call__(self, candidates):
        self.batches += 1
        self.calls += len(candidates)
        self.measured += [dict(c) for c in candidates]
        return [self.value(s) for s in candidates]


def _lagrange_optimum(level: float) -> dict[str, float]:
    """argmin sum c_p s_p^2 size_p s.t. sum s_p size_p = level * total: s_p = lam / c_p."""
    lam = level * TOTAL / sum(SIZES[p] / COEF[p] for p in SIZES)
    return {p: lam / COEF[p] for p in SIZES}


@pytest.fixture(scope="module", params=["exact", "lazy"])
def greedy_run(request):
    error = CountingError(COEF)
    seen = []
    result = greedy_allocation(error, SIZES, LEVELS, step=STEP, progress=seen.append, search=request.param)
    return result, error, seen


def test_greedy_matches_lagrange_optimum(greedy_run):
    result, error, _ = greedy_run
    for level, alloc in zip(LEVELS, result):
        optimum = _lagrange_optimum(level)
        assert max(optimum.values()) < 0.99  # the constraint s_p <= max_sparsity is inactive
        for p in SIZES:
            assert alloc[p] == pytest.approx(optimum[p], abs=STEP), (level, p, alloc[p], optimum[p])
        e_opt = error.value(optimum)
        assert error.value(alloc) <= e_opt * 1.01 + 1e-12, (level, error.value(alloc), e_opt)


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
            assert error.value(greedy) < error.value(uniform), level


def test_block_error_calls_bounded(greedy_run):
    error = CountingError(COEF)
    progress = []
    greedy_allocation(error, SIZES, LEVELS, step=STEP, progress=progress.append, search="exact")
    n_steps = len(progress)
    assert error.calls <= 7 * n_steps + 1
    assert error.batches == n_steps + 1  # exact: all candidates of a step in one call (one all-reduce)
    # Each full step gains >= step * min(size) / total; at most one shrunk step per level.
    assert n_steps <= math.ceil(max(LEVELS) * TOTAL / (STEP * min(SIZES.values()))) + len(LEVELS)
    assert all(b > a for a, b in zip(progress, progress[1:]))
    assert progress[-1] == pytest.approx(LEVELS[-1], abs=1e-9)


def test_lazy_measures_far_less_and_equals_exact_on_a_separable_error():
    exact, lazy = CountingError(COEF), CountingError(COEF)
    a = greedy_allocation(exact, SIZES, LEVELS, step=STEP, search="exact")
    b = greedy_allocation(lazy, SIZES, LEVELS, step=STEP, search="lazy")
    assert a == b
    assert lazy.calls < 0.6 * exact.calls, (lazy.calls, exact.calls)


@pytest.mark.parametrize("refresh", [0, 3])
def test_lazy_accepts_only_measured_allocations_on_a_non_separable_error(refresh):
    """With interactions (raising q makes down costlier) stale scores are estimates: every allocation lazy ends a
    level on was measured itself, and with refresh 1 (every score re-measured every step) lazy is exact."""
    error = CountingError(COEF, cross=3.0)
    result = greedy_allocation(error, SIZES, LEVELS, step=0.02, search="lazy", refresh=refresh)
    for alloc in result[1:]:
        assert alloc in error.measured
        assert abs(effective_sparsity(alloc, SIZES) - LEVELS[result.index(alloc)]) <= 1e-9
    exact = greedy_allocation(CountingError(COEF, cross=3.0), SIZES, LEVELS, step=0.02, search="exact")
    every_step = greedy_allocation(CountingError(COEF, cross=3.0), SIZES, LEVELS, step=0.02, search="lazy", refresh=1)
    assert every_step == exact
    for level, a, b in zip(LEVELS[1:], result[1:], exact[1:]):  # an estimate-driven search stays close here
        assert error.value(a) <= error.value(b) * 1.02, (level, error.value(a), error.value(b))


def test_gain_is_normalized_by_projection_size():
    # Linear error: cost per unit of effective sparsity is a_p, so "down" (a=1) must be raised first, although the
    # small "k" (a=2, size 4) has the smaller raw error increase per equal step (2*4 < 1*44).
    a = {p: 3.0 for p in SIZES} | {"k": 2.0, "down": 1.0}

    def linear(candidates):
        return [sum(a[p] * s[p] * SIZES[p] for p in SIZES) for s in candidates]

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
    with pytest.raises(ValueError, match="search"):
        greedy_allocation(error, SIZES, [0.5], step=0.1, search="fast")
    with pytest.raises(ValueError, match="positive"):
        uniform_allocation({"q": 0}, [0.5])


def test_only_zero_levels_need_no_block_evaluation():
    error = CountingError(COEF)
    assert greedy_allocation(error, SIZES, [0.0, 0.0], step=0.1) == [{p: 0.0 for p in SIZES}] * 2
    assert error.calls == 0


def test_effective_sparsity_is_size_weighted():
    s = {p: 0.0 for p in SIZES} | {"k": 1.0, "down": 0.5}
    assert effective_sparsity(s, SIZES) == pytest.approx((4 + 22) / TOTAL, abs=1e-15)
