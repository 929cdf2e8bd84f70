"""The Hugging Face Hub: push an artifact, download one (or a base model) by repo id.

The only module of teal-quant that touches the network; everything goes through huggingface_hub.

- The endpoint is the `endpoint` argument, else the HF_ENDPOINT environment variable (read at call time), else
  huggingface.co. The token is the `token` argument, else whatever huggingface_hub finds (HF_TOKEN, then the
  `hf auth login` file). The token is never printed, logged or written: error messages are scrubbed of it.
- Every failure (network, 401/403, a repo of another type, a server dying mid-upload, offline mode) becomes one
  `HubError` line. A push never writes into the local artifact.
- A push uploads the artifact's files (replacing the remote copies of those names, README.md included) and removes
  only stale weight shards of an earlier push; every other remote file stays unless `delete_extra`, which makes the
  remote revision mirror the artifact.
- Pushing is idempotent: huggingface_hub asks the server for the remote oid of every file before uploading and
  drops unchanged files; when nothing changed, no commit is made and the result names the existing head commit
  (`PushResult.changed` is False). Files already stored on the server (e.g. uploaded before a connection broke)
  are not sent again.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from teal_quant.errors import HubError, first_line, scrub

DEFAULT_ENDPOINT = "https://huggingface.co"
REPO_TYPE = "model"


class PushResult(str):
    """The commit URL (a str, as `push` promises), with the commit oid and whether this push made a commit."""

    oid: str
    changed: bool
    repo_url: str

    def __new__(cls, commit_url: str, *, oid: str, changed: bool, repo_url: str) -> "PushResult":
        self = super().__new__(cls, commit_url)
        self.oid, self.changed, self.repo_url = oid, changed, repo_url
        return self


def looks_like_local_path(source: str) -> bool:
    """A path the user meant as local (so not worth asking the Hub about): ./x, /x, ~/x, a/b/c, a\\b."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep in source.replace("/", "")


def resolve_endpoint(endpoint: str | None = None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read at call time as well as at huggingface_hub's import."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or value.upper() in ("1", "ON", "YES", "TRUE")


def push(
    artifact_dir: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    message: str | None = None,
    delete_extra: bool = False,
) -> PushResult:
    """Upload a validated artifact directory to a model repo (created when missing, private by default).

    `revision` is a branch (created from main when missing). Remote files the artifact does not have (an edited
    README, a file added on the Hub) are left alone unless `delete_extra`, which makes the revision mirror the
    artifact (stale shards of an earlier push removed too). Returns the commit URL (a `PushResult`).
    """
    from teal_quant.artifact.format import SHARD_PATTERNS, read_artifact

    artifact = read_artifact(artifact_dir)  # ArtifactError before any network traffic
    token = token.strip() or None if token else token  # as huggingface_hub strips HF_TOKEN and the login file
    endpoint = resolve_endpoint(endpoint)
    branch = revision or "main"
    where = f"push to '{repo_id}' on {endpoint}"
    with _hub_errors(where, token):
        from huggingface_hub import HfApi

        from teal_quant import __version__

        api = HfApi(endpoint=endpoint, token=token, library_name="teal-quant", library_version=__version__)
        repo_url = str(api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True))
        _check_model_repo(api, repo_id, endpoint)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, repo_type=REPO_TYPE, exist_ok=True)
        before = api.repo_info(repo_id, repo_type=REPO_TYPE, revision=branch).sha
        q = artifact.quant
        default_message = f"teal-quant artifact: int{q.bits} g{q.group_size}, TEAL levels {', '.join(f'{lv:g}' for lv in q.levels)}"
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(artifact.path),
            repo_type=REPO_TYPE,
            revision=branch,
            commit_message=message or default_message,
            # default: only weight shards of an earlier push that this artifact no longer has (the index names none of
            # them); every other remote file stays. delete_extra: the revision mirrors the artifact.
            delete_patterns=["*"] if delete_extra else list(SHARD_PATTERNS),
        )
    return PushResult(info.commit_url, oid=info.oid, changed=info.oid != before, repo_url=repo_url)


def download(
    repo_id: str,
    revision: str | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    allow_patterns: list[str] | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """A snapshot of a model repo in the huggingface_hub cache (only the cache when HF_HUB_OFFLINE is set)."""
    endpoint = resolve_endpoint(endpoint)
    token = token.strip() or None if token else token
    where = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "") + f" from {endpoint}"
    is_offline = offline()
    with _hub_errors(f"download {where}", token, offline=is_offline):
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id, repo_type=REPO_TYPE, revision=revision, token=token, endpoint=endpoint,
            allow_patterns=allow_patterns, cache_dir=cache_dir, local_files_only=is_offline,
            library_name="teal-quant",
        )
    return Path(path)


