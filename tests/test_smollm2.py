"""The real model, end to end on the CPU: SmolLM2-135M -> int4 g64 + TEAL greedy -> load -> generate -> WikiText-2.

Bounds were set from measurement (see the closing note of issue 2): w4 g64 RTN at level 0 and TEAL at 0.4, every
token sparsified, WikiText-2 test tokens in windows of 512: the first 4,096 tokens then, the first 2,048 now (half the
evaluation time; the perplexity bounds scaled with the measured ratios, below).
"""

import json

import pytest
from _support import CALIBRATION_DIR, SMOLLM2_GGUF, WIKITEXT, smollm2_dir

import teal_quant

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "w4-s40"
    recipe = teal_quant.Recipe.from_yaml_text(f"""
model: {{source: '{smollm2_dir()}', gguf_file: {SMOLLM2_GGUF}, dtype: float16}}
calibration:
  source: {{kind: text_files, paths: ['{CALIBRATION_DIR / "Pride_and_Prejudice.txt"}']}}
  samples: 8
  seq_len: 256
quantization: {{bits: 4, group_size: 64}}
sparsity: {{levels: [0.25, 0.4, 0.5], default: 0.4, greedy: {{step: 0.1, tokens: 512}}}}
output: {{dir: '{out}'}}
""")
    return teal_quant.compress(recipe)


@pytest.fixture(scope="module")
def wikitext_rows(smollm2_artifact):
    from teal_quant.compression.recipe import TextFilesSource
    from teal_quant.evaluate import evaluate_artifact

    source = TextFilesSource(kind="text_files", paths=[str(WIKITEXT)])
    return evaluate_artifact(smollm2_artifact, source, tokens=2048, window=512, levels=[0.0, 0.4], device="cpu",
                             baseline=True)


def test_generates_text(smollm2_artifact):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_artifact)
    model = teal_quant.load(smollm2_artifact, device="cpu")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert 0.3 < teal_quant.realized_sparsity(model) < 0.5


def test_realized_sparsity_and_perplexity_on_wikitext(wikitext_rows):
    """Measured (2026-12-02, 1 CPU thread): dense 30.33, level 0 40.54 (x1.34), level 0.4 46.12 (x1.52), realized
    0.390 on these 2,048 tokens; on 4,096 tokens x1.40 and x1.60 against bounds x1.6 and x1.9. The bounds keep that
    headroom (x1.14 and x1.19 over the measured ratio): x1.55 and x1.8."""
    dense, level0, level40 = wikitext_rows
    assert dense["level"] is None and level0["level"] == 0.0 and level40["level"] == 0.4
    assert dense["tokens"] == level0["tokens"] == level40["tokens"] == 4 * 511
    assert level40["realized_sparsity"] == pytest.approx(0.40, abs=0.03)
    assert level0["realized_sparsity"] == pytest.approx(0.0, abs=1e-4)
    assert dense["perplexity"] < level0["perplexity"] < level40["perplexity"]
    assert level0["perplexity"] < 1.55 * dense["perplexity"]
    assert level40["perplexity"] < 1.8 * dense["perplexity"]


def test_greedy_allocation_beats_uniform(smollm2_artifact):
    """The lazy greedy search is a heuristic on 1,024 tokens: summed over the layers it beats the uniform allocation
    at every level, and no single layer is more than 2 % worse than uniform (measured: 1.1 % at worst, layer 2 s25)."""
    report = json.loads((smollm2_artifact / "calibration_report.json").read_text())
    assert len(report["layers"]) == 30
    for j in range(1, len(report["levels"])):
        greedy = [layer["block_error"]["greedy"][j] for layer in report["layers"]]
        uniform = [layer["block_error"]["uniform"][j] for layer in report["layers"]]
        assert sum(greedy) < sum(uniform), (report["levels"][j], sum(greedy), sum(uniform))
        for i, (g, u) in enumerate(zip(greedy, uniform)):
            assert g <= 1.02 * u, (i, report["levels"][j], g, u)


def test_artifact_is_smaller_than_the_dense_model(smollm2_artifact):
    art = teal_quant.artifact.format.read_artifact(smollm2_artifact)
    tensors = art.tensors()
    quantized_bytes = sum(t.numel() * t.element_size() for n, t in tensors.items() if n.split(".")[-1] in
                          ("qweight", "scales", "zeros", "thresholds"))
    dense_projection_params = sum(t.numel() * 8 for n, t in tensors.items() if n.endswith(".qweight"))
    # int4 + fp16 scale and zero per 64 weights: 4.5 bits instead of 16
    assert quantized_bytes / (2 * dense_projection_params) == pytest.approx(4.5 / 16, rel=0.02)
