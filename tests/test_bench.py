"""`teal-quant bench` on the CPU (tiny shapes, no CUDA graphs): the JSON has every field with positive numbers, the
bytes it counts are the model's real bytes, the bf16 extrapolation is the stated linear fit, and bad input is one
line and exit 2."""

import json

import pytest
from test_cli import assert_one_line_error, teal_quant
from test_synthetic import tiny_config

FAST = ["--prompt-len", "6", "--new-tokens", "3", "--warmup", "1", "--profile-steps", "1", "--device", "cpu"]
HIDDEN, INTER, VOCAB, KV = 64, 128, 256, 32  # tiny_config's shapes (4 heads of 16, 2 kv heads)
PROJ_SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN)]


def int4_bytes(layers: int, group: int) -> int:
    """Weights a dense int4 decode step reads on the CPU (float32 model): packed rows + fp32 scales/zeros of every
    projection, lm_head and the norms (not the embedding table)."""
    per_layer = sum(k * n // 2 + 2 * (k // group) * n * 4 for k, n in PROJ_SHAPES) + 2 * HIDDEN * 4
    return layers * per_layer + VOCAB * HIDDEN * 4 + HIDDEN * 4


def dense_bytes(layers: int) -> int:
    per_layer = sum(k * n * 4 for k, n in PROJ_SHAPES) + 2 * HIDDEN * 4
    return layers * per_layer + VOCAB * HIDDEN * 4 + HIDDEN * 4


@pytest.fixture(scope="module")
def bench_artifact(tmp_path_factory):
    from teal_quant.compression.synthetic import SyntheticSpec, write_synthetic

    arch = tiny_config(tmp_path_factory.mktemp("arch2"))
    return write_synthetic(arch, tmp_path_factory.mktemp("b") / "art", SyntheticSpec(group_size=32, levels=(0.25, 0.5), default=0.5),
                           device="cpu")


def check_row(row: dict) -> None:
    assert row["status"] == "ok", row
    for key in ("prefill_ms", "decode_ms_per_token", "tokens_per_s", "weight_bytes_per_step", "bandwidth_gb_s"):
        assert row[key] > 0, (key, row)
    assert row["tokens_per_s"] == pytest.approx(1000.0 / row["decode_ms_per_token"])
    assert row["bandwidth_gb_s"] == pytest.approx(row["weight_bytes_per_step"] / row["decode_ms_per_token"] / 1e6)
    b = row["breakdown"]
    assert b["linear_ms"] > 0 and b["attention_ms"] > 0 and b["other_ms"] >= 0 and b["norm_rotary_ms"] >= 0
    assert sum(b[f"{k}_share"] for k in ("linear", "attention", "norm_rotary", "other")) == pytest.approx(1.0)
    assert b["launches_per_step"] >= 3  # at least the linear, attention and lm_head operators of a step
    top = [t["ms"] for t in b["top_other"]]
    assert top == sorted(top, reverse=True) and sum(top) <= b["other_ms"] + 1e-6
    assert all(t["calls"] > 0 for t in b["top_other"])


def test_bench_artifact_json(bench_artifact, tmp_path):
    out = tmp_path / "bench.json"
    result = teal_quant("bench", bench_artifact, *FAST, "--json", out)
    assert result.returncode == 0, result.stderr
    assert "decode ms/token" in result.stdout
    r = json.loads(out.read_text())
    assert (r["prompt_len"], r["new_tokens"], r["batch"], r["sparsity"], r["cuda_graph"]) == (6, 3, 1, 0.5, False)
    assert r["baselines"] == ["bf16", "int4"] and r["batches"] == [1]  # the CPU default: no tinygemm
    assert r["source"]["kind"] == "artifact" and r["device"] == "cpu"
    rows = {v["variant"]: v for v in r["variants"]}
    assert list(rows) == ["ours", "int4", "bf16"]
    for row in rows.values():
        check_row(row)
        assert row["extrapolated"] is None and row["peak_memory_bytes"] is None  # no GPU memory on the CPU
    ours, int4, bf16 = rows["ours"], rows["int4"], rows["bf16"]
    assert (ours["level"], int4["level"], bf16["level"]) == (0.5, 0.0, None)
    # Bytes: level 0 reads every packed row; ours skips the realized fraction of them; dense reads fp32 weights.
    assert int4["realized_sparsity"] < 1e-3
    assert 0.4 < ours["realized_sparsity"] < 0.6
    assert int4["weight_bytes_per_step"] == pytest.approx(int4_bytes(2, 32), rel=1e-3)
    packed = 2 * sum(k * n // 2 for k, n in PROJ_SHAPES)
    expected_ours = int4_bytes(2, 32) - ours["realized_sparsity"] * packed
    assert ours["weight_bytes_per_step"] == pytest.approx(expected_ours, rel=0.02)
    assert bf16["weight_bytes_per_step"] == dense_bytes(2)
    assert r["ratios"]["ours_over_int4"] == pytest.approx(ours["tokens_per_s"] / int4["tokens_per_s"])
    assert r["ratios"]["ours_over_bf16"] == pytest.approx(ours["tokens_per_s"] / bf16["tokens_per_s"])
    assert r["ratios_by_batch"] == {"1": r["ratios"]}


def test_bench_several_batch_sizes(bench_artifact, tmp_path):
    out = tmp_path / "bench.json"
    result = teal_quant("bench", bench_artifact, *FAST, "--batch", "1,2", "--baselines", "int4", "--json", out)
    assert result.returncode == 0, result.stderr
    r = json.loads(out.read_text())
    assert r["batches"] == [1, 2]
    assert [(v["variant"], v["batch"]) for v in r["variants"]] == [("ours", 1), ("ours", 2), ("int4", 1), ("int4", 2)]
    for v in r["variants"]:
        check_row({**v, "tokens_per_s": v["tokens_per_s"] / v["batch"]})
        assert v["tokens_per_s"] == pytest.approx(v["batch"] * 1000.0 / v["decode_ms_per_token"])
    rows = {(v["variant"], v["batch"]): v for v in r["variants"]}
    assert r["ratios_by_batch"]["2"]["ours_over_int4"] == pytest.approx(
        rows["ours", 2]["tokens_per_s"] / rows["int4", 2]["tokens_per_s"])


def test_depth_fit_is_the_line_through_two_depths_and_refuses_a_time_that_does_not_grow():
    from teal_quant.bench import depth_fit

    points = [{"layers": 2, "t": 3.0, "m": 10.0}, {"layers": 6, "t": 5.0, "m": 8.0}]
    assert depth_fit(points, "t", 80, grows=True) == pytest.approx(3.0 + 0.5 * 78)
    assert depth_fit(points, "m", 80) == pytest.approx(10.0 - 0.5 * 78)  # no growth asked: the plain line
    assert depth_fit(points, "m", 80, grows=True) is None  # a shorter time at more layers: noise, no line
    assert depth_fit([{"layers": 2, "t": 3.0}, {"layers": 6, "t": 3.0}], "t", 80, grows=True) is None
    assert depth_fit([{"layers": 2, "t": None}, {"layers": 6, "t": 3.0}], "t", 80, grows=True) is None


def test_bench_arch_extrapolates_bf16(tmp_path):
    arch = tiny_config(tmp_path / "arch", layers=4)
    out = tmp_path / "bench.json"
    result = teal_quant("bench", arch, *FAST, "--group-size", "32", "--sparsity", "0.3", "--baselines", "bf16",
                        "--bf16-extrapolate", "--extrapolate-layers", "1,2", "--json", out)
    assert result.returncode in (0, 1), result.stderr  # 1: a variant failed (only the refusal below may)
    r = json.loads(out.read_text())
    assert r["source"]["kind"] == "synthetic" and 0.3 in r["source"]["levels"] and r["sparsity"] == 0.3
    ours, bf16 = r["variants"]
    assert [ours["variant"], bf16["variant"]] == ["ours", "bf16"]
    check_row(ours)
    if bf16["status"] == "failed":  # a tiny layer's ms is within the noise of a busy 2-core box: the one honest refusal
        assert "not growing with depth" in bf16["error"], bf16
        assert result.returncode == 1  # a failed variant is the command's failure too
        return
    assert result.returncode == 0, result.stderr
    assert "extrapolated" in result.stdout
    points = bf16["extrapolated"]["points"]
    if bf16["prefill_ms"] is None:  # the prefill's two depths within the noise: shown as "-" (bench.depth_fit), the
        # step still extrapolated (a fresh-clone run on a busy box hit this)
        t1, t2 = (p["prefill_ms"] for p in points)
        assert t1 is None or t2 is None or t2 <= t1, points
        bf16 = {**bf16, "prefill_ms": 1.0}
    check_row(bf16)
    assert 0.2 < ours["realized_sparsity"] < 0.4
    assert [p["layers"] for p in points] == [1, 2]
    t1, t2 = (p["decode_ms_per_token"] for p in points)
    assert bf16["decode_ms_per_token"] == pytest.approx(t1 + (t2 - t1) * 3)  # t(4) of the line through t(1), t(2)
    assert bf16["weight_bytes_per_step"] == dense_bytes(4)  # the full model's bytes, not the reduced one's
    assert "linear in the layer count" in bf16["extrapolated"]["method"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["no-such-arch"], "arch 'no-such-arch': not llama3-8b or llama3-70b"),
        (["ART", "--batch", "0"], "--batch must be >= 1, got 0"),
        (["ART", "--batch", "1,x"], "is not a batch size or a list of them"),
        (["ART", "--batch", "2,2"], "--batch: each size once, got 2,2"),
        (["ART", "--baselines", "tinygemm"], "--baselines tinygemm: tinygemm (torch._weight_int4pack_mm) runs on CUDA only"),
        (["ART", "--new-tokens", "0"], "--new-tokens must be >= 1"),
        (["ART", "--baselines", "bf16,fp8"], "unknown baseline 'fp8'"),
        (["ART", "--sparsity", "0.33"], "--sparsity: sparsity level 0.33 is not in this artifact"),
        (["ART", "--extrapolate-layers", "6,2"], "need two layer counts 1 <= a < b"),
        (["ART", "--extrapolate-layers", "x"], "is not two layer counts"),
        (["ART", "--bf16-extrapolate"], "--extrapolate-layers: 6 is not fewer than the model's 2 layers"),
        (["ART", "--device", "cuda"], "no CUDA device"),
        (["ART", "--prompt-len", "600"], "exceed the model's max_position_embeddings 512"),
    ],
)
def test_bench_rejects_bad_input(args, expected, bench_artifact):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = teal_quant("bench", *[str(bench_artifact) if a == "ART" else a for a in args])
    assert_one_line_error(result, expected)


