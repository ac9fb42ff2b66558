"""A local fake Hugging Face Hub for tests: real HTTP on 127.0.0.1, spoken the way huggingface_hub reads it.

    from tests.fakehub import FakeHub, serve_manifest

    with FakeHub.for_assets({"vavae-f16d32": vae_bytes, "fid-inception": b"..."}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)       # huggingface_hub / repro.hub talk to it
        manifest = serve_manifest(tmp_path, hub)              # configs/assets.yaml, pointed at the hub
        steps.step2_download.main(manifest=str(manifest))
        assert hub.count("GET") == 2

    FakeHub(files={("hustvl/repo", "file.pt"): b"bytes"}, plain={"ref.npz": b"..."},
            revision_sha="a" * 40, gated={"hustvl/repo": "hf_token"}, corrupt={("hustvl/repo", "file.pt")},
            throttle={("hustvl/repo", "file.pt"): 1_000_000}, non_lfs={("hustvl/repo", "config.json")})
    hub.headers[("hustvl/repo", "file.pt")] = {"X-Linked-Etag": '"../../x"'}   # a hostile mirror
    hub.ignore_range.add("ref.npz")                                            # a broken server

Two hosts, like the real Hub and its CDN (127.0.0.1 and 127.0.0.2): `endpoint` answers HEAD/GET
`/{repo}/resolve/{rev}/{file}` with `X-Repo-Commit` and `ETag`; an LFS file (the default) gets a 302
to the second host with `X-Linked-Etag` (its sha256) and `X-Linked-Size`, a non-LFS file is served
directly. Errors carry `X-Error-Code`: 404 RepoNotFound / RevisionNotFound / EntryNotFound, 401 (no
token) or 403 (wrong token) GatedRepo. Both hosts honour `Range` (206 + Content-Range, 416 past the
end). `plain_url(name)` serves `plain` files.

Options, all changeable while running; a "key" is (repo_id, filename) or a plain file's name:
`throttle` (key -> bytes/second), `corrupt` (served bytes differ from the advertised sha256), and the
misbehaviours of broken or hostile servers: `headers` (key -> {header: value, or None to drop it} on
the /resolve answer), `status` (key -> an HTTP status /resolve answers instead), `ignore_range`
(answer 200 with the whole file to a Range request), `bad_range` (answer 206 with a Content-Range
starting at 0 whatever was asked), `drop_after` (key -> n: hang up after n body bytes of every
answer), `extra` (key -> bytes appended to the served body, the advertised size unchanged).

Uploads, as huggingface_hub's `HfApi.create_repo` / `upload_folder` / `create_commit` speak them: POST
`/api/repos/create` (409 when the repo exists), POST `/api/validate-yaml` (a README's front matter, parsed), POST `/api/models/{repo}/preupload/{rev}` (every file
"regular": the client then sends the bytes inside the commit, so no LFS or Xet transfer is needed; that
keeps the fake small while the client runs its real upload path) and POST `/api/models/{repo}/commit/{rev}`
(ndjson: the files are stored, served back as non-LFS files, and the hub's `revision_sha` moves to a new
commit). `write_token`, when set, is the one token that may create repos and commit (401/403 otherwise).

What tests look at: `requests` lists every request as (method, path, headers), path including the
query, headers a dict with lower-case names; `count(method, contains)` and `ranges()` summarise them;
`sent` counts the body bytes written per key until the client hung up.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Mapping
from urllib.parse import quote, unquote, urlsplit

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
Key = tuple  # (repo_id, filename)
CDN_HOST = "127.0.0.2"  # loopback too on Linux (all of 127.0.0.0/8)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(data: bytes) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{_sha256(data)}\nsize {len(data)}\n".encode()


def _corrupted(data: bytes) -> bytes:
    if not data:
        return b"\0"
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


class FakeHub:
    """See the module docstring. Use as a context manager (or call start()/stop())."""

    def __init__(self, files: Mapping[Key, bytes] | None = None, *, plain: Mapping[str, bytes] | None = None,
                 revision_sha: str = "0123456789abcdef0123456789abcdef01234567",
                 gated: Mapping[str, str] | None = None, corrupt=(), throttle: Mapping | None = None,
                 non_lfs=()):
        self.files = dict(files or {})
        self.plain = dict(plain or {})
        self.revision_sha = revision_sha
        self.gated = dict(gated or {})  # repo_id -> the one token that may read it
        self.corrupt = set(corrupt)
        self.throttle = dict(throttle or {})
        self.non_lfs = set(non_lfs)
        self.headers: dict = {}
        self.status: dict = {}
        self.ignore_range: set = set()
        self.bad_range: set = set()
        self.drop_after: dict = {}
        self.extra: dict = {}
        self.sent: dict = {}  # key -> body bytes written to clients so far (all answers)
        self.requests: list[tuple[str, str, dict]] = []
        self.write_token: str | None = None
        self.commits: list[dict] = []
        self.created: set = set()
        self.validated: list[str] = []  # model cards whose YAML front matter the client had checked  # {"repo", "summary", "files": [paths]} per commit received
        self._servers: list[ThreadingHTTPServer] = []
        self.endpoint = self.cdn = ""

    @classmethod
    def for_assets(cls, content: Mapping[str, bytes], manifest: str | Path | None = None, **kwargs) -> "FakeHub":
        """Serve `{asset name: bytes}` under the official repo/file names (HF) or as plain files."""
        from repro.hub.manifest import load_manifest

        m = load_manifest(manifest)
        files, plain = dict(kwargs.pop("files", {})), dict(kwargs.pop("plain", {}))
        for name, data in content.items():
            spec = m.assets[name]
            if spec.is_hf:
                files[(spec.repo_id, spec.filename)] = data
            else:
                plain[spec.filename] = data
        return cls(files, plain=plain, **kwargs)

    # -- what tests look at -------------------------------------------------------------------------
    def repos(self) -> set:
        """The repos that exist: created through the API, or holding a file."""
        return self.created | {r for r, _ in self.files}

    def sha256(self, key) -> str:
        """The advertised sha256 of a served file (key: (repo_id, filename) or a plain name)."""
        return _sha256(self.files[key] if isinstance(key, tuple) else self.plain[key])

    def plain_url(self, name: str) -> str:
        return f"{self.endpoint}/plain/{quote(name)}"

    def count(self, method: str | None = None, contains: str = "") -> int:
        return sum(1 for m, p, _ in self.requests if (method is None or m == method) and contains in p)

    def ranges(self) -> list[str]:
        """The Range headers of every GET so far (to see that a download resumed)."""
        return [h["range"] for m, _, h in self.requests if m == "GET" and "range" in h]

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        # The CDN on another host, as on the real Hub: huggingface_hub 1.x follows a HEAD's redirect to the
        # same host name (whatever the port), so a CDN on 127.0.0.1 too would hide the LFS headers from it.
        for role, host in (("hub", "127.0.0.1"), ("cdn", CDN_HOST)):
            handler = type(f"FakeHub{role.title()}Handler", (_Handler,), {"hub": self, "role": role})
            server = ThreadingHTTPServer((host, 0), handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(server)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn = f"http://{CDN_HOST}:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    role: str
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._handle(body=False)

    def do_GET(self) -> None:
        self._handle(body=True)

    def do_POST(self) -> None:
        hub = self.hub
        hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        payload = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = unquote(urlsplit(self.path).path)
        if hub.write_token is not None and self.headers.get("Authorization") != f"Bearer {hub.write_token}":
            status = 401 if self.headers.get("Authorization") is None else 403
            return self._json(status, {"error": "Invalid credentials"}, {"X-Error-Message": "Invalid credentials"})
        if path == "/api/validate-yaml":  # a model card's front matter, checked before an upload (huggingface_hub 1.x+)
            content = json.loads(payload).get("content", "")
            front = content.split("---", 2)[1] if content.startswith("---") and content.count("---") >= 2 else ""
            try:
                yaml.safe_load(front)
            except yaml.YAMLError as e:
                return self._json(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
            hub.validated.append(content)
            return self._json(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create":
            spec = json.loads(payload)
            repo_id = f"{spec['organization']}/{spec['name']}" if spec.get("organization") else spec["name"]
            if repo_id in hub.repos():
                return self._json(409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"})
            hub.created.add(repo_id)
            return self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})
        for action in ("preupload", "commit"):
            marker = f"/{action}/"
            if path.startswith("/api/models/") and marker in path:
                repo_id = path[len("/api/models/"):path.index(marker)]
                if repo_id not in hub.repos():
                    return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return getattr(self, f"_{action}")(repo_id, payload)
        self._json(404, {"error": "unknown route"})

    def _preupload(self, repo_id: str, payload: bytes) -> None:
        files = json.loads(payload)["files"]
        self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in files]})

    def _commit(self, repo_id: str, payload: bytes) -> None:
        hub, added, summary = self.hub, [], ""
        for line in payload.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"].get("summary", "")
            elif item["key"] == "file":
                key = (repo_id, item["value"]["path"])
                hub.files[key] = base64.b64decode(item["value"]["content"])
                hub.non_lfs.add(key)
                added.append(key[1])
            else:
                return self._json(400, {"error": f"the fake hub takes regular files only, got {item['key']}"})
        hub.revision_sha = hashlib.sha1(f"{hub.revision_sha}{summary}{added}".encode()).hexdigest()
        hub.commits.append({"repo": repo_id, "summary": summary, "files": added})
        self._json(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{hub.revision_sha}",
                         "commitOid": hub.revision_sha, "pullRequestUrl": None})

    def _json(self, status: int, obj: dict, headers: Mapping[str, str] | None = None) -> None:
        self._reply(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode(), True)

    # -- routing -----------------------------------------------------------------------------------
    def _handle(self, body: bool) -> None:
        hub = self.hub
        hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        path = urlsplit(self.path).path
        try:
            if self.role == "cdn" and path.startswith("/lfs/"):
                return self._serve_lfs(unquote(path[len("/lfs/"):]), body)
            if self.role == "hub" and path.startswith("/plain/"):
                name = unquote(path[len("/plain/"):])
                if name not in hub.plain:
                    return self._reply(404, {"X-Error-Code": "EntryNotFound"}, b"not found", body)
                data = hub.plain[name]
                served = _corrupted(data) if name in hub.corrupt else data
                return self._send_bytes(served, {"ETag": f'"{_sha256(data)}"'}, body, name)
            if self.role == "hub" and "/resolve/" in path:
                return self._resolve(path, body)
            self._reply(404, {}, b"unknown route", body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (e.g. a SIGKILLed downloader)

    def _resolve(self, path: str, body: bool) -> None:
        hub = self.hub
        repo_id, _, rest = path.lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        repo_id, revision, filename = unquote(repo_id), unquote(revision), unquote(filename)
        if repo_id not in hub.repos():
            return self._reply(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                               b"Repository not found", body)
        if repo_id in hub.gated:
            auth = self.headers.get("Authorization")
            if auth != f"Bearer {hub.gated[repo_id]}":
                status = 401 if auth is None else 403
                msg = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
                return self._reply(status, {"X-Error-Code": "GatedRepo", "X-Error-Message": msg}, msg.encode(), body)
        if revision not in ("main", hub.revision_sha):
            return self._reply(404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"},
                               b"Invalid rev id", body)
        key = (repo_id, filename)
        if key in hub.status:
            return self._reply(hub.status[key], {}, b"mirror error", body)
        commit = {"X-Repo-Commit": hub.revision_sha}
        if key not in hub.files:
            return self._reply(404, {**commit, "X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"},
                               b"Entry not found", body)
        data = hub.files[key]
        if key in hub.non_lfs:
            served = _corrupted(data) if key in hub.corrupt else data
            return self._send_bytes(served, self._crafted(key, {**commit, "ETag": f'"{_git_sha1(data)}"'}), body, key)
        sha = _sha256(data)
        location = f"{hub.cdn}/lfs/{sha}?repo={quote(repo_id, safe='')}&file={quote(filename, safe='')}"
        self._reply(302, self._crafted(key, {**commit, "Location": location,
                                             "ETag": f'"{_git_sha1(_lfs_pointer(data))}"', "X-Linked-Etag": f'"{sha}"',
                                             "X-Linked-Size": str(len(data))}), b"", body)

    def _crafted(self, key, headers: dict) -> dict:
        """`headers` with the test's replacements for `key` applied (None drops a header)."""
        out = dict(headers)
        for name, value in self.hub.headers.get(key, {}).items():
            out.pop(name, None)
            if value is not None:
                out[name] = value
        return out

    def _serve_lfs(self, sha: str, body: bool) -> None:
        hub = self.hub
        for key, data in list(hub.files.items()):
            if key not in hub.non_lfs and _sha256(data) == sha:
                served = _corrupted(data) if key in hub.corrupt else data
                return self._send_bytes(served, {"ETag": f'"{sha}"'}, body, key)
        self._reply(404, {}, b"no such object", body)

    # -- responses ---------------------------------------------------------------------------------
    def _reply(self, status: int, headers: Mapping[str, str], payload: bytes, body: bool) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body and payload:
            self.wfile.write(payload)

    def _send_bytes(self, data: bytes, headers: Mapping[str, str], body: bool, key) -> None:
        hub = self.hub
        data = data + hub.extra.get(key, b"")
        total, start = len(data), 0
        rng = self.headers.get("Range")
        status = 200
        extra = {"Accept-Ranges": "bytes", **headers}
        if rng and key in hub.bad_range:
            status = 206
            extra["Content-Range"] = f"bytes 0-{total - 1}/{total}"  # whatever was asked: a broken server
        elif rng and rng.startswith("bytes=") and key not in hub.ignore_range:
            first, _, last = rng[len("bytes="):].partition("-")
            start = int(first or 0)
            end = int(last) if last else total - 1
            if start >= total:
                return self._reply(416, {"Content-Range": f"bytes */{total}"}, b"", body)
            data = data[start:end + 1]
            status = 206
            extra["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{total}"
        self.send_response(status)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
            return
        drop = hub.drop_after.get(key)
        if drop is not None:
            data = data[:drop]
            self.close_connection = True  # hang up before Content-Length bytes were sent
        step = 16384
        for i in range(0, len(data), step):
            self.wfile.write(data[i:i + step])
            hub.sent[key] = hub.sent.get(key, 0) + len(data[i:i + step])
            rate = hub.throttle.get(key)  # live: a test may lift it mid-transfer
            if rate:
                time.sleep(step / rate)


def serve_manifest(tmp_path: str | Path, hub: FakeHub, *, search_dirs=(), pin_hf: bool = False,
                   base: str | Path | None = None) -> Path:
    """Write `tmp_path/assets.yaml`: the kit's manifest, limited to the assets `hub` serves.

    HF entries keep their official repo/file (the hub answers them through HF_ENDPOINT) with size and
    sha256 null like the real manifest, unless `pin_hf`; plain-URL entries point at `hub.plain_url`
    with size and sha256 pinned from the served bytes. `search_dirs` replaces the manifest's list.
    """
    base = Path(base) if base else PROJECT_ROOT / "configs" / "assets.yaml"
    data = yaml.safe_load(base.read_text())
    kept = {}
    for name, entry in data["assets"].items():
        entry = dict(entry)
        if "repo_id" in entry and (entry["repo_id"], entry["filename"]) in hub.files:
            blob = hub.files[(entry["repo_id"], entry["filename"])]
            if pin_hf:
                entry.update(size=len(blob), sha256=_sha256(blob))
        elif "url" in entry and entry.get("filename") in hub.plain:
            blob = hub.plain[entry["filename"]]
            entry.update(url=hub.plain_url(entry["filename"]), size=len(blob), sha256=_sha256(blob))
        else:
            continue
        kept[name] = entry
    data["assets"] = kept
    data["search_dirs"] = [str(d) for d in search_dirs]
    out = Path(tmp_path) / "assets.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out
