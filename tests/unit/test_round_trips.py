"""Issue 15: fewer round trips on a deploy's critical path, without giving up a safety property.

The S3 parts run against moto's server (the session fixture `s3_server`); the SSH parts with
fakes in place of paramiko.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from fabdeploy.adapters import ssh
from fabdeploy.adapters.bundle import Bundle, publish_bundle
from fabdeploy.adapters.store import Store, StoreError
from fabdeploy.basics.config import Host
from fabdeploy.basics.errors import ConflictError, HostError


@pytest.fixture
def store(moto_store: Store) -> Store:
    return moto_store


def bundle(store: Store, commit: str) -> Bundle:
    key = store.bundle_key(commit)
    return Bundle(
        commit, "main", "f" * 64, 10, key, store.uri(key), uploaded=True, committed_at=1700000000
    )


def sent_expect(store: Store) -> list[Any]:
    seen: list[Any] = []
    store.client.meta.events.register(
        "before-send.s3", lambda request, **kw: seen.append(request.headers.get("Expect"))
    )
    return seen


def test_small_puts_go_in_one_exchange_big_ones_keep_expect_continue(store: Store) -> None:
    seen = sent_expect(store)
    store.client.put_object(Bucket=store.s3.bucket, Key=f"{store.prefix}/small", Body=b"x" * 100)
    store.client.put_object(
        Bucket=store.s3.bucket, Key=f"{store.prefix}/big", Body=b"x" * (2 << 20)
    )
    assert seen == [None, b"100-continue"]


def test_lock_and_pointer_puts_send_no_expect_header(store: Store) -> None:
    seen = sent_expect(store)
    lock = store.acquire_lock("me", "hotfix", 60)
    publish_bundle(store, bundle(store, "a" * 40), log=lambda _: None)
    store.release_lock(lock)
    assert seen and all(e is None for e in seen)


def test_publish_with_a_pointer_read_earlier_stays_conditional(store: Store) -> None:
    """The hotfix reads the pointer while its hosts work: a publish meanwhile is a lost race."""
    read = store.read_pointer(replacing=True)
    publish_bundle(store, bundle(store, "b" * 40), log=lambda _: None)  # someone else, meanwhile
    with pytest.raises(ConflictError, match="lost a race"):
        publish_bundle(store, bundle(store, "c" * 40), log=lambda _: None, read=read)
    assert store.read_pointer()[0].commit == "b" * 40  # type: ignore[union-attr]


def test_deferred_history_lands_and_finish_waits_for_it(store: Store) -> None:
    read = store.read_pointer(replacing=True)
    publish_bundle(
        store, bundle(store, "d" * 40), log=lambda _: None, read=read, defer_history=True
    )
    store.finish_deferred()
    assert [p.commit for p in store.pointer_history()] == ["d" * 40]
    assert store.read_pointer()[0].commit == "d" * 40  # type: ignore[union-attr]


def test_history_is_read_a_window_at_a_time_in_parallel_and_stops_early(store: Store) -> None:
    """A rollback reads the history until it finds its bundle (usually the first or second
    entry): the entries come a window at a time, in parallel, not one GET after another."""
    for c in "abcdefghijkl":  # 12 publishes, newest last
        publish_bundle(store, bundle(store, c * 40), log=lambda _: None)
    gets: list[str] = []
    together = threading.Barrier(4, timeout=20)  # the first window's GETs must be in flight at once

    def on_send(request: Any, **kw: Any) -> None:
        if (
            "/history/" in request.url
            and request.method == "GET"
            and "list-type" not in request.url
        ):
            gets.append(threading.current_thread().name)
            if len(gets) <= 4:
                together.wait()  # one GET after another would time out here

    store.client.meta.events.register("before-send.s3", on_send)
    it = store.pointer_history(limit=100, window=4)
    assert next(it).commit == "l" * 40  # newest first
    assert len(gets) == 4 and all(t.startswith("history") for t in gets)  # one window, no more
    assert [p.commit[0] for p in it] == list("kjihgfedcba")  # the rest, in order
    assert len(gets) == 12
    it.close()


def test_a_deferred_history_failure_is_raised_by_finish(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(pointer: Any) -> None:
        raise StoreError("published dddddddddddd, but could not record it in history: boom")

    monkeypatch.setattr(store, "_write_history", broken)
    publish_bundle(store, bundle(store, "d" * 40), log=lambda _: None, defer_history=True)
    with pytest.raises(StoreError, match="could not record it in history"):
        store.finish_deferred()
    store.finish_deferred()  # reported once


# --- SSH connections opened ahead --------------------------------------------------------


class FakeTransport:
    def __init__(self, active: bool = True) -> None:
        self.active = active

    def is_active(self) -> bool:
        return self.active


class FakeConn:
    def __init__(self, name: str, active: bool = True) -> None:
        self.name = name
        self.closed = False
        self.transport = FakeTransport(active)
        self.client = self

    def get_transport(self) -> FakeTransport:
        return self.transport

    def close(self) -> None:
        self.closed = True


def test_preconnect_hands_each_host_its_opened_connection_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[str] = []
    monkeypatch.setattr(ssh, "connect", lambda cfg, host: FakeConn(host.name))

    def open_connection(cfg: Any, host: Host, conn: Any) -> None:
        if host.name == "down":
            raise HostError(host.name, "cannot connect to down: connection refused")
        opened.append(host.name)

    monkeypatch.setattr(ssh, "open_connection", open_connection)
    hosts = [Host("web1", "web1"), Host("down", "down")]
    with ssh.Preconnect(None, hosts) as pre:  # type: ignore[arg-type]
        conn = pre.take(hosts[0])
        assert isinstance(conn, FakeConn) and conn.name == "web1"
        assert pre.take(hosts[0]) is None  # once: a retry connects afresh
        # Opened too early to judge (a host rebooting then): the worker connects afresh.
        assert pre.take(hosts[1]) is None
        assert pre.take(Host("web9", "web9")) is None
    assert opened == ["web1"]


def test_preconnect_drops_a_connection_that_died_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = FakeConn("web1", active=False)
    monkeypatch.setattr(ssh, "connect", lambda cfg, host: conn)
    monkeypatch.setattr(ssh, "open_connection", lambda cfg, host, c: None)
    with ssh.Preconnect(None, [Host("web1", "web1")]) as pre:  # type: ignore[arg-type]
        assert pre.take(Host("web1", "web1")) is None
    assert conn.closed


def test_preconnect_closes_what_nobody_took(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock held by someone else: the connections opened meanwhile are closed, none leak."""
    conns: list[FakeConn] = []
    gate = threading.Event()

    def connect(cfg: Any, host: Host) -> FakeConn:
        conns.append(FakeConn(host.name))
        return conns[-1]

    monkeypatch.setattr(ssh, "connect", connect)
    monkeypatch.setattr(ssh, "open_connection", lambda cfg, host, conn: gate.wait(5))
    pre = ssh.Preconnect(None, [Host("web1", "web1"), Host("web2", "web2")])  # type: ignore[arg-type]
    pre.close()  # still opening: closed once open
    gate.set()
    pre._pool.shutdown(wait=True)
    assert len(conns) == 2 and all(c.closed for c in conns)


