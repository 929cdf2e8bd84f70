"""A Hub model as the source of a run, against the loopback Hub (tests/hub_server.py), never the network: only the
metadata is fetched when the model is opened; each safetensors shard is downloaded once, when a layer first needs it,
never twice (not even across an interrupted run and its --resume); with model.keep_download false every shard the
run downloaded is gone from the cache once its layers are done; the artifact's tensors are those of a run on the same
model from a local folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _support import tiny_recipe_text, write_tiny_llama
from hub_server import HubServer

TOKEN = "hf_teal_test_secret_0123456789"
REPO = "teal-org/tiny-base"
SPARSITY = "sparsity: {levels: [0.5], default: 0.5, allocation: uniform}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("hub"), tokens={TOKEN}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def base_model(hub, tmp_path_factory):
    """A 3-layer tiny Llama saved in 60 KB shards (so each holds about one layer), pushed to the loopback Hub."""
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM

    folder = write_tiny_llama(tmp_path_factory.mktemp("base") / "model", layers=3)
    model = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="60KB")
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:  # the loopback Hub speaks LFS, not Xet
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        api = HfApi(endpoint=hub.url, token=TOKEN)
        api.create_repo(REPO, private=False)
        api.upload_folder(repo_id=REPO, folder_path=str(folder))
    return folder


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return tmp_path / "hf-cache"


def _shard_gets(hub) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in hub.requests:
        if r.startswith("GET ") and "/resolve/" in r and r.split("?")[0].endswith(".safetensors"):
            name = r.split("?")[0].rsplit("/", 1)[1]
            counts[name] = counts.get(name, 0) + 1
    return counts


def _tensors(artifact: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(artifact.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_shards_stream_in_once_and_go_when_done(hub, base_model, hub_env, tmp_path, monkeypatch):
    import torch

    import teal_quant
    from teal_quant.compression.sources.base import ModelSource

    shards = sorted(json.loads((base_model / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(set(shards)) >= 3
    local = teal_quant.compress(teal_quant.Recipe.from_yaml_text(
        tiny_recipe_text(base_model, tmp_path / "local", sparsity=SPARSITY)))

    recipe = teal_quant.Recipe.from_yaml_text(tiny_recipe_text(
        REPO, tmp_path / "art", sparsity=SPARSITY, model=f"model: {{source: {REPO}, dtype: float32, keep_download: false}}"))
    # an exception after layer 0 is checkpointed: the run stops, keeping layer 0 for --resume
    real_release = ModelSource.release
    on_disk: list[set[str]] = []

    def release(self, i):
        real_release(self, i)
        on_disk.append({p.name for p in self.hub.folder.glob("*.safetensors")})
        if i == 0 and not getattr(ModelSource, "_resumed", False):
            raise RuntimeError("stop after layer 0")

    monkeypatch.setattr(ModelSource, "release", release)
    hub.requests.clear()
    with pytest.raises(RuntimeError, match="stop after layer 0") as err:
        teal_quant.compress(recipe)
    assert "1 of 3 finished layers kept in" in err.value.resume_note
    assert not (tmp_path / "art").exists()
    first = _shard_gets(hub)
    assert first and all(n == 1 for n in first.values()) and len(first) < len(set(shards)), first

    monkeypatch.setattr(ModelSource, "_resumed", True, raising=False)
    summary = teal_quant.compress(recipe, resume=True)
    gets = _shard_gets(hub)
    assert sorted(gets) == sorted(set(shards)) and all(n == 1 for n in gets.values()), gets  # each shard once, ever
    assert summary.resumed_from_layer == 1
    # keep_download false: never the whole model on disk, and no shard (link or blob) left at the end
    assert max(len(s) for s in on_disk) < len(set(shards)) // 2, on_disk
    snapshot = next(hub_env.glob("models--teal-org--tiny-base/snapshots/*"))
    assert not list(snapshot.glob("*.safetensors"))
    assert len(list((snapshot.parents[1] / "blobs").iterdir())) == len(list(snapshot.iterdir()))
    assert (snapshot / "config.json").is_file()  # the metadata stays

    a, b = _tensors(summary.artifact), _tensors(local.artifact)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_keep_download_false_never_deletes_a_local_model(base_model, tmp_path, caplog):
    import logging

    import teal_quant

    before = sorted(p.name for p in base_model.iterdir())
    recipe = teal_quant.Recipe.from_yaml_text(tiny_recipe_text(
        base_model, tmp_path / "art", sparsity=SPARSITY,
        model=f"model: {{source: '{base_model}', dtype: float32, keep_download: false}}"))
    with caplog.at_level(logging.INFO, logger="teal_quant"):
        teal_quant.compress(recipe)
    assert sorted(p.name for p in base_model.iterdir()) == before
    assert "never deletes a local model's files" in caplog.text
