"""The on-disk format: int4 packing layout, sharding + index, atomic writes, validation of corrupt artifacts."""

import json
import logging

import pytest
import torch
from teal_quant.kernels import pack, pack_int4, unpack, unpack_int4

from teal_quant.artifact.format import (
    ArtifactWriter,
    TealQuantConfig,
    layer_key_prefix,
    linear_key,
    linear_of,
    linear_tensor_names,
    read_artifact,
    stored_float32,
)
from teal_quant.errors import ArtifactError


def test_int4_packing_layout_matches_the_contract():
    K, N = 3, 16
    q = torch.randint(0, 16, (K, N), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (K, N // 8)
    for k in range(K):
        for j in range(N // 8):
            word = int(packed[k, j]) & 0xFFFFFFFF
            assert [(word >> (4 * i)) & 0xF for i in range(8)] == q[k, 8 * j : 8 * j + 8].tolist()


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_round_trip(bits):
    q = torch.randint(0, 2**bits, (64, 40), dtype=torch.uint8)
    assert torch.equal(unpack(pack(q, bits), bits), q)
    if bits == 4:
        assert torch.equal(unpack_int4(pack_int4(q)), q)


def _quant(**kw):
    base = dict(bits=4, group_size=32, sym=False, quantizer="rtn", levels=[0.0, 0.4], default=0.4, allocation="greedy")
    base.update(kw)
    return TealQuantConfig(**base)


def _write(dest, max_shard_size=1000, overwrite=False):
    w = ArtifactWriter(dest, max_shard_size=max_shard_size, overwrite=overwrite)
    with w:
        w.add({f"t{i}": torch.full((100,), float(i)) for i in range(5)})  # 400 B each -> 3 shards of <= 1000 B
        w.write_json("config.json", {"model_type": "llama", "quantization_config": _quant().to_dict()})
        return w.commit()


def test_writer_shards_and_index(tmp_path):
    dest = _write(tmp_path / "a")
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 5 * 400
    art = read_artifact(dest)
    assert {n: float(t[0]) for n, t in art.tensors().items()} == {f"t{i}": float(i) for i in range(5)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_writer_is_atomic_on_failure(tmp_path):
    dest = tmp_path / "b"
    with pytest.raises(RuntimeError):
        with ArtifactWriter(dest, max_shard_size=1000) as w:
            w.add({"x": torch.ones(10)})
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_to_overwrite_unless_asked(tmp_path):
    dest = _write(tmp_path / "c")
    with pytest.raises(ArtifactError, match="already exists"):
        ArtifactWriter(dest, max_shard_size=1000)
    (dest / "marker").write_text("old")
    _write(dest, overwrite=True)
    assert not (dest / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_quant_config_round_trip_and_validation():
    q = _quant(group_size=-1, bits=8)
    d = q.to_dict()
    assert d["packing"] == "int8" and d["quant_method"] == "teal_quant" and d["format_version"] == 1
    assert TealQuantConfig.from_dict(d) == q
    for broken, msg in [
        ({**d, "quant_method": "gptq"}, "not a teal-quant artifact"),
        ({**d, "format_version": 9}, "format_version 9 is not supported"),
        ({**d, "packing": "int4-n8"}, "not supported"),
        ({k: v for k, v in d.items() if k != "bits"}, "incomplete"),
        ({**d, "sparsity": {**d["sparsity"], "levels": [0.4, 0.2]}}, "must start at 0"),
        ({**d, "sparsity": {**d["sparsity"], "default": 0.3}}, "not in this artifact"),
    ]:
        with pytest.raises(ArtifactError, match=msg):
            TealQuantConfig.from_dict(broken)


def test_read_artifact_detects_corruption(tmp_path):
    dest = _write(tmp_path / "d")
    shard = dest / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 50])
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        read_artifact(dest)
    shard.unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        read_artifact(dest)
    (dest / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_artifact(dest)
    with pytest.raises(ArtifactError, match="no such directory"):
        read_artifact(tmp_path / "nothing")


def test_a_single_unindexed_shard_is_read(tmp_path):
    """transformers' save_pretrained writes model.safetensors without an index when everything fits in one file."""
    from safetensors.torch import save_file

    dest = tmp_path / "single"
    dest.mkdir()
    (dest / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": _quant().to_dict()}))
    save_file({"a": torch.arange(4.0)}, str(dest / "model.safetensors"))
    art = read_artifact(dest)
    assert art.weight_map == {"a": "model.safetensors"} and torch.equal(art.tensors()["a"], torch.arange(4.0))
    (dest / "model.safetensors").write_bytes(b"\x10" * 12)
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        read_artifact(dest)


def test_tensor_keys_are_named_in_one_place():
    up = "model.layers.3.mlp.up_proj"
    assert layer_key_prefix(3) + "mlp.up_proj" == up
    assert linear_key(up, "qweight") == up + ".qweight" and linear_of(up + ".qweight", "qweight") == up
    assert linear_of(up + ".scales", "qweight") is None and linear_of("qweight", "qweight") is None
    assert linear_tensor_names(up) == [f"{up}.{s}" for s in ("qweight", "scales", "zeros", "thresholds")]
    assert linear_tensor_names(up, bias=True, channel_scale=True, perm=True)[4:] == [
        f"{up}.bias", f"{up}.channel_scale", f"{up}.perm"]
    with pytest.raises(ValueError, match="'qweights' is not a tensor of a quantized linear"):
        linear_key(up, "qweights")
    assert stored_float32(up + ".thresholds") and stored_float32(up + ".channel_scale")
    assert not stored_float32(up + ".scales") and not stored_float32("model.norm.weight")


# --- the destination rules, the rename, modes, shard paths, up-front tensor checks (docs/safety.md) ---

def test_overwrite_replaces_only_an_artifact_and_never_the_source(tmp_path):
    from teal_quant.artifact.format import check_destination

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a teal-quant artifact"):
        ArtifactWriter(user, max_shard_size=1000, overwrite=True)
    plain = tmp_path / "plain"
    plain.write_text("mine")
    with pytest.raises(ArtifactError, match="is a file"):
        ArtifactWriter(plain, max_shard_size=1000, overwrite=True)
    model = tmp_path / "model"
    model.mkdir()
    for out in (model, model / "sub", tmp_path):
        with pytest.raises(ArtifactError, match="model source"):
            check_destination(out, overwrite=True, sources=[model])
    with pytest.raises(ArtifactError, match="is a file, not a folder"):
        check_destination(plain / "x", overwrite=False)
    assert (user / "notes.txt").read_text() == "mine" and plain.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "plain", "user"]  # nothing staged


@pytest.mark.parametrize("intruder", ["empty_dir", "file", "artifact"])
def test_commit_renames_only_onto_nothing(tmp_path, intruder):
    """Something that appears at the destination during a run is left alone (an empty folder too, which a plain
    rename(2) would replace); the new artifact is kept under the name the error gives."""
    dest = tmp_path / "out"
    w = ArtifactWriter(dest, max_shard_size=1000)
    w.add({"a": torch.ones(3)})
    w.write_json("config.json", {"model_type": "llama", "quantization_config": _quant().to_dict()})
    if intruder == "empty_dir":
        dest.mkdir()
    elif intruder == "file":
        dest.write_text("someone else's")
    else:
        _write(dest)
    before = sorted(p.name for p in dest.iterdir()) if dest.is_dir() else dest.read_text()
    with pytest.raises(ArtifactError, match="appeared while this run was going") as e:
        with w:
            w.commit()
    kept = tmp_path / f"out.teal-quant-{__import__('os').getpid()}"
    assert f"'{kept}'" in str(e.value)
    assert (sorted(p.name for p in dest.iterdir()) if dest.is_dir() else dest.read_text()) == before
    assert torch.equal(read_artifact(kept).tensors()["a"], torch.ones(3))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_replaces_only_the_artifact_checked_at_start(tmp_path):
    dest = _write(tmp_path / "out")
    w = ArtifactWriter(dest, max_shard_size=1000, overwrite=True)
    w.add({"a": torch.ones(3)})
    w.write_json("config.json", {"model_type": "llama", "quantization_config": _quant().to_dict()})
    second = _write(tmp_path / "out", overwrite=True)  # another run replaced it meanwhile: a different folder
    (second / "marker").write_text("second run")
    with pytest.raises(ArtifactError, match="was replaced while this run was going"):
        with w:
            w.commit()
    assert (dest / "marker").read_text() == "second run"
    # the normal case: the checked artifact is swapped, nothing left aside
    w = ArtifactWriter(dest, max_shard_size=1000, overwrite=True)
    w.add({"a": torch.ones(3)})
    w.write_json("config.json", {"model_type": "llama", "quantization_config": _quant().to_dict()})
    w.commit()
    assert not (dest / "marker").exists() and list(read_artifact(dest).weight_map) == ["a"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stale_partials_of_a_dead_run_are_removed_live_ones_reported(tmp_path, caplog):
    import os
    import socket
    import subprocess
    import sys

    from teal_quant.artifact.format import OWNER_FILE

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owners = {"dead": int(dead.stdout), "alive": os.getppid(), "none": None}
    for name, pid in owners.items():
        p = tmp_path / f".out.partial-{name}"
        p.mkdir()
        if pid is not None:
            (p / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    (tmp_path / ".other.partial-x").mkdir()  # another destination's: not ours to touch
    caplog.set_level(logging.DEBUG, logger="teal_quant")
    _write(tmp_path / "out")
    err = caplog.text  # removed: a warning; left alone (maybe live): debug, shown with --verbose
    assert not (tmp_path / ".out.partial-dead").exists() and "removed" in err
    assert (tmp_path / ".out.partial-alive").is_dir() and (tmp_path / ".out.partial-none").is_dir()
    assert "may still be writing it" in err and "names no writing process" in err
    assert (tmp_path / ".other.partial-x").is_dir()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_artifact_modes_follow_the_umask(tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        dest = _write(tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o777 & ~umask
    files = list(dest.iterdir())
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask for f in files)
    assert not (dest / ".teal-quant-writer.json").exists()


def test_shard_paths_outside_the_folder_are_refused(tmp_path):
    import shutil

    from teal_quant.artifact.format import shard_path

    dest = _write(tmp_path / "art")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(dest / "model-00001-of-00003.safetensors", outside)
    index_file = dest / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    (dest / "link.safetensors").symlink_to(outside)
    for bad in ("../outside.safetensors", str(outside), "link.safetensors", "sub/../../outside.safetensors"):
        index_file.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], "t0": bad}}))
        with pytest.raises(ArtifactError, match="outside the folder"):
            read_artifact(dest)
    # a huggingface_hub snapshot links its files into the repo's blobs/: allowed
    snap = tmp_path / "models--o--n" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (tmp_path / "models--o--n" / "blobs").mkdir()
    shutil.copy(outside, tmp_path / "models--o--n" / "blobs" / "h1")
    (snap / "s.safetensors").symlink_to("../../blobs/h1")
    assert shard_path(snap, "s.safetensors", "x") == snap / "s.safetensors"
    with pytest.raises(ArtifactError, match="outside the folder"):
        shard_path(snap, "../../blobs/h1", "x")


def _rewrite(dest, key, fn):
    from safetensors.torch import load_file, save_file

    index = json.loads((dest / "model.safetensors.index.json").read_text())
    file = dest / index["weight_map"][key]
    tensors = load_file(str(file))
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(file))


def _quantized_artifact(dest, group_size=32, k=64, n=16):
    from teal_quant.kernels import pack

    quant = _quant(group_size=group_size)
    w = ArtifactWriter(dest, max_shard_size=10**6)
    p = "model.layers.0.mlp.up_proj"
    g = k if group_size == -1 else group_size
    w.add({f"{p}.qweight": pack(torch.randint(0, 16, (k, n), dtype=torch.uint8), 4),
           f"{p}.scales": torch.rand(k // g, n), f"{p}.zeros": torch.rand(k // g, n),
           f"{p}.thresholds": torch.tensor([0.0, 0.5])})
    w.write_json("config.json", {"model_type": "llama", "quantization_config": quant.to_dict()})
    return w.commit(), p


@pytest.mark.parametrize("case, message", [
    ("int32 scales", "scales must be floating [2, 16], got I32"),
    ("inf scales", "scales has non-finite values"),
    ("nan zeros", "zeros has non-finite values"),
    ("float32 qweight", "qweight must be int32 [K, N/8] for 4-bit weights, got F32"),
    ("float64 thresholds", "thresholds must be float32 [2], got F64"),
    ("short scales", "scales must be floating [2, 16], got F32 [1, 16]"),
    ("group_size 48", "group_size 48 must be a positive power of two"),
    ("group_size 0", "group_size 0 must be a positive power of two"),
    ("group_size 128 > K", "group_size 128 does not divide in_features 64"),
])
def test_read_artifact_checks_tensors_up_front(tmp_path, case, message):
    dest, p = _quantized_artifact(tmp_path / "art")
    read_artifact(dest)  # valid as written
    if case.startswith("group_size"):
        config = json.loads((dest / "config.json").read_text())
        config["quantization_config"]["group_size"] = int(case.split()[1])
        (dest / "config.json").write_text(json.dumps(config))
    else:
        fn = {
            "int32 scales": lambda t: t.to(torch.int32),
            "inf scales": lambda t: torch.where(torch.arange(t.numel()).view(t.shape) == 3, float("inf"), t),
            "nan zeros": lambda t: torch.full_like(t, float("nan")),
            "float32 qweight": lambda t: t.float(),
            "float64 thresholds": lambda t: t.double(),
            "short scales": lambda t: t[:1].contiguous(),
        }[case]
        _rewrite(dest, f"{p}.{case.split()[1]}", fn)
    with pytest.raises(ArtifactError, match=__import__("re").escape(message)):
        read_artifact(dest)


def test_pickle_only_artifact_is_refused(tmp_path):
    dest, _ = _quantized_artifact(tmp_path / "art")
    for f in dest.glob("*.safetensors*"):
        f.unlink()
    torch.save({"x": torch.ones(1)}, dest / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match="safetensors only"):
        read_artifact(dest)


@pytest.mark.parametrize("field, value, msg", [
    ("format_version", 1.0, "format_version 1.0 is not supported"),
    ("format_version", "1", "format_version '1' is not supported"),
    ("format_version", True, "format_version True is not supported"),
    ("bits", 8.0, "bits must be an integer, got 8.0"),
    ("bits", "8", "bits must be an integer"),
    ("bits", True, "bits must be an integer"),
    ("group_size", 32.5, "group_size must be an integer"),
    ("levels", [0.0, float("nan")], "must be finite numbers"),
    ("levels", [0.0, float("inf")], "must be finite numbers"),
    ("levels", [0.0, "0.4"], "must be finite numbers"),
])
def test_quant_config_schema_is_strict(field, value, msg):
    d = _quant(group_size=-1, bits=8).to_dict()
    if field == "levels":
        d = {**d, "sparsity": {**d["sparsity"], "levels": value}}
    else:
        d = {**d, field: value}
    with pytest.raises(ArtifactError, match=msg):
        TealQuantConfig.from_dict(d)
