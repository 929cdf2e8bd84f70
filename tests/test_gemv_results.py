"""benchmarks/gemv.py keeps rows it does not re-measure (`--keep-from`): each row carries the run that measured it,
and the report names those runs in one flat line, however many runs in a row kept them."""

import importlib.util

from _support import ROOT


def load_gemv_script():
    spec = importlib.util.spec_from_file_location("gemv_bench", ROOT / "benchmarks" / "gemv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kept_rows_name_the_run_that_measured_them():
    gemv = load_gemv_script()
    old_meta = {"commit": "aaa1111", "date": "2026-12-01T10:00:00+00:00"}
    # a file written before rows carried provenance: its rows count as measured by its own run
    legacy = [gemv.with_provenance({"batch": b, "us": 1.0}, old_meta) for b in (8, 16)]
    assert {r["measured"]["commit"] for r in legacy} == {"aaa1111"}
    # a later file kept those and measured batch 4 itself; a third run keeps everything but batch 1
    later_meta = {"commit": "bbb2222", "date": "2026-12-02T00:00:00+00:00"}
    batch4 = {"batch": 4, "us": 2.0, "measured": dict(later_meta)}
    kept = [gemv.with_provenance(r, later_meta) for r in legacy + [batch4]]
    assert [r["measured"]["commit"] for r in kept] == ["aaa1111", "aaa1111", "bbb2222"]
    heads = [gemv.with_provenance({"N": 128256, "us": 3.0}, later_meta)]
    note = gemv.kept_note(kept, heads)
    assert note == ("rows kept from earlier runs (same method): batch 4 at commit bbb2222 (2026-12-02T00:00:00+00:00); "
                    "batch 8, 16 at commit aaa1111 (2026-12-01T10:00:00+00:00); "
                    "lm_head rows at commit bbb2222 (2026-12-02T00:00:00+00:00)")
