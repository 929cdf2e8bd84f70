"""benchmarks/gemv.py keeps rows it does not re-measure (`--keep-from`): each row carries the run that measured it,
and the report names those runs in one flat line, however many runs in a row kept them."""

from _support import load_benchmark


def load_gemv_script():
    return load_benchmark("gemv")


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


def test_a_partial_remeasure_keeps_the_other_layers_of_that_batch_and_names_them():
    """`--layers`: the layers of a batch size measured now replace theirs; the other layers of that batch are kept
    and the note names them."""
    gemv = load_gemv_script()
    meta = {"commit": "ccc3333", "date": "2026-12-03T00:00:00+00:00"}
    kept = [gemv.with_provenance({"model": model, "proj": proj, "batch": b, "us": 1.0}, meta)
            for model, proj, b in (("8B", "q_o", 1), ("70B", "down", 1), ("8B", "q_o", 4))]
    note = gemv.kept_note(kept, [], {("8B", "down", 1), ("8B", "gate_up_fused", 1)})
    assert note == ("rows kept from earlier runs (same method): batch 1 (70B down, 8B q_o), 4 at commit ccc3333 "
                    "(2026-12-03T00:00:00+00:00)")


def load_sweep_script():
    return load_benchmark("gemv_sweep")


def test_a_sweep_of_some_layers_replaces_only_their_exact_rules():
    """gemv_sweep.py --layers: a swept layer's exact rule takes the new shape; a layer without one gets its own in
    front of its batch class's rules by weight size; every other rule stays, in order."""
    sweep = load_sweep_script()
    old = {"kernel": "core", "vec": 2, "warps": 4, "rows": 4, "k_range": 128}
    new = {"kernel": "core", "vec": 4, "warps": 4, "rows": 8, "k_range": 128, "loads_first": True}
    rules = [{"m": [1, 1], "dense_threshold": True, "bits": 4, "weight": [100, 100], "n": [10, 10], "shape": old},
             {"m": [1, 1], "weight": [100, 100], "n": [10, 10], "shape": old},
             {"m": [1, 1], "weight": [400, 400], "n": [20, 20], "shape": old},
             {"m": [1, 1], "weight": [0, 200], "shape": old}, {"m": [1, 1], "shape": old},
             {"m": [2, 2], "weight": [100, 100], "n": [10, 10], "shape": old}]
    out = sweep.replace_exact_rules(rules, {(1, 10, 10): new, (1, 40, 20): new})
    assert out[0] == rules[0] and out[2] == rules[2] and out[-1] == rules[-1]  # dense-threshold, other layer, batch 2
    assert out[1]["shape"] == new
    assert out[3] == {"m": [1, 1], "weight": [800, 800], "n": [40, 40], "shape": new}  # before the size rules
    assert out[4:] == rules[3:]
    assert rules[1]["shape"] == old  # the previous table is not changed in place


def test_the_previous_pick_of_a_layer_without_an_exact_rule_is_what_the_dispatch_took():
    """--keep-unless-faster compares a new pick with what the previous table gave the layer: its exact rule, else
    (a fused layer swept for the first time) the first rule matching its batch and weight size."""
    sweep = load_sweep_script()
    a = {"kernel": "core", "vec": 2, "warps": 4, "rows": 4, "k_range": 128}
    b = {"kernel": "core", "vec": 4, "warps": 4, "rows": 4, "k_range": 128}
    rules = [{"m": [1, 1], "dense_threshold": True, "shape": a}, {"m": [1, 1], "weight": [100, 100], "n": [10, 10], "shape": a},
             {"m": [1, 1], "weight": [0, 500], "shape": b}, {"m": [1, 1], "shape": a}]
    assert sweep.previous_pick(rules, 1, 10, 10) == a
    assert sweep.previous_pick(rules, 1, 40, 10) == b
    assert sweep.previous_pick(rules, 1, 40, 100) == a
    assert sweep.previous_pick(rules, 4, 40, 100) is None


def test_the_sweep_report_names_every_option_that_tells_two_shapes_apart():
    """The md labels each candidate in a few words: two candidates that differ in one option (here ``shfl``, which
    the report once left out, so c0 and c1 of a sweep read the same) get different labels."""
    sweep = load_sweep_script()
    base = {"kernel": "core", "vec": 4, "warps": 4, "rows": 8, "k_range": 128, "evict_first": True, "dense": 85,
            "h2": True, "loads_first": True}
    variants = [base] + [{**base, key: value} for key, value in
                         (("shfl", True), ("pipe", True), ("f16", False), ("maxnreg", 96), ("dense", 95))]
    variants.append({k: v for k, v in base.items() if k not in ("dense", "loads_first")} | {"preload": 2, "lookahead": 64})
    labels = [sweep.short(v) for v in variants]
    assert len(set(labels)) == len(labels), labels
    assert sweep.short({**base, "shfl": True}).endswith("shfl")


def test_gemlite_is_timed_in_its_accurate_mode_when_its_default_misses_the_check(monkeypatch):
    """gemlite's default batch-1 GEMV (native bf16 atomics) can miss the 2 % check; the benchmark then times its
    fp32-atomic mode and keeps the default mode's time and error beside it, and restores the default after."""
    import torch

    gemv = load_gemv_script()
    monkeypatch.setattr(gemv, "time_graph", lambda fns: 10.0 if fake.bf16 else 12.0)
    w = torch.randn(64, 32).to(torch.bfloat16)
    x = torch.randn(1, 32).to(torch.bfloat16)
    exact = torch.nn.functional.linear(x.float(), w.float())

    class Fake:
        bf16 = True

        def set_native_atomic_bfp16(self, on):
            self.bf16 = on

        def layer(self, xx):  # 5 % of max |y| off in the default mode, exact in the fp32 one
            return exact + (0.05 * exact.abs().max() if self.bf16 else 0.0)

    fake = Fake()
    row = gemv.time_gemlite(fake, [fake.layer], x, w, print, "t")
    assert row["us"] == 12.0 and row["mode"] == "fp32 atomics" and row["error"] == 0.0
    assert row["us_bf16_atomics"] == 10.0 and abs(row["error_bf16_atomics"] - 0.05) < 1e-6
    assert fake.bf16 and gemv._gemlite_cell(row) == "12.0* (10.0, 5.0%)"
    fake.layer = lambda xx: exact * 1.1  # wrong in both modes: no time, a reason
    row = gemv.time_gemlite(fake, [fake.layer], x, w, print, "t")
    assert row["us"] is None and "wrong result" in row["failure"] and gemv._gemlite_cell(row) == "failed"
    fake.layer = lambda xx: exact  # right at once: timed in its default mode
    assert gemv.time_gemlite(fake, [fake.layer], x, w, print, "t") == {"us": 10.0, "error": 0.0}
