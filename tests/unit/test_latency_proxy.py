"""The sandbox's latency proxy (fabfile/sandbox_files/latency_proxy.py), as a real process
against a real TCP echo server, and the sandbox's latency helpers."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fabfile import sandbox

PROXY = Path(sandbox.FILES) / "latency_proxy.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def echo_port():
    """An echo server, listening before the fixture returns (readiness by construction)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


@pytest.fixture
def start_proxy(tmp_path: Path):
    procs: list[subprocess.Popen] = []

    def start(
        rtt: float, target_port: int, handshake: bool = False, route_handshake: bool | None = None
    ) -> int:
        port = _free_port()
        ready = tmp_path / f"ready-{port}"
        cfg = tmp_path / f"proxy-{port}.json"
        cfg.write_text(
            json.dumps(
                {
                    "rtt": rtt,
                    "handshake": handshake,
                    "ready_file": str(ready),
                    "routes": [
                        ["127.0.0.1", port, "127.0.0.1", target_port]
                        + ([] if route_handshake is None else [route_handshake])
                    ],
                }
            )
        )
        p = subprocess.Popen(
            [sys.executable, str(PROXY), str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        procs.append(p)
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert p.poll() is None, p.stdout.read().decode() if p.stdout else "proxy exited"
            assert time.monotonic() < deadline, "proxy not ready in 20s"
            time.sleep(0.01)
        return port

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


def _roundtrip(s: socket.socket, payload: bytes) -> float:
    t = time.perf_counter()
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(65536)
        assert chunk, "connection closed mid-echo"
        got += chunk
    assert got == payload
    return time.perf_counter() - t


def test_each_round_trip_costs_the_rtt(echo_port: int, start_proxy) -> None:
    port = start_proxy(0.1, echo_port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        times = [_roundtrip(s, f"ping {i}".encode()) for i in range(4)]
    assert min(times) >= 0.1, times


def test_connections_are_not_serialised(echo_port: int, start_proxy) -> None:
    rtt, n = 0.2, 6
    port = start_proxy(rtt, echo_port)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
    try:
        _roundtrip(socks[0], b"warm")  # the proxy has connected upstream
        t = time.perf_counter()
        for s in socks:
            s.sendall(b"x" * 100)
        for s in socks:
            got = b""
            while len(got) < 100:
                got += s.recv(100)
        elapsed = time.perf_counter() - t
    finally:
        for s in socks:
            s.close()
    # Serialised, n echoes would take n * rtt; concurrent ones take about one rtt.
    assert rtt <= elapsed < 2.5 * rtt, elapsed


def test_order_and_bytes_survive_many_small_chunks(echo_port: int, start_proxy) -> None:
    port = start_proxy(0.05, echo_port)
    payload = b"".join(
        i.to_bytes(4, "big") for i in range(100_000)
    )  # 400 kB, every offset distinct
    got = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:

        def reader() -> None:
            while len(got) < len(payload):
                chunk = s.recv(65536)
                if not chunk:
                    return
                got.extend(chunk)

        th = threading.Thread(target=reader)
        th.start()
        for i in range(0, len(payload), 997):
            s.sendall(payload[i : i + 997])
        th.join(30)
    assert bytes(got) == payload


def test_half_close_reaches_the_far_end(echo_port: int, start_proxy) -> None:
    port = start_proxy(0.05, echo_port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"last words")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(100):
            got += chunk
    assert got == b"last words"  # and then EOF: the echo server saw ours and closed


def test_handshake_charges_one_round_trip_per_connection(echo_port: int, start_proxy) -> None:
    rtt = 0.1
    port = start_proxy(rtt, echo_port, handshake=True)
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        _roundtrip(s, b"hello")
        first = time.perf_counter() - t
        second = _roundtrip(s, b"again")
    assert first >= 2 * rtt, first  # handshake + the echo
    assert second >= rtt, second
    assert second < first


def test_a_route_can_override_the_handshake_charge(echo_port: int, start_proxy) -> None:
    rtt = 0.1
    port = start_proxy(rtt, echo_port, handshake=False, route_handshake=True)
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        _roundtrip(s, b"hello")
    assert time.perf_counter() - t >= 2 * rtt


def test_refused_target_is_a_reset_after_a_round_trip(start_proxy) -> None:
    rtt = 0.1
    port = start_proxy(rtt, _free_port(), handshake=True)  # nothing listens there
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            data = s.recv(10)
        except ConnectionResetError:
            data = b""
    assert data == b""
    assert time.perf_counter() - t >= rtt


# --- the sandbox's side ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("100ms", 0.1),
        ("0.1s", 0.1),
        ("100", 0.1),
        ("0", 0.0),
        (" 50MS ", 0.05),
        ("2s", 2.0),
        (None, 0.0),
        (200, 0.2),
    ],
)
def test_parse_rtt(text, seconds) -> None:
    assert sandbox.parse_rtt(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["fast", "-5ms", "100us", "20s"])
def test_parse_rtt_rejects(text) -> None:
    with pytest.raises(sandbox.SandboxError, match="rtt"):
        sandbox.parse_rtt(text)


def test_latency_addresses_are_distinct_per_subnet() -> None:
    assert sandbox.latency_ip("127.0.10.3") == "127.128.10.3"
    assert sandbox.latency_ip("127.200.1.2") == "127.72.1.2"
    assert sandbox.s3_name("127.0.10") != sandbox.s3_name("127.0.11")


def test_etc_hosts_line_added_replaced_and_removed(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    original = "127.0.0.1 localhost\n::1 ip6-localhost"  # no final newline
    hosts.write_text(original)
    name = "s3-0-99.sandbox.internal"
    a, b = tmp_path / "a", tmp_path / "b"
    sandbox._set_etc_hosts(name, "127.128.99.255", a, path=hosts)
    sandbox._set_etc_hosts(name, "127.128.99.255", a, path=hosts)  # idempotent
    lines = hosts.read_text().splitlines()
    assert lines[:2] == original.splitlines()
    assert [ln.split()[:2] for ln in lines[2:]] == [["127.128.99.255", name]]
    # Another dir's sandbox on the same subnet (the first one died) takes the name over...
    sandbox._set_etc_hosts(name, "127.128.99.255", b, path=hosts)
    assert hosts.read_text().count(name) == 1 and str(b) in hosts.read_text()
    # ...and the dead one's down leaves it alone; its own down removes it.
    sandbox._set_etc_hosts(name, None, a, path=hosts)
    assert str(b) in hosts.read_text()
    sandbox._set_etc_hosts(name, None, b, path=hosts)
    assert hosts.read_text() == original + "\n"
