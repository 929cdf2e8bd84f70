"""kernels.dispatch: the per-GPU launch-shape tables are data, read by one function (pick_gemv)."""

import json

import pytest
import torch
from teal_quant.kernels import dispatch
from teal_quant.kernels.dispatch import CoreShape, MmaShape, SplitKShape

TABLES = sorted(p.stem for p in dispatch.CONFIG_DIR.glob("*.json"))


def test_the_tables_ship_beside_the_code():
    assert {"h200", "default", "interpreter"} <= set(TABLES)


@pytest.mark.parametrize("name", TABLES)
@pytest.mark.parametrize("group_size", [32, 64, 128, 576])
def test_every_table_has_a_fitting_shape_for_every_batch(name, group_size):
    k = group_size * 8
    for m in range(1, 17):
        for n in (1024, 8192, 28672):
            shape = dispatch.pick_gemv(m, n, k, 4, group_size, torch.device("cpu"), table=name)
            assert shape is not None and dispatch.fits(shape, m, k, 4, group_size), (name, m, n, shape)
            if isinstance(shape, SplitKShape):  # K-steps inside one group, any number of them per program
                assert group_size % shape.block_k == 0
            else:
                assert group_size % shape.k_range == 0
            if isinstance(shape, CoreShape):
                assert m <= dispatch.CORE_MAX_M


def test_first_matching_rule_wins_and_unfit_rules_are_skipped(tmp_path, monkeypatch):
    rules = [
        {"m": [1, 1], "weight": [0, 100], "shape": {"kernel": "core", "vec": 1, "warps": 2, "rows": 2, "k_range": 16}},
        {"m": [1, 4], "shape": {"kernel": "core", "vec": 4, "warps": 4, "rows": 8, "k_range": 128}},
        {"m": [1, 16], "shape": {"kernel": "mma", "block_n": 64, "block_k": 32, "warps": 4, "k_range": 64, "swap": True}},
    ]
    (tmp_path / "t.json").write_text(json.dumps({"rules": rules}))
    monkeypatch.setattr(dispatch, "CONFIG_DIR", tmp_path)
    dispatch.load_table.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert dispatch.pick_gemv(1, 4, 16, 4, 16, cpu, table="t") == CoreShape(1, 2, 2, 16)
        assert dispatch.pick_gemv(1, 64, 256, 4, 128, cpu, table="t") == CoreShape(4, 4, 8, 128)
        assert dispatch.pick_gemv(3, 64, 256, 4, 64, cpu, table="t") == CoreShape(4, 4, 8, 64)  # K-range fitted
        assert dispatch.pick_gemv(8, 64, 256, 4, 128, cpu, table="t") == MmaShape(64, 32, 4, 64, swap=True)
        assert dispatch.pick_gemv(8, 64, 256, 4, 16, cpu, table="t") == MmaShape(64, 16, 4, 16, swap=True)
    finally:
        dispatch.load_table.cache_clear()


def test_preload_fits_only_plain_in_place_shapes():
    """``preload`` (round 10) loads k_range / warps rows per warp at the start: no pipe, stages or groups, value 1 or
    2; it needs no rows-per-step divisibility (it has no row loop)."""
    assert dispatch.fits(CoreShape(1, 4, 8, 16, preload=1), 1, 256, 4, 128)
    assert dispatch.fits(CoreShape(2, 2, 4, 64, preload=2, h2=True), 4, 256, 4, 128)
    for bad in (CoreShape(1, 4, 4, 32, preload=1, pipe=True), CoreShape(1, 4, 4, 32, preload=1, stages=2),
                CoreShape(1, 4, 4, 32, preload=1, groups=2), CoreShape(1, 4, 4, 32, preload=3)):
        assert not dispatch.fits(bad, 1, 256, 4, 128), bad
    assert dispatch.fits(CoreShape(1, 4, 1, 32, preload=1), 1, 256, 4, 128)
    # round 11: lookahead only with preload, >= 0; any value (past the last row: each row waits for itself only)
    assert dispatch.fits(CoreShape(2, 4, 4, 64, preload=2, h2=True, lookahead=64), 1, 256, 4, 128)
    for bad in (CoreShape(2, 4, 4, 64, dense=100, lookahead=2), CoreShape(2, 4, 4, 64, preload=1, lookahead=-1)):
        assert not dispatch.fits(bad, 1, 256, 4, 128), bad
    assert dispatch.shape_from_dict({"kernel": "core", "vec": 2, "warps": 4, "rows": 4, "k_range": 64, "preload": 2,
                                     "lookahead": 8}).lookahead == 8


def test_pipe_takes_rows_other_than_4_only_with_loads_first():
    """``pipe`` (the next step's slots loaded ahead) is written for R = 4; round 12's ``loads_first`` runs it over
    tuples of any R."""
    assert dispatch.fits(CoreShape(2, 4, 4, 128, pipe=True), 1, 256, 4, 128)
    assert not dispatch.fits(CoreShape(2, 4, 8, 128, pipe=True), 1, 256, 4, 128)
    assert dispatch.fits(CoreShape(2, 4, 8, 128, pipe=True, loads_first=True), 1, 256, 4, 128)
    assert dispatch.fits(CoreShape(1, 2, 3, 32, pipe=True, loads_first=True), 3, 256, 4, 128)


