"""benchmarks/step_sweep.py: the (N, K) it sweeps are those the fused decode step launches, and a variant's rule
reaches the dispatch for that layer only (the table's other picks unchanged)."""

import json

import pytest
import torch
from _support import load_benchmark
from teal_quant.kernels import dispatch  # the module the model's GEMVs ask (not `kernels.dispatch`)


@pytest.fixture(scope="module")
def step_sweep():
    return load_benchmark("step_sweep")


@pytest.mark.parametrize("arch", ["llama3-8b", "llama3-70b"])
def test_layers_are_the_fused_steps_calls(step_sweep, arch):
    from teal_quant.compression.synthetic import resolve_arch

    c = resolve_arch(arch)
    d = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    # the fused q/k/v and gate/up calls concatenate their parts along N; o_proj reads q's width, down the MLP's
    assert step_sweep.step_layers(c) == {"qkv": (q + 2 * kv, c.hidden_size), "o_proj": (c.hidden_size, q),
                                         "gate_up": (2 * c.intermediate_size, c.hidden_size),
                                         "down": (c.hidden_size, c.intermediate_size)}


def test_a_variant_changes_one_layers_pick(step_sweep, monkeypatch):
    from teal_quant.kernels import gemv_launch

    monkeypatch.setattr(dispatch, "load_table", dispatch.load_table)  # use_rules replaces it: restored after the test
    assert gemv_launch.pick_gemv.__globals__ is vars(step_sweep.dispatch)  # the model's calls read the patched table
    rules = json.loads((dispatch.CONFIG_DIR / "h200.json").read_text())["rules"]
    cuda = torch.device("cuda")
    step_sweep.use_rules(rules)
    before = {nk: dispatch.pick_gemv(1, *nk, 4, 128, cuda, table="h200") for nk in ((10240, 8192), (8192, 8192))}
    batch4 = dispatch.pick_gemv(4, 10240, 8192, 4, 128, cuda, table="h200")
    candidate = next(s for s in step_sweep.candidates(1) if s != before[(10240, 8192)])
    step_sweep.use_rules(step_sweep.with_shape(rules, 1, 10240, 8192, dispatch.shape_to_dict(candidate)))
    assert dispatch.pick_gemv(1, 10240, 8192, 4, 128, cuda, table="h200") == candidate
    assert dispatch.pick_gemv(1, 8192, 8192, 4, 128, cuda, table="h200") == before[(8192, 8192)]
    assert dispatch.pick_gemv(4, 10240, 8192, 4, 128, cuda, table="h200") == batch4 != candidate  # (M = 1 only)


def test_report_gives_each_shape_against_the_tables_pick(step_sweep):
    row = {"N": 8192, "K": 8192, "kept": False, "gain": 0.0286, "table_pick": {"kernel": "core", "vec": 4},
           "rows": [{"shape": {"kernel": "core", "vec": 2, "shfl": True}, "median_ms": 9.0206, "min_ms": 9.0181,
                     "max_ms": 9.0218},
                    {"shape": None, "median_ms": 9.2862, "min_ms": 9.2801, "max_ms": 9.2877}]}
    report = {"gpu": "NVIDIA H200", "command": "c", "date": "d", "commit": "abc", "torch": "t", "arch": "llama3-70b",
              "level": 0.4, "steps": 32, "rounds": 3, "min_gain": 0.005, "kinds": {"o_proj": row}}
    text = step_sweep.markdown(report)
    assert "| vec=2 shfl | 9.0206 (9.0181-9.0218) | 0.9714 |" in text and "new pick, 2.86 % faster step" in text
    row["rows"] = row["rows"][:1]  # the table's pick failed to build: no ratio
    assert "| vec=2 shfl | 9.0206 (9.0181-9.0218) | - |" in step_sweep.markdown(report)


def test_a_batch_4_variant_takes_the_batch_class_rule(step_sweep, monkeypatch):
    """--batch 4: the exact rule covers the table's batch class 3-4 and leaves batch 1 and 5-8 to their rules."""
    monkeypatch.setattr(dispatch, "load_table", dispatch.load_table)
    rules = json.loads((dispatch.CONFIG_DIR / "h200.json").read_text())["rules"]
    cuda = torch.device("cuda")
    step_sweep.use_rules(rules)
    before = {m: dispatch.pick_gemv(m, 8192, 8192, 4, 128, cuda, table="h200") for m in (1, 3, 4, 8)}
    candidate = next(s for s in step_sweep.candidates(4) if s not in before.values()
                     and dispatch.fits(s, 4, 8192, 4, 128))
    step_sweep.use_rules(step_sweep.with_shape(rules, 4, 8192, 8192, dispatch.shape_to_dict(candidate)))
    after = {m: dispatch.pick_gemv(m, 8192, 8192, 4, 128, cuda, table="h200") for m in (1, 3, 4, 8)}
    assert after == {**before, 3: candidate, 4: candidate}