@pytest.mark.parametrize(
    "kernel, group",
    [
        ("_sgemv_kernel", "linear"),  # ours (Triton)
        ("_compact_kernel", "linear"),
        ("_sgemv_mma_kernel", "linear"),
        ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4>", "linear"),  # cuBLAS
        ("nvjet_hsh_64x8_64x16_2x1_v_bz_splitK_TNT", "linear"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "linear"),
        ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
        ("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4>>", "attention"),
        ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "attention"),
        ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "other"),  # RMSNorm
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "other"),
        ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>>>", "other"),
        ("_rms_norm_kernel", "norm_rotary"),  # ours (Triton, teal_quant.kernels.elementwise)
        ("_add_rms_norm_kernel", "norm_rotary"),
        ("_rotary_kernel", "norm_rotary"),
        ("_silu_mul_kernel", "other"),
        ("_decode_attention_kernel", "attention"),  # rotary + cache write + attention (kernels/attention_triton.py)
        ("_attention_combine_kernel", "attention"),
        ("void at::native::(anonymous namespace)::tinygemm_m16n8k16_chunk_kernel<(at::native::KReductionType)0>",
         "linear"),
        ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "allreduce"),  # --tp
    ],
)
def test_kernel_groups(kernel, group):
    from teal_quant.bench import kernel_group

    assert kernel_group(kernel) == group


