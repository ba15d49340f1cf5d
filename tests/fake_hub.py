"""A Hugging Face hub on loopback, serving local directories, for `mlxd pull` tests.

It answers the calls huggingface-hub makes for snapshot_download: the model-info API and
`resolve` HEAD/GET with ETag, X-Repo-Commit, Content-Length and byte ranges. `cut_once` names
files whose first GET stops half-way; `stall_once` names files whose first GET sends half and
then hangs (until the hub closes), so a test can kill the downloading process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


@dataclass
class FakeHub:
    repos: dict[str, Path]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    cut_once: set[str] = field(default_factory=set)
    stall_once: set[str] = field(default_factory=set)
    half_sent: threading.Event = field(default_factory=threading.Event)
    closing: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.handle(self, body=False)

            def do_GET(self) -> None:
                hub.handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self.server is not None
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def handle(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(request.path.split("?")[0])
        self.requests.append((request.command, path, request.headers.get("Range")))
        if path.startswith("/api/models/"):
            return self._info(request, path[len("/api/models/") :])
        if "/resolve/" in path:
            repo, _, rest = path.lstrip("/").partition("/resolve/")
            return self._file(request, repo, rest.partition("/")[2], body)
        return self._send(request, 404, b'{"error": "not found"}', body=body)

    def _info(self, request: BaseHTTPRequestHandler, rest: str) -> None:
        repo = rest.split("/revision/")[0].split("/tree/")[0]
        if repo not in self.repos:
            headers = {"X-Error-Code": "RepoNotFound"}
            return self._send(request, 404, b'{"error": "Repository not found"}', headers)
        if "/tree/" in rest:
            return self._tree(request, repo)
        info = {
            "id": repo,
            "modelId": repo,
            "sha": self.commit,
            "private": False,
            "siblings": [{"rfilename": name} for name in self.files(repo)],
        }
        self._send(request, 200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _tree(self, request: BaseHTTPRequestHandler, repo: str) -> None:
        entries = []
        for name in self.files(repo):
            data = (self.repos[repo] / name).read_bytes()
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            entry = {"type": "file", "path": name, "size": len(data), "oid": blob}
            if len(data) > 1_000_000:
                sha = hashlib.sha256(data).hexdigest()
                entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 130}
            entries.append(entry)
        self._send(request, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

    def _file(self, request: BaseHTTPRequestHandler, repo: str, name: str, body: bool) -> None:
        target = self.repos.get(repo, Path("/nonexistent")) / name
        if not target.is_file():
            return self._send(request, 404, b"", {"X-Error-Code": "EntryNotFound"}, body)
        data = target.read_bytes()
        headers = {
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "X-Repo-Commit": self.commit,
            "Accept-Ranges": "bytes",
        }
        start = _range_start(request.headers.get("Range"))
        if not body:
            return self._send(request, 200, data, headers, body=False)
        if name in self.cut_once or name in self.stall_once:
            stall = name in self.stall_once
            self.cut_once.discard(name)
            self.stall_once.discard(name)
            return self._send_cut(request, data, headers, stall)
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(request, status, data[start:], headers)

    def _send(self, request, status, data, headers=None, body=True) -> None:
        request.send_response(status)
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)

    def _send_cut(self, request, data, headers, stall: bool) -> None:
        request.send_response(200)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data[: len(data) // 2])
        request.wfile.flush()
        self.half_sent.set()
        if stall:
            self.closing.wait(60)
        request.close_connection = True
        with contextlib.suppress(OSError):
            request.connection.shutdown(2)


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header[len("bytes=") :].split("-")[0] or 0)
