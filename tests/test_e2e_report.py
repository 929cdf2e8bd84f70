"""benchmarks/e2e.py's report logic: targets met or not from a bench result, and the markdown it writes.

The GPU run itself is benchmarks/results/e2e_h200.*; here a bench-shaped result (the keys `teal-quant bench --json`
writes, checked by tests/test_bench.py) goes through check_targets and markdown.
"""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("e2e", ROOT / "benchmarks" / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variant(name, ms, level=None, top=None):
    return {"variant": name, "level": level, "status": "ok", "realized_sparsity": level, "prefill_ms": 10.0,
            "decode_ms_per_token": ms, "tokens_per_s": 1000.0 / ms, "weight_bytes_per_step": 3e9,
            "bandwidth_gb_s": 3e9 / ms / 1e6, "peak_memory_bytes": 6e9, "extrapolated": None,
            "breakdown": {"linear_ms": 1.0, "attention_ms": 0.2, "other_ms": 1.0, "launches_per_step": 836.0,
                          "top_other": top or []}}


def result(ours_ms, int4_ms, bf16_ms):
    rows = [variant("ours", ours_ms, 0.5, [{"name": "_rms_norm_kernel", "ms": 0.105, "calls": 65}]),
            variant("int4", int4_ms, 0.0), variant("bf16", bf16_ms)]
    return {"variants": rows, "ratios": {"ours_over_bf16": bf16_ms / ours_ms, "ours_over_int4": int4_ms / ours_ms}}


def test_targets_are_met_only_at_or_above_the_wanted_value(e2e):
    targets = {"ours_over_bf16": 3.0, "ours_over_int4": 1.8, "ours_tokens_per_s": 300.0}
    got = e2e.check_targets(result(3.321, 3.872, 6.143), targets)
    assert got["ours_over_bf16"] == {"want": 3.0, "got": pytest.approx(6.143 / 3.321), "met": False}
    assert got["ours_over_int4"]["met"] is False
    assert got["ours_tokens_per_s"]["got"] == pytest.approx(301.1, abs=0.1) and got["ours_tokens_per_s"]["met"] is True
    assert e2e.check_targets(result(2.0, 3.6, 6.0), targets)["ours_over_bf16"]["met"] is True
    assert e2e.check_targets(None, targets)["ours_over_bf16"] == {"want": 3.0, "got": None, "met": None}


def test_markdown_states_rows_kernels_targets_and_comparison_runs(e2e):
    report = {"command": "python3 benchmarks/e2e.py", "gpu": "NVIDIA H200", "date": "2026-11-29", "git_commit": "abc",
              "torch": "2.11", "cuda": "13.0", "triton": "3.6.0", "transformers": "5.17.0", "runs": {}}
    for name, targets in (("llama3-8b", {"ours_over_bf16": 3.0}), ("llama3-8b-eager-elementwise", {})):
        r = result(3.321, 3.872, 6.143)
        report["runs"][name] = {"command": f"teal-quant bench {name}", "status": "ok", "seconds": 33.0, "result": r,
                                "stderr_tail": [], "targets": e2e.check_targets(r, targets)}
    text = e2e.markdown(report)
    assert "| ours | 0.5 | 0.500 | 10.0 | 3.321 | 301.1 |" in text
    assert "(836 kernels)" in text and "`_rms_norm_kernel` 0.105 / 65" in text
    assert "ours_over_bf16 >= 3: got 1.85 -> NOT met" in text
    assert "targets: none (a comparison run)" in text
