"""Distributed calibration (torchrun, gloo on the CPU, 2 processes): the artifact equals one process's, and the sums
the ranks share (greedy block errors, GPTQ Hessians) equal the one-process sums within float reduction order."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _support import tiny_recipe_text
from safetensors.torch import load_file

from teal_quant.testing import run_ranks

# Thresholds come from histogram counts (exact integers, summed exactly) and an allocation taken from sums of squared
# errors in float64; only a near-tie between greedy candidates could change them, so they must agree closely.
THRESHOLD_RTOL = 1e-5


def torchrun(args: list[str], cwd: Path, timeout: float = 180, *, script: bool = False) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m teal_quant.cli ARGS` with this interpreter; script=True:
    `torchrun ... --no-python teal-quant ARGS` (the installed command)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    entry = ["--no-python", shutil.which("teal-quant", path=str(Path(sys.executable).parent))] if script else \
        ["-m", "teal_quant.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *entry, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def artifact_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def assert_same_artifact(reference: Path, out: Path) -> dict[str, torch.Tensor]:
    """`out` holds the one-process artifact's tensors: packed weights bit for bit, thresholds within the float
    reduction order of the all-reduced sums. Returns the reference's tensors."""
    one, two = artifact_tensors(reference), artifact_tensors(out)
    assert one.keys() == two.keys()
    for key, t in one.items():
        if key.endswith(".thresholds"):
            torch.testing.assert_close(two[key], t, rtol=THRESHOLD_RTOL, atol=0, msg=key)
        else:
            assert t.dtype == two[key].dtype and torch.equal(t, two[key]), key
    return one


def test_torchrun_run_writes_the_one_process_artifact(tiny_llama, tiny_artifact, tmp_path):
    """The tiny recipe (RTN int4, greedy) as 2 torchrun ranks against the session's one-process artifact of the same
    recipe: every packed weight, scale, zero and norm byte-identical, thresholds within THRESHOLD_RTOL; the report
    says who calibrated on what; rank 0 alone prints the progress and the summary."""
    out = tmp_path / "tp-out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(tiny_llama, out))
    proc = torchrun(["run", str(recipe)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("teal-quant run:") == 1 and proc.stdout.count("compressing layers: 2/2") == 1
    assert "Traceback" not in proc.stderr

    one = assert_same_artifact(tiny_artifact, out)
    assert sum(k.endswith(".qweight") for k in one) == 14
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["world_size"] == 2
    assert all(r.pop("peaks")["host_rss_bytes"] > 0 for r in report["ranks"])  # each rank's own peak memory
    assert report["ranks"] == [{"rank": 0, "sequences": [0, 2, 4, 6], "tokens": 4 * 64},
                               {"rank": 1, "sequences": [1, 3, 5, 7], "tokens": 4 * 64}]
    single = json.loads((tiny_artifact / "calibration_report.json").read_text())
    assert single["world_size"] == 1 and single["ranks"] == [{"rank": 0, "sequences": list(range(8)), "tokens": 512}]
    for a, b in zip(single["layers"], report["layers"]):
        assert a["sparsity"] == b["sparsity"]
        for kind in a["block_error"]:
            assert b["block_error"][kind] == pytest.approx(a["block_error"][kind], rel=1e-6, abs=1e-12)


def test_torchrun_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_llama, tmp_path):
    """1 calibration sample for 2 ranks (through the `teal-quant` command under torchrun): both ranks find it, rank 0
    says it once, each exits 2, nothing is written."""
    out = tmp_path / "never"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(tiny_llama, out, calibration="calibration:\n  source: {kind: text_files, paths: ['"
                                       + str(Path(__file__).resolve().parents[2] / "data/calibration/tinyshakespeare.txt")
                                       + "']}\n  samples: 1\n  seq_len: 64"))
    proc = torchrun(["run", str(recipe)], tmp_path, timeout=120, script=True)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("teal-quant")]
    assert ours == ["teal-quant: error: calibration.samples 1 is fewer than the 2 processes of this job: each rank "
                    "calibrates on its own sequences (raise calibration.samples or use fewer processes)"]
    assert proc.stderr.count("exitcode  : 2") >= 1 and proc.returncode != 0
    assert not out.exists() and not list(tmp_path.glob(".never*"))


