"""Debian's HAProxy in front of sandbox hosts, driven through its runtime API (dev tooling).

The e2e test and bench/bench_drain.py put it before a fleet's app ports, health-checked, with
no retries and no redispatch (an ALB does not retry either), and keep a steady client load on
it. As a script it is what deploy.yml's traffic.drain / traffic.restore run on the deploying
machine:

    python3 fabfile/haproxy_lb.py SOCKET drain app web1     # drain, wait until scur is 0, maint
    python3 fabfile/haproxy_lb.py SOCKET restore app web1   # ready, wait until HAProxy says UP

Standard library only: it runs as its own process, outside the venv.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

POLL = 0.05
CONFIG = """\
# Written by fabfile/haproxy_lb.py.
global
    stats socket {sock} mode 600 level admin
    maxconn 500

defaults
    mode http
    retries 0
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout check {check_timeout}

frontend fe
    bind {bind}
    default_backend {backend}

backend {backend}
    balance roundrobin
    option httpchk GET /health
    # A busy 2-core machine: checks every {inter} may be late or slow; a server goes DOWN after
    # {fall} failed ones and UP again after {rise}.
    default-server check inter {inter} fall {fall} rise {rise}
{servers}
"""


def api(sock: str, command: str, timeout: float = 10.0) -> str:
    """One command on HAProxy's admin socket; its whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def servers(sock: str, backend: str) -> dict[str, dict[str, str]]:
    """`show stat` of the backend's servers: name -> {status, scur, ...}."""
    lines = api(sock, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND", None):
            out[row["svname"]] = row
    return out


def _set_state(sock: str, backend: str, server: str, state: str) -> None:
    answer = api(sock, f"set server {backend}/{server} state {state}").strip()
    if answer:  # HAProxy answers nothing on success
        raise SystemExit(f"haproxy: set server {backend}/{server} state {state}: {answer}")


def _wait(what: str, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"haproxy: timed out after {timeout:g}s waiting for {what}")
        time.sleep(POLL)


def drain(sock: str, backend: str, server: str, timeout: float = 60.0) -> None:
    """No new requests, wait for the ones in flight (scur 0), then maintenance."""
    _set_state(sock, backend, server, "drain")
    _wait(
        f"{backend}/{server} to finish its requests",
        lambda: servers(sock, backend)[server]["scur"] == "0",
        timeout,
    )
    _set_state(sock, backend, server, "maint")


def restore(sock: str, backend: str, server: str, timeout: float = 60.0) -> None:
    """Back in rotation; returns once HAProxy's own health check says UP."""
    _set_state(sock, backend, server, "ready")
    _wait(
        f"{backend}/{server} to be UP",
        lambda: servers(sock, backend)[server]["status"] == "UP",
        timeout,
    )


class Balancer:
    """A foreground haproxy process; `stop()` ends it."""

    def __init__(
        self,
        dir: Path,
        bind: str,
        backends: dict[str, str],
        backend: str = "app",
        inter: str = "300ms",
        fall: int = 2,
        rise: int = 2,
        check_timeout: str = "3s",
    ) -> None:
        exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not os.path.exists(exe):
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        dir.mkdir(parents=True, exist_ok=True)
        self.sock = str(dir / "haproxy.sock")
        self.backend = backend
        self.bind = bind
        self.config = dir / "haproxy.cfg"
        self.config.write_text(
            CONFIG.format(
                sock=self.sock,
                bind=bind,
                backend=backend,
                inter=inter,
                fall=fall,
                rise=rise,
                check_timeout=check_timeout,
                servers="\n".join(f"    server {n} {a}" for n, a in backends.items()),
            )
        )
        self.names = list(backends)
        log = open(dir / "haproxy.log", "ab")  # noqa: SIM115 - the child's, closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            [exe, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            self.wait_up(60)
        except BaseException:
            self.stop()
            raise

    def wait_up(self, timeout: float = 60.0) -> None:
        """Until every server is UP in HAProxy's own health checks."""

        def all_up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}; see its log")
            try:
                states = servers(self.sock, self.backend)
            except OSError:
                return False
            return len(states) == len(self.names) and all(
                s["status"] == "UP" for s in states.values()
            )

        deadline = time.monotonic() + timeout
        while not all_up():
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy's servers not all UP within {timeout:g}s")
            time.sleep(POLL)

    def command(self, action: str) -> str:
        """deploy.yml's traffic.drain / traffic.restore (run_on: local) for this balancer."""
        me = Path(__file__).resolve()
        return f"{sys.executable} {me} {self.sock} {action} {self.backend} {{host}}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Load:
    """Client threads sending GET /version through the balancer, each request on a new
    connection, `rate` requests a second in all (steady, without taking the whole machine
    from the deploy it watches); every non-200 answer or connection error is a failure."""

    def __init__(
        self, address: str, threads: int = 2, rate: float = 100.0, timeout: float = 30.0
    ) -> None:
        self.host, _, port = address.rpartition(":")
        self.port = int(port)
        self.timeout = timeout
        self.interval = threads / rate
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self.versions: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _one(self) -> tuple[bool, str]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("GET", "/version")
            r = conn.getresponse()
            body = r.read().decode(errors="replace").strip()
            return r.status == 200, body if r.status == 200 else f"HTTP {r.status}"
        except (OSError, http.client.HTTPException) as e:
            return False, f"{type(e).__name__}: {e}"
        finally:
            conn.close()

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            due += self.interval
            ok, what = self._one()
            with self._lock:
                if ok:
                    self.ok += 1
                    self.versions[what] = self.versions.get(what, 0) + 1
                else:
                    self.failed += 1
                    if len(self.errors) < 20:
                        self.errors.append(what)
            # Behind schedule (a slow answer): go on at once, no burst to catch up.
            due = max(due, time.monotonic())
            self._stop.wait(due - time.monotonic())

    def wait_requests(self, n: int, timeout: float = 60.0) -> None:
        """Until `n` more requests have been answered (the load is really running)."""
        start = self.ok + self.failed
        _wait(f"{n} requests", lambda: self.ok + self.failed >= start + n, timeout)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="drain or restore a server through HAProxy's admin socket"
    )
    p.add_argument("socket")
    p.add_argument("action", choices=("drain", "restore"))
    p.add_argument("backend")
    p.add_argument("server")
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    (drain if args.action == "drain" else restore)(
        args.socket, args.backend, args.server, args.timeout
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
