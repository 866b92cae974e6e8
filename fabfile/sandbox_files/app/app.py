#!/usr/bin/env python3
"""Sample app for the fabdeploy sandbox: GET /health -> "ok", GET /version -> REVISION,
GET /deps -> the version of the dependency the build step vendored (vendor/), or "none"."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Resolved once at start-up: `current` is a symlink that a later deploy may repoint, but this
# process must keep reporting the release it was started from.
RELEASE_DIR = os.path.dirname(os.path.realpath(__file__))


def read_revision() -> str:
    try:
        with open(os.path.join(RELEASE_DIR, "REVISION")) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def vendored_version() -> str:
    """What `build:` put in vendor/ (pip install --target vendor ...); the app ships no deps itself."""
    vendor = os.path.join(RELEASE_DIR, "vendor")
    if vendor not in sys.path:
        sys.path.insert(0, vendor)
    try:
        import fabdeploy_sample_dep  # noqa: PLC0415 - only there when the build vendored it
    except ImportError:
        return "none"
    return str(fabdeploy_sample_dep.VERSION)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/health":
            self.reply(200, "ok")
        elif self.path == "/version":
            self.reply(200, read_revision())
        elif self.path == "/deps":
            self.reply(200, vendored_version())
        else:
            self.reply(404, "not found")

    def reply(self, status: int, body: str) -> None:
        data = (body + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    # Also serve on this port: the sandbox's latency proxy does not forward it, so only the host
    # itself reaches it, as with an app behind a bastion (`fab sandbox.up --private-port`).
    parser.add_argument("--private-port", type=int)
    args = parser.parse_args()
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer((args.bind, args.port), Handler)
    if args.private_port:
        private = ThreadingHTTPServer((args.bind, args.private_port), Handler)
        threading.Thread(target=private.serve_forever, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(
        f"serving {RELEASE_DIR} (revision {read_revision()}) on {args.bind}:{args.port}", flush=True
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