# ---------------------------------------------------------------------------------------------- the shared sums
def _tiny_layer(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from teal_quant.compression.calibrate.layer import attach_simulated

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    layer = model.model.layers[0]
    hidden = torch.randn(5, 32, 64, generator=torch.Generator().manual_seed(seed + 1))
    position_embeddings = model.model.rotary_emb(hidden[:1], torch.arange(32)[None])
    return layer, attach_simulated(layer), hidden, position_embeddings


def _shared_sums_rank() -> dict:
    """Each rank computes the one-process answer on all 5 sequences, then its distributed share (strided)."""
    from teal_quant import distributed
    from teal_quant.compression.calibrate.layer import allocate, capture_histograms
    from teal_quant.compression.hidden import HiddenStates
    from teal_quant.compression.quantize.layer import input_hessians
    from teal_quant.compression.stream import SINGLE_PROCESS, LayerPasses, LayerWork, _summed, distinct_histograms

    world = distributed.init()
    layer, sims, hidden, pe = _tiny_layer()
    mine = hidden[world.split(hidden.shape[0])]

    def passes_over(h: torch.Tensor) -> LayerPasses:
        buffer = HiddenStates.in_memory(tuple(h.shape), torch.float32)
        buffer.write_input(0, h)
        return LayerPasses(layer, pe, buffer, torch.device("cpu"), torch.float32, batch_size=2)

    out = {}
    hists = capture_histograms(passes_over(hidden), sims, hidden, "cpu")
    local_hists = capture_histograms(passes_over(mine), sims, mine, "cpu")
    for h in distinct_histograms(local_hists):
        world.all_reduce(h.counts)
    out["hist_equal"] = all(torch.equal(hists[p].counts, local_hists[p].counts) for p in hists)
    # greedy over the first sequence (rank 1 holds none of it and adds zeros to the sums), then over the first 3
    levels = [0.0, 0.25, 0.5]
    for n_subset in (1, 3):
        kwargs = dict(method="greedy", step=0.25, last_fraction=0.5, search="exact")
        one = allocate(layer, sims, hists, hidden[:n_subset], pe, levels, **kwargs)
        dist = allocate(layer, sims, hists, mine[: world.local_count(n_subset)], pe, levels, reduce=_summed(world),
                        **kwargs)
        out[f"greedy_{n_subset}"] = {"same_sparsity": one.sparsities == dist.sparsities,
                                     "errors": (one.errors, dist.errors), "local": world.local_count(n_subset)}
    # GPTQ's Hessians over the first 3 global samples: H = 2/n sum x x^T, the ranks' sums added
    h_one = input_hessians(LayerWork(0, layer, sims, one, levels, passes_over(hidden), SINGLE_PROCESS), None, 3)
    h_dist = input_hessians(LayerWork(0, layer, sims, one, levels, passes_over(mine), world), None, 3)
    out["hessian_rel"] = max(float((h_dist[p] - h_one[p]).norm() / h_one[p].norm()) for p in h_one)
    return out


def test_greedy_errors_histograms_and_hessians_summed_over_ranks_equal_one_process():
    results = run_ranks(_shared_sums_rank, 2, timeout=120)
    for rank, r in enumerate(results):
        assert r["hist_equal"]  # exact: integer counts in float64
        for n_subset in (1, 3):
            g = r[f"greedy_{n_subset}"]
            assert g["local"] == len(range(rank, n_subset, 2))
            assert g["same_sparsity"]
            one, dist = g["errors"]
            for kind in one:
                assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) for a, b in zip(one[kind], dist[kind]))
        assert r["hessian_rel"] < 1e-6


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first listed before theirs."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out


def _layers_done(out: Path) -> int:
    for p in sorted(out.parent.glob(f".{out.name}.partial-*")):
        try:
            return json.loads((p / ".resume" / "state.json").read_text())["progress"]["layers_done"]
        except (OSError, ValueError, KeyError):
            pass
    return 0


def test_torchrun_killed_after_a_layer_resumes_to_the_same_artifact(tiny_llama, tiny_artifact, tmp_path):
    """SIGKILL the whole torchrun job once layer 0 is checkpointed (rank 0's tensors and state, rank 1's hidden states
    in the staging folder's .resume/rank-1), then `--resume` under torchrun: the one-process artifact again."""
    import signal
    import time

    out = tmp_path / "tp-out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(tiny_llama, out))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "teal_quant.cli",
           "run", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while _layers_done(out) < 1:
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before layer 0"
            time.sleep(0.01)
    finally:  # the agent and both ranks (torchrun starts each rank in a session of its own)
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (out / "config.json").exists()
    partial = next(out.parent.glob(f".{out.name}.partial-*"))
    assert (partial / ".resume" / "rank-1").is_dir()
    proc = torchrun(["run", str(recipe), "--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_artifact(tiny_artifact, out)
    assert json.loads((out / "calibration_report.json").read_text())["world_size"] == 2