def download_file(
    repo_id: str,
    filename: str,
    revision: str | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """One file of a model repo in the huggingface_hub cache (found there, or downloaded once), e.g. one weight shard
    of a model read layer by layer."""
    endpoint = resolve_endpoint(endpoint)
    token = token.strip() or None if token else token
    where = f"'{filename}' of '{repo_id}'" + (f" at revision '{revision}'" if revision else "") + f" from {endpoint}"
    is_offline = offline()
    with _hub_errors(f"download {where}", token, offline=is_offline):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(
            repo_id, filename, repo_type=REPO_TYPE, revision=revision, token=token, endpoint=endpoint,
            cache_dir=cache_dir, local_files_only=is_offline, library_name="teal-quant",
        )
    return Path(path)


def _check_model_repo(api, repo_id: str, endpoint: str) -> None:
    """create_repo(exist_ok=True) also succeeds when the name is taken by a dataset or Space: say so."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        api.repo_info(repo_id, repo_type=REPO_TYPE)
        return
    except RepositoryNotFoundError:
        pass
    for other in ("dataset", "space"):
        try:
            api.repo_info(repo_id, repo_type=other)
        except RepositoryNotFoundError:
            continue
        raise HubError(f"push to '{repo_id}' on {endpoint}: '{repo_id}' is a {other} repository, not a model; choose another repo id")
    raise HubError(f"push to '{repo_id}' on {endpoint}: the repository could not be created nor found (check the token's write access)")


@contextmanager
def _hub_errors(where: str, token: str | None, *, offline: bool = False) -> Iterator[None]:
    """Translate huggingface_hub / network exceptions into one HubError line, scrubbed of the token; log records of
    the HTTP stack (which at DEBUG level quote request headers) are scrubbed too."""
    _scrub_log_records(token)
    try:
        yield
    except HubError as e:
        raise HubError(_scrub(str(e), token)) from None
    except Exception as e:  # noqa: BLE001 - everything below is classified; the rest is a bug, re-raised
        reason = _reason(e, offline)
        if reason is None:
            raise
        raise HubError(_scrub(f"{where}: {reason}", token)) from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP client this huggingface_hub uses (httpx2, httpx or requests)."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name, attr in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"),
                       ("requests", "Timeout")):
        try:
            errors.append(getattr(importlib.import_module(name), attr))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _reason(error: BaseException, offline: bool) -> str | None:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = []
    e: BaseException | None = error
    while e is not None and len(chain) < 8:  # the exception and its causes (upload errors wrap the network error)
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, ValueError) and str(e).startswith("Invalid metadata in README.md"):
            return "the Hub refused the model card's metadata (" + " ".join(str(e).split("\n")[1:]).strip() + ")"
        if isinstance(e, HFValidationError):
            return f"not a valid repo id ({first_line(e)})"
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or (offline and isinstance(e, FileNotFoundError)):
            if offline:
                return "not in the local cache, and HF_HUB_OFFLINE is set (unset it to download)"
            return f"the Hub cannot be reached and the files are not in the local cache ({_root_cause(chain)})"
        if isinstance(e, GatedRepoError):
            return "the repository is gated: request access on the Hub, then use a token that has it"
        if isinstance(e, RevisionNotFoundError):
            return "revision not found in the repository"
        if isinstance(e, RepositoryNotFoundError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            hint = " or the token is invalid" if status == 401 else ""
            return f"repository not found (or private and not visible to this token{hint})"
        if isinstance(e, HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            server = _server_message(e)
            if status == 401:
                return f"401 Unauthorized: the Hub rejected the token ({server}); pass token=, set HF_TOKEN or run `hf auth login`"
            if status == 403:
                return f"403 Forbidden: the token may not write here ({server}); use a token with write access to the namespace"
            return f"HTTP {status}: {server}"
        if isinstance(e, _transport_errors()):
            return _NETWORK.format(cause=_root_cause(chain))
    # huggingface_hub wraps a failed LFS upload in RuntimeError("Error while uploading '<file>' to the Hub."); with
    # parallel uploads the cause may be another thread's closing of the shared HTTP client after a network error.
    if any(isinstance(e, RuntimeError) and str(e).startswith("Error while uploading") for e in chain):
        return _NETWORK.format(cause=f"{first_line(chain[0]).rstrip('.')}: the connection was lost")
    return None


_NETWORK = ("network error ({cause}); the local artifact is unchanged, and pushing again resumes "
            "(files already on the server are not sent twice)")


def _server_message(e) -> str:
    msg = getattr(e, "server_message", None)
    return first_line(Exception(msg)) if msg else first_line(e)


def _root_cause(chain: list[BaseException]) -> str:
    last = chain[-1]
    return f"{type(last).__name__}: {first_line(last)}"


_LOGGERS = ("huggingface_hub", "httpx", "httpx2", "httpcore", "httpcore2", "urllib3", "requests", "filelock")


class _ScrubFilter(logging.Filter):
    """Replaces a record's message by its scrubbed text (the token in any form, `Bearer ...`, hf_...)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            record.msg, record.args = scrub(record.getMessage(), *self.tokens), ()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is dropped rather than shown raw
            return False
        return True


_SCRUB_FILTER = _ScrubFilter()


def _scrub_log_records(token: str | None) -> None:
    """Attach the scrubbing filter to every logger of the HTTP stack (a logger's filter sees only its own records,
    so each existing child logger gets it too)."""
    if token:
        _SCRUB_FILTER.tokens.add(token)
    import huggingface_hub  # noqa: F401 - its import creates the loggers of the client it uses

    for name in [*_LOGGERS, *logging.root.manager.loggerDict]:
        if name.split(".")[0] in _LOGGERS:
            logger = logging.getLogger(name)
            if _SCRUB_FILTER not in logger.filters:
                logger.addFilter(_SCRUB_FILTER)


def _scrub(text: str, token: str | None) -> str:
    """The token in every form it can take (argument, HF_TOKEN raw or stripped, the login file, `Bearer ...`,
    anything shaped like hf_...) replaced by ***."""
    return scrub(text, token)
