"""A local webhook receiver for the notification tests (unit and e2e): a real HTTP server on
127.0.0.1 in a thread, recording each JSON post; `mode` makes it answer 500 or hang."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """A local webhook: records each post; `mode` says how it answers."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.requests = 0
        self.mode = "ok"  # ok | fail-once | fail | hang
        self.release = threading.Event()
        self.got = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.got:
                    outer.requests += 1
                    n = outer.requests
                    outer.got.notify_all()
                if outer.mode == "hang":
                    outer.release.wait(30)
                    return
                if outer.mode == "fail" or (outer.mode == "fail-once" and n == 1):
                    self.send_response(500)
                    self.end_headers()
                    return
                with outer.got:
                    outer.posts.append(
                        {
                            "path": self.path,
                            "type": self.headers["Content-Type"],
                            **json.loads(body),
                        }
                    )
                    outer.got.notify_all()
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T000/SECRET"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_requests(self, n: int, timeout: float = 10) -> None:
        with self.got:
            assert self.got.wait_for(lambda: self.requests >= n, timeout), self.requests

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