def test_operator_groups():
    from teal_quant.bench import operator_group

    assert [operator_group(n) for n in ("aten::linear", "teal_quant::sparse_gemv", "aten::mm",
                                        "aten::scaled_dot_product_attention", "aten::mul", "aten::index_copy_",
                                        "c10d::allreduce_")] == \
        ["linear", "linear", "linear", "attention", "other", "other", "allreduce"]


# --- reports of a bench result: targets met or not, markdown rows (benchmarks/e2e.py writes them for the GPU runs,
# benchmarks/results/e2e_h200.*); a bench-shaped result (the keys checked above) goes through check_targets and
# markdown_lines.


def variant(name, ms, level=None, top=None, batch=1):
    return {"variant": name, "level": level, "status": "ok", "batch": batch, "realized_sparsity": level, "prefill_ms": 10.0,
            "decode_ms_per_token": ms, "tokens_per_s": 1000.0 / ms, "weight_bytes_per_step": 3e9,
            "bandwidth_gb_s": 3e9 / ms / 1e6, "peak_memory_bytes": 6e9, "extrapolated": None,
            "breakdown": {"linear_ms": 1.0, "attention_ms": 0.2, "norm_rotary_ms": 0.1, "other_ms": 1.0,
                          "launches_per_step": 836.0,
                          "top_other": top or []}}


