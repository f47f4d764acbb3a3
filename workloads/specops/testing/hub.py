"""A local stand-in for the Hugging Face Hub's model file API, for tests without network.

It serves model directories the way the Hub does for `huggingface_hub` (point `HF_ENDPOINT` at
it): repository info (`/api/models/<id>/revision/<rev>`), the recursive tree listing
(`/api/models/<id>/tree/<rev>`) and file downloads (`/<id>/resolve/<rev>/<path>`, with the
`X-Repo-Commit`, `ETag` and size headers the client reads). So the real client code path runs:
revision resolution, snapshot layout in the cache, token headers. With an `uploads` directory it
also takes pushes: repository creation (`/api/repos/create`), the preupload check (every file
"regular", so no LFS or Xet storage is needed) and commits (`/api/models/<id>/commit/<rev>`,
NDJSON with base64 file contents); pushed repositories are then served like the others. It binds
loopback only, can require a bearer token, and counts requests and the file downloads per repository.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    directory: Path
    files: dict[str, Path] = field(init=False)
    commit: str = field(init=False)

    def __post_init__(self) -> None:
        self.files = {
            p.relative_to(self.directory).as_posix(): p
            for p in sorted(self.directory.rglob("*"))
            if p.is_file()
        }
        listing = hashlib.sha1()
        for name, path in self.files.items():
            listing.update(f"{name}:{blob_id(path)}\n".encode())
        self.commit = listing.hexdigest()


def _front_matter_errors(readme: str) -> list[dict[str, str]]:
    """The Hub refuses a model card whose `---` block is not a YAML mapping."""
    import yaml

    if not readme.startswith("---\n"):
        return []
    block = readme[4:].split("\n---", 1)[0]
    try:
        parsed = yaml.safe_load(block)
    except yaml.YAMLError as exc:
        return [{"message": f"invalid YAML: {exc}"}]
    return [] if isinstance(parsed, dict) else [{"message": "metadata must be a mapping"}]


def blob_id(path: Path) -> str:
    """A git blob id, as the Hub reports for each file."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """`with FakeHub({"org/name": directory}) as hub:` ... `HF_ENDPOINT=hub.url`."""

    def __init__(
        self,
        repos: dict[str, Path],
        token: str | None = None,
        host: str = "127.0.0.1",
        uploads: Path | None = None,
    ) -> None:
        self.repos = {repo_id: Repo(Path(directory)) for repo_id, directory in repos.items()}
        self.token = token
        self.uploads = uploads
        self.commits: list[dict[str, Any]] = []
        """Each commit's header (`summary`, ...), in order."""
        self.downloads: Counter[str] = Counter()
        self.refused = 0
        self.requests = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

            def do_POST(self) -> None:
                hub.receive(self)

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _find(self, parts: list[str]) -> tuple[str, Repo, list[str]] | None:
        for size in (2, 1):
            repo_id = "/".join(parts[:size])
            if repo_id in self.repos:
                return repo_id, self.repos[repo_id], parts[size:]
        return None

    def answer(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests += 1
        path = unquote(urlsplit(request.path).path)
        parts = [p for p in path.split("/") if p]
        if parts[:2] != ["api", "models"] and "resolve" not in parts:
            self._send(request, 404, {"error": "not found"}, {}, body)  # other Hub APIs: not served
            return
        if self._refused(request, body, {"X-Error-Code": "GatedRepo"}):
            return
        if parts[:2] == ["api", "models"]:
            found = self._find(parts[2:])
            if found is None:
                self._send(
                    request, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, body
                )
                return
            repo_id, repo, rest = found
            if not rest or rest[0] == "revision":
                if rest and not self._revision_ok(repo, rest[1]):
                    self._send(
                        request,
                        404,
                        {"error": "Revision not found"},
                        {"X-Error-Code": "RevisionNotFound"},
                        body,
                    )
                    return
                siblings = [{"rfilename": name} for name in repo.files]
                self._send(
                    request,
                    200,
                    {"id": repo_id, "sha": repo.commit, "siblings": siblings, "private": False},
                    {},
                    body,
                )
                return
            if rest[0] == "tree":
                tree = [
                    {"type": "file", "oid": blob_id(p), "size": p.stat().st_size, "path": n}
                    for n, p in repo.files.items()
                ]
                self._send(request, 200, tree, {}, body)
                return
        found = self._find(parts)
        if found is not None and len(found[2]) >= 3 and found[2][0] == "resolve":
            repo_id, repo, rest = found
            name = "/".join(rest[2:])
            if not self._revision_ok(repo, rest[1]) or name not in repo.files:
                self._send(
                    request,
                    404,
                    {"error": "Entry not found"},
                    {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit},
                    body,
                )
                return
            data = repo.files[name].read_bytes()
            if body:
                self.downloads[repo_id] += 1
            headers = {
                "X-Repo-Commit": repo.commit,
                "ETag": f'"{blob_id(repo.files[name])}"',
                "Content-Length": str(len(data)),
            }
            request.send_response(200)
            for key, value in headers.items():
                request.send_header(key, value)
            request.send_header("Content-Type", "application/octet-stream")
            request.end_headers()
            if body:
                request.wfile.write(data)
            return
        self._send(request, 404, {"error": "not found"}, {}, body)

    def receive(self, request: BaseHTTPRequestHandler) -> None:
        """The write API `HfApi.create_repo` and `upload_folder` use (see the module docstring)."""
        self.requests += 1
        parts = [p for p in unquote(urlsplit(request.path).path).split("/") if p]
        data = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        if self.uploads is None:
            self._send(request, 405, {"error": "this hub takes no uploads"}, {}, True)
            return
        if self._refused(request, True, {}):
            return
        if parts == ["api", "validate-yaml"]:  # the client checks a README's front matter first
            self._send(request, 200, {"errors": _front_matter_errors(json.loads(data)["content"])}, {}, True)
            return
        if parts == ["api", "repos", "create"]:
            body = json.loads(data)
            repo_id = "/".join(filter(None, (body.get("organization"), body["name"])))
            if repo_id in self.repos:
                answer = {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
                self._send(request, 409, answer, {}, True)  # the Hub's 409 names the repository too
                return
            directory = self.uploads / repo_id
            directory.mkdir(parents=True)
            self.repos[repo_id] = Repo(directory)
            self._send(request, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}, True)
            return
        found = self._find(parts[2:]) if parts[:2] == ["api", "models"] else None
        if found is None or len(found[2]) < 2 or found[2][0] not in ("preupload", "commit"):
            self._send(
                request, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, True
            )
            return
        repo_id, repo, rest = found
        if rest[0] == "preupload":
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                for f in json.loads(data)["files"]
            ]
            self._send(request, 200, {"files": files}, {}, True)
            return
        if rest[1] != "main":  # one branch per repository here; the Hub refuses a missing one so
            headers = {"X-Error-Code": "RevisionNotFound"}
            self._send(request, 404, {"error": f"Invalid rev id: {rest[1]}"}, headers, True)
            return
        for line in data.decode().splitlines():
            entry = json.loads(line)
            if entry["key"] == "header":
                self.commits.append(entry["value"])
            elif entry["key"] == "file":
                target = repo.directory / entry["value"]["path"]
                if not target.resolve().is_relative_to(repo.directory.resolve()):
                    self._send(request, 400, {"error": "path outside the repository"}, {}, True)
                    return
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(entry["value"]["content"]))
            else:
                self._send(request, 400, {"error": f"{entry['key']} is not served here"}, {}, True)
                return
        self.repos[repo_id] = repo = Repo(repo.directory)
        commit = {"commitUrl": f"{self.url}/{repo_id}/commit/{repo.commit}", "commitOid": repo.commit}
        self._send(request, 200, commit, {}, True)

    def _refused(self, request: BaseHTTPRequestHandler, body: bool, headers: dict[str, str]) -> bool:
        """Answer 401 (and count it) when a token is required and the request lacks it."""
        if self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}":
            return False
        self.refused += 1
        self._send(request, 401, {"error": "Invalid credentials"}, headers, body)
        return True

    @staticmethod
    def _revision_ok(repo: Repo, revision: str) -> bool:
        return revision in ("main", repo.commit)

    @staticmethod
    def _send(
        request: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str], body: bool
    ) -> None:
        data = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            request.send_header(key, value)
        request.end_headers()
        if body:
            request.wfile.write(data)
