"""Per-layer allocation of TEAL sparsity between the projections of a decoder layer.

A decoder layer has seven projections ("q", "k", "v", "o", "gate", "up", "down"); a level is a target for the
layer's *effective* sparsity, the size-weighted mean sum(s_p * size_p) / sum(size_p) (size = parameter count,
so the effective sparsity is the fraction of weight bytes a decode step skips). The allocation says which
per-projection sparsities s_p realize each level. One search serves the whole table of levels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")

# Tolerance on "the effective sparsity has reached the level"; results land on the level within ~1e-15.
_LEVEL_TOL = 1e-12


def effective_sparsity(sparsities: Mapping[str, float], sizes: Mapping[str, int]) -> float:
    """Size-weighted mean sparsity: the fraction of the layer's weights a decode step does not read."""
    total = sum(int(sizes[p]) for p in sizes)
    return sum(float(sparsities[p]) * int(sizes[p]) for p in sizes) / total


def _check(sizes: Mapping[str, int], levels: Sequence[float], max_sparsity: float = 1.0) -> None:
    if not sizes:
        raise ValueError("sizes is empty")
    for p, n in sizes.items():
        if int(n) <= 0:
            raise ValueError(f"size of projection {p!r} must be positive, got {n}")
    levels = [float(x) for x in levels]
    for level in levels:
        if not 0.0 <= level < 1.0:
            raise ValueError(f"levels must lie in [0, 1), got {level}")
        if level > max_sparsity + _LEVEL_TOL:
            raise ValueError(f"level {level} is not reachable with every projection at max_sparsity={max_sparsity}")
    if any(b < a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels must be sorted ascending, got {levels}")


def uniform_allocation(sizes: Mapping[str, int], levels: Sequence[float]) -> list[dict[str, float]]:
    """Every projection at the level itself (TEAL's "uniform" baseline)."""
    _check(sizes, levels)
    return [{p: float(level) for p in sizes} for level in levels]


SEARCHES = ("lazy", "exact")


def greedy_allocation(
    block_errors: Callable[[list[dict[str, float]]], Sequence[float]],
    sizes: Mapping[str, int],
    levels: Sequence[float],
    step: float,
    max_sparsity: float = 0.99,
    progress: Callable[[float], None] | None = None,
    search: str = "lazy",
    refresh: int = 3,
) -> list[dict[str, float]]:
    """TEAL's block-wise greedy search, returning one allocation per level (same order as ``levels``).

    Like TEAL (teal/greedyopt.py) the search starts every projection at 0, repeatedly tries raising each
    projection, evaluates the block's output error for each candidate, accepts the best candidate, and records the
    allocation as each requested level is reached, so one search serves the whole table.

    Our variant: every candidate raises its own sparsity by the same ``step`` (clamped at ``max_sparsity``;
    projections already there are no candidates), and the accepted candidate is the one with the least error
    increase per unit of effective sparsity gained, (E_cand - E_current) / delta_effective. With equal steps the
    effective gain differs by projection size (k/v are small under GQA), hence the normalization. TEAL instead
    scales each candidate's step by projection size so every candidate gains the same effective sparsity and
    takes the least error; that needs a fine step for the largest projection and so ~10x more block evaluations,
    which matters on CPU. When a candidate would overshoot the next level, its step is shrunk so the effective
    sparsity lands on the level exactly (then all candidates gain the same amount and the least error wins).

    ``search``: "exact" measures every candidate at every step (TEAL). "lazy" keeps each projection's last
    measured score (lazy greedy): at each step it re-measures the candidate with the best known score until the best
    one was measured at the current allocation with its current step, and then accepts it; a score measured before
    other projections moved is only an estimate, and one older than ``refresh`` accepted steps is re-measured (0:
    never). A candidate is accepted only on a score measured at the current allocation, as in "exact". On a
    separable error (raising one projection leaves the others' marginal errors unchanged) lazy picks exactly what
    exact picks. On the 12 SmolLM2-135M layers of docs/quality.md, refresh 3 makes ~47 % of exact's evaluations
    for a mean block error within 0.5 % of exact's at every level (refresh 0: 30 % of the evaluations, +3 % at s50).

    ``block_errors(candidates)`` gets a list of full dicts {projection: sparsity} and returns the block output
    error of each (e.g. ||Y - Y_hat||^2 on calibration tokens); one call per step in "exact" (all candidates at
    once), so an implementation can batch them or all-reduce their sums in one go. ``progress(effective)`` is
    called after each accepted step. Levels must be sorted ascending in [0, 1) and reachable, i.e. <=
    max_sparsity; level 0 gives all zeros.
    """
    if not step > 0.0:
        raise ValueError(f"step must be positive, got {step}")
    if not 0.0 < max_sparsity <= 1.0:
        raise ValueError(f"max_sparsity must be in (0, 1], got {max_sparsity}")
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    _check(sizes, levels, max_sparsity)
    names = list(sizes)
    order = {p: i for i, p in enumerate(names)}
    total = float(sum(int(sizes[p]) for p in names))
    current = {p: 0.0 for p in names}
    effective = 0.0
    error = float(block_errors([dict(current)])[0]) if any(float(x) > 0.0 for x in levels) else 0.0
    # per projection, the last measured (score, error, allocation it was measured at, its gain)
    known: dict[str, tuple[float, float, dict[str, float], float]] = {}
    measured_at: dict[str, int] = {}
    steps = 0
    result = []
    for level in (float(x) for x in levels):
        while effective < level - _LEVEL_TOL:
            moves: dict[str, tuple[float, float]] = {}  # projection -> (new sparsity, effective gain)
            for p in names:
                if current[p] >= max_sparsity:
                    continue
                new = min(current[p] + step, max_sparsity)
                gain = (new - current[p]) * sizes[p] / total
                if effective + gain > level:  # shrink so the layer lands exactly on the level
                    new = current[p] + (level - effective) * total / sizes[p]
                    gain = level - effective
                moves[p] = (new, gain)
            if not moves:  # unreachable given the check above, kept as a clear failure
                raise ValueError(f"level {level} not reachable under max_sparsity={max_sparsity}")
            candidates = {p: {**current, p: new} for p, (new, _) in moves.items()}

            def measure(projs: list[str]) -> None:
                if not projs:
                    return
                errors = block_errors([candidates[p] for p in projs])
                for p, e in zip(projs, errors):
                    known[p] = ((float(e) - error) / moves[p][1], float(e), candidates[p], moves[p][1])
                    measured_at[p] = steps

            if search == "exact":
                measure(list(moves))
                best = min(moves, key=lambda p: (known[p][0], order[p]))
            else:
                # unknown, too old, or for another step size (a step shrunk onto a level gains less per unit: a
                # full step's score is no estimate of it)
                measure([p for p in moves if p not in known or (refresh and steps - measured_at[p] >= refresh)
                         or known[p][3] != moves[p][1]])
                while True:
                    best = min(moves, key=lambda p: (known[p][0], order[p]))
                    if known[best][2] == candidates[best]:
                        break
                    measure([best])
            current = candidates[best]
            error = known[best][1]
            steps += 1
            effective = effective_sparsity(current, sizes)
            if progress is not None:
                progress(effective)
        result.append(dict(current))
    return result
