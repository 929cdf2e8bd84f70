"""`teal-quant generate` as a user runs it (subprocess, CPU): the streamed text is the artifact tokenizer's decoding
of teal_quant.generate's tokens, the last line reports tok/s and realized sparsity, a seed reproduces a sampled
text, and bad input is one line with exit 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "TEAL_QUANT_QUIET": "1"}
PROMPT = "ROMEO: What light"


def teal_quant_cli(*args):
    return subprocess.run([sys.executable, "-m", "teal_quant.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)


def split_output(stdout: str) -> tuple[str, str]:
    """(streamed text, summary line)."""
    text, _, summary = stdout.rstrip("\n").rpartition("\n")
    return text, summary


def test_greedy_text_is_the_decoding_of_generate(tiny_artifact):
    from transformers import AutoTokenizer

    import teal_quant

    result = teal_quant_cli("generate", tiny_artifact, "--prompt", PROMPT, "--max-new-tokens", 12, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    text, summary = split_output(result.stdout)
    tok = AutoTokenizer.from_pretrained(tiny_artifact)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    model = teal_quant.load(tiny_artifact, device="cpu")
    out = teal_quant.generate(model, ids, 12, eos_token_id=tok.eos_token_id)
    assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    m = re.fullmatch(r"(\d+) new tokens, ([\d.]+) tok/s decode \(prefill of (\d+) tokens [\d.]+ s\); "
                     r"sparsity level 0.4, realized ([\d.]+)", summary)
    assert m, summary
    new = out[0, ids.shape[1]:]
    hits = (new == tok.eos_token_id).nonzero()
    expected = int(hits[0]) + 1 if hits.numel() else new.numel()  # streaming stops at EOS; generate pads after it
    assert int(m[1]) == expected and int(m[3]) == ids.shape[1] and float(m[2]) > 0
    assert 0.25 < float(m[4]) < 0.55  # counted over the decode steps at level 0.4


def test_sampling_follows_the_seed_and_the_level(tiny_artifact):
    args = ["generate", tiny_artifact, "--prompt", PROMPT, "--max-new-tokens", 10, "--temperature", "0.9",
            "--top-k", "40", "--top-p", "0.95", "--device", "cpu"]
    a, b = teal_quant_cli(*args, "--seed", 1), teal_quant_cli(*args, "--seed", 1)
    c = teal_quant_cli(*args, "--seed", 2, "--sparsity", "0")
    for r in (a, b, c):
        assert r.returncode == 0, r.stderr
    assert split_output(a.stdout)[0] == split_output(b.stdout)[0]
    assert "sparsity level 0, realized 0.000" in split_output(c.stdout)[1]


@pytest.mark.parametrize("args,expected", [
    (["--top-k", "5"], "--top-k / --top-p apply to sampling"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "1", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--sparsity", "0.33"], "sparsity level 0.33 is not in this artifact"),
    (["--chat"], "--chat: this artifact's tokenizer has no chat template"),
    (["--max-new-tokens", "100000"], "exceed the model's max_position_embeddings"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_artifact, args, expected):
    result = teal_quant_cli("generate", tiny_artifact, "--prompt", PROMPT, "--device", "cpu", *args)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("teal-quant: error: ") and expected in lines[0], result.stderr


def test_missing_artifact_is_bad_input(tmp_path):
    result = teal_quant_cli("generate", tmp_path / "nope", "--prompt", "x")
    assert result.returncode == 2 and "no such directory" in result.stderr, result.stderr


def test_empty_prompt_is_bad_input(tiny_artifact):
    result = teal_quant_cli("generate", tiny_artifact, "--prompt", "   ", "--device", "cpu")
    assert result.returncode == 2 and "--prompt is empty" in result.stderr, result.stderr
