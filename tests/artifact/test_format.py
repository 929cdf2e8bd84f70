"""The on-disk format: int4 packing layout, sharding + index, atomic writes, validation of corrupt artifacts."""

import json

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