def bench_result(ours_ms, int4_ms, bf16_ms):
    rows = [variant("ours", ours_ms, 0.5, [{"name": "_rms_norm_kernel", "ms": 0.105, "calls": 65}]),
            variant("int4", int4_ms, 0.0), variant("bf16", bf16_ms)]
    return {"batch": 1, "variants": rows,
            "ratios": {"ours_over_bf16": bf16_ms / ours_ms, "ours_over_int4": int4_ms / ours_ms}}


def test_targets_are_met_only_at_or_above_the_wanted_value():
    from teal_quant.bench import check_targets

    targets = {"ours_over_bf16": 3.0, "ours_over_int4": 1.8, "ours_tokens_per_s": 300.0}
    got = check_targets(bench_result(3.321, 3.872, 6.143), targets)
    assert got["ours_over_bf16"] == {"want": 3.0, "got": pytest.approx(6.143 / 3.321), "bound": ">=", "met": False}
    assert got["ours_over_int4"]["met"] is False
    assert got["ours_tokens_per_s"]["got"] == pytest.approx(301.1, abs=0.1) and got["ours_tokens_per_s"]["met"] is True
    assert check_targets(bench_result(2.0, 3.6, 6.0), targets)["ours_over_bf16"]["met"] is True
    assert check_targets(None, targets)["ours_over_bf16"] == {"want": 3.0, "got": None, "bound": ">=", "met": None}


def test_targets_per_batch_variant_speed_and_nonlinear_time():
    from teal_quant.bench import check_targets

    r = bench_result(3.321, 3.872, 6.143)
    r["variants"] += [variant("ours", 5.0, 0.5, batch=4), variant("bf16", 4.0, batch=4)]
    r["ratios_by_batch"] = {"1": r["ratios"], "4": {"ours_over_bf16": 4.0 / 5.0}}
    got = check_targets(r, {"ours_over_bf16@4": 1.0, "bf16_tokens_per_s": 150.0, "tinygemm_tokens_per_s": 314.0,
                            "ours_nonlinear_ms": 1.3, "ours_nonlinear_ms@4": 1.0})
    assert got["ours_over_bf16@4"]["got"] == pytest.approx(0.8) and got["ours_over_bf16@4"]["met"] is False
    assert got["bf16_tokens_per_s"]["got"] == pytest.approx(1000 / 6.143) and got["bf16_tokens_per_s"]["met"] is True
    assert got["tinygemm_tokens_per_s"] == {"want": 314.0, "got": None, "bound": ">=", "met": None}  # no such row
    # attention 0.2 + norm+rotary 0.1 + other 1.0 = 1.3 ms: an upper bound, met at equality
    assert got["ours_nonlinear_ms"] == {"want": 1.3, "got": pytest.approx(1.3), "bound": "<=", "met": True}
    assert got["ours_nonlinear_ms@4"]["met"] is False


def test_markdown_states_rows_kernels_targets_and_comparison_runs():
    from teal_quant.bench import check_targets, markdown_lines, targets_markdown

    r = bench_result(3.321, 3.872, 6.143)
    text = "\n".join(markdown_lines(r))
    assert "| 1 | ours | 0.5 | 0.500 | 10.0 | 3.321 | 301.1 |" in text
    assert "1.000 / 0.200 / 0.100 / 1.000 (836 kernels)" in text
    assert "(836 kernels)" in text and "`_rms_norm_kernel` 0.105 / 65" in text
    assert "ours_over_bf16 >= 3: got 1.85 -> NOT met" in targets_markdown(check_targets(r, {"ours_over_bf16": 3.0}))
    assert targets_markdown(check_targets(r, {})) == "targets: none (a comparison run)"