def test_run_parallel_uses_the_preopened_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []

    def connect(cfg: Any, host: Host) -> FakeConn:
        made.append(host.name)
        return FakeConn(host.name)

    monkeypatch.setattr(ssh, "connect", connect)
    monkeypatch.setattr(ssh, "open_connection", lambda cfg, host, conn: None)

    class Cfg:
        parallel = 4

    hosts = [Host("web1", "web1"), Host("web2", "web2")]
    with ssh.Preconnect(Cfg(), hosts[:1]) as pre:  # type: ignore[arg-type]
        res = ssh.run_parallel(
            Cfg(),  # type: ignore[arg-type]
            hosts,
            lambda host, conn: {"conn": conn.name},
            pre=pre,
        )
    assert [r.data["conn"] for r in res] == ["web1", "web2"]
    assert sorted(made) == ["web1", "web2"]  # web1 by the preconnect, web2 in its worker


def test_exec_goes_without_waiting_for_the_reply_and_refuses_a_closed_channel() -> None:
    import paramiko
    from paramiko.common import cMSG_CHANNEL_REQUEST

    sent: list[Any] = []

    class Transport:
        def _send_user_message(self, m: Any) -> None:
            sent.append(m)

    class Channel:
        closed = eof_received = eof_sent = False
        active = True
        remote_chanid = 7
        transport = Transport()

    ssh._exec_without_waiting(Channel(), "node.py activate")  # returns at once: nothing waits
    (m,) = sent
    m.rewind()
    assert m.get_bytes(1) == cMSG_CHANNEL_REQUEST and m.get_int() == 7
    assert m.get_text() == "exec" and m.get_boolean() is True
    assert m.get_text() == "node.py activate"
    Channel.closed = True
    with pytest.raises(paramiko.SSHException):
        ssh._exec_without_waiting(Channel(), "true")


