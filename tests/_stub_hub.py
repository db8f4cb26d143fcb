"""Test helper: a Hugging Face Hub endpoint on localhost, for ``huggingface_hub``'s real client.

It answers the calls a small ``upload_folder`` makes (create the repository, check the model card's
metadata, ask each file's upload mode: always ``regular``, i.e. inline; the commit with the files base64-encoded in its
NDJSON body) and keeps each repository's files in memory. Any other call is a 404 and is recorded,
so a test sees the client asking for something new.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.unknown: list[str] = []
        self.tokens: list[str | None] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.tokens.append(self.headers.get("Authorization"))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(body)
                    repo = f"{req.get('organization') or 'user'}/{req['name']}" if "/" not in req["name"] else req["name"]
                    hub.repos.setdefault(repo, {})
                    return self._json({"url": f"{hub.url}/{repo}", "name": repo})
                if parts[:2] == ["api", "validate-yaml"]:  # the model card's metadata
                    return self._json({"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                 for f in files]})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit":
                    repo = f"{parts[2]}/{parts[3]}"
                    for line in body.decode().splitlines():
                        op = json.loads(line)
                        if op["key"] == "file":
                            hub.repos.setdefault(repo, {})[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                    return self._json({"commitUrl": f"{hub.url}/{repo}/commit/1", "commitOid": "1" * 40,
                                       "pullRequestUrl": None})
                hub.unknown.append(f"POST {self.path}")
                self._json({"error": "not found"}, 404)

            def do_GET(self) -> None:  # noqa: N802
                hub.unknown.append(f"GET {self.path}")
                self._json({"error": "not found"}, 404)

            def _json(self, doc, code: int = 200) -> None:
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "StubHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
