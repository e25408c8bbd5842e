"""A few lines of HTTP standing in for the Kubernetes API server: it records the PATCH requests
the trainer sends (finetune_trainer.kubeapi), so tests see exactly what it reports. The same
requests against the real API server: tests/integration/test_trainer_status_api.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import yaml


class Recorder:
    """What the fake API server received, and how it answers."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status_code = 200
        self.lock = threading.Lock()

    @property
    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [request["body"] for request in self.requests]


def _handler(recorder: Recorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:
            length = int(self.headers["Content-Length"])
            body = json.loads(self.rfile.read(length))
            with recorder.lock:
                recorder.requests.append(
                    {
                        "path": self.path,
                        "content_type": self.headers["Content-Type"],
                        "authorization": self.headers["Authorization"],
                        "body": body,
                    }
                )
            ok = recorder.status_code == 200
            answer = {"kind": "FineTuneJob"} if ok else {"kind": "Status", "message": "refused"}
            payload = json.dumps(answer).encode()
            self.send_response(recorder.status_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def fake_apiserver(directory: Path) -> Iterator[tuple[Recorder, Path]]:
    """Serve on a free loopback port; yields the recorder and a kubeconfig pointing at it."""
    recorder = Recorder()
    server = HTTPServer(("127.0.0.1", 0), _handler(recorder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}
        ],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = directory / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    try:
        yield recorder, path
    finally:
        server.shutdown()
        server.server_close()