def test_stdin_goes_whole_right_behind_the_exec_then_eof() -> None:
    """invoke's stdin pump sends a file-like stream one byte per 10 ms: a 400-byte presigned
    URL took 4 s to reach the node. The stdin now leaves with the exec request, whole."""
    events: list[Any] = []

    class Transport:
        def _send_user_message(self, m: Any) -> None:
            events.append("exec")

    class Channel:
        closed = eof_received = eof_sent = False
        active = True
        remote_chanid = 7
        transport = Transport()

        def sendall(self, data: bytes) -> None:
            events.append(data)

        def shutdown_write(self) -> None:
            events.append("eof")

    url = b"https://s3.example/b.tar.gz?" + b"X" * 400 + b"\n"
    ssh._exec_without_waiting(Channel(), "node.py activate --url-stdin", stdin=url)
    assert events == ["exec", url, "eof"]  # one write, not 429
    events.clear()
    ssh._exec_without_waiting(Channel(), "true")
    assert events == ["exec"]  # no stdin given: the channel's stdin stays open, as before


# --- a roll learns a rebooted node's outcome from the node's S3 report ---------------------


def test_report_keys_must_be_under_our_nodes_prefix(store: Store) -> None:
    base = f"{store.prefix}/nodes/"
    assert store.report_key_ok(base + "web1.json")
    for bad in (None, 3, "other/nodes/web1.json", base + "a/b.json", base + "..json", base + "x"):
        assert not store.report_key_ok(bad), bad


def test_a_report_counts_only_when_new_and_of_another_boot(store: Store) -> None:
    from fabdeploy.ops import roll

    key = f"{store.prefix}/nodes/web1.json"
    body = {"boot_id": "new", "last_boot": {"boot_id": "new"}, "current": {"commit": "c"}}
    r = roll.BootReport(store, key, '"before"', "old", until=0)  # until passed: no polling
    assert r.fresh(body, '"after"')
    assert not r.fresh(body, '"before"')  # the object read before the reboot
    assert not r.fresh({**body, "boot_id": "old", "last_boot": {"boot_id": "old"}}, '"after"')
    assert not r.fresh({**body, "last_boot": {"boot_id": "older"}}, '"after"')  # no outcome yet
    assert not r.fresh(None, '"after"')  # not JSON


def test_the_roll_takes_the_s3_report_without_waiting_for_ssh(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from fabdeploy.ops import roll

    key = f"{store.prefix}/nodes/web1.json"
    store.client.put_object(Bucket=store.s3.bucket, Key=key, Body=b'{"boot_id": "old"}')
    before = store.read_report(key)
    assert before is not None
    cancelled = threading.Event()

    def ssh_never_back(cfg: Any, host: Any, old: Any, start: Any, cancel: Any) -> Any:
        cancel.wait(30)  # the report must win, and must stop this path
        cancelled.set()
        raise roll._Cancelled

    monkeypatch.setattr(roll, "_wait_back", ssh_never_back)
    import time

    report = roll.BootReport(store, key, before[1], "old", until=time.monotonic() + 30)
    body = {
        "boot_id": "new",
        "last_boot": {"boot_id": "new", "outcome": "activated"},
        "current": {"commit": "c2"},
        "health": {"ok": True, "detail": "200"},
    }
    store.client.put_object(Bucket=store.s3.bucket, Key=key, Body=json.dumps(body).encode())
    boot_id, status, seen = roll._back(None, Host("web1", "web1"), "old", 0.0, report)  # type: ignore[arg-type]
    assert (boot_id, seen) == ("new", "from its S3 report") and status == body
    assert cancelled.wait(5)


def test_the_lock_stays_exclusive_without_expect_continue(store: Store) -> None:
    """If-None-Match still holds on a PUT sent in one exchange: a second deploy is refused."""
    lock = store.acquire_lock("me", "roll", 60)
    with pytest.raises(StoreError, match="deploy lock held by"):
        store.acquire_lock("you", "hotfix", 60)
    store.release_lock(lock)