def test_shfl_fits_only_loops_that_read_a_step_of_slots():
    """``shfl`` (round 14: the compacted list in registers, one slot per lane) takes the compacting loops that read a
    step of slots at a time (pipe, loads_first, h2 at R = 4), a K-range of whole 32-row ballots that the lanes of
    the warps can hold (<= 128 and <= 32 * warps), and no groups, stages or preload; always in place (dense 100)
    has no list."""
    for good in (CoreShape(4, 4, 4, 128, h2=True, dense=85, evict_first=True, shfl=True),
                 CoreShape(2, 4, 4, 128, pipe=True, h2=True, shfl=True), CoreShape(1, 1, 8, 32, loads_first=True, shfl=True),
                 CoreShape(1, 2, 4, 64, h2=True, shfl=True)):
        assert dispatch.fits(good, 1, 256, 4, 128), good
    for bad in (CoreShape(1, 2, 2, 64, h2=True, shfl=True),  # R = 2 without loads_first: slot loads one by one
                CoreShape(1, 2, 4, 128, h2=True, shfl=True),  # 128 slots, 64 lanes
                CoreShape(1, 4, 4, 16, h2=True, shfl=True),  # not a whole ballot
                CoreShape(1, 4, 4, 32, h2=True, groups=2, shfl=True), CoreShape(1, 4, 4, 32, h2=True, stages=2, shfl=True),
                CoreShape(1, 4, 4, 32, h2=True, preload=1, shfl=True), CoreShape(1, 4, 4, 32, h2=True, dense=100, shfl=True)):
        assert not dispatch.fits(bad, 1, 256, 4, 128), bad
    assert dispatch.shape_from_dict({"kernel": "core", "vec": 4, "warps": 4, "rows": 4, "k_range": 128, "h2": True,
                                     "shfl": True}).shfl


def test_unknown_launch_parameters_are_rejected():
    with pytest.raises(ValueError, match="unknown core launch parameters"):
        dispatch.shape_from_dict({"kernel": "core", "vec": 1, "warps": 1, "rows": 1, "k_range": 16, "probe": 2})
    shape = MmaShape(128, 32, 8, 128, stages=2, swap=True, tiles=2)
    assert dispatch.shape_from_dict(dispatch.shape_to_dict(shape)) == shape


def test_dense_threshold_rules_match_only_python_numbers_at_or_below_zero(tmp_path, monkeypatch):
    rules = [
        {"m": [1, 1], "dense_threshold": True, "bits": 4, "shape": {"kernel": "core", "vec": 4, "warps": 4, "rows": 4,
                                                                      "k_range": 128, "dense": 100, "h2": True}},
        {"m": [1, 1], "dense_threshold": True, "bits": 8, "shape": {"kernel": "core", "vec": 2, "warps": 4, "rows": 4,
                                                                      "k_range": 128, "dense": 100}},
        {"m": [1, 16], "shape": {"kernel": "core", "vec": 1, "warps": 2, "rows": 2, "k_range": 64}},
    ]
    (tmp_path / "t.json").write_text(json.dumps({"rules": rules}))
    monkeypatch.setattr(dispatch, "CONFIG_DIR", tmp_path)
    dispatch.load_table.cache_clear()
    try:
        cpu = torch.device("cpu")
        dense4, dense8, plain = CoreShape(4, 4, 4, 128, dense=100, h2=True), CoreShape(2, 4, 4, 128, dense=100), CoreShape(1, 2, 2, 64)
        for t in (0.0, 0, -1.5):
            assert dispatch.pick_gemv(1, 64, 256, 4, 128, cpu, table="t", threshold=t) == dense4
            assert dispatch.pick_gemv(1, 64, 256, 8, 128, cpu, table="t", threshold=t) == dense8
        for t in (0.5, torch.tensor(0.0), torch.zeros(256), None, False):
            assert dispatch.pick_gemv(1, 64, 256, 4, 128, cpu, table="t", threshold=t) == plain
        assert dispatch.pick_gemv(2, 64, 256, 4, 128, cpu, table="t", threshold=0.0) == plain  # batch 1 rules only
    finally:
        dispatch.load_table.cache_clear()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n, k", [(128256, 4096), (128256, 8192)])
def test_h200_table_covers_the_lm_heads(bits, n, k):
    """A quantized lm_head (python-float threshold 0.0) gets a fitting batch-1 core shape from the H200 table, int4
    and int8, group 128 and 32: int4 through a measured dense_threshold rule (always in place), int8 through the
    ordinary rules (the always-dense shapes measured slower there: round 7)."""
    for g in (128, 32):
        shape = dispatch.pick_gemv(1, n, k, bits, g, torch.device("cpu"), table="h200", threshold=0.0)
        assert isinstance(shape, CoreShape) and dispatch.fits(shape, 1, k, bits, g), shape
        ordinary = dispatch.pick_gemv(1, n, k, bits, g, torch.device("cpu"), table="h200")
        if bits == 4:
            assert shape.dense == 100 and shape.h2
        else:
            assert shape == ordinary
