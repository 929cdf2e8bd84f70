"""A loopback Hugging Face Hub for the tests: the routes the real huggingface_hub client uses, nothing more.

Bound to 127.0.0.1 only. Files are stored on disk (content-addressed by sha256 under `root/objects`); repos,
branches and commits are kept in memory (and survive `restart()`, which rebinds the same port). Every request
that carries a token must carry one of `tokens`; writes need one. `die_during_next_upload()` makes the next LFS
PUT read half of its body, drop the connection and stop the whole server, as a server dying mid-upload would.

Routes (huggingface_hub 2.x with HF_HUB_DISABLE_XET=1 / no hf_xet, i.e. the plain LFS path):
  POST /api/repos/create                                   create_repo
  GET  /api/{type}s/{repo}[/revision/{rev}]                model_info / repo_info
  GET  /api/{type}s/{repo}/tree/{rev}[/{path}]             list_repo_tree / list_repo_files (one page)
  POST /api/{type}s/{repo}/preupload/{rev}                 upload modes + remote oids (no-op detection)
  POST /api/{type}s/{repo}/commit/{rev}                    NDJSON commit (header, file, lfsFile, deletedFile)
  POST /api/{type}s/{repo}/branch/{branch}                 create_branch
  POST /api/validate-yaml                                  model card metadata check (base_model, as the Hub does)
  POST /{repo}.git/info/lfs/objects/batch                  LFS batch: upload actions for unknown objects
  PUT  /lfs-upload/{repo}/{sha256}                         LFS basic transfer (no auth, like a presigned URL)
  HEAD/GET /{repo}/resolve/{rev}/{path}                    file metadata (X-Repo-Commit, ETag, size) + content
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_THRESHOLD = 10_000  # bytes; the Hub's is 10 MB, ours is small so that tiny test shards go through LFS
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")
TYPES = ("model", "dataset", "space")


_REPO_ID = re.compile(r"^[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?(?:/[A-Za-z0-9_.-]{1,96})?$")


def metadata_errors(card: str) -> list[str]:
    """What the Hub says about a model card's YAML metadata, for the part it checks that we model: `base_model`
    must be model repo ids (a commit of such a README.md is refused with 400, like on huggingface.co)."""
    import yaml

    m = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", card, re.DOTALL)
    if not m:
        return []
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        return [f"YAML metadata does not parse: {e}"]
    if not isinstance(meta, dict):
        return ["YAML metadata is not a mapping"]
    errors = []
    base = meta.get("base_model")
    for value in ([base] if isinstance(base, str) else base or []) if base is not None else []:
        if not isinstance(value, str) or not _REPO_ID.match(value) or "--" in value or ".." in value:
            errors.append(f'"base_model" with value "{value}" is not valid. Use a model id from https://hf.co/models.')
    return errors


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    sha256: str
    size: int
    oid: str  # git blob id of the content (regular) or of the pointer (lfs)
    lfs: bool


@dataclass
class Repo:
    repo_id: str
    type: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)  # commit sha -> files
    lfs_objects: set[str] = field(default_factory=set)  # sha256 of the LFS objects uploaded to this repo


class _Stop(Exception):
    pass


class HubServer:
    """`with HubServer(tmp, tokens={"hf_x"}) as hub: ... hub.url ...` (or start()/stop())."""

    def __init__(self, root: Path, tokens: set[str], *, port: int = 0):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self.tokens = set(tokens)
        self.port = port
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []  # "METHOD path" of every request, for assertions
        self.lock = threading.Lock()
        self._die_on_upload = False
        self.echo_authorization = False  # error bodies quote the request's Authorization header (a careless server)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._dying: threading.Thread | None = None
        self.dead = False  # set when it dies mid-upload: kept-alive connections are dropped too, until restart()

    # -- lifecycle ---------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "HubServer":
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def restart(self) -> None:
        """Start again on the same port with the same repos and files (after a stop or a death mid-upload)."""
        if self._dying is not None:
            self._dying.join(timeout=10)
            self._dying = None
        self.stop()
        self.dead = False
        self.start()

    @property
    def running(self) -> bool:
        return self._server is not None

    def die_during_next_upload(self) -> None:
        self._die_on_upload = True

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- storage -------------------------------------------------------------------------------------------
    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256

    def store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha

    def new_commit(self, repo: Repo, files: dict[str, StoredFile], parent: str | None, message: str) -> str:
        listing = json.dumps({p: f.sha256 for p, f in sorted(files.items())})
        sha = hashlib.sha1(f"{parent}\n{message}\n{listing}\n{len(repo.commits)}".encode()).hexdigest()
        repo.commits[sha] = files
        return sha

    def resolve(self, repo: Repo, revision: str) -> str | None:
        if revision in repo.branches:
            return repo.branches[revision]
        return revision if revision in repo.commits else None

    def file_bytes(self, f: StoredFile) -> bytes:
        return self.object_path(f.sha256).read_bytes()

    def head_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """For assertions: path -> content at a revision."""
        repo = self.repos[repo_id]
        return {p: self.file_bytes(f) for p, f in repo.commits[self.resolve(repo, revision)].items()}


class _Handler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        pass

    # -- plumbing -----------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes | dict | None = None, headers: dict | None = None, *, head: bool = False):
        if isinstance(body, dict) or isinstance(body, list):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        body = body or b""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None, *, head: bool = False):
        if self.server_hub.echo_authorization:
            message = f"{message} (you sent Authorization: {self.headers.get('Authorization')!r})"
        headers = {"X-Error-Message": message.replace("\n", " ")}  # a header is one line
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers, head=head)

    def _body(self) -> bytes:
        """The request body, read once (handlers and error paths may both ask for it)."""
        if getattr(self, "_cached_body", None) is None:
            n = int(self.headers.get("Content-Length") or 0)
            self._cached_body = self.rfile.read(n) if n else b""
        return self._cached_body

    def _auth(self) -> bool | None:
        """True: a valid token; None: no token; raises _Stop after a 401 for a wrong one."""
        value = self.headers.get("Authorization")
        if not value:
            return None
        token = value.removeprefix("Bearer ").strip()
        if token in self.server_hub.tokens:
            return True
        self._body()
        self._error(401, "Invalid credentials in Authorization header")
        raise _Stop

    def _repo(self, repo_id: str, type_: str, *, write: bool, auth: bool | None, head: bool = False) -> Repo:
        repo = self.server_hub.repos.get(repo_id)
        if repo is None or repo.type != type_ or (repo.private and not auth):
            self._body()
            self._error(401 if auth is None and repo is not None else 404, "Repository not found", "RepoNotFound", head=head)
            raise _Stop
        if write and not auth:
            self._error(401, "You must be authenticated to write")
            raise _Stop
        return repo

    def _rev(self, repo: Repo, revision: str, *, head: bool = False) -> str:
        sha = self.server_hub.resolve(repo, revision)
        if sha is None:
            self._body()
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
            raise _Stop
        return sha

    def _dispatch(self, method: str):
        self._cached_body = None
        hub = self.server_hub
        if hub.dead:
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        path = urlsplit(self.path).path
        with hub.lock:
            hub.requests.append(f"{method} {path}")
        try:
            auth = self._auth()
            for pattern, handler in _ROUTES:
                if pattern[0] != method:
                    continue
                m = re.fullmatch(pattern[1], path)
                if m:
                    return handler(self, auth, *[g if g is None else unquote(g) for g in m.groups()])
            self._body()
            self._error(404, f"no route for {method} {path}")
        except _Stop:
            pass
        except Exception as e:  # a bug in this server: answer (400 is not retried by the client) instead of hanging up
            self._error(400, f"test hub server error: {type(e).__name__}: {e}")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # -- routes -------------------------------------------------------------------------------------------
    def create_repo(self, auth):
        payload = json.loads(self._body() or b"{}")
        if not auth:
            return self._error(401, "You must be authenticated to create a repo")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        type_ = payload.get("type") or "model"
        hub = self.server_hub
        with hub.lock:
            existing = hub.repos.get(repo_id)
            if existing is not None:
                what = f"You already created this {type_} repo" if existing.type == type_ else f"A {existing.type} repo with this name exists"
                prefix = "" if existing.type == "model" else f"{existing.type}s/"  # the Hub's 409 names the existing repo
                return self._send(409, {"error": what, "url": f"{hub.url}/{prefix}{repo_id}"}, {"X-Error-Message": what})
            repo = Repo(repo_id, type_, private=payload.get("visibility", "private") != "public")
            data = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            attributes = StoredFile(sha256=hub.store(data), size=len(data), oid=git_oid(data), lfs=False)
            repo.branches["main"] = hub.new_commit(repo, {".gitattributes": attributes}, None, "initial commit")
            hub.repos[repo_id] = repo
        prefix = "" if type_ == "model" else f"{type_}s/"
        self._send(200, {"url": f"{hub.url}/{prefix}{repo_id}", "name": repo_id, "id": repo_id})

    def repo_info(self, auth, type_, repo_id, revision=None):
        repo = self._repo(repo_id, type_, write=False, auth=auth)
        sha = self._rev(repo, revision or "main")
        files = repo.commits[sha]
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [], "downloads": 0, "likes": 0})

    def tree(self, auth, type_, repo_id, revision, sub=None):
        repo = self._repo(repo_id, type_, write=False, auth=auth)
        sha = self._rev(repo, revision)
        out = []
        for p, f in sorted(repo.commits[sha].items()):
            if sub and not p.startswith(sub.rstrip("/") + "/"):
                continue
            entry = {"type": "file", "path": p, "size": f.size, "oid": f.oid}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            out.append(entry)
        self._send(200, out)

    def preupload(self, auth, type_, repo_id, revision):
        payload = json.loads(self._body() or b"{}")
        repo = self._repo(repo_id, type_, write=True, auth=auth)
        files = repo.commits[self._rev(repo, revision)]
        out = []
        for f in payload.get("files", []):
            lfs = f["size"] >= LFS_THRESHOLD or f["path"].endswith(LFS_SUFFIXES)
            remote = files.get(f["path"])
            oid = None if remote is None else (remote.sha256 if remote.lfs else remote.oid)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": out, "commitOid": files and self.server_hub.resolve(repo, revision)})

    def commit(self, auth, type_, repo_id, revision):
        body = self._body()
        repo = self._repo(repo_id, type_, write=True, auth=auth)
        hub = self.server_hub
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        with hub.lock:
            parent = self._rev(repo, revision)
            if header.get("parentCommit") and header["parentCommit"] != parent:
                return self._error(412, "parent commit is not the head of the branch")
            files = dict(repo.commits[parent])
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    if value["path"] == "README.md" and (errors := metadata_errors(data.decode(errors="replace"))):
                        return self._error(400, "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors))
                    files[value["path"]] = StoredFile(hub.store(data), len(data), git_oid(data), lfs=False)
                elif key == "lfsFile":
                    if value["oid"] not in repo.lfs_objects:
                        return self._error(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\nsize {value['size']}\n"
                    files[value["path"]] = StoredFile(value["oid"], int(value["size"]), git_oid(pointer.encode()), lfs=True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {p: f for p, f in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            sha = hub.new_commit(repo, files, parent, header.get("summary", ""))
            repo.branches[revision] = sha
        self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    def create_branch(self, auth, type_, repo_id, branch):
        payload = json.loads(self._body() or b"{}")
        repo = self._repo(repo_id, type_, write=True, auth=auth)
        with self.server_hub.lock:
            if branch in repo.branches:
                return self._error(409, f"Branch {branch} already exists")
            repo.branches[branch] = self._rev(repo, payload.get("startingPoint") or "main")
        self._send(200, {})

    def validate_yaml(self, auth):
        payload = json.loads(self._body() or b"{}")
        errors = metadata_errors(payload.get("content", ""))
        if errors and "text/plain" in (self.headers.get("Accept") or ""):  # ModelCard.validate: the text is its error
            return self._send(400, "\n".join(f"- {e}" for e in errors).encode(), {"Content-Type": "text/plain"})
        # upload_folder / upload_file of a README.md: JSON, errors as [{message}] (400 when there are any)
        self._send(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})

    def lfs_batch(self, auth, repo_id):
        payload = json.loads(self._body() or b"{}")
        repo = self._repo(repo_id, "model", write=True, auth=auth)
        hub = self.server_hub
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in repo.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{repo_id}/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, auth, repo_id, sha256):
        hub = self.server_hub
        n = int(self.headers.get("Content-Length") or 0)
        if hub._die_on_upload:
            hub._die_on_upload = False
            hub.dead = True
            self.rfile.read(n // 2)
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            hub._dying = threading.Thread(target=hub.stop, daemon=True)
            hub._dying.start()
            raise _Stop
        data = self.rfile.read(n)
        if hashlib.sha256(data).hexdigest() != sha256:
            return self._error(400, "sha256 of the uploaded content does not match the object id")
        hub.store(data)
        with hub.lock:
            hub.repos[repo_id].lfs_objects.add(sha256)
        self._send(200)

    def resolve_file(self, auth, repo_id, revision, path, *, head: bool):
        repo = self._repo(repo_id, "model", write=False, auth=auth, head=head)
        sha = self._rev(repo, revision, head=head)
        f = self.server_hub.repos[repo_id].commits[sha].get(path)
        if f is None:
            return self._error(404, f"{path} not found at {revision}", "EntryNotFound", head=head)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f.sha256 if f.lfs else f.oid}"', "Accept-Ranges": "none"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": f.size})
        data = b"" if head else self.server_hub.file_bytes(f)
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(f.size))
        self.end_headers()
        if not head:
            self.wfile.write(data)


_REPO = r"([^/]+/[^/]+)"
_TYPE = r"(model|dataset|space)s"
_ROUTES = [
    (("POST", r"/api/repos/create"), _Handler.create_repo),
    (("POST", r"/api/validate-yaml"), _Handler.validate_yaml),
    (("GET", rf"/api/{_TYPE}/{_REPO}/tree/([^/]+)(?:/(.+))?"), _Handler.tree),
    (("GET", rf"/api/{_TYPE}/{_REPO}/revision/([^/]+)"), _Handler.repo_info),
    (("GET", rf"/api/{_TYPE}/{_REPO}"), _Handler.repo_info),
    (("POST", rf"/api/{_TYPE}/{_REPO}/preupload/([^/]+)"), _Handler.preupload),
    (("POST", rf"/api/{_TYPE}/{_REPO}/commit/([^/]+)"), _Handler.commit),
    (("POST", rf"/api/{_TYPE}/{_REPO}/branch/([^/]+)"), _Handler.create_branch),
    (("POST", rf"/{_REPO}\.git/info/lfs/objects/batch"), _Handler.lfs_batch),
    (("PUT", rf"/lfs-upload/{_REPO}/([0-9a-f]{{64}})"), _Handler.lfs_upload),
    (("HEAD", rf"/{_REPO}/resolve/([^/]+)/(.+)"), lambda h, a, r, rev, p: h.resolve_file(a, r, rev, p, head=True)),
    (("GET", rf"/{_REPO}/resolve/([^/]+)/(.+)"), lambda h, a, r, rev, p: h.resolve_file(a, r, rev, p, head=False)),
]
