"""A Hugging Face Hub on 127.0.0.1 for download tests: the routes huggingface_hub's clients call (repo info with
file metadata, the file tree, HEAD/GET of a file), serving one local folder under any `org/name`.

The first part of a repo id picks the answer: `missing/...` and `out/...` do not exist (401 RepoNotFound, as the
Hub answers anonymous clients), `gated/...` lists its files but refuses them (401 GatedRepo); any other repo
serves the folder. `claimed_sizes` makes the Hub claim other sizes for some files (without serving them).
Run the client in a subprocess with HF_ENDPOINT=server.url: huggingface_hub reads it once at import.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _oid(name: str, algo=hashlib.sha1) -> str:
    return algo(name.encode()).hexdigest()


class FakeHub:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.claimed_sizes: dict[str, int] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._answer(self)

            def do_GET(self) -> None:
                hub._answer(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def size(self, name: str) -> int:
        return self.claimed_sizes.get(name, (self.folder / name).stat().st_size)

    def sibling(self, name: str) -> dict:
        entry = {"rfilename": name, "size": self.size(name), "blobId": _oid(name)}
        if name.endswith(".safetensors"):  # stored in LFS, as weights are
            entry["lfs"] = {"size": self.size(name), "sha256": _oid(name, hashlib.sha256), "pointerSize": 134}
        return entry

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(f"{h.command} {path}")
        parts = path.strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo, rest = ("/".join(parts[2:4]), parts[4:]) if api else ("/".join(parts[:2]), parts[2:])
        names = sorted(p.name for p in self.folder.iterdir() if p.is_file())
        if repo.split("/")[0] in ("missing", "out"):
            return self._send(h, 401, {"error": "Repository not found"},
                              {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if api and rest[:1] == ["revision"]:
            return self._send(h, 200, {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                                       "gated": "manual" if repo.startswith("gated/") else False,
                                       "siblings": [self.sibling(n) for n in names]})
        if api and rest[:1] == ["tree"]:
            return self._send(h, 200, [{"type": "file", "path": n, "size": self.size(n), "oid": _oid(n),
                                        **({"lfs": {"oid": s["lfs"]["sha256"], "size": s["size"], "pointerSize": 134}}
                                           if "lfs" in (s := self.sibling(n)) else {})} for n in names])
        if rest[:1] == ["resolve"] and len(rest) >= 3:
            if repo.startswith("gated/"):
                return self._send(h, 401, {"error": "gated"}, {
                    "X-Error-Code": "GatedRepo",
                    "X-Error-Message": f"Access to model {repo} is restricted. You must have access to it and be "
                                       "authenticated to access it. Please log in."})
            name = "/".join(rest[2:])
            s = self.sibling(name)
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{s["blobId"]}"'}
            if "lfs" in s:
                headers |= {"X-Linked-Etag": f'"{s["lfs"]["sha256"]}"', "X-Linked-Size": str(s["size"])}
            return self._send(h, 200, (self.folder / name).read_bytes(), headers)
        self._send(h, 404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, body, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.send_response(code)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if not isinstance(body, bytes):
            h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
