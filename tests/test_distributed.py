"""teal_quant/distributed.py: the world in one process (every collective a no-op), the strided token split, and, over
2 real gloo processes, sums, broadcasts and agreements (an error on one rank is raised on every rank, reported once).
The distributed pipeline and tensor-parallel decoding: tests/compression/test_distributed_pipeline.py and
tests/runtime/test_tensor_parallel.py; `bench --tp` under torchrun: below."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from teal_quant import distributed
from teal_quant.distributed import World
from teal_quant.errors import TealQuantError
from teal_quant.testing import run_ranks

ROOT = Path(__file__).resolve().parents[1]


def test_one_process_is_rank_0_of_1_and_collectives_do_nothing():
    world = distributed.current()
    assert (world.rank, world.size, world.is_main, world.distributed) == (0, 1, True, False)
    t = torch.tensor([1.5, 2.0])
    assert distributed.all_reduce_(t) is t and t.tolist() == [1.5, 2.0]
    assert world.all_reduce(t) is t
    assert distributed.all_reduce_floats([1, 2.5]) == [1.0, 2.5]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    with pytest.raises(TealQuantError, match="bad"):
        with distributed.agreement("x"):
            raise TealQuantError("bad")


@pytest.mark.parametrize("n,size", [(8, 2), (7, 2), (5, 4), (3, 4), (128, 8)])
def test_strided_split_covers_every_sequence_once_and_spreads_every_prefix(n, size):
    worlds = [World(rank=r, size=size) for r in range(size)]
    owned = [list(range(n))[w.split(n)] for w in worlds]
    assert sorted(i for part in owned for i in part) == list(range(n))
    for prefix in range(n + 1):  # the first `prefix` global sequences are each rank's first local_count ones
        counts = [w.local_count(prefix) for w in worlds]
        assert sum(counts) == prefix and max(counts) - min(counts) <= 1
        for w, part in zip(worlds, owned):
            assert part[: w.local_count(prefix)] == [i for i in part if i < prefix]


def _collectives_rank() -> dict:
    world = distributed.init()
    t = torch.full((3,), float(world.rank + 1), dtype=torch.float64)
    world.all_reduce(t)
    floats = distributed.all_reduce_floats([world.rank, 0.5])
    obj = distributed.broadcast_object({"from": world.rank})
    outcome = {}
    for failing in (1, 0, None):
        try:
            with distributed.agreement("checking", world):
                if world.rank == failing:
                    raise TealQuantError(f"bad input on {world.rank}")
                if failing is None and world.rank == 1:
                    raise ZeroDivisionError("boom")
            outcome[failing] = "ok"
        except Exception as e:  # noqa: BLE001 - the test reads what each rank raised
            outcome[failing] = (type(e).__name__, str(e), distributed.reported_by_main(e, world))
    return {"sum": t.tolist(), "floats": floats, "obj": obj, "outcome": outcome, "size": world.size}


def test_collectives_and_agreements_over_two_processes():
    r0, r1 = run_ranks(_collectives_rank, 2, timeout=90)
    for r in (r0, r1):
        assert r["size"] == 2 and r["sum"] == [3.0] * 3 and r["floats"] == [1.0, 1.0] and r["obj"] == {"from": 0}
    # rank 1's bad input: rank 0 raises it as a PeerInputError naming rank 1 (and prints it), rank 1 re-raises its
    # own error quietly
    assert r0["outcome"][1] == ("PeerInputError", "rank 1: bad input on 1", False)
    assert r1["outcome"][1] == ("TealQuantError", "bad input on 1", True)
    assert r0["outcome"][0] == ("TealQuantError", "bad input on 0", False)
    assert r1["outcome"][0] == ("PeerInputError", "bad input on 0", True)
    # an internal error on rank 1: rank 0 raises PeerInternalError with its type (exit 1, not 2)
    assert r0["outcome"][None] == ("PeerInternalError", "rank 1: ZeroDivisionError: boom", False)
    assert r1["outcome"][None] == ("ZeroDivisionError", "boom", True)


# ---------------------------------------------------------------------------------------------- bench --tp
def _torchrun(args: list[str], cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m teal_quant.cli ARGS` with this interpreter (not the `torchrun` script, whose
    shebang may name another environment)."""
    env = {**os.environ, "TEAL_QUANT_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "teal_quant.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_arch_json(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("arch") / "config.json"
    LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512).to_json_file(path)
    return path


BENCH_ARGS = ["--device", "cpu", "--group-size", "32", "--prompt-len", "8", "--new-tokens", "6", "--warmup", "2",
              "--profile-steps", "2", "--baselines", "int4"]


def test_bench_tp_under_torchrun_reports_allreduce_and_one_process_tokens(tiny_arch_json, tmp_path):
    """`teal-quant bench ARCH --tp 2` as 2 torchrun ranks on the CPU: rank 0 alone writes the JSON; each variant's
    breakdown has an all-reduce share; the greedy tokens of the timed decode are one process's."""
    from teal_quant.bench import BenchOptions, run_bench
    from teal_quant.compression.synthetic import SyntheticSpec

    proc = _torchrun(["bench", str(tiny_arch_json), "--tp", "2", *BENCH_ARGS, "--json", str(tmp_path / "tp.json")],
                     tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "tp.json").read_text())
    assert result["tensor_parallel"] == 2
    assert [v["variant"] for v in result["variants"]] == ["ours", "int4"]
    assert all(v["status"] == "ok" and v["breakdown"]["allreduce_ms"] > 0 for v in result["variants"])
    assert proc.stdout.count("teal-quant bench:") == 1  # one table, from rank 0
    one = run_bench(str(tiny_arch_json), BenchOptions(prompt_len=8, new_tokens=6, warmup=2, profile_steps=2,
                                                      baselines=("int4",), device="cpu",
                                                      synthetic=SyntheticSpec(group_size=32)))
    for tp_row, one_row in zip(result["variants"], one["variants"]):
        assert len(tp_row["tokens"]) == 6 and tp_row["tokens"] == one_row["tokens"]
        assert one_row["breakdown"]["allreduce_ms"] == 0


def test_bench_tp_without_torchrun_or_with_a_bad_shape_is_one_line(tiny_arch_json, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "teal_quant.cli", "bench", str(tiny_arch_json), "--tp", "2",
                           *BENCH_ARGS], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("teal-quant: error: --tp 2: run it as `torchrun --nproc-per-node 2 -m "
                                   "teal_quant.cli bench ... --tp 2` (WORLD_SIZE is 1)")
    # under torchrun, a group size that does not divide the model is found by both ranks: said once, exit 2 each
    proc = _torchrun(["bench", str(tiny_arch_json), "--tp", "2", *BENCH_ARGS[:2], "--group-size", "128"], tmp_path)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("teal-quant")]
    assert ours == ["teal-quant: error: --group-size: 128 does not divide in_features 64 of self_attn.q_proj"]
    assert "exitcode  : 2" in proc.stderr and proc.returncode != 0
